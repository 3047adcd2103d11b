# Sourced by the GPU scripts of bench/ (gpu_report.sh, gpu_check.sh): their shared command line and
# their refusal to measure without a GPU, so both answer alike.
#
#   gpu_script_args NAME DEFAULT_OUT "$@"   sets dry_run (kept at its value unless --dry-run),
#                                           out_dir, root, python; --help prints the caller's header
#   gpu_script_require_cuda NAME WHAT       exits 2 unless torch sees a CUDA device (not in a dry run)

gpu_script_args() {
    local name="$1" default_out="$2" arg
    shift 2
    out_dir=""
    for arg in "$@"; do
        case "$arg" in
            --dry-run) dry_run=1 ;;
            -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
            -*) echo "$name: unknown option $arg (valid: --dry-run, OUT_DIR)" >&2; exit 2 ;;
            *) out_dir="$arg" ;;
        esac
    done
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    out_dir="${out_dir:-$root/$default_out}"
    python="${PYTHON:-python}"
}

gpu_script_require_cuda() {
    local name="$1" what="$2"
    if [[ "$dry_run" != 1 ]] && ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        echo "$name: no CUDA device visible to torch here; $what." \
             "Run this on a machine with one, or use --dry-run to check the pipeline on the CPU." >&2
        exit 2
    fi
}
