#!/usr/bin/env bash
# DeepSpeed's launcher across the nodes of a Slurm allocation, in one line (inside an sbatch
# script or an salloc shell):
#
#   deepspeed $(bash launch/deepspeed_slurm_args.sh) launch/pretrain.sh [--config C] [key=value ...]
#
# DeepSpeed's runner needs a hostfile to see more than the node it runs on, and, with one, checks
# password-less ssh and asks the first host for its address over ssh. Its Slurm back-end starts
# the ranks with `srun` instead (one task per slot), and the ranks meet through the Slurm
# environment (training/distributed.py), so neither ssh step is needed. This script writes the
# allocation's hostfile (one line per node, slots = its Slurm tasks, or its GPUs in a job without a
# task count) and prints the runner's
# options: --hostfile FILE --launcher slurm --force_multi --no_ssh_check --master_addr FIRST_NODE.
# --force_multi keeps the Slurm back-end on a one-node allocation too, so every rank is a Slurm
# task there as well (signals, accounting and cgroups as with any srun step).
#
# Environment: SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_TASKS_PER_NODE (set by sbatch/salloc);
# RMT_HOSTFILE (where to write it; default ${TMPDIR:-/tmp}/rmt-hostfile-$SLURM_JOB_ID).
set -euo pipefail

die() { echo "[deepspeed_slurm_args] error: $*" >&2; exit 2; }

[[ -n "${SLURM_JOB_ID:-}" && -n "${SLURM_JOB_NODELIST:-}" ]] ||
    die "not inside a Slurm allocation (SLURM_JOB_ID / SLURM_JOB_NODELIST unset): run it in an sbatch script or salloc shell"
command -v scontrol >/dev/null 2>&1 || die "scontrol not found: the Slurm client tools are needed to expand SLURM_JOB_NODELIST"

# Slurm's compressed per-node task counts, e.g. '2(x3),1' -> '2 2 2 1'.
tasks_per_node() {
    local part count repeat out=()
    IFS=, read -ra parts <<< "${SLURM_TASKS_PER_NODE:-1}"
    for part in "${parts[@]}"; do
        if [[ "$part" =~ ^([0-9]+)[(]x([0-9]+)[)]$ ]]; then
            count=${BASH_REMATCH[1]}
            repeat=${BASH_REMATCH[2]}
            while (( repeat-- > 0 )); do out+=("$count"); done
        else
            out+=("$part")
        fi
    done
    echo "${out[@]}"
}

mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
read -ra slots <<< "$(tasks_per_node)"
[[ ${#hosts[@]} -gt 0 ]] || die "SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST' names no host"
if [[ -z "${SLURM_NTASKS:-}" ]]; then
    # A job without a task count (launch/pretrain.sh's header; a node range that may shrink on
    # requeue) has one Slurm task per node: a slot per GPU instead, by the launcher's own rule.
    # shellcheck source=pretrain.sh
    source "$(dirname "${BASH_SOURCE[0]}")/pretrain.sh"
    root=$(repo_root) || exit 2
    gpus=$(cd "$root" && count_gpus) || exit 2
    per_node=$(slurm_tasks_per_node "$gpus") || exit 2
    slots=()
    for _ in "${hosts[@]}"; do slots+=("$per_node"); done
fi
[[ ${#slots[@]} -eq ${#hosts[@]} ]] ||
    die "SLURM_TASKS_PER_NODE='${SLURM_TASKS_PER_NODE:-}' does not give one count per node of '$SLURM_JOB_NODELIST'"

hostfile=${RMT_HOSTFILE:-${TMPDIR:-/tmp}/rmt-hostfile-$SLURM_JOB_ID}
tmp="$hostfile.tmp.$$"
for i in "${!hosts[@]}"; do
    echo "${hosts[$i]} slots=${slots[$i]}"
done > "$tmp"
mv -f "$tmp" "$hostfile"
echo "--hostfile $hostfile --launcher slurm --force_multi --no_ssh_check --master_addr ${hosts[0]}"
