"""Rank and world discovery for every way this stack is launched, then DeepSpeed's process group.

Launchers and how each is recognised (first match wins):

  deepspeed     RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT all set, and DeepSpeed's
                launch.py's own CROSS_RANK, CROSS_SIZE, LOCAL_SIZE (the ranks per node) with
                none of torchrun's TORCHELASTIC_* variables
  torchrun      RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT all set (torchrun, or any
                launcher that speaks torch's env:// convention)
  MPI           mpirun (OMPI_COMM_WORLD_SIZE), even inside an srun step or a Slurm allocation:
                DeepSpeed's mpi4py discovery
  Slurm         inside an srun step (SLURM_STEP_ID and SLURM_PROCID): SLURM_* variables,
                MASTER_ADDR = first host of the step, MASTER_PORT derived from the job id. Also
                when srun's MPI plugin is PMIx (`srun --mpi=pmix`, or MpiDefault=pmix in
                slurm.conf, which gives every srun task PMIX_RANK): within a step Slurm's
                variables name the same rank and world as PMIx, and `deepspeed --launcher slurm`
                is exactly such an srun without RANK variables
  MPI           a PMIx launch outside an srun step (PMIX_RANK), e.g. prterun
  single        none of the above: one process, world size 1

mpirun wins over Slurm because `mpirun` inside an allocation inherits the batch step's SLURM_PROCID
(0 on every rank). An explicit MASTER_ADDR / MASTER_PORT in the environment is always respected.

Devices (SPEC 2.6, training/devices.py): a rank uses GPU `local_rank % device_count` of the GPUs it
sees, so a task that sees one GPU (Slurm --gpus-per-task=1, --gpu-bind) uses device 0 whatever its
local rank. DeepSpeed reads LOCAL_RANK as that device ordinal (init_process_group's device_id,
zero.Init, the engine), so LOCAL_RANK is set to it; DistInfo.local_rank keeps the rank's place on
its node and DistInfo.device the ordinal.

Collective timeouts: `init_distributed(timeout_s=...)` bounds every collective after the
rendezvous; a caller with a long set-up (pretrain: engine build, ZeRO-3 partitioning, resume) passes
its set-up timeout there and calls set_collective_timeout() with the training one afterwards.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch

from training.config import DistributedConfig
from training.devices import DeviceError, device_index

# The recipe's `distributed` section owns the values and why they are what they are (config.py).
DEFAULT_TIMEOUT_S = DistributedConfig.timeout_s
DEFAULT_RENDEZVOUS_TIMEOUT_S = DistributedConfig.setup_timeout_s

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Set by DeepSpeed's launcher (deepspeed/launcher/launch.py) for every rank it starts, and by no
# other launcher; torchrun marks its workers with TORCHELASTIC_RUN_ID.
DEEPSPEED_LAUNCH_VARS = ("CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE")


class DistributedSetupError(RuntimeError):
    """The launch environment is inconsistent; the message says which variable and why."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    launcher: str = "single"  # deepspeed | torchrun | mpi | slurm | single
    device: int | None = None  # accelerator ordinal among the visible devices; None on CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def in_srun_step(env) -> bool:
    return "SLURM_STEP_ID" in env and "SLURM_PROCID" in env


def detect_launcher(env=None) -> str:
    """deepspeed | torchrun | mpi | slurm | single: the rules in this module's docstring."""
    env = os.environ if env is None else env
    if all(v in env for v in TORCHRUN_VARS):
        deepspeed_launch = (all(v in env for v in DEEPSPEED_LAUNCH_VARS)
                            and "TORCHELASTIC_RUN_ID" not in env)
        return "deepspeed" if deepspeed_launch else "torchrun"
    if "OMPI_COMM_WORLD_SIZE" in env:  # mpirun, wherever it runs
        return "mpi"
    if in_srun_step(env):  # with or without srun's PMIx plugin (PMIX_RANK)
        return "slurm"
    if "PMIX_RANK" in env:
        return "mpi"
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
    """Intra-op threads of one CPU rank: the user's OMP_NUM_THREADS, else Slurm's CPUs per task,
    else this node's CPUs shared between its ranks. OMP_NUM_THREADS comes first because runs
    placed side by side on one machine (each RMT_NPROC=1 OMP_NUM_THREADS=1) would otherwise each
    take every core and slow one another down many times over. torchrun sets it to 1 when unset,
    so launch/pretrain.sh exports the per-rank share before starting torchrun."""
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS"):
        return max(1, _int_var(env, "OMP_NUM_THREADS"))
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
    """Discover rank and world, pin the device, initialise DeepSpeed's process group.

    `rendezvous_timeout_s` bounds the initial meeting of all ranks; `timeout_s` bounds every
    collective after it (a dead or stuck rank makes the others fail) until set_collective_timeout()
    changes it: pretrain passes its set-up timeout here and switches to the training one once the
    trainer is built and resumed.
    """
    if timeout_s <= 0 or rendezvous_timeout_s <= 0:
        raise DistributedSetupError(
            f"timeouts must be positive seconds (timeout_s={timeout_s}, rendezvous_timeout_s={rendezvous_timeout_s})")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    launcher = detect_launcher()
    if launcher == "slurm":
        os.environ.update(_slurm_env(os.environ))
    elif launcher == "single":
        os.environ.update(_single_env(os.environ))
    elif launcher == "mpi":
        _mpi_env()
    elif launcher == "deepspeed" and "LOCAL_WORLD_SIZE" not in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]  # launch.py's name for it
    backend = backend or default_backend()
    local_rank = _int_var(os.environ, "LOCAL_RANK")

    accel = get_accelerator()
    device = None
    if accel.device_name() != "cpu":
        try:
            device = device_index(local_rank, accel.device_count())
        except DeviceError as e:
            raise DistributedSetupError(str(e)) from None
        if device != local_rank:
            # DeepSpeed takes LOCAL_RANK as the device ordinal (init_process_group's device_id,
            # zero.Init, the engine); its engine also insists that OMPI_COMM_WORLD_LOCAL_RANK agrees.
            os.environ["LOCAL_RANK"] = str(device)
            if "OMPI_COMM_WORLD_LOCAL_RANK" in os.environ:
                os.environ["OMPI_COMM_WORLD_LOCAL_RANK"] = str(device)
        # Pin before the process group exists so NCCL binds its communicator to this rank's GPU.
        accel.set_device(device)

    deepspeed.init_distributed(dist_backend=backend,
                               auto_mpi_discovery=False,  # done above for MPI launches
                               timeout=timedelta(seconds=rendezvous_timeout_s),
                               verbose=False)
    if device is not None:
        accel.set_device(device)
    set_collective_timeout(timeout_s)

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    _check_against_slurm(launcher, world)
    info = DistInfo(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                    backend=backend, launcher=launcher, device=device)
    if set_threads and accel.device_name() == "cpu":
        torch.set_num_threads(threads_per_rank(local_world))
    return info


def _mpi_env() -> None:
    """torch's env:// variables through DeepSpeed's mpi4py discovery, before the process group
    exists (the device ordinal must be settled first), keeping a MASTER_ADDR the user set."""
    from deepspeed.comm.comm import mpi_discovery

    port, local_size = _mpi_port_and_local_size()
    user_addr = os.environ.get("MASTER_ADDR")
    mpi_discovery(distributed_port=port, verbose=False)
    if user_addr:
        os.environ["MASTER_ADDR"] = user_addr
    os.environ["LOCAL_WORLD_SIZE"] = str(local_size)


def set_collective_timeout(timeout_s: float) -> None:
    """Bound every later collective of the default process group to `timeout_s` seconds."""
    if not timeout_s > 0:
        raise DistributedSetupError(f"collective timeout must be positive seconds, got {timeout_s}")
    setter = getattr(torch.distributed.distributed_c10d, "_set_pg_timeout", None)
    if setter is None:
        raise DistributedSetupError(
            f"torch {torch.__version__} has no distributed_c10d._set_pg_timeout; cannot bound collective time")
    setter(timedelta(seconds=timeout_s))


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
