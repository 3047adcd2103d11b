"""What a run reports: TensorBoard scalars (SPEC 2.4) and hparams, metrics.jsonl, train.log,
progress, and with logging.wandb the same scalars and the config to W&B (training.wandb_sink).

Only rank 0 writes; other ranks get a Monitor whose methods do nothing but log warnings.
Progress: a tqdm bar when rank 0's stderr is a terminal and logging.progress_bar is true;
otherwise (Slurm's slurm-*.out, CI logs, pipes) one plain log line, no '\r', at every
logging.every-th step and at max_steps: step/max_steps, loss, tokens/s and the ETA from the
average wall time per step since training (re)started, evals and checkpoints included
(Hugging Face's own bars, e.g. model.init_from's "Loading weights", are turned off then too).
At the end of a finished run, the HParams tab gets the resolved config's scalar settings
(dotted keys: optim.lr, batch.global_batch_size, ...) and the final eval/* metrics (the last
values of those scalar tags), so runs can be compared side by side.
Scalar tags (TensorBoard groups by the prefix before '/'):
  train/loss, train/ppl, train/loss_segment_{i}, train/lr, train/grad_norm, train/skipped_steps,
  train/tokens_per_s, train/samples_seen, train/num_segments, train/step_time_s, train/mfu (GPU),
  train/loss_scale (fp16),
  system/memory_gb (GPU: peak allocated; CPU: resident set size),
  eval/loss, eval/loss_segment_{i}, eval/memory_exact_match_{n}seg, eval/memory_token_acc_{n}seg
  (babilong: eval/babilong_{task}_exact_match_{n}seg, ..._token_acc_{n}seg)
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch

from training.run_dir import RunDir

log = logging.getLogger("training")

# Dense bf16 peak TFLOP/s per device, for MFU when logging.peak_tflops is not given.
PEAK_TFLOPS_BY_GPU_NAME = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
                           "A10G": 125.0, "A10": 125.0, "L4": 121.0, "V100": 125.0}


def memory_gb() -> float:
    """Peak accelerator memory on GPUs; resident set size of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_flops_per_device(configured_tflops: Optional[float]) -> Optional[float]:
    if configured_tflops is not None:
        return configured_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS_BY_GPU_NAME.items():
        if key in name:
            return tflops * 1e12
    return None


def setup_logging(log_file: Optional[Path], rank: int) -> None:
    """train.log + console on rank 0; warnings only elsewhere, tagged with the rank."""
    root = logging.getLogger("training")
    root.handlers.clear()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    root.addHandler(console)
    if log_file is not None:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(fmt)
        root.addHandler(handler)
    quiet_hub_progress_bars()


def quiet_hub_progress_bars() -> None:
    """Turn off transformers' and huggingface_hub's tqdm bars ("Loading weights" of
    model.init_from, hub downloads, export's reload) when stderr is not a terminal: in
    slurm-*.out and CI logs each redraw is a line of '\\r' noise. The trainer, evaluate and
    export all call this one."""
    if sys.stderr is None or sys.stderr.isatty():
        return
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()


def segment_scalars(prefix: str, segment_losses: list[float]) -> dict[str, float]:
    return {f"{prefix}/loss_segment_{i}": v for i, v in enumerate(segment_losses)
            if not math.isnan(v)}


class Monitor:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, progress_bar: bool,
                 start_step: int, max_steps: int, every: int = 1, wandb=None):
        """`wandb`: rank 0's W&B run (training.wandb_sink.open_wandb), or None."""
        self.enabled = enabled
        self.writer = None
        self.wandb = wandb if enabled else None
        self.bar = None
        self.every, self.start_step, self.max_steps = every, start_step, max_steps
        self.started = time.perf_counter()
        self.metrics_file = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(RunDir(run_dir).tensorboard))
        self.metrics_file = open(RunDir(run_dir).metrics, "a")
        if progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr)

    def text(self, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, 0)

    def scalars(self, step: int, values: dict[str, float], kind: str) -> None:
        """Record `values` at `step` in TensorBoard and as one JSON line of metrics.jsonl."""
        if not self.enabled:
            return
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(step, values)
        # repr-exact floats: the resume test compares losses bit for bit.
        self.metrics_file.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self.metrics_file.flush()

    def progress(self, step: int, metrics: dict[str, float]) -> None:
        """`step` is done: move the bar, or log a progress line at logging.every and the end."""
        if not self.enabled:
            return
        loss = metrics["train/loss"]
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({"loss": f"{loss:.4f}", "seg": int(metrics["train/num_segments"])},
                                 refresh=False)
            return
        if step % self.every and step != self.max_steps:
            return
        per_step = (time.perf_counter() - self.started) / max(step - self.start_step, 1)
        eta = timedelta(seconds=round(per_step * (self.max_steps - step)))
        log.info("step %d/%d  loss %.4f  tokens/s %.0f  ETA %s", step, self.max_steps, loss,
                 metrics["train/tokens_per_s"], eta)

    def hparams(self, settings: dict[str, object], metrics: dict[str, float]) -> None:
        """The HParams tab: `settings`' int/float/bool/str values and the metric tags `metrics`
        names, whose values TensorBoard takes from those scalars' last events in this run."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        scalars = {k: v for k, v in settings.items() if isinstance(v, (bool, int, float, str))}
        for summary in hparams(scalars, metrics):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None  # the W&B run finishes once, however often close() is called
