"""bench/gpu_report.sh, the one command behind docs/benchmarks.md's GPU figures: it refuses to run
without a CUDA device (exit 2), and its --dry-run drives the same pipeline on the CPU (tiny profile,
tiny lengths): micro batches tried largest first with a fallback when an attempt fails, one
interleaved bench/step.py run per point, the raw JSON and logs kept, the markdown table and issue
19's targets written from them. The table writer is also checked on hand-made rows."""

import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import gpu_report_table  # noqa: E402


def script(repo_root):
    return str(repo_root / "bench" / "gpu_report.sh")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_refuses_without_a_cuda_device(repo_root, tmp_path):
    proc = subprocess.run(["bash", script(repo_root), str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written, no bench started
    proc = subprocess.run(["bash", script(repo_root), "--bogus"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr


def test_dry_run_writes_the_table_from_the_bench(repo_root, tmp_path):
    out = tmp_path / "report"
    # Micro batch 0 fails (bench/step.py rejects it) like an out-of-memory attempt: the script must
    # fall back to the next; 2 x 512 tokens is over the dry run's cap, so 512 runs at 1.
    env = {**os.environ, "PYTHON": sys.executable, "GPU_REPORT_MICRO_BATCHES": "0 2 1"}
    proc = subprocess.run(["bash", script(repo_root), "--dry-run", str(out)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    raw = out / "raw"
    assert (raw / "tiny_256_mb0.log").exists() and not (raw / "tiny_256_mb0.json").exists()
    for length, micro_batch in ((256, 2), (512, 1)):
        report = json.loads((raw / f"tiny_{length}.json").read_text())
        assert report["micro_batch"] == micro_batch and report["device"] == "cpu"
        assert sorted(row["variant"] for row in report["rows"]) == ["a", "b", "c", "d"]
        assert all(row["tokens_per_step"] == micro_batch * length for row in report["rows"])
    table = (out / "report.md").read_text()
    assert "GPU: none (dry run on CPU" in table
    for length, micro_batch in ((256, 2), (512, 1)):
        for variant in "abcd":
            assert f"| tiny | {length} | {micro_batch} | {variant} |" in table
    targets = table.split("## Issue 19 targets")[1]
    assert "RMT (b) vs full attention (d) at 512 >= 3.0x" in targets
    assert "not measured" not in targets  # every target found its rows (at the dry run's lengths)


def _row(variant, times, length=16384, micro_batch=8, mfu=0.5):
    return dict(variant=variant, length=length, micro_batch=micro_batch, step_times_s=times, step_s=sorted(times)[1],
                tokens_per_s=micro_batch * length / sorted(times)[1], mfu=mfu, warmup_s=60.0)


def test_table_writer_ratios_targets_and_points_not_measured():
    measured = dict(profile="gpu-350m", matmul_flops=600e12, rows=[
        _row("a", [1.3, 1.3, 1.3]), _row("b", [1.0, 1.0, 1.0], mfu=0.5), _row("c", [1.0, 1.1, 1.2]),
        _row("d", [1.2, 1.4, 1.2])])
    missing = dict(profile="gpu-350m", length=65536, status="no micro batch in (2 1) fit", rows=[])
    for point in (measured, missing):
        point["by_variant"] = {row["variant"]: row for row in point["rows"]}
    table = gpu_report_table.render([measured, missing], "NVIDIA X", peak_tflops=1000.0)
    assert "GPU: NVIDIA X" in table
    assert "| gpu-350m | 16384 | 8 | b | 131072 | 1.100x | 1.200x | 50.0% | 30.0% | 1.000 |" in table
    assert "| gpu-350m | 65536 | - | - | not measured: no micro batch in (2 1) fit |" in table
    assert "| gpu-350m | RMT step (b) MFU at 16K >= 45% | 30.0% | no |" in table  # against the given peak
    assert "| gpu-350m | RMT (b) vs full attention (d) at 16K >= 1.3x | 1.200x | no |" in table
    assert "| gpu-350m | RMT step (b) vs bare segment loop (c) at 16K >= 0.95x | 1.100x | yes |" in table
    assert "| gpu-350m | RMT (b) vs full attention (d) at 64K >= 3.0x | not measured | - |" in table
    assert "| gpu-350m | every segment checkpointed (a) vs (b) at 16K >= 0.75x | 0.769x | yes |" in table
