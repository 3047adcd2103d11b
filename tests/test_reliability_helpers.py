"""Shared by the reliability tests (issue 5): tiny real runs, launched with or without torchrun,
and what they left on disk. No tests here."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from tests.cluster.env import clean_launch_env

REPO = Path(__file__).resolve().parents[1]
# Every step is real DeepSpeed ZeRO-3 work on a model small enough that a step takes ~0.1 s.
TINY = ["run.export=false", "logging.every=1", "logging.progress_bar=false",
        "optim.warmup_steps=3", "optim.lr=3e-3", "eval.every=0", "eval.batches=1",
        "eval.memory_task_samples=8", "eval.memory_task_segments=[2]",
        "curriculum.schedule=[[0,2]]", "model.backbone.hidden_size=32",
        "model.backbone.intermediate_size=64", "model.backbone.num_attention_heads=2",
        "model.backbone.num_key_value_heads=2", "batch.global_batch_size=null",
        "batch.micro_batch_size=4", "deepspeed.zero_stage=3"]


def run_args(run_dir: Path, *extra: str) -> list[str]:
    return ["-m", "training.pretrain", f"run.runs_dir={run_dir.parent}",
            f"run.name={run_dir.name}", *TINY, *extra]


def console_path(run_dir: Path, rank: int | None = None) -> Path:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    suffix = "" if rank is None else f".rank{rank}"
    return run_dir.parent / f"{run_dir.name}.console{suffix}.log"


def _env(**extra: str) -> dict[str, str]:
    return clean_launch_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def launch_torchrun(run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """2 ranks under torchrun (whose agent stops the other workers when one fails)."""
    log = open(console_path(run_dir), "a")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *run_args(run_dir, *extra)]
    return subprocess.Popen(cmd, cwd=REPO, env={**_env(), **(env or {})}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_bare(run_dir: Path, *extra: str, port: int) -> list[subprocess.Popen]:
    """2 ranks as independent processes, as on two machines: no agent watches them, so when
    one dies the other learns it only through its collectives."""
    procs = []
    for rank in range(2):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log = open(console_path(run_dir, rank), "a")
        procs.append(subprocess.Popen([sys.executable, *run_args(run_dir, *extra)], cwd=REPO,
                                      env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return procs


def console(run_dir: Path, rank: int | None = None) -> str:
    path = console_path(run_dir, rank)
    return path.read_text(errors="replace") if path.exists() else ""


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> train loss; a step logged twice (crashed, then resumed) keeps its last value."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            out[rec["step"]] = rec["train/loss"]
    return out


def complete_steps(run_dir: Path) -> list[int]:
    return sorted(int(d.name.split("_")[1]) for d in (run_dir / "checkpoints").glob("step_*")
                  if (d / "COMPLETE").is_file())


def all_steps(run_dir: Path) -> list[int]:
    return sorted(int(d.name.split("_")[1]) for d in (run_dir / "checkpoints").glob("step_*"))
