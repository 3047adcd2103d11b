"""`deepspeed launch/pretrain.sh`, the users' own command, on one machine (issue 17, SPEC 2.6).

DeepSpeed's launcher runs the file as `python -u launch/pretrain.sh --local_rank=N ...`; the file is
both a bash script and a Python program that hands each rank back to the bash part (rank mode).
On a CPU machine the launcher starts one process; `--num_gpus N` asks for N (CPU) processes.
Any world size trains the recipe's global batch: accumulation (and the micro batch, where the
world is larger than it allows) is derived, and the run log says how.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tests.cluster.env import clean_launch_env
from tests.cluster.runs import complete_steps, tiny_args, train_log
from tests.test_reliability_helpers import train_losses
from training.pretrain import parse_args

LAUNCHER = "launch/pretrain.sh"
# The default recipe as it ships (its batch included: global 32, micro 16), a short run.
DEFAULT_RECIPE_SHORT = ["run.export=false", "curriculum.schedule=[[0,2]]",
                        "eval.every=0", "eval.batches=1", "eval.memory_task_samples=8",
                        "eval.memory_task_segments=[2]", "logging.every=1",
                        "logging.progress_bar=false"]


def deepspeed_command() -> list[str]:
    found = shutil.which("deepspeed")
    return [found] if found else [sys.executable, "-m", "deepspeed.launcher.runner"]


def run(repo_root, cmd, timeout=420, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=repo_root, env=clean_launch_env(OMP_NUM_THREADS="1", **env),
                          capture_output=True, text=True, timeout=timeout)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]


def test_the_file_is_valid_bash_and_valid_python(repo_root):
    source = (repo_root / LAUNCHER).read_text()
    assert subprocess.run(["bash", "-n", LAUNCHER], cwd=repo_root).returncode == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. an invalid escape sequence in the bash part
        compile(source, LAUNCHER, "exec")
    # sbatch reads #SBATCH lines only before the first command: the polyglot opener comes after.
    lines = source.splitlines()
    assert max(i for i, l in enumerate(lines) if l.startswith("#SBATCH")) < lines.index('""":"')


def test_every_rank_accepts_local_rank_both_spellings(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert parse_args(["--local_rank=3", "optim.lr=1e-3"]).overrides == ["optim.lr=1e-3"]
    assert parse_args(["--local-rank", "2", "--config", "c.yaml"]).local_rank == 2


def test_rank_mode_runs_training_directly(repo_root, tmp_path):
    """A process some launcher already made a rank does not start a launcher of its own."""
    runs = tmp_path / "runs"
    result = run(repo_root, ["bash", LAUNCHER, "--local_rank=0", *tiny_args(runs, "r", 1, "optim.lr=-1")],
                 RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999")
    assert result.returncode == 2, result.stderr
    assert "optim.lr" in result.stderr and "Traceback" not in result.stderr
    assert "[launch] local run" not in result.stderr  # no torchrun of its own
    assert not runs.exists()


def test_literal_deepspeed_command_trains_default_recipe_on_one_cpu_process(repo_root, tmp_path):
    """No launcher flags: DeepSpeed picks the process count (one on a CPU machine); the default
    recipe's global batch of 32 is kept by accumulating two micro-batches of 16."""
    run_dir = tmp_path / "runs" / "ds1"
    result = run(repo_root, [*deepspeed_command(), LAUNCHER, f"run.runs_dir={run_dir.parent}",
                             f"run.name={run_dir.name}", "run.max_steps=3", *DEFAULT_RECIPE_SHORT])
    assert_ok(result)
    log = train_log(run_dir)
    assert "on 1 rank(s)" in log
    assert "batch global 32 = micro 16 x accum 2 x 1 rank(s)" in log
    assert complete_steps(run_dir) == [3]


@pytest.mark.parametrize("nproc", [4])
def test_default_recipe_keeps_its_global_batch_on_more_ranks(repo_root, tmp_path, nproc):
    """4 ranks: the recipe's micro batch (16) is larger than 32 / 4 allows, so it shrinks to 8."""
    run_dir = tmp_path / "runs" / f"ds{nproc}"
    result = run(repo_root, [*deepspeed_command(), f"--num_gpus={nproc}", LAUNCHER,
                             f"run.runs_dir={run_dir.parent}", f"run.name={run_dir.name}",
                             "run.max_steps=3", *DEFAULT_RECIPE_SHORT])
    assert_ok(result)
    log = train_log(run_dir)
    assert f"on {nproc} rank(s)" in log
    assert f"batch global 32 = micro 8 x accum 1 x {nproc} rank(s)" in log
    assert complete_steps(run_dir) == [3]
    step_dir = run_dir / "checkpoints" / "step_00000003"
    assert len(list(step_dir.glob("rank_*.json"))) == nproc


def test_two_deepspeed_processes_match_the_bash_launcher(repo_root, tmp_path):
    """`deepspeed --num_gpus 2` (two CPU processes) and `bash launch/pretrain.sh` (torchrun, two
    ranks), the default recipe's batch: the same seed gives the same loss curve."""
    runs = tmp_path / "runs"
    args = ["run.max_steps=4", *DEFAULT_RECIPE_SHORT]
    by_deepspeed = run(repo_root, [*deepspeed_command(), "--num_gpus=2", LAUNCHER,
                                   f"run.runs_dir={runs}", "run.name=ds", *args])
    assert_ok(by_deepspeed)
    by_bash = run(repo_root, ["bash", LAUNCHER, f"run.runs_dir={runs}", "run.name=sh", *args])
    assert_ok(by_bash)
    for name in ("ds", "sh"):
        assert "on 2 rank(s)" in train_log(runs / name)
        assert "batch global 32 = micro 16 x accum 1 x 2 rank(s)" in train_log(runs / name)
    a, b = train_losses(runs / "ds"), train_losses(runs / "sh")
    assert sorted(a) == [1, 2, 3, 4]
    assert a == b, (a, b)
