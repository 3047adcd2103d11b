"""bench/gpu_report.sh, the one command behind docs/benchmarks.md's GPU figures: it refuses to run
without a CUDA device (exit 2), and its --dry-run drives the same pipeline on the CPU (tiny profile,
tiny lengths): micro batches tried largest first with a fallback when an attempt fails, one
interleaved bench/step.py run per point, then bench/trainer_step.py (the real Trainer, ZeRO-2 and
ZeRO-3, vs (b)), the raw JSON and logs kept, the markdown table and issue 19's targets written
from them. The table writer is also checked on hand-made rows."""

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
    targets = table.split("## Issue 19 targets")[1].split("## The trainer's step")[0]
    assert "RMT (b) vs full attention (d) at 512 >= 3.0x" in targets
    assert "not measured" not in targets  # every target found its rows (at the dry run's lengths)
    # The real trainer (ZeRO-2, ZeRO-3) vs (b), at the first length and the micro batch that fit there.
    trainer = json.loads((raw / "trainer_tiny_256_eager.json").read_text())
    assert [row["variant"] for row in trainer["rows"]] == ["b", "trainer ZeRO-2", "trainer ZeRO-3"]
    assert trainer["micro_batch"] == 2 and all(row["tokens_per_step"] == 512 for row in trainer["rows"])
    section = table.split("## The trainer's step vs bench/step.py (b)")[1]
    for variant in ("bench/step.py (b)", "trainer ZeRO-2", "trainer ZeRO-3"):
        assert f"| tiny | 256 | 2 | eager | {variant} |" in section
    assert "| tiny | trainer ZeRO-3 >= 0.8x (b) |" in section and "not measured" not in section


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
    trainer = [dict(profile="gpu-350m", length=16384, micro_batch=8, compile=None, rows=[
        dict(_row("b", [1.0, 1.0, 1.0]), mfu=0.5),
        dict(_row("trainer ZeRO-2", [1.25, 1.25, 1.25]), vs_bench_b=0.8, mfu=0.4),
        dict(_row("trainer ZeRO-3", [1.2, 1.2, 1.2]), vs_bench_b=1 / 1.2, mfu=0.42)]),
        dict(profile="gpu-350m", length=16384, micro_batch=8, compile="reduce-overhead", rows=[
            _row("b", [0.5, 0.5, 0.5]), dict(_row("trainer ZeRO-2", [1.0, 1.0, 1.0]), vs_bench_b=0.5)]),
        dict(profile="gpu-350m", length=16384, run="default", status="over the time budget (450 s)", rows=[])]
    table = gpu_report_table.render([measured, missing], "NVIDIA X", peak_tflops=1000.0, trainer_points=trainer)
    assert "GPU: NVIDIA X" in table
    assert "| gpu-350m | 16384 | 8 | b | 131072 | 1.100x | 1.200x | 50.0% | 30.0% | 1.000 |" in table
    assert "| gpu-350m | 65536 | - | - | not measured: no micro batch in (2 1) fit |" in table
    assert "| gpu-350m | RMT step (b) MFU at 16K >= 45% | 30.0% | no |" in table  # against the given peak
    assert "| gpu-350m | RMT (b) vs full attention (d) at 16K >= 1.3x | 1.200x | no |" in table
    assert "| gpu-350m | RMT step (b) vs bare segment loop (c) at 16K >= 0.95x | 1.100x | yes |" in table
    assert "| gpu-350m | RMT (b) vs full attention (d) at 64K >= 3.0x | not measured | - |" in table
    assert "| gpu-350m | every segment checkpointed (a) vs (b) at 16K >= 0.75x | 0.769x | yes |" in table
    assert "| gpu-350m | 16384 | 8 | eager | trainer ZeRO-2 | 104858 | 40.0% | 1.250 | 0.800x |" in table
    assert "| gpu-350m | trainer ZeRO-2 >= 0.9x (b) | 0.800x | no |" in table
    assert "| gpu-350m | trainer ZeRO-3 >= 0.8x (b) | 0.833x | yes |" in table
    assert "| gpu-350m | 16384 | - | default | - | not measured: over the time budget (450 s) |" in table
    assert "| gpu-350m | reduce-overhead | b | 2.000x |" in table  # compiled (b) vs eager (b)
    assert "| gpu-350m | reduce-overhead | trainer ZeRO-2 | 1.250x |" in table
