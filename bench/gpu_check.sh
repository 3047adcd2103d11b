#!/usr/bin/env bash
# Everything this repository can only check on a GPU, in one command within a time budget: what to
# run first on a new GPU node, and what a session that is lent a GPU for a few minutes runs.
#   1. tests   the CUDA-only tests: a micro-step under torch.cuda.set_sync_debug_mode("error"),
#              ZeRO-0 and ZeRO-3, bf16 (tests/test_trainer_sync.py), and the fused AdamW's veto
#              (tests/test_optim_fused.py);
#   2. pretrain  the users' own command on every local GPU, shortened: `deepspeed launch/pretrain.sh
#              run.max_steps=N` on the default recipe (ZeRO-3; eval, checkpoint, TensorBoard, export
#              and its reload check at the last step);
#   3. report  bench/gpu_report.sh (every GPU figure of docs/benchmarks.md) in the time left.
# Writes OUT_DIR/summary.md (per part: command, exit status, wall seconds; then the report's table)
# and OUT_DIR/<part>.log; the report's own files under OUT_DIR/gpu_report/.
#
#   bench/gpu_check.sh [--dry-run] [OUT_DIR]        # OUT_DIR default: bench/out/gpu_check
#
# Without a CUDA device it refuses (exit 2); --dry-run runs the same parts on the CPU (the report's
# own dry run; 2 pretrain steps), which is what tests/test_bench_gpu_check.py runs.
# Settings (environment): GPU_CHECK_BUDGET_S (default 540: the whole check ends within it; the
# report gets what parts 1-2 leave, less 30 s for its table, and is listed as not run under 120 s),
# GPU_CHECK_PARTS (default "tests pretrain report"), GPU_CHECK_PRETRAIN_STEPS (default 100; dry
# run 2), GPU_CHECK_TESTS_TIMEOUT_S (240), GPU_CHECK_PRETRAIN_TIMEOUT_S (240); the report's own
# settings pass through (bench/gpu_report.sh --help). Exit status: 0 when every part passed, else 1.
set -euo pipefail

dry_run=0
source "$(dirname "${BASH_SOURCE[0]}")/gpu_script_args.sh"
gpu_script_args gpu_check.sh bench/out/gpu_check "$@"
parts="${GPU_CHECK_PARTS:-tests pretrain report}"
budget_s="${GPU_CHECK_BUDGET_S:-540}"
steps="${GPU_CHECK_PRETRAIN_STEPS:-$([[ $dry_run == 1 ]] && echo 2 || echo 100)}"
tests_timeout_s="${GPU_CHECK_TESTS_TIMEOUT_S:-240}" pretrain_timeout_s="${GPU_CHECK_PRETRAIN_TIMEOUT_S:-240}"
# Every bad setting in one message, before anything runs.
problems=()
for part in $parts; do
    case "$part" in tests|pretrain|report) ;;
        *) problems+=("GPU_CHECK_PARTS has '$part' (valid: tests, pretrain, report)") ;;
    esac
done
for setting in GPU_CHECK_BUDGET_S=$budget_s GPU_CHECK_PRETRAIN_STEPS=$steps \
               GPU_CHECK_TESTS_TIMEOUT_S=$tests_timeout_s GPU_CHECK_PRETRAIN_TIMEOUT_S=$pretrain_timeout_s; do
    if ! [[ "${setting#*=}" =~ ^[1-9][0-9]*$ ]]; then
        problems+=("${setting%%=*}='${setting#*=}' is not a whole number >= 1")
    fi
done
if (( ${#problems[@]} )); then
    printf 'gpu_check.sh: %s\n' "${problems[@]}" >&2
    exit 2
fi
gpu_script_require_cuda gpu_check.sh "these checks need a GPU"
# Absolute: the parts run from the repository root.
out_dir="$(mkdir -p "$out_dir" && cd "$out_dir" && pwd)"
# An earlier check's files would be read as this one's (the skip count, the report's table).
rm -rf "$out_dir"/{tests,pretrain,report}.log "$out_dir/summary.md" "$out_dir/gpu_report" "$out_dir/runs"
report_args=()
if [[ $dry_run == 1 ]]; then report_args=(--dry-run); fi
start=$SECONDS
failed=0
rows=()

# run_part NAME TIMEOUT_S COMMAND...: runs it with its output in NAME.log, one summary row.
run_part() {
    local name="$1" limit="$2" rc=0 t0=$SECONDS
    shift 2
    if (( limit < 1 )); then
        rows+=("| $name | \`$*\` | not run: the budget (${budget_s} s) is spent | 0 | |")
        failed=1
        return
    fi
    echo "gpu_check: $name (at most $limit s): $*"
    (cd "$root" && timeout "$limit" "$@") > "$out_dir/$name.log" 2>&1 || rc=$?
    local verdict=passed
    if [[ $rc == 124 ]]; then verdict="timed out ($limit s)"; elif [[ $rc != 0 ]]; then verdict="failed (exit $rc)"; fi
    if [[ $rc != 0 ]]; then failed=1; fi
    rows+=("| $name | \`$*\` | $verdict | $((SECONDS - t0)) | $name.log |")
    echo "gpu_check: $name $verdict ($((SECONDS - t0)) s)"
}

for part in $parts; do
    left_s=$(( budget_s - (SECONDS - start) ))
    case "$part" in
        tests)
            limit=$tests_timeout_s
            run_part tests $(( left_s < limit ? left_s : limit )) "$python" -m pytest -q -rs -p no:cacheprovider \
                tests/test_trainer_sync.py::test_a_micro_step_does_not_synchronise_the_gpu tests/test_optim_fused.py
            # On a GPU a skipped test is a check not made (e.g. torch sees no device in pytest): a
            # failure. The dry run skips the CUDA one by design and only says so.
            skipped=$(grep -c "^SKIPPED" "$out_dir/tests.log" 2>/dev/null || true)
            if (( skipped > 0 )); then
                if [[ $dry_run == 0 ]]; then verdict="failed: $skipped skipped"; failed=1; else verdict="passed, $skipped skipped"; fi
                rows[-1]="${rows[-1]/| passed |/| $verdict (tests.log) |}"
            fi ;;
        pretrain)
            limit=$pretrain_timeout_s
            run_part pretrain $(( left_s < limit ? left_s : limit )) env PYTHON="$python" deepspeed launch/pretrain.sh \
                "run.max_steps=$steps" "run.runs_dir=$out_dir/runs" "eval.every=$steps" "checkpoint.every=$steps" \
                "logging.every=1" ;;
        report)
            report_s=$(( left_s - 30 ))
            if (( report_s < 120 )); then
                rows+=("| report | \`bench/gpu_report.sh\` | not run: ${left_s} s of the budget left | 0 | |")
                failed=1
                continue
            fi
            run_part report "$left_s" env PYTHON="$python" GPU_REPORT_BUDGET_S="$report_s" \
                bash bench/gpu_report.sh "${report_args[@]}" "$out_dir/gpu_report" ;;
    esac
done

if [[ $dry_run == 1 ]]; then
    where="dry run on the CPU"
else
    where="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)"
fi
commit="$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
torch_version="$("$python" -c 'import torch; print(torch.__version__)')"
{
    echo "# bench/gpu_check.sh"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%MZ); commit $commit; torch $torch_version; ${where:-GPU name unknown};" \
         "$((SECONDS - start)) s of a ${budget_s} s budget"
    echo
    echo "| part | command | result | wall s | log |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
    if [[ -f "$out_dir/gpu_report/report.md" ]]; then echo; cat "$out_dir/gpu_report/report.md"; fi
} > "$out_dir/summary.md"
echo "gpu_check: wrote $out_dir/summary.md ($((SECONDS - start)) s)"
exit $failed
