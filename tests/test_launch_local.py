"""`bash launch/pretrain.sh` on one machine: argument checks, pre-flight, signal relay (SPEC 2.6)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

from tests.cluster.env import clean_launch_env
from tests.cluster.poll import wait_until
from tests.cluster.runs import complete_steps, tiny_args, train_log

LAUNCHER = "launch/pretrain.sh"
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


def descendants(pid: int) -> list[int]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def training_processes_with(pid: int, library: Path) -> int:
    """How many `-m training.pretrain` processes under `pid` have `library` mapped."""
    count = 0
    for child in descendants(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            maps = Path(f"/proc/{child}/maps").read_text()
        except OSError:
            continue
        if b"training.pretrain" in cmdline and b"torch.distributed.run" not in cmdline:
            count += str(library) in maps
    return count


def run_launcher(repo_root, args, timeout=120, **env):
    return subprocess.run(["bash", LAUNCHER, *args], cwd=repo_root, env=clean_launch_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def test_bad_process_count_is_refused_before_anything_runs(repo_root, tmp_path):
    result = run_launcher(repo_root, tiny_args(tmp_path / "runs", "n", 2), RMT_NPROC="0")
    assert result.returncode == 2
    assert "RMT_NPROC='0' must be a positive integer" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_config_fails_once_before_ranks_start(repo_root, tmp_path):
    result = run_launcher(repo_root, tiny_args(tmp_path / "runs", "bad", 2, "optim.lr=-1", "no.such_key=1"))
    assert result.returncode == 2, result.stderr
    # One report listing both problems, from the pre-flight, not one per rank from torchrun.
    assert result.stderr.count("invalid configuration") == 1
    assert "optim.lr" in result.stderr and "no.such_key" in result.stderr
    assert "OMP_NUM_THREADS" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_sbatch_header_asks_for_whole_gpu_nodes_no_task_count_and_requeue(repo_root):
    header = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", (repo_root / LAUNCHER).read_text(), re.M))
    assert int(header["nodes"]) >= 2 and int(header["gpus-per-node"]) == 8 and "exclusive" in header
    # Any task count would fix the job's size: a requeued job could not come back on fewer nodes
    # (tests/test_slurm_requeue_elastic.py). The launcher lays the tasks out (next test).
    assert not {"ntasks", "ntasks-per-node", "cpus-per-task"} & set(header), header
    assert "requeue" in header and re.fullmatch(r"B:USR1@\d+", header["signal"])
    assert "%j" in header["output"] and header["open-mode"] == "append"


def slurm_layout(repo_root, gpus_seen: int, **env) -> subprocess.CompletedProcess:
    """The launcher's layout of a job without a task count, from its own functions (sourced)."""
    script = (f"source {LAUNCHER}; per_node=$(slurm_tasks_per_node {gpus_seen}); "
              'echo "$per_node $(slurm_cpus_per_task "$per_node")"')
    return subprocess.run(["bash", "-c", script], cwd=repo_root, capture_output=True, text=True,
                          env=clean_launch_env(**env), timeout=30)


def test_slurm_layout_without_a_task_count_is_one_task_per_gpu_sharing_the_node(repo_root):
    # (SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, GPUs the interpreter sees, SLURM_CPUS_ON_NODE) ->
    # (tasks, CPUs) per node: Slurm's allocation on this node first, then the job's request, then
    # the visible GPUs (a cluster without GPU GRES, submitted with --gpus-per-node=0); 1 on CPU.
    cases = {(8, "8", 8, 112): (8, 14), (None, "h100:4", 0, 64): (4, 16),
             (None, "0", 4, 16): (4, 4), (None, None, 0, 2): (1, 2), (4, "4", 4, 3): (4, 1),
             (None, "a100:2,v100:2", 4, 8): (4, 2)}
    for (given, asked, seen, cpus), expected in cases.items():
        env = {"SLURM_CPUS_ON_NODE": str(cpus)}
        if given is not None:
            env["SLURM_GPUS_ON_NODE"] = str(given)
        if asked is not None:
            env["SLURM_GPUS_PER_NODE"] = asked
        result = slurm_layout(repo_root, seen, **env)
        assert result.returncode == 0, result.stderr
        assert tuple(map(int, result.stdout.split())) == expected, (env, seen, result.stdout)
    # GPUs allocated that the interpreter cannot use: refused, not trained on CPU 8 times over.
    refused = slurm_layout(repo_root, 0, SLURM_GPUS_ON_NODE="8", SLURM_CPUS_ON_NODE="64")
    assert refused.returncode == 2 and "8 GPU(s) on this node (SLURM_GPUS_ON_NODE)" in refused.stderr
    assert "--gpus-per-node=0" in refused.stderr and "Traceback" not in refused.stderr


def test_deepspeed_hostfile_has_a_slot_per_gpu_in_a_job_without_a_task_count(repo_root, tmp_path):
    """launch/deepspeed_slurm_args.sh follows the launcher's rule: Slurm's tasks per node when the
    job has a task count, else the GPUs per node (one task per node then is Slurm's default)."""
    (tmp_path / "scontrol").write_text("#!/bin/sh\necho n1; echo n2\n")  # show hostnames n[1-2]
    (tmp_path / "scontrol").chmod(0o755)
    cases = [({"SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_GPUS_PER_NODE": "h100:4"}, "4"),
             ({"SLURM_TASKS_PER_NODE": "1(x2)"}, "1"),  # no GPU anywhere: one rank per node
             ({"SLURM_NTASKS": "4", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_GPUS_PER_NODE": "4"}, "2")]
    for extra, slots in cases:
        env = {**clean_launch_env(), "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "7",
               "SLURM_JOB_NODELIST": "n[1-2]", "RMT_HOSTFILE": str(tmp_path / "hostfile"), **extra}
        out = subprocess.run(["bash", "launch/deepspeed_slurm_args.sh"], cwd=repo_root, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert (tmp_path / "hostfile").read_text() == f"n1 slots={slots}\nn2 slots={slots}\n", extra


def test_sigterm_to_launcher_checkpoints_every_rank_and_exits_zero(repo_root, tmp_path):
    run_dir = tmp_path / "runs" / "loc"
    args = tiny_args(tmp_path / "runs", "loc", 5000, "checkpoint.every=3", "checkpoint.keep_last=100",
                     "run.export=false")
    log_path = tmp_path / "launcher.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["bash", LAUNCHER, *args], cwd=repo_root, env=clean_launch_env(),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: complete_steps(run_dir) or proc.poll() is not None, 300, "a periodic checkpoint",
                   log_path)
        assert proc.poll() is None, log_path.read_text()[-4000:]
        if TCMALLOC.is_file():  # CPU allocator: both ranks run on tcmalloc (flat memory, no fault churn)
            assert training_processes_with(proc.pid, TCMALLOC) == 2
        proc.send_signal(signal.SIGTERM)  # what a job scheduler or `kill` sends to the launcher
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log_path.read_text(errors="replace")
    assert proc.returncode == 0, output[-4000:]
    # DeepSpeed's per-step collectives trip torch's deprecation warnings; they must not flood the
    # console (thousands of lines in a real run).
    assert "is deprecated" not in output, [l for l in output.splitlines() if "deprecated" in l][:3]
    assert "on 2 rank(s) (torchrun)" in train_log(run_dir)
    stopped_at = complete_steps(run_dir)[-1]
    assert f"stopped on signal, checkpoint saved at step {stopped_at}" in train_log(run_dir)
    step_dir = run_dir / "checkpoints" / f"step_{stopped_at:08d}"
    assert sorted(p.name for p in step_dir.glob("rank_*.json")) == ["rank_00000.json", "rank_00001.json"]


def test_precision_the_machine_lacks_is_refused_before_ranks_start(repo_root, tmp_path):
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        import pytest
        pytest.skip("this machine's DeepSpeed accelerator trains in fp16")
    result = run_launcher(repo_root, tiny_args(tmp_path / "runs", "fp16", 2, "deepspeed.precision=fp16"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("invalid configuration") == 1 and "deepspeed.precision: fp16" in result.stderr
    assert "OMP_NUM_THREADS" not in result.stderr and "Traceback" not in result.stderr  # no torchrun
    assert not (tmp_path / "runs").exists()
