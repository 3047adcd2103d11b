#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md's GPU section (issue 19) in one run on one GPU:
# bench/step.py on profiles gpu-350m and gpu-1b at 16K and 64K tokens per sample, variants
# a b c d interleaved in one process per point, --compile, the micro batch as large as fits
# (tried largest first, the next one after a failed attempt). Writes OUT_DIR/report.md (markdown
# table, issue 19's targets checked) and OUT_DIR/raw/ (each attempt's JSON and log).
#
#   bench/gpu_report.sh [--dry-run] [OUT_DIR]        # OUT_DIR default: bench/out/gpu_report
#
# Without a CUDA device it refuses (exit 2). --dry-run (or GPU_REPORT_DRY_RUN=1) runs the same
# pipeline on the CPU: the tiny profile, lengths 256 and 512, no --compile, in under a minute.
# Settings (environment): GPU_REPORT_PROFILES, GPU_REPORT_LENGTHS, GPU_REPORT_MICRO_BATCHES (tried
# in order, default "8 4 2 1"), GPU_REPORT_MAX_TOKENS (a micro batch whose micro batch x length
# exceeds it is not tried; default 131072 = 8 x 16K), GPU_REPORT_STEPS (timed steps per variant,
# default 3; dry run 2),
# GPU_REPORT_BUDGET_S (all attempts end within this many seconds, default 450, so the report
# takes under 8 minutes; each attempt is also cut at GPU_REPORT_POINT_TIMEOUT_S, default 240),
# GPU_PEAK_TFLOPS (spec bf16 peak for MFU against it; none by default), GPU_REPORT_TRAINER_COMPILE
# (model.compile modes timed in the trainer on the first profile, ZeRO-2; default "default
# reduce-overhead", i.e. torch.compile and torch.compile + CUDA graphs; none in the dry run).
# After the bench points: bench/trainer_step.py (the real Trainer, ZeRO-2 and ZeRO-3, vs (b)) per
# profile at the first length, then the compile modes; all within the same time budget, of which
# the bench points leave GPU_REPORT_TRAINER_RESERVE_S (default 150; dry run 0) to the trainer's.
set -euo pipefail

dry_run="${GPU_REPORT_DRY_RUN:-0}"
source "$(dirname "${BASH_SOURCE[0]}")/gpu_script_args.sh"
gpu_script_args gpu_report.sh bench/out/gpu_report "$@"
gpu_script_require_cuda gpu_report.sh "this report measures a GPU"

if [[ "$dry_run" == 1 ]]; then
    device=cpu gpu="none (dry run on CPU: tiny profile, tiny lengths; no GPU figures)"
    profiles="${GPU_REPORT_PROFILES:-tiny}" lengths="${GPU_REPORT_LENGTHS:-256 512}"
    micro_batches="${GPU_REPORT_MICRO_BATCHES:-2 1}" max_tokens="${GPU_REPORT_MAX_TOKENS:-512}"
    extra=(--threads 1) default_steps=2 trainer_extra=(--threads 1 --warmup 1 --in-process)
    trainer_compile_modes="${GPU_REPORT_TRAINER_COMPILE:-}"  # a cold CPU compile takes minutes
    default_trainer_reserve_s=0
else
    device=cuda
    gpu="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)"
    gpu="${gpu:-$("$python" -c 'import torch; print(torch.cuda.get_device_name(0))')}"
    profiles="${GPU_REPORT_PROFILES:-gpu-350m gpu-1b}" lengths="${GPU_REPORT_LENGTHS:-16384 65536}"
    micro_batches="${GPU_REPORT_MICRO_BATCHES:-8 4 2 1}" max_tokens="${GPU_REPORT_MAX_TOKENS:-131072}"
    extra=(--compile) default_steps=3 trainer_extra=()
    trainer_compile_modes="${GPU_REPORT_TRAINER_COMPILE:-default reduce-overhead}"
    default_trainer_reserve_s=150
fi
steps="${GPU_REPORT_STEPS:-$default_steps}" budget_s="${GPU_REPORT_BUDGET_S:-450}"
point_timeout_s="${GPU_REPORT_POINT_TIMEOUT_S:-240}"
trainer_reserve_s="${GPU_REPORT_TRAINER_RESERVE_S:-$default_trainer_reserve_s}"
raw="$out_dir/raw"
mkdir -p "$raw"
rm -f "$raw"/*.json
start=$SECONDS
echo "gpu_report: $gpu; profiles $profiles; lengths $lengths; micro batches $micro_batches; out $out_dir"

# stub PROFILE LENGTH STATUS: the JSON of a point that did not run (the table says why).
stub() {
    printf '{"profile": "%s", "length": %s, "status": "%s", "rows": []}\n' "$1" "$2" "$3" > "$raw/${1}_${2}.json"
}

for profile in $profiles; do
    for length in $lengths; do
        status="no micro batch in ($micro_batches) fit"
        for mb in $micro_batches; do
            if (( mb * length > max_tokens )); then continue; fi
            # Kept back for the trainer's runs below, which the targets need as much as these points.
            left_s=$(( budget_s - trainer_reserve_s - (SECONDS - start) ))
            if (( left_s < 30 )); then status="over the time budget (${budget_s} s)"; break; fi
            attempt_s=$(( left_s < point_timeout_s ? left_s : point_timeout_s ))
            log="$raw/${profile}_${length}_mb${mb}.log" json="$raw/${profile}_${length}_mb${mb}.json"
            echo "  $profile L=$length micro batch $mb ..."
            rc=0
            timeout "$attempt_s" "$python" "$root/bench/step.py" --profile "$profile" --device "$device" \
                --lengths "$length" --variants a b c d --interleave --steps "$steps" --micro-batch "$mb" \
                --no-live-peak --json "$json" "${extra[@]}" > "$log" 2>&1 || rc=$?
            # A point fits when every variant produced a row (an out-of-memory child leaves none).
            if [[ $rc == 0 && -f "$json" ]] && "$python" -c 'import json, sys; sys.exit(len(json.load(open(sys.argv[1]))["rows"]) != 4)' "$json"; then
                cp "$json" "$raw/${profile}_${length}.json"
                status=ok
                break
            fi
            rm -f "$json"
            status="no micro batch in ($micro_batches) fit"
            if [[ $rc == 124 ]]; then status="timed out at micro batch $mb (${attempt_s} s)"; fi
            echo "    failed (rc $rc; see $log)"
        done
        if [[ "$status" != ok ]]; then stub "$profile" "$length" "$status"; fi
    done
done

# The trainer's own step vs (b) (bench/trainer_step.py: the real Trainer, ZeRO-2 and ZeRO-3), at the
# first length with the micro batch the bench point ran at; then, on the first profile, the choice
# of capture: model.compile per mode (ZeRO-2; each run also times (b) compiled the same way).
# Points the budget does not reach are listed as not measured.
read -r -a all_lengths <<< "$lengths"
trainer_length="${all_lengths[0]}"
read -r -a compile_modes <<< "$trainer_compile_modes"
trainer_points=()
first_profile=1
for profile in $profiles; do
    bench_json="$raw/${profile}_${trainer_length}.json"
    mb="$("$python" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("micro_batch", ""))' "$bench_json" 2>/dev/null || true)"
    runs=("eager")
    if [[ $first_profile == 1 ]]; then runs+=("${compile_modes[@]}"); fi
    first_profile=0
    for run in "${runs[@]}"; do
        name="trainer_${profile}_${trainer_length}_${run}"
        json="$raw/$name.json" log="$raw/$name.log"
        trainer_points+=("$json")
        if [[ -z "$mb" ]]; then
            printf '{"profile": "%s", "length": %s, "run": "%s", "status": "%s", "rows": []}\n' "$profile" \
                "$trainer_length" "$run" "the bench point did not run" > "$json"
            continue
        fi
        left_s=$(( budget_s - (SECONDS - start) ))
        if (( left_s < 60 )); then
            printf '{"profile": "%s", "length": %s, "run": "%s", "status": "%s", "rows": []}\n' "$profile" \
                "$trainer_length" "$run" "over the time budget (${budget_s} s)" > "$json"
            continue
        fi
        attempt_s=$(( left_s < point_timeout_s ? left_s : point_timeout_s ))
        compile_args=()
        if [[ "$run" != eager ]]; then compile_args=(--compile "$run" --zero-stages 2); fi
        echo "  trainer $profile L=$trainer_length micro batch $mb ($run) ..."
        rc=0
        timeout "$attempt_s" "$python" "$root/bench/trainer_step.py" --profile "$profile" --device "$device" \
            --length "$trainer_length" --micro-batch "$mb" --steps "$steps" --json "$json" \
            "${trainer_extra[@]}" "${compile_args[@]}" > "$log" 2>&1 || rc=$?
        if [[ $rc != 0 || ! -f "$json" ]]; then
            status="failed (rc $rc; see $log)"
            if [[ $rc == 124 ]]; then status="timed out (${attempt_s} s)"; fi
            printf '{"profile": "%s", "length": %s, "run": "%s", "status": "%s", "rows": []}\n' "$profile" \
                "$trainer_length" "$run" "$status" > "$json"
            echo "    $status"
        fi
    done
done

peak=()
if [[ -n "${GPU_PEAK_TFLOPS:-}" ]]; then peak=(--peak-tflops "$GPU_PEAK_TFLOPS"); fi
# Issue 19's 16K and 64K targets are checked at the first and last length.
points=()
for profile in $profiles; do for length in $lengths; do points+=("$raw/${profile}_${length}.json"); done; done
read -r -a target_lengths <<< "$lengths"
"$python" "$root/bench/gpu_report_table.py" --gpu "$gpu" --out "$out_dir/report.md" "${peak[@]}" \
    --target-lengths "${target_lengths[0]}" "${target_lengths[-1]}" \
    --note "$(date -u +%Y-%m-%dT%H:%MZ); $((SECONDS - start)) s; torch $("$python" -c 'import torch; print(torch.__version__)')" \
    --trainer "${trainer_points[@]}" -- "${points[@]}"
echo "gpu_report: wrote $out_dir/report.md ($((SECONDS - start)) s)"
