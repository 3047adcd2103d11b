"""`mpirun -np 2 python -m training.pretrain` trains through DeepSpeed's mpi4py discovery (issue 4 acceptance 5)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.cluster.env import clean_launch_env
from tests.cluster.fixtures import mpirun_binary  # noqa: F401  (pytest fixture)
from tests.cluster.mpi import mpirun_command
from tests.cluster.runs import complete_steps, tiny_args, train_log


# Both ways users start ranks under mpirun: the module itself, or the launcher file, which a
# process that mpirun made a rank runs in rank mode (no launcher of its own). PYTHON names the
# interpreter: mpirun started by its absolute path puts its own bin folder first on PATH.
ENTRY_POINTS = {"module": [sys.executable, "-m", "training.pretrain"],
                "launcher": ["bash", "launch/pretrain.sh"]}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_mpirun_two_ranks_train(mpirun_binary, repo_root, tmp_path, entry):
    run_dir = tmp_path / "runs" / "mpi"
    cmd = mpirun_command(mpirun_binary, 2, [*ENTRY_POINTS[entry],
                                            *tiny_args(tmp_path / "runs", "mpi", 2, "run.export=false")])
    result = subprocess.run(cmd, cwd=repo_root, env=clean_launch_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "on 2 rank(s) (mpi)" in train_log(run_dir), train_log(run_dir)
    assert complete_steps(run_dir) == [2]
    # Both ranks wrote their part of the checkpoint: one world of two, not two worlds of one.
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step_00000002").glob("rank_*.json")) == [
        "rank_00000.json", "rank_00001.json"]
