"""Tiny training runs for launch tests, and what a run left on disk."""
from __future__ import annotations

import re
from pathlib import Path

# A run of a few seconds per step-free phase: tiny batch, 2 segments, no periodic evaluation,
# one small memory-task eval at the end.
TINY_OVERRIDES = [
    "batch.micro_batch_size=4", "batch.global_batch_size=8", "curriculum.schedule=[[0,2]]",
    "eval.every=0", "eval.batches=1", "eval.memory_task_samples=8", "eval.memory_task_segments=[2]",
    "logging.every=1", "logging.progress_bar=false",
]


def tiny_args(runs_dir: Path, name: str, max_steps: int, *extra: str) -> list[str]:
    return ["--config", "configs/tiny_cpu.yaml", f"run.runs_dir={runs_dir}", f"run.name={name}",
            f"run.max_steps={max_steps}", *TINY_OVERRIDES, *extra]


def complete_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints whose completion marker exists, oldest first."""
    ckpts = run_dir / "checkpoints"
    if not ckpts.is_dir():
        return []
    return sorted(int(d.name.split("_")[1]) for d in ckpts.glob("step_*") if (d / "COMPLETE").is_file())


def train_log(run_dir: Path) -> str:
    path = run_dir / "train.log"
    return path.read_text(errors="replace") if path.is_file() else ""


def resumed_step(run_dir: Path) -> list[int]:
    """Steps the run resumed from, in order (the trainer logs 'resumed from PATH (step N)')."""
    return [int(m) for m in re.findall(r"resumed from \S+ \(step (\d+)\)", train_log(run_dir))]
