"""Weights & Biases for a run (logging.wandb): rank 0 only, started by the entry point before the
model is built (open_wandb), fed and finished by training.monitor.

The same scalars under the same tags as TensorBoard (training.monitor lists them), at the same
steps; the resolved config (config.yaml's tree) as the W&B run's config. wandb is imported here
only, and only when logging.wandb is true.

One W&B run per training run: its id is kept in runs/NAME/wandb_run_id, and a run that resumes
from a checkpoint continues that W&B run (resume="allow") instead of starting a new one each
restart. W&B keeps one value per step and ignores steps below its last one, so steps logged after
the checkpoint and before the crash keep the first attempt's values there (TensorBoard and
metrics.jsonl hold both). W&B's local files go to $WANDB_DIR, else to runs/NAME/wandb/.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Optional

from training.run_dir import METRICS_FILE, RunDir

log = logging.getLogger("training")


class WandbError(RuntimeError):
    """The W&B run could not be started; the message says what to set."""


def run_id(run_dir: Path, resumed: bool) -> str:
    """The W&B run id: the stored one when the training run resumes, else a new one (stored).
    Written before the W&B run starts, so a run killed during start-up still finds it."""
    id_file = RunDir(run_dir).wandb_id
    if resumed and id_file.is_file() and id_file.read_text().strip():
        return id_file.read_text().strip()
    new = secrets.token_hex(6)  # W&B ids: letters and digits, unique within the project
    id_file.write_text(new + "\n")
    return new


def open_wandb(config, rank: int, resumed: bool) -> Optional["WandbSink"]:
    """Rank 0's W&B run (None elsewhere, and when logging.wandb is off), started before the
    model is built: when W&B cannot start (no credentials for online mode, ...), every rank
    raises the same WandbError, which the entry point reports as bad input (exit 2)."""
    if not config.logging.wandb:
        return None
    from training.data.rank0_first import broadcast_from_rank0

    sink, error = None, None
    if rank == 0:
        try:
            sink = WandbSink(config.run_dir, config, resumed)
        except WandbError as e:
            error = str(e)
    error = broadcast_from_rank0(error)
    if error:
        raise WandbError(error)
    return sink


class WandbSink:
    def __init__(self, run_dir: Path, config, resumed: bool):
        """`config`: the resolved TrainConfig; `resumed`: the trainer starts from a checkpoint."""
        import wandb

        log_cfg = config.logging
        kwargs = {}
        if log_cfg.wandb_mode is not None:
            kwargs["mode"] = log_cfg.wandb_mode
        if not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = str(run_dir)
        run = run_id(run_dir, resumed)
        try:
            self.run = wandb.init(
                project=log_cfg.wandb_project, entity=log_cfg.wandb_entity,
                name=log_cfg.wandb_run_name or config.run.name, id=run,
                resume="allow", config=config.to_dict(),
                # train.log already keeps the console; W&B wrapping rank 0's stderr would also
                # capture the progress lines a second time.
                settings=wandb.Settings(console="off"), **kwargs)
        except Exception as e:  # wandb raises UsageError, CommError, timeouts, ...
            raise WandbError(f"logging.wandb: cannot start the W&B run ({type(e).__name__}: {e}); "
                             f"log in (WANDB_API_KEY or `wandb login`), set "
                             f"logging.wandb_mode=offline, or logging.wandb=false") from e

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.run is None:
            return
        try:
            # commit=False: train and eval scalars of one step are one W&B history row, written
            # when a later step is logged or at finish.
            self.run.log(dict(values), step=step, commit=False)
        except Exception as e:
            self._give_up("log", e)

    def close(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as e:
            self._give_up("finish", e)
        self.run = None

    def _give_up(self, what: str, error: Exception) -> None:
        """W&B is a second copy of what TensorBoard and metrics.jsonl keep: when its service is
        gone (Slurm's SIGTERM at preemption reaches the wandb-core process too, and every later
        call raises ConnectionResetError), training goes on to its checkpoint without it."""
        import wandb

        log.warning("W&B %s failed (%s: %s); logging to W&B stops here, TensorBoard and %s "
                    "keep every scalar", what, type(error).__name__, error, METRICS_FILE)
        self.run = None
        try:
            wandb.teardown()  # else its exit hook reports the same lost connection again
        except Exception:
            pass
