#!/usr/bin/env bash
# Pretraining launcher: one machine, a Slurm job, or one rank under any other launcher.
#
#   deepspeed [deepspeed options] launch/pretrain.sh [--config configs/NAME.yaml] [key.path=value ...]
#       DeepSpeed's own launcher decides the processes: every visible GPU (or --num_gpus/--include),
#       one process on a CPU machine (--num_gpus N for N CPU processes); across nodes from a
#       hostfile, e.g. inside a Slurm allocation with `--launcher slurm` (README, "Slurm").
#       DeepSpeed runs this file with Python (`python -u launch/pretrain.sh --local_rank=N ...`):
#       the Python lines at the end hand each rank back to this script (rank mode, below).
#   bash launch/pretrain.sh [--config configs/NAME.yaml] [key.path=value ...]
#       every local GPU (torchrun, one process per GPU), or 2 CPU processes when there is no GPU.
#       RMT_NPROC=N overrides the process count in both cases.
#   sbatch [sbatch options] launch/pretrain.sh [same arguments]
#       one task per GPU on every node of the allocation (srun); rank and rendezvous come from the
#       Slurm environment (training/distributed.py). Options given to sbatch override the header,
#       e.g. `sbatch --nodes=4 launch/pretrain.sh ...`. The header asks for whole nodes and GPUs
#       but no task count: the tasks are laid out at each start (GPUs per node, else 1 per node;
#       the node's CPUs shared between them unless --cpus-per-task is given), so a job with a
#       node range (`sbatch --nodes=12-16 ...`) requeued after losing a node comes back on the
#       nodes left and resumes on fewer ranks (docs/reliability.md, 9). A task count on the sbatch
#       line is used as given and fixes the job's size, e.g. on a CPU-only cluster
#       `sbatch --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --gpus-per-node=0 launch/pretrain.sh`.
#   torchrun / srun / mpirun ... launch/pretrain.sh [same arguments]   (rank mode)
#       a process that a launcher already made a rank (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*, an
#       srun step, mpirun) becomes that rank: CPU allocator, then training.pretrain with the same
#       arguments. `--local_rank=N` / `--local-rank=N` are accepted.
#
# Preemption and time limits: Slurm sends SIGUSR1 180 s before the limit (header below) and
# SIGTERM on preemption or `scancel --signal=TERM`. Every rank saves a complete checkpoint at the
# next step boundary and exits 0. After a SIGUSR1 this script requeues the job; a requeued job runs
# the same command and the trainer resumes from the newest complete checkpoint of the run.
#
# Environment: RMT_NPROC (processes on this machine, local runs), PYTHON (interpreter, default
# python3; under DeepSpeed's launcher the one that runs it), RMT_ROOT (repository; default: this
# script's parent, else the sbatch submit directory).
# On CPU the launcher preloads tcmalloc (else jemalloc, else tunes glibc malloc) unless LD_PRELOAD,
# MALLOC_* or TCMALLOC_* is set.
#
# This file is both a bash script and a Python program (for DeepSpeed's launcher): keep the line
# below as the first command, write no backslashes and no triple quotes in the bash part.
#
# No task count below: Slurm keeps a job's task count across requeues, so a job with one waits for
# as many nodes as before; the launcher lays the tasks out instead (launch_slurm). --exclusive
# gives whole nodes, so their CPUs are there to share between the tasks of a node.
#SBATCH --job-name=rmt-pretrain
#SBATCH --nodes=2
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
""":"
set -euo pipefail

PYTHON=${PYTHON:-python3}

log() { echo "[launch] $*" >&2; }
die() { echo "[launch] error: $*" >&2; exit 2; }

repo_root() {
    # sbatch runs a copy of this script from Slurm's spool directory, so its own path says nothing
    # there; every other way of starting it (bash, DeepSpeed's launcher, srun, mpirun) runs the file.
    local root here
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    if [[ -n "${RMT_ROOT:-}" ]]; then
        root=$RMT_ROOT
    elif [[ -f "$here/training/pretrain.py" ]]; then
        root=$here
    elif [[ -n "${SLURM_JOB_ID:-}" && -n "${SLURM_SUBMIT_DIR:-}" ]]; then
        root=$SLURM_SUBMIT_DIR
    else
        root=$here
    fi
    [[ -f "$root/training/pretrain.py" ]] || die "no training/pretrain.py under '$root': submit from the repository root or set RMT_ROOT to it"
    echo "$root"
}

count_gpus() {  # GPUs this process may use (CUDA_VISIBLE_DEVICES honoured): training/devices.py
    # A failure (a hung driver, an interpreter without the project's requirements) stops the
    # launch: falling back to CPU would train a GPU job on CPU without a word.
    "$PYTHON" -m training.devices || die "cannot count the GPUs with $PYTHON -m training.devices (set PYTHON to the interpreter that has the requirements)"
}

positive_int() {  # name value
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1='$2' must be a positive integer"
}

# CPU allocator (docs/benchmarks.md, "The CPU allocator"): glibc's arenas fragment under the many
# short-lived activation buffers (a 1M-token step outgrew 24 GB). jemalloc keeps resident memory
# flat only by handing freed pages back to the kernel, which made every 16K-token step fault ~1M
# pages (4 GB) in again; told to keep them, it grew step after step instead. tcmalloc reuses
# them: flat, no fault churn, the fastest of the three. Fallbacks: jemalloc, then glibc.
configure_cpu_allocator() {
    if [[ -n "${LD_PRELOAD:-}" || -n "$(compgen -e | grep -E '^(MALLOC_|TCMALLOC_)' || true)" ]]; then
        log "allocator: keeping the user's LD_PRELOAD/MALLOC_*/TCMALLOC_* settings"
        return
    fi
    local lib arch
    for arch in /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64; do
        lib=$arch/libtcmalloc_minimal.so.4
        if [[ -f "$lib" ]]; then
            export LD_PRELOAD=$lib
            # tcmalloc reports every allocation above 1 GiB on stderr; large models make many.
            export TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=1099511627776
            log "allocator: tcmalloc ($lib)"
            return
        fi
    done
    for arch in /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64; do
        lib=$arch/libjemalloc.so.2
        if [[ -f "$lib" ]]; then
            export LD_PRELOAD=$lib
            export MALLOC_CONF=background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:1000
            log "allocator: jemalloc ($lib; no tcmalloc found: install libtcmalloc-minimal4)"
            return
        fi
    done
    export MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=131072
    log "allocator: glibc with MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=131072 (no tcmalloc found: install libtcmalloc-minimal4)"
}

# Validate the whole config once, before any rank or allocation is spent on it, and say where the
# run's outputs go. Uses the trainer's own argument parser, loader and path report.
preflight() {  # world_size args...
    local world=$1; shift
    WORLD_SIZE=$world "$PYTHON" - "$@" <<'EOF'
import sys
from deepspeed.accelerator import get_accelerator
from training.config import ConfigError, load_config
from training.pretrain import launch_world_size, parse_args, where
args = parse_args(sys.argv[1:])
try:
    cfg = load_config(args.config, args.overrides, world_size=launch_world_size(),
                      accelerator=get_accelerator())
except ConfigError as e:
    print(e.report(), file=sys.stderr)
    sys.exit(2)
print("[launch] this run writes:\n" + where(cfg), file=sys.stderr)
EOF
}

# Signals for the whole run reach this shell; the training processes must get a signal they treat
# as "save at the next step boundary, then exit 0", and never one that kills them:
# - srun turns a SIGTERM it receives into SIGKILL for its tasks but relays SIGUSR1 untouched, so
#   under Slurm both are relayed as USR1 (on preemption and `scancel` the tasks also get SIGTERM
#   from slurmstepd directly);
# - torchrun dies on SIGUSR1 and would report the workers' clean exit as a failure after SIGTERM,
#   so locally both go to torchrun's workers (its children) as TERM.
on_signal() {
    local sig=$1
    received=$sig
    [[ -z "${child:-}" ]] && return
    log "received SIG$sig: asking the training processes to checkpoint at the next step boundary and exit"
    if [[ "$relay_mode" == slurm ]]; then
        kill -s USR1 "$child" 2>/dev/null || true
    else
        pkill -TERM -P "$child" 2>/dev/null || kill -s TERM "$child" 2>/dev/null || true
    fi
}

run_child() {  # relay_mode command...: run in the background so traps fire; return its status
    relay_mode=$1; shift
    received=""
    child=""
    trap 'on_signal USR1' USR1
    trap 'on_signal TERM' TERM
    "$@" &
    child=$!
    local status=0
    # `wait` returns early (status > 128) when a trapped signal arrives: wait again for the real exit.
    while true; do
        status=0
        wait "$child" || status=$?
        kill -0 "$child" 2>/dev/null || break
    done
    return "$status"
}

# GPUs per node of a job submitted without a task count, hence the training step's tasks per node.
# The first positive of: Slurm's count of the GPUs it gave the job on this node
# (SLURM_GPUS_ON_NODE, set in a batch step, which holds all of them); the job's --gpus-per-node
# ([type:]count; an salloc shell may run on a node without GPUs); the GPUs this interpreter sees
# (a cluster that does not manage GPUs, where --gpus-per-node=0 is given). 1 task on a CPU node.
slurm_tasks_per_node() {  # gpus_seen
    local seen=$1 given=${SLURM_GPUS_ON_NODE:-} asked=${SLURM_GPUS_PER_NODE:-}
    if [[ -n "$given" ]]; then
        [[ "$given" =~ ^[0-9]+$ ]] || die "SLURM_GPUS_ON_NODE='$given' is not a GPU count"
        [[ "$given" -gt 0 && "$seen" -eq 0 ]] && die "Slurm gave this job $given GPU(s) on this node (SLURM_GPUS_ON_NODE) but $PYTHON sees none: use an interpreter with a CUDA build of torch (PYTHON=...), or submit with --gpus-per-node=0 for a CPU run"
    fi
    [[ "$asked" == *,* ]] && asked=0  # a list of several GPU types is not one count: left to the others
    asked=${asked##*:}
    [[ "$asked" =~ ^[0-9]+$ ]] || asked=0
    local count
    for count in "${given:-0}" "$asked" "$seen" 1; do
        if [[ "$count" -gt 0 ]]; then
            echo "$count"
            return
        fi
    done
}

# CPUs per task when sbatch was given no --cpus-per-task: the header's --exclusive gives the job
# whole nodes, shared out evenly between the tasks of a node (empty: srun's default, when the
# tasks per node are not known, i.e. a bare --ntasks).
slurm_cpus_per_task() {  # tasks_per_node
    local per_node=${1:-}
    [[ -n "$per_node" && "${SLURM_CPUS_ON_NODE:-}" =~ ^[0-9]+$ ]] || return 0
    local cpus=$(( SLURM_CPUS_ON_NODE / per_node ))
    echo $(( cpus > 0 ? cpus : 1 ))
}

launch_slurm() {
    local root=$1; shift
    cd "$root"
    local gpus
    gpus=$(count_gpus)
    [[ "$gpus" -eq 0 ]] && configure_cpu_allocator
    # A job with a task count (--ntasks-per-node or --ntasks on the sbatch line, as on the CPU test
    # clusters) gets exactly those tasks from srun. Any task count fixes the job's size, so the
    # header sets none: such a job (also `--nodes=12-16`) is laid out here on however many nodes
    # it got this time, and requeued after losing a node it comes back on the nodes left.
    local tasks=${SLURM_NTASKS:-} per_node=${SLURM_NTASKS_PER_NODE:-} nodes=${SLURM_JOB_NUM_NODES:-1} layout=()
    if [[ -z "$tasks" ]]; then
        per_node=$(slurm_tasks_per_node "$gpus")
        tasks=$(( nodes * per_node ))
        layout=(--ntasks-per-node="$per_node" --ntasks="$tasks")
    fi
    # Slurm >= 22.05: srun no longer inherits --cpus-per-task from the allocation.
    local cpus=${SLURM_CPUS_PER_TASK:-}
    [[ -n "$cpus" ]] || cpus=$(slurm_cpus_per_task "$per_node")
    [[ -n "$cpus" ]] && export SRUN_CPUS_PER_TASK=$cpus
    log "Slurm job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): $tasks tasks on $nodes node(s) [${SLURM_JOB_NODELIST:-}], $gpus GPU(s) on this node, ${cpus:-srun default} CPU(s) per task"
    log "launcher log: $(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=//p' || echo 'see sbatch --output')"
    preflight "$tasks" "$@"
    local status=0
    run_child slurm srun --kill-on-bad-exit=1 "${layout[@]}" "$PYTHON" -m training.pretrain "$@" || status=$?
    if [[ "$received" == USR1 && "$status" -eq 0 ]]; then
        log "time limit near: checkpoint written, requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    log "training step exited with status $status"
    exit "$status"
}

launch_local() {
    local root=$1; shift
    cd "$root"
    local gpus nproc
    gpus=$(count_gpus)
    if [[ "$gpus" -gt 0 ]]; then
        nproc=${RMT_NPROC:-$gpus}
    else
        nproc=${RMT_NPROC:-2}
        configure_cpu_allocator
    fi
    positive_int RMT_NPROC "$nproc"
    # CPU ranks take OMP_NUM_THREADS as their thread count (training/distributed.py); torchrun
    # would set an unset one to 1, so the default, this machine's CPUs shared out, is set here.
    if [[ "$gpus" -eq 0 && -z "${OMP_NUM_THREADS:-}" ]]; then
        local cpus
        cpus=$(nproc)
        export OMP_NUM_THREADS=$(( cpus / nproc > 0 ? cpus / nproc : 1 ))
    fi
    log "local run: $nproc process(es) on $(hostname), $gpus GPU(s)"
    preflight "$nproc" "$@"
    local status=0
    run_child local "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m training.pretrain "$@" || status=$?
    exit "$status"
}

# A process that some launcher already made a rank: DeepSpeed's launcher (through the Python lines
# at the end of this file, or directly with --no_python), torchrun --no-python, an srun step, mpirun.
# The rank-discovery rules themselves live in training/distributed.py.
is_rank_process() {
    [[ -n "${RANK:-}" && -n "${WORLD_SIZE:-}" && -n "${LOCAL_RANK:-}" ]] && return 0
    [[ -n "${SLURM_STEP_ID:-}" && -n "${SLURM_PROCID:-}" ]] && return 0
    [[ -n "${OMPI_COMM_WORLD_SIZE:-}" || -n "${PMIX_RANK:-}" ]]
}

launch_rank() {
    local root=$1; shift
    cd "$root"
    local gpus
    gpus=$(count_gpus)
    if [[ "$gpus" -eq 0 && "${RANK:-${SLURM_PROCID:-${OMPI_COMM_WORLD_RANK:-0}}}" == 0 ]]; then
        configure_cpu_allocator
    elif [[ "$gpus" -eq 0 ]]; then
        configure_cpu_allocator 2>/dev/null  # the same line from every rank would be noise
    fi
    exec "$PYTHON" -u -m training.pretrain "$@"
}

main() {
    local arg
    for arg in "$@"; do
        if [[ "$arg" == -h || "$arg" == --help ]]; then
            cd "$(repo_root)" && exec "$PYTHON" -m training.pretrain --help
        fi
    done
    local root
    root=$(repo_root)
    if is_rank_process; then
        launch_rank "$root" "$@"
    # A batch script or an salloc shell (job, but no step yet): start one task per GPU with srun.
    elif [[ -n "${SLURM_JOB_ID:-}" && -z "${SLURM_STEP_ID:-}" ]]; then
        launch_slurm "$root" "$@"
    else
        launch_local "$root" "$@"
    fi
}

# Sourced (tests/test_launch_local.py tests the functions above one by one): define only.
(return 0 2>/dev/null) && return 0
main "$@"
exit
: <<'#END_OF_PYTHON'  # bash never runs what follows; this keeps `bash -n` able to parse it
":"""
# Python: DeepSpeed's launcher runs this file as `python -u launch/pretrain.sh --local_rank=N ...`
# (its Slurm, MPI and pdsh back-ends the same way, without --local_rank). Everything above is one
# string to Python; the rank is handed back to the bash part, which starts it like any other rank.
import os
import sys

os.environ.setdefault("PYTHON", sys.executable)
os.execvp("bash", ["bash", os.path.abspath(__file__), *sys.argv[1:]])
#END_OF_PYTHON
