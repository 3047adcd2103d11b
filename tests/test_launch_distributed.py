"""training.distributed: launcher detection, Slurm variables, and real gloo process groups."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.env import clean_launch_env
from training import distributed as D

PROBE = Path(__file__).parent / "cluster" / "dist_probe.py"

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
SRUN_STEP = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "5",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURM_STEP_NUM_TASKS": "5",
             "SLURM_STEP_TASKS_PER_NODE": "3,2", "SLURM_STEP_NODELIST": "localhost,nodeb"}
# What a batch script (no step yet) or mpirun inside an allocation inherits.
BATCH = {"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_NTASKS": "5"}


@pytest.mark.parametrize("env, expected", [
    ({}, "single"),
    (BATCH, "single"),
    (SRUN_STEP, "slurm"),
    ({**BATCH, "OMPI_COMM_WORLD_SIZE": "2"}, "mpi"),           # mpirun inside sbatch
    ({**SRUN_STEP, "PMIX_RANK": "3"}, "slurm"),                # srun --mpi=pmix / MpiDefault=pmix
    ({"PMIX_RANK": "3"}, "mpi"),                               # PMIx launch outside srun
    ({**SRUN_STEP, "PMI_RANK": "3", "PMI_SIZE": "5"}, "slurm"),  # srun --mpi=pmi2: Slurm's variables suffice
    ({**SRUN_STEP, "OMPI_COMM_WORLD_SIZE": "2", **TORCHRUN}, "torchrun"),  # torchrun inside a step
])
def test_detect_launcher_precedence(env, expected):
    assert D.detect_launcher(env) == expected


@pytest.mark.parametrize("spec, counts", [("8", [8]), ("2(x3)", [2, 2, 2]), ("3,2(x2),1", [3, 2, 2, 1])])
def test_expand_tasks_per_node(spec, counts):
    assert D.expand_tasks_per_node(spec) == counts


def test_slurm_env_multi_node_uses_this_nodes_task_count():
    env = D._slurm_env({**SRUN_STEP, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "4242"})
    # Node 1 of "3,2" runs 2 tasks; the user's MASTER_ADDR/PORT win over derived ones.
    assert env == {"RANK": "3", "WORLD_SIZE": "5", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}


@pytest.mark.parametrize("nodelist, first", [
    ("vm", "vm"), ("localhost,nodeb", "localhost"), ("gpu[007-009,12],cpu1", "gpu007"),
    ("rack[2-3]-n[01-04]", "rack2-n01"), ("a[5],b[1-2]", "a5"),
])
def test_first_host_in_nodelist(nodelist, first):
    assert D.first_host_in_nodelist(nodelist) == first


def test_unbalanced_nodelist_is_refused():
    with pytest.raises(D.DistributedSetupError, match="unbalanced"):
        D.first_host_in_nodelist("gpu[1-2")


def test_slurm_env_master_is_first_host_and_port_from_job():
    env = D._slurm_env(SRUN_STEP)
    assert env["MASTER_ADDR"] == "localhost"
    assert env["MASTER_PORT"] == str(20000 + (77 * 16 + 0) % 40000)


def test_master_port_distinct_for_neighbouring_jobs_and_steps():
    ports = {D.slurm_master_port(job, step) for job in range(1000, 1100) for step in range(4)}
    assert len(ports) == 400 and all(1024 < p < 65536 for p in ports)


def test_bad_slurm_variable_is_named():
    with pytest.raises(D.DistributedSetupError, match="SLURM_PROCID='x'"):
        D._slurm_env({**SRUN_STEP, "SLURM_PROCID": "x"})


def test_threads_per_rank(monkeypatch):
    assert D.threads_per_rank(2, {"SLURM_CPUS_PER_TASK": "3"}) == 3
    assert D.threads_per_rank(1, {}) == len(os.sched_getaffinity(0))
    assert D.threads_per_rank(10_000, {}) == 1
    # The user's OMP_NUM_THREADS wins over both (runs side by side on one machine).
    assert D.threads_per_rank(1, {"OMP_NUM_THREADS": "1", "SLURM_CPUS_PER_TASK": "3"}) == 1
    with pytest.raises(D.DistributedSetupError, match="OMP_NUM_THREADS='x'"):
        D.threads_per_rank(1, {"OMP_NUM_THREADS": "x"})


def test_mpi_singletons_under_srun_are_refused(monkeypatch):
    # An MPI without srun's PMI starts each task as its own world of 1.
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE", raising=False)
    with pytest.raises(D.DistributedSetupError, match="srun --mpi=pmix"):
        D._check_against_slurm("mpi", 1)


def _spawn_pair(tmp_path, *probe_args):
    """Two real processes with torchrun's variables, as torchrun would start them."""
    port = str(D._free_port())
    procs = []
    for rank in (0, 1):
        env = clean_launch_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                               MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(PROBE), *probe_args], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _probe_lines(output: str, tag: str) -> list[dict]:
    return [json.loads(line.split(" ", 1)[1]) for line in output.splitlines() if line.startswith(tag + " ")]


def test_two_ranks_all_reduce_and_one_thread_each(tmp_path):
    procs = _spawn_pair(tmp_path)
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    reports = sorted((r for out in outs for r in _probe_lines(out, "PROBE")), key=lambda r: r["rank"])
    assert [(r["rank"], r["world_size"], r["local_rank"], r["launcher"], r["backend"]) for r in reports] == [
        (0, 2, 0, "torchrun", "gloo"), (1, 2, 1, "torchrun", "gloo")]
    assert [r["sum"] for r in reports] == [3.0, 3.0]  # 1 + 2
    cores = len(os.sched_getaffinity(0))
    assert [r["threads"] for r in reports] == [max(1, cores // 2)] * 2


@pytest.mark.parametrize("fault", ["--stall-rank", "--die-rank"])
def test_faulty_peer_makes_the_other_rank_fail_instead_of_hanging(tmp_path, fault):
    # The rendezvous timeout stays at its 1800 s default: only the collective timeout can end a stall.
    procs = _spawn_pair(tmp_path, "--timeout-s", "5", fault, "1")
    try:
        out0 = procs[0].communicate(timeout=180)[0]
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode != 0, out0
    errors = _probe_lines(out0, "PROBE_ERROR")
    assert errors and errors[0]["rank"] == 0, out0
    if fault == "--stall-rank":
        # Failed through the 5 s collective timeout, not the 1800 s rendezvous one (communicate's
        # 180 s limit would have fired first).
        assert "Timed out" in errors[0]["error"]
