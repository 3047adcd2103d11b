"""The markdown table of bench/gpu_report.sh: one row per (profile, length, variant) from the
bench/step.py --json files it wrote, and issue 19's targets checked against those rows; then the
trainer's step vs (b) from bench/trainer_step.py's files (--trainer), with its targets and the
gain of each model.compile mode over eager.

    python bench/gpu_report_table.py --gpu "NVIDIA H200" --out report.md --trainer raw/trainer_*.json -- raw/gpu*.json

A point that did not run has a JSON with "status" (why) and no rows; it stays in the table as
"not measured". Ratios are medians of per-round ratios (the variants of a point interleaved).
"""

import argparse
import json
import sys
from pathlib import Path

# Issue 19's targets: (label, length: 0 the short (16K), 1 the long (64K), numerator variant,
# denominator variant or "mfu", threshold).
TARGETS = [
    ("RMT step (b) MFU", 0, "b", "mfu", 0.45),
    ("RMT step (b) vs bare segment loop (c)", 0, "b", "c", 0.95),
    ("RMT (b) vs full attention (d)", 0, "b", "d", 1.3),
    ("RMT (b) vs full attention (d)", 1, "b", "d", 3.0),
    ("every segment checkpointed (a) vs (b)", 0, "a", "b", 0.75),
    ("every segment checkpointed (a) vs (b)", 1, "a", "b", 0.75),
]


def median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else None


def paired_ratio(rows: dict, variant: str, base: str):
    """tokens/s of `variant` over `base`: median of per-round step-time ratios (same tokens per step)."""
    if variant not in rows or base not in rows:
        return None
    return median([b / v for b, v in zip(rows[base]["step_times_s"], rows[variant]["step_times_s"])])


def load_points(paths):
    points = []
    for path in paths:
        report = json.loads(Path(path).read_text())
        report["by_variant"] = {row["variant"]: row for row in report.get("rows", [])}
        points.append(report)
    return points


def mfu_vs_peak(row, peak_flops):
    if not peak_flops:
        return None
    return row["mfu"] * row["matmul_flops"] / peak_flops


def fmt(value, pattern, missing="-"):
    return missing if value is None else pattern.format(value)


def render(points, gpu: str, peak_tflops=None, note: str = "", target_lengths=(16384, 65536),
           trainer_points=None) -> str:
    peak = peak_tflops * 1e12 if peak_tflops else None
    lines = ["# GPU report (`bench/gpu_report.sh`)", "", f"GPU: {gpu}", ""]
    if note:
        lines += [note, ""]
    lines += ["| profile | length | micro batch | variant | tokens/s | vs (c) | vs (d) | MFU (GEMM) | MFU (peak) "
              "| step s | peak device MiB | warm-up + compile s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for point in points:
        rows = point["by_variant"]
        if not rows:
            lines.append(f"| {point['profile']} | {point.get('length', '-')} | - | - | not measured: "
                         f"{point.get('status', 'no rows')} | | | | | | | |")
            continue
        for variant, row in rows.items():
            row["matmul_flops"] = point["matmul_flops"]
            lines.append(
                f"| {point['profile']} | {row['length']} | {row.get('micro_batch', 1)} | {variant} "
                f"| {row['tokens_per_s']:.0f} | {fmt(paired_ratio(rows, variant, 'c'), '{:.3f}x')} "
                f"| {fmt(paired_ratio(rows, variant, 'd'), '{:.3f}x')} | {row['mfu'] * 100:.1f}% "
                f"| {fmt(mfu_vs_peak(row, peak), '{:.1%}')} | {row['step_s']:.3f} "
                f"| {fmt(row.get('peak_device_mb'), '{:.0f}')} | {fmt(row.get('warmup_s'), '{:.1f}')} |")
    rates = sorted({p["matmul_flops"] for p in points if p.get("matmul_flops")})
    lines += ["", "MFU (GEMM): model FLOPs (model/flops.py, times the micro batch) / step time / the GEMM "
              "rate (the profile's dtype) bench/step.py measured in the same run (" + ", ".join(f"{r / 1e12:.1f}" for r in rates)
              + " TFLOP/s); MFU (peak): against " + (f"{peak_tflops:g} TFLOP/s (--peak-tflops)" if peak_tflops
                                                      else "the spec peak, not given (--peak-tflops)") + ".",
              "", "## Issue 19 targets", "", "| profile | target | measured | met |", "|---|---|---|---|"]
    for profile in dict.fromkeys(p["profile"] for p in points):
        by_length = {}
        for point in points:
            if point["profile"] == profile and point["by_variant"]:
                by_length[next(iter(point["by_variant"].values()))["length"]] = point["by_variant"]
        for label, which, variant, base, threshold in TARGETS:
            length = target_lengths[which]
            label = f"{label} at {length // 1024}K" if length % 1024 == 0 else f"{label} at {length}"
            rows = by_length.get(length, {})
            if base == "mfu":
                row = rows.get(variant)
                value = None if row is None else (mfu_vs_peak(row, peak) if peak else row["mfu"])
                shown = fmt(value, "{:.1%}", "not measured") + ("" if peak or value is None else " (vs GEMM rate)")
                wanted = f">= {threshold:.0%}"
            else:
                value = paired_ratio(rows, variant, base)
                shown, wanted = fmt(value, "{:.3f}x", "not measured"), f">= {threshold}x"
            met = "-" if value is None else ("yes" if value >= threshold else "no")
            lines.append(f"| {profile} | {label} {wanted} | {shown} | {met} |")
    lines += trainer_section(trainer_points or [])
    return "\n".join(lines) + "\n"


# Issue 19: the trainer's step against the benchmark's (b), same model and batch.
TRAINER_TARGETS = {"trainer ZeRO-2": 0.9, "trainer ZeRO-3": 0.8}


def trainer_section(points) -> list:
    """bench/trainer_step.py's rows (eager, and per model.compile mode on ZeRO-2), the issue's
    targets, and what each compile mode gains over eager: the data to choose the capture by."""
    if not points:
        return []
    lines = ["", "## The trainer's step vs bench/step.py (b) (`bench/trainer_step.py`)", "",
             "| profile | length | micro batch | run | variant | tokens/s | MFU (GEMM) | step s | vs (b), same run "
             "| peak device MiB | warm-up s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    by_run = {}
    for point in points:
        run = point.get("run") or (point.get("compile") or "eager")
        rows = point.get("rows", [])
        if not rows:
            lines.append(f"| {point['profile']} | {point.get('length', '-')} | - | {run} | - | not measured: "
                         f"{point.get('status', 'no rows')} | | | | | |")
            continue
        by_run[(point["profile"], run)] = {row["variant"]: row for row in rows}
        for row in rows:
            name = "bench/step.py (b)" if row["variant"] == "b" else row["variant"]
            lines.append(
                f"| {point['profile']} | {row['length']} | {row.get('micro_batch', 1)} | {run} | {name} "
                f"| {row['tokens_per_s']:.0f} | {row['mfu'] * 100:.1f}% | {row['step_s']:.3f} "
                f"| {fmt(row.get('vs_bench_b'), '{:.3f}x')} | {fmt(row.get('peak_device_mb'), '{:.0f}')} "
                f"| {fmt(row.get('warmup_s'), '{:.1f}')} |")
    lines += ["", "| profile | target | measured | met |", "|---|---|---|---|"]
    for profile in dict.fromkeys(p["profile"] for p in points):
        eager = by_run.get((profile, "eager"), {})
        for variant, threshold in TRAINER_TARGETS.items():
            value = eager.get(variant, {}).get("vs_bench_b")
            met = "-" if value is None else ("yes" if value >= threshold else "no")
            lines.append(f"| {profile} | {variant} >= {threshold}x (b) | {fmt(value, '{:.3f}x', 'not measured')} "
                         f"| {met} |")
    gains = []
    for (profile, run), rows in by_run.items():
        eager = by_run.get((profile, "eager"), {})
        if run == "eager" or not eager:
            continue
        for variant in ("b", "trainer ZeRO-2"):
            if variant in rows and variant in eager:
                gains.append(f"| {profile} | {run} | {variant} | "
                             f"{rows[variant]['tokens_per_s'] / eager[variant]['tokens_per_s']:.3f}x |")
    if gains:
        lines += ["", "model.compile mode vs eager (tokens/s ratio, separate processes):", "",
                  "| profile | compile mode | variant | vs eager |", "|---|---|---|---|", *gains]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", help="bench/step.py --json files (one per profile and length)")
    parser.add_argument("--trainer", nargs="*", default=[], help="bench/trainer_step.py --json files "
                        "(end the list with --)")
    parser.add_argument("--gpu", required=True, help="the device's name (nvidia-smi)")
    parser.add_argument("--out", required=True, help="the markdown file to write")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's spec bf16 peak, if known")
    parser.add_argument("--note", default="", help="a line under the GPU name")
    parser.add_argument("--target-lengths", type=int, nargs=2, default=[16384, 65536], metavar=("SHORT", "LONG"),
                        help="the lengths issue 19's 16K and 64K targets are checked at")
    args = parser.parse_args(argv)
    trainer_points = [json.loads(Path(path).read_text()) for path in args.trainer]
    text = render(load_points(args.json), args.gpu, args.peak_tflops, args.note, tuple(args.target_lengths),
                  trainer_points)
    Path(args.out).write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
