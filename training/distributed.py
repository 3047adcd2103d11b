"""Rank and world discovery for every way this stack is launched, then DeepSpeed's process group.

Launchers and how each is recognised (first match wins):

  torchrun / deepspeed   RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT all set
  MPI                    mpirun (OMPI_COMM_WORLD_SIZE) or a PMIx launch such as
                         `srun --mpi=pmix` (PMIX_RANK): DeepSpeed's mpi4py discovery
  Slurm                  inside an srun step (SLURM_STEP_ID and SLURM_PROCID): SLURM_* variables,
                         MASTER_ADDR = first host of the step, MASTER_PORT derived from the job id
  single                 none of the above: one process, world size 1

MPI wins over Slurm because `mpirun` inside an allocation inherits the batch step's SLURM_PROCID
(0 on every rank). An explicit MASTER_ADDR / MASTER_PORT in the environment is always respected.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch

# A dead or stuck rank must make the others fail well within two minutes (issue 5).
DEFAULT_TIMEOUT_S = 100.0
# Start-up skew (imports from a shared file system on many nodes) is not a failure.
DEFAULT_RENDEZVOUS_TIMEOUT_S = 900.0

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK")


class DistributedSetupError(RuntimeError):
    """The launch environment is inconsistent; the message says which variable and why."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    launcher: str = "single"  # torchrun | mpi | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_launcher(env=None) -> str:
    env = os.environ if env is None else env
    if all(v in env for v in TORCHRUN_VARS):
        return "torchrun"
    if any(v in env for v in MPI_MARKERS):
        return "mpi"
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        return "slurm"
    return "single"


def _int_var(env, name: str) -> int:
    value = env.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedSetupError(f"environment variable {name}={value!r} must be an integer") from None


def expand_tasks_per_node(spec: str) -> list[int]:
    """Slurm's compressed per-node task counts, e.g. '2(x3),1' -> [2, 2, 2, 1]."""
    counts = []
    for part in spec.split(","):
        part = part.strip()
        if "(x" in part:
            count, repeat = part.rstrip(")").split("(x")
            counts.extend([int(count)] * int(repeat))
        else:
            counts.append(int(part))
    return counts


def slurm_master_port(job_id: int, step_id: int) -> int:
    # Deterministic so every rank agrees without talking; the step id keeps consecutive steps of
    # one job (e.g. a requeue-free retry inside the same allocation) off each other's port.
    return 20000 + (job_id * 16 + step_id) % 40000


def first_host_in_nodelist(nodelist: str) -> str:
    """First host of a Slurm host list ('gpu[007-009,12],cpu1' -> 'gpu007'), without scontrol:
    containers on Slurm nodes often lack the Slurm client tools."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    if first.count("[") != first.count("]"):
        raise DistributedSetupError(f"SLURM node list {nodelist!r} has unbalanced brackets; set MASTER_ADDR")
    # Each bracket holds ranges like 007-009,12; the first value keeps its zero padding.
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], first)


def reachable_address(host: str) -> str:
    """`host` if it resolves, else the NodeAddr Slurm has for it (node names need not resolve)."""
    try:
        socket.getaddrinfo(host, None)
        return host
    except socket.gaierror:
        pass
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", host], capture_output=True, text=True).stdout
    except OSError:
        out = ""
    for field in out.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    raise DistributedSetupError(f"first Slurm node {host!r} does not resolve and Slurm has no NodeAddr for it; "
                                "set MASTER_ADDR")


def _slurm_env(env) -> dict[str, str]:
    """torch.distributed's env:// variables from an srun step's SLURM_* variables."""
    rank = _int_var(env, "SLURM_PROCID")
    world = _int_var(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS")
    local_rank = _int_var(env, "SLURM_LOCALID")
    per_node_spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node_spec:
        per_node = expand_tasks_per_node(per_node_spec)
        node_id = _int_var(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
        local_world = per_node[min(node_id, len(per_node) - 1)]
    else:
        local_world = _int_var(env, "SLURM_NTASKS_PER_NODE")
    out = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
           "LOCAL_WORLD_SIZE": str(local_world)}
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise DistributedSetupError("SLURM_STEP_NODELIST / SLURM_JOB_NODELIST unset; set MASTER_ADDR")
        out["MASTER_ADDR"] = reachable_address(first_host_in_nodelist(nodelist))
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(slurm_master_port(_int_var(env, "SLURM_JOB_ID"), _int_var(env, "SLURM_STEP_ID")))
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _single_env(env) -> dict[str, str]:
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": env.get("MASTER_PORT", str(_free_port()))}


def _mpi_port_and_local_size() -> tuple[int, int]:
    """A port every rank agrees on, and the number of ranks on this node, from MPI itself."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    port = int(os.environ["MASTER_PORT"]) if "MASTER_PORT" in os.environ else (
        _free_port() if world.Get_rank() == 0 else None)
    port = world.bcast(port, root=0)
    local = world.Split_type(MPI.COMM_TYPE_SHARED)
    local_size = local.Get_size()
    local.Free()
    return port, local_size


def threads_per_rank(local_world_size: int, env=None) -> int:
    env = os.environ if env is None else env
    if env.get("SLURM_CPUS_PER_TASK"):
        return max(1, _int_var(env, "SLURM_CPUS_PER_TASK"))
    return max(1, len(os.sched_getaffinity(0)) // max(1, local_world_size))


def default_backend() -> str:
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    # DeepSpeed's CPU accelerator asks for oneCCL when its bindings are importable; gloo is what
    # every CPU machine has and what the tests exercise.
    return "gloo" if accel.device_name() == "cpu" else accel.communication_backend_name()


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S,
                     rendezvous_timeout_s: float = DEFAULT_RENDEZVOUS_TIMEOUT_S,
                     backend: str | None = None,
                     set_threads: bool = True) -> DistInfo:
    """Discover rank and world, initialise DeepSpeed's process group, pin the device.

    `timeout_s` bounds every collective after start-up (a dead rank makes the others fail);
    `rendezvous_timeout_s` bounds only the initial meeting of all ranks.
    """
    if timeout_s <= 0 or rendezvous_timeout_s <= 0:
        raise DistributedSetupError(
            f"timeouts must be positive seconds (timeout_s={timeout_s}, rendezvous_timeout_s={rendezvous_timeout_s})")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    launcher = detect_launcher()
    port = 29500  # only DeepSpeed's MPI discovery reads it; the other paths set MASTER_PORT
    if launcher == "slurm":
        os.environ.update(_slurm_env(os.environ))
    elif launcher == "single":
        os.environ.update(_single_env(os.environ))
    elif launcher == "mpi":
        port, local_size = _mpi_port_and_local_size()
        os.environ["LOCAL_WORLD_SIZE"] = str(local_size)
    backend = backend or default_backend()

    # Pin before the process group exists so NCCL binds its communicator to this rank's GPU.
    accel = get_accelerator()
    local_rank_env = os.environ.get("LOCAL_RANK") or os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK")
    if accel.device_name() != "cpu" and local_rank_env is not None:
        accel.set_device(int(local_rank_env))

    deepspeed.init_distributed(dist_backend=backend,
                               auto_mpi_discovery=(launcher == "mpi"),
                               distributed_port=port,
                               timeout=timedelta(seconds=rendezvous_timeout_s),
                               verbose=False)
    if accel.device_name() != "cpu":
        accel.set_device(int(os.environ["LOCAL_RANK"]))
    _set_collective_timeout(timedelta(seconds=timeout_s))

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    _check_against_slurm(launcher, world)
    info = DistInfo(rank=rank, world_size=world, local_rank=int(os.environ["LOCAL_RANK"]),
                    local_world_size=local_world, backend=backend, launcher=launcher)
    if set_threads and accel.device_name() == "cpu":
        torch.set_num_threads(threads_per_rank(local_world))
    return info


def _set_collective_timeout(timeout: timedelta) -> None:
    setter = getattr(torch.distributed.distributed_c10d, "_set_pg_timeout", None)
    if setter is None:
        raise DistributedSetupError(
            f"torch {torch.__version__} has no distributed_c10d._set_pg_timeout; cannot bound collective time")
    setter(timeout)


def _check_against_slurm(launcher: str, world: int) -> None:
    # An MPI library that cannot talk to srun's PMI starts every task as a singleton (world 1):
    # every rank would believe it is rank 0 and train alone.
    if launcher == "mpi" and "SLURM_STEP_NUM_TASKS" in os.environ and "OMPI_COMM_WORLD_SIZE" not in os.environ:
        step_tasks = _int_var(os.environ, "SLURM_STEP_NUM_TASKS")
        if step_tasks != world:
            raise DistributedSetupError(
                f"MPI reports world size {world} but srun started SLURM_STEP_NUM_TASKS={step_tasks}: "
                "launch with the PMI plugin your MPI supports (e.g. `srun --mpi=pmix`) or without MPI (`srun`)")


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if is_initialized():
        import deepspeed.comm as dist

        dist.barrier()


def destroy() -> None:
    if is_initialized():
        torch.distributed.destroy_process_group()
