"""Issue 17 point 4: GPU device mapping and launcher detection as real clusters need them.

The device rules are pure functions of the environment (training/devices.py), so they are checked
here without a GPU; `python -m training.devices` is run for real against a stand-in nvidia-smi.
Launcher detection covers srun under MpiDefault=pmix, mpirun inside an allocation, PMIx outside
srun, torchrun and DeepSpeed's own launcher (whose real launch.py starts two ranks here).
"""
from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.env import clean_launch_env
from tests.cluster.fixtures import slurm_cluster  # noqa: F401  (pytest fixture)
from training import devices as V
from training import distributed as D
from training import pretrain

REPO = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).parent / "cluster" / "dist_probe.py"


# ------------------------------------------------------------------------------ device rules

@pytest.mark.parametrize("value, physical, visible", [
    (None, 8, 8),                      # unset: every GPU of the node
    (None, 0, 0),
    ("", 8, 0),                        # set but empty: no GPU
    ("-1", 8, 0),
    ("NoDevFiles", 8, 0),              # what Slurm sets when the GPUs have no device files
    ("3", 8, 1),                       # --gpus-per-task=1 / --gpu-bind: one GPU per task
    ("0,1,2,3", 8, 4),
    (" 4, 5 ", 8, 2),
    ("0,2,-1,1", 8, 2),                # CUDA stops at the first invalid entry
    ("0,9,1", 8, 1),                   # 9 is not a GPU of this node: invalid, stops the list
    ("0,9,1", None, 3),                # physical count unknown: nothing to check against
    ("1gpu,2", 8, 2),                  # indices are read like strtoul
    ("1,1", 8, 0),                     # a repeated device: CUDA sees none
    ("GPU-8e1b2c3d,GPU-77aa0011", 8, 2),
    ("GPU-a,GPU-b,GPU-c", 2, 2),       # more GPU UUIDs than GPUs cannot all be valid
    ("GPU-a,0", 8, 1),                 # the list is UUIDs: an index ends it
    ("MIG-1f2e,MIG-3d4c", 1, 2),       # MIG instances: several per GPU, not capped
    ("GPU-a,GPU-a", 8, 0),
])
def test_visible_gpu_count_follows_cuda_visible_devices(value, physical, visible):
    env = {} if value is None else {"CUDA_VISIBLE_DEVICES": value}
    assert V.visible_gpu_count(env, physical) == visible


def test_unset_visibility_needs_the_physical_count():
    with pytest.raises(ValueError, match="physical GPU count"):
        V.visible_gpu_count({}, None)


@pytest.mark.parametrize("local_rank, count, device", [
    (3, 1, 0),    # a task that sees one GPU uses it, whatever its local rank
    (0, 1, 0),
    (3, 8, 3),    # every GPU visible: the local rank
    (7, 8, 7),
    (9, 8, 1),    # more ranks than GPUs on the node: shared round robin
])
def test_device_index_is_local_rank_modulo_visible_devices(local_rank, count, device):
    assert V.device_index(local_rank, count) == device


@pytest.mark.parametrize("count", [0, -1])
def test_no_visible_device_is_refused(count):
    with pytest.raises(V.DeviceError, match=f"sees {count} GPU"):
        V.device_index(0, count)


def test_negative_local_rank_is_refused():
    with pytest.raises(V.DeviceError, match="local rank -1"):
        V.device_index(-1, 4)


# ------------------------------------------------------------------------------ the CLI

def fake_nvidia_smi(bin_dir: Path, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "nvidia-smi"
    exe.write_text("#!/bin/sh\n" + body + "\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


FOUR_GPUS_ONE_MIG = "\n".join([
    *(f'echo "GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd)"'
      for i in range(4)),
    'echo "  MIG 1g.10gb     Device  0: (UUID: MIG-11111111-2222-3333-4444-555555555555)"',
])


def devices_cli(bin_dir: Path, visible: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    return subprocess.run([sys.executable, "-m", "training.devices"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("visible, printed", [
    (None, "4"), ("2,3", "2"), ("1", "1"), ("", "0"), ("-1", "0"), ("0,5,1", "1"),
])
def test_cli_prints_the_visible_gpu_count(tmp_path, visible, printed):
    fake_nvidia_smi(tmp_path / "bin", FOUR_GPUS_ONE_MIG)
    proc = devices_cli(tmp_path / "bin", visible)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == printed + "\n"


def test_cli_without_gpus_prints_0(tmp_path):
    # nvidia-smi installed but no GPU or no driver: it fails ("No devices were found").
    fake_nvidia_smi(tmp_path / "bin", 'echo "No devices were found"; exit 6')
    assert devices_cli(tmp_path / "bin", None).stdout == "0\n"


def test_hung_driver_is_an_error_not_zero_gpus(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path / "bin", "sleep 30")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(V.DeviceError, match="did not answer"):
        V.physical_gpu_count(timeout_s=0.5)


def test_cli_does_not_import_torch():
    # launch/pretrain.sh calls it before every launch: it must take well under a second.
    code = "import sys, training.devices as d; d.local_gpu_count(); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr


# ------------------------------------------------------------------------------ launchers

SRUN_STEP = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
             "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_NUM_TASKS": "4",
             "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NODELIST": "gpu[01-02]"}
PMIX = {"PMIX_RANK": "3", "PMIX_NAMESPACE": "slurm.pmix.77.0", "PMIX_SERVER_URI4": "pmix-server.1"}
BATCH = {"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gpu[01-02]"}
OPEN_MPI = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            "PMIX_RANK": "2"}
TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "gpu01", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "none",
            "GROUP_RANK": "1"}
# What deepspeed/launcher/launch.py gives each rank (checked against the real one below).
DEEPSPEED = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu01",
             "MASTER_PORT": "29500", "CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "2",
             "CUDA_VISIBLE_DEVICES": "0,1"}


@pytest.mark.parametrize("env, expected", [
    ({**SRUN_STEP, **PMIX}, "slurm"),              # srun on a cluster with MpiDefault=pmix
    ({**BATCH, **OPEN_MPI}, "mpi"),                # mpirun inside an allocation (batch step)
    ({**SRUN_STEP, **OPEN_MPI}, "mpi"),            # mpirun run from an srun step
    (PMIX, "mpi"),                                 # PMIx launch outside srun (e.g. prterun)
    ({**BATCH, **PMIX}, "mpi"),                    # ... inside an allocation, still no step
    ({**SRUN_STEP, **PMIX, **TORCHRUN}, "torchrun"),
    ({**SRUN_STEP, **DEEPSPEED}, "deepspeed"),     # deepspeed's launch.py (pdsh or local)
    ({**DEEPSPEED, "TORCHELASTIC_RUN_ID": "x"}, "torchrun"),
    ({**SRUN_STEP, **PMIX, "SLURM_CPUS_PER_TASK": "8"}, "slurm"),  # deepspeed --launcher slurm
    (BATCH, "single"),
    ({"CUDA_VISIBLE_DEVICES": "0"}, "single"),
])
def test_detect_launcher(env, expected):
    assert D.detect_launcher(env) == expected


class FakeGPUs:
    """DeepSpeed's accelerator as a node with `count` visible CUDA devices would present it."""

    def __init__(self, count: int):
        self.count, self.pinned = count, []

    def device_name(self, index=None):
        return "cuda" if index is None else f"cuda:{index}"

    def device_count(self):
        return self.count

    def set_device(self, index):
        self.pinned.append(index)


@pytest.mark.parametrize("visible, device", [(1, 0), (8, 3), (2, 1)])
def test_init_distributed_pins_local_rank_modulo_visible_gpus(monkeypatch, visible, device):
    """Local rank 3 of a torchrun-style launch: DeepSpeed must be handed the device ordinal as
    LOCAL_RANK (it passes LOCAL_RANK to init_process_group as device_id, and zero.Init and the
    engine use it), while DistInfo keeps the rank's place on its node."""
    import deepspeed
    import deepspeed.accelerator
    import torch

    for k, v in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "3"}.items():
        monkeypatch.setenv(k, v)
    gpus = FakeGPUs(visible)
    seen = {}
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: gpus)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: seen.update(
        local_rank=os.environ["LOCAL_RANK"], ompi=os.environ["OMPI_COMM_WORLD_LOCAL_RANK"], pinned=list(gpus.pinned),
        timeout=kw["timeout"].total_seconds()))
    monkeypatch.setattr(D, "set_collective_timeout", lambda s: seen.update(collective_timeout=s))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 3)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    info = D.init_distributed(timeout_s=7, rendezvous_timeout_s=11, backend="nccl", set_threads=False)
    assert seen == {"local_rank": str(device), "ompi": str(device), "pinned": [device], "timeout": 11.0,
                    "collective_timeout": 7}
    assert gpus.pinned == [device, device]
    assert (info.local_rank, info.local_world_size, info.device, info.launcher) == (3, 4, device, "torchrun")


def test_init_distributed_refuses_a_rank_without_gpu(monkeypatch):
    import deepspeed.accelerator

    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: FakeGPUs(0))
    with pytest.raises(D.DistributedSetupError, match="sees 0 GPU"):
        D.init_distributed(backend="nccl", set_threads=False)


def test_srun_under_pmix_uses_slurms_rank_and_world():
    env = D._slurm_env({**SRUN_STEP, **PMIX, "MASTER_ADDR": "10.0.0.1"})
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_PORT": str(D.slurm_master_port(77, 0))}


def test_real_deepspeed_launcher_two_ranks(tmp_path):
    """deepspeed/launcher/launch.py, as `deepspeed` runs it on every node: two CPU ranks, named
    'deepspeed', with the node's rank count from its LOCAL_SIZE."""
    world_info = base64.urlsafe_b64encode(json.dumps({"localhost": [0, 1]}).encode()).decode()
    cmd = [sys.executable, "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
           "--master_addr=127.0.0.1", f"--master_port={D._free_port()}", "--no_local_rank",
           str(PROBE)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=clean_launch_env(), capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    reports = sorted((json.loads(line.split(" ", 1)[1]) for line in out.splitlines()
                      if line.startswith("PROBE ")), key=lambda r: r["rank"])
    assert [(r["rank"], r["world_size"], r["local_rank"], r["local_world_size"], r["launcher"],
             r["sum"]) for r in reports] == [(0, 2, 0, 2, "deepspeed", 3.0), (1, 2, 1, 2, "deepspeed", 3.0)], out[-4000:]
    assert all(r["device"] is None for r in reports)  # CPU: no accelerator ordinal


def test_srun_with_the_pmix_plugin_forms_one_slurm_world(slurm_cluster, tmp_path):
    """A real srun step under Slurm's PMIx plugin (what MpiDefault=pmix gives every srun): the
    tasks carry PMIX_RANK, yet they meet through the Slurm rendezvous as one world of two."""
    # The plugin's per-step folder (spmix_appdir_<uid>_<job>.<step>) goes under /tmp by default,
    # where a folder left by an earlier test cluster (job ids restart at 1) makes the step fail.
    (tmp_path / "pmix").mkdir()
    env = {**slurm_cluster.env, "SLURM_PMIX_TMPDIR": str(tmp_path / "pmix")}
    env_check = subprocess.run(["srun", "--mpi=pmix", "-n", "2", "sh", "-c", "echo PMIX_RANK=$PMIX_RANK"],
                               env=env, capture_output=True, text=True, timeout=120)
    assert sorted(env_check.stdout.split()) == ["PMIX_RANK=0", "PMIX_RANK=1"], env_check.stderr
    proc = subprocess.run(["srun", "--mpi=pmix", "-n", "2", sys.executable, str(PROBE)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    reports = sorted((json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
                      if line.startswith("PROBE ")), key=lambda r: r["rank"])
    assert [(r["rank"], r["world_size"], r["launcher"], r["sum"]) for r in reports] == [
        (0, 2, "slurm", 3.0), (1, 2, "slurm", 3.0)], (proc.stdout + proc.stderr)[-4000:]


# ------------------------------------------------------------------------------ config section

@pytest.mark.parametrize("overrides, fragments", [
    (["distributed.timeout_s=0"], ["distributed.timeout_s: 0.0 must be a positive number"]),
    (["distributed.setup_timeout_s=-5", "distributed.timeout_s=.inf"],
     ["distributed.setup_timeout_s: -5.0 must be", "distributed.timeout_s: inf must be"]),
    (["distributed.timeout_s=soon"], ["distributed.timeout_s: expected float, got str 'soon'"]),
    (["distributed.collective_timeout=5"], ["distributed.collective_timeout: unknown key"]),
])
def test_bad_distributed_section_exits_2(overrides, fragments, tmp_path, monkeypatch, capsys):
    for var in ("WORLD_SIZE", "RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(REPO)
    runs = tmp_path / "runs"
    code = pretrain.main([f"run.runs_dir={runs}", *overrides])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("invalid configuration"), err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} missing from:\n{err}"
    assert not runs.exists()


def test_distributed_defaults_are_what_init_distributed_uses():
    from training.config import load_config

    cfg = load_config(None)
    assert cfg.distributed.timeout_s == D.DEFAULT_TIMEOUT_S == 900.0
    assert cfg.distributed.setup_timeout_s == D.DEFAULT_RENDEZVOUS_TIMEOUT_S == 1800.0
