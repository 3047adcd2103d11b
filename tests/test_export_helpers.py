"""Shared by the export and evaluation tests: one real tiny training run, trained once per session.

The run is the tiny recipe narrowed to one easy task (copy 3 symbols of 4 across 2 segments) so
that 250 steps on 2 CPU ranks under ZeRO-3 (about a minute) learn it: the evaluation test needs
memory that works, the export tests need a checkpoint written by 2 ranks. Checkpoints at steps
125 and 250; the trainer's own end-of-run export lands in runs/tiny/export.
"""

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_RUN_STEPS = 250
TINY_RUN_OVERRIDES = [
    "run.name=tiny",
    f"run.max_steps={TINY_RUN_STEPS}",
    "checkpoint.every=125",
    "eval.every=0",
    "eval.memory_task_segments=[2]",
    "eval.memory_task_samples=64",
    "curriculum.schedule=[[0,2]]",
    "data.memory_tasks.tasks=[copy]",
    "data.memory_tasks.span_length=3",
    "data.memory_tasks.alphabet_size=4",
    "optim.lr=3e-3",
]


def repo_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra)
    return env


def tiny_run(tmp_path_factory) -> Path:
    """runs/tiny trained by the real trainer (2 ranks, ZeRO-3); reused by every test of the session.

    RMT_TINY_RUN_DIR=DIR keeps the run in DIR across sessions (for working on these tests);
    delete DIR after changing the trainer or the recipe.
    """
    runs = Path(os.environ.get("RMT_TINY_RUN_DIR") or tmp_path_factory.getbasetemp() / "tiny_runs")
    run = runs / "tiny"
    if (run / "export" / "config.json").is_file():
        return run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training.pretrain", "--config", "configs/tiny_cpu.yaml", f"run.runs_dir={runs}",
           *TINY_RUN_OVERRIDES]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=repo_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"tiny training run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return run
