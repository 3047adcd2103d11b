"""Pretrain an RMT: `python -m training.pretrain --config configs/NAME.yaml [key.path=value ...]`.

Config precedence: dataclass defaults < the recipe YAML < `key.path=value` overrides (see
training/config.py). The whole config is validated before anything starts: a bad one prints
every problem at once and exits 2 without creating the run directory.

Exit codes: 0 trained (or saved and stopped on SIGTERM/SIGUSR1), 2 bad input (config, checkpoint,
data state, precision the accelerator lacks), 3 aborted after guard.max_nonfinite_in_a_row
non-finite steps in a row (the checkpoints on disk are left as they were), anything else: a crash
(e.g. 1 when a peer rank died and a collective failed).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Optional

from training.config import ConfigError, TrainConfig, load_config
from training.run_dir import RunDir

DEFAULT_RECIPE = "configs/tiny_cpu.yaml"
EXIT_BAD_INPUT = 2
log = logging.getLogger("training")


def launch_world_size(env=os.environ) -> int:
    """World size the launcher announces, read before any process group exists (for validation).
    Falls back to 1 when the launcher does not say; the trainer re-checks after rendezvous."""
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"):
        if env.get(var, "").isdigit():
            return int(env[var])
    if "SLURM_STEP_ID" in env and env.get("SLURM_NTASKS", "").isdigit():
        return int(env["SLURM_NTASKS"])
    return 1


def launch_rank(env=os.environ) -> int:
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        if env.get(var, "").isdigit():
            return int(env[var])
    return 0


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.pretrain", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_RECIPE, help="recipe YAML "
                        f"(default {DEFAULT_RECIPE})")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="config overrides, e.g. optim.lr=3e-4 run.max_steps=100")
    # DeepSpeed's launcher (and torch.distributed.launch) append it to every rank's arguments.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by launchers; LOCAL_RANK in the environment wins when both are set")
    args = parser.parse_args(argv)
    if args.local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return args


def where(cfg: TrainConfig) -> str:
    run = RunDir(cfg.run_dir)
    return "\n".join([
        f"  run directory : {run.path}",
        f"  config        : {run.config}",
        f"  log file      : {run.log}",
        f"  tensorboard   : tensorboard --logdir {run.tensorboard}",
        f"  checkpoints   : {run.checkpoints}",
        f"  export        : {run.export}" + ("" if cfg.run.export else " (run.export=false)"),
    ])


def fail(message: str, rank: int) -> int:
    if rank == 0:
        print(message, file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: Optional[list[str]] = None) -> int:
    # torch 2.13 deprecates the all-gather and reduce-scatter that DeepSpeed 0.19 issues on every
    # ZeRO-3 fetch and gradient reduction; the warning is not actionable by users and would flood
    # the console (thousands of lines per run).
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=".*(all_gather_into_tensor|reduce_scatter_tensor).*")
    args = parse_args(argv)
    from training.agent_watch import die_with_agent
    from training.signals import install_stop_signal_handlers
    die_with_agent()  # an orphaned worker would keep writing into the run folder
    install_stop_signal_handlers()
    rank_hint = launch_rank()
    from deepspeed.accelerator import get_accelerator

    try:
        # The whole gate, the accelerator's precisions included, before any distributed work.
        cfg = load_config(args.config, args.overrides, world_size=launch_world_size(),
                          accelerator=get_accelerator())
    except ConfigError as e:
        return fail(e.report(), rank_hint)

    from training.distributed import DistributedSetupError, destroy, init_distributed

    try:
        # Set-up (rendezvous, engine build, ZeRO-3 partitioning, resume) runs under the longer
        # timeout; _run switches to distributed.timeout_s once the trainer is ready.
        dist = init_distributed(timeout_s=cfg.distributed.setup_timeout_s,
                                rendezvous_timeout_s=cfg.distributed.setup_timeout_s)
    except DistributedSetupError as e:
        return fail(f"launch environment: {e}", rank_hint)
    # The world the rendezvous formed is what the batch must split over (the launcher's
    # announcement checked above is usually, not always, the same).
    problems = cfg.batch.problems(dist.world_size)
    if problems:
        destroy()
        return fail(ConfigError(problems).report(), dist.rank)
    from training.checkpoint import CheckpointError, verify_checkpoint
    from training.run_dir import resolve_resume

    try:
        # Before anything is written: a damaged or mismatched checkpoint is bad input, and
        # `auto` never falls back to an older checkpoint or to a fresh start behind the user's back.
        resume_from = resolve_resume(RunDir(cfg.run_dir).checkpoints, cfg.checkpoint.resume)
        if resume_from is not None:
            # Another world size or ZeRO stage continues through the universal format when the
            # global batch and the data can continue exactly (training.elastic).
            verify_checkpoint(resume_from, dist.world_size, cfg.data.reshard,
                              zero_stage=cfg.deepspeed.zero_stage,
                              global_batch_size=cfg.batch.for_world(dist.world_size)
                              .global_batch_size, elastic_shards=cfg.data.elastic_shards)
    except CheckpointError as e:
        destroy()
        return fail(f"cannot resume: {e}", dist.rank)

    status, outcome = _run(cfg, dist, resume_from)
    destroy()
    # A preempted run exports nothing: the signal's grace period is for the checkpoint, and the
    # requeued job exports when it finishes.
    if status == 0 and outcome == "done" and dist.rank == 0 and cfg.run.export:
        status = _export(cfg)
    return status


def _run(cfg: TrainConfig, dist, resume_from) -> tuple[int, str]:
    """Train; returns (exit status, outcome: 'done' | 'preempted' | 'failed')."""
    import torch

    from training.checkpoint import CheckpointError, write_atomic
    from training.data.errors import DataSourceError, DataStateError
    from training.data.rank0_first import resolve_rank0_first
    from training.distributed import barrier, set_collective_timeout
    from training.monitor import Monitor, setup_logging
    from training.trainer import EXIT_NONFINITE, NonFiniteAbort, Trainer
    from training.wandb_sink import WandbError, open_wandb

    run_dir = cfg.run_dir
    if dist.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    setup_logging(RunDir(run_dir).log if dist.rank == 0 else None, dist.rank)
    threads = "" if dist.device is not None else f", {torch.get_num_threads()} CPU thread(s) per rank"
    log.info("run %s on %d rank(s) (%s)%s, ZeRO-%d, %s, batch %s\n%s", cfg.run.name,
             dist.world_size, dist.launcher, threads, cfg.deepspeed.zero_stage,
             cfg.deepspeed.precision, cfg.batch.describe(dist.world_size), where(cfg))

    trainer = Trainer(cfg, dist)
    monitor = wandb_run = None
    try:
        try:
            # What the config gate cannot see offline (a hub tokenizer or dataset that is not in
            # the local cache and turns out missing) fails here, on every rank alike: bad input.
            # Hub datasets first: rank 0 resolves them while the others wait (rank0_first.py).
            resolve_rank0_first(cfg.data, dist.rank)
            # W&B before the model: missing credentials stop every rank here (wandb_sink.py).
            wandb_run = open_wandb(cfg, dist.rank, resumed=resume_from is not None)
            trainer.setup()
        except (DataSourceError, WandbError) as e:
            return fail(f"cannot start: {e}", dist.rank), "failed"
        try:
            if resume_from is not None:
                trainer.resume(resume_from)
        except (CheckpointError, DataStateError) as e:
            return fail(f"cannot resume: {e}", dist.rank), "failed"
        if dist.rank == 0:
            # Only now: config.yaml describes the run's checkpoints (export and evaluate read it),
            # so a config that could not start or resume them must not replace it.
            write_atomic(RunDir(run_dir).config, cfg.to_yaml())
        set_collective_timeout(cfg.distributed.timeout_s)  # set-up is over: training's bound
        monitor = Monitor(run_dir, enabled=dist.rank == 0, tensorboard=cfg.logging.tensorboard,
                          progress_bar=cfg.logging.progress_bar, start_step=trainer.step,
                          max_steps=cfg.run.max_steps, every=cfg.logging.every, wandb=wandb_run)
        outcome = trainer.train(monitor)
        if outcome == "done":
            monitor.hparams(cfg.flat_dict(), {k: v for k, v in trainer.latest_metrics.items()
                                              if k.startswith("eval/")})
    except NonFiniteAbort as e:
        log.error("%s", e)
        if monitor is not None:
            monitor.close()
        logging.shutdown()
        # Leave without tearing down the engine and process group: every rank aborts at the same
        # step, and torch's C++ teardown racing the peer's exit was seen to SIGABRT a rank
        # ("terminate called without an active exception") instead of returning exit code 3.
        # Checkpoints are complete on disk; TensorBoard and the log are flushed above.
        os._exit(EXIT_NONFINITE)
    finally:
        if monitor is not None:
            monitor.close()
        elif wandb_run is not None:
            wandb_run.close()  # set-up failed after the W&B run started
        trainer.close()
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in sorted(trainer.latest_metrics.items())
                        if k.startswith("eval/"))
    log.info("%s at step %d (%s)\n%s", "stopped on signal, checkpoint saved" if outcome ==
             "preempted" else "finished", trainer.step, metrics, where(cfg))
    if outcome == "preempted":
        return 0, outcome
    return (0, outcome) if trainer.step >= cfg.run.max_steps else (1, "failed")


def _export(cfg: TrainConfig) -> int:
    """Export the final checkpoint to run_dir/export, replacing an export of an older step."""
    from training.export import export_run

    out = RunDir(cfg.run_dir).export
    # export_run stages into a sibling folder and replaces `out` only after the reload check passes,
    # and logs what it exported.
    export_run(cfg.run_dir, out_dir=out, step=None, overwrite=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
