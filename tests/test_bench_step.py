"""bench/step.py --interleave runs every variant on the same tokens in one process: the RMT variants
(checkpointed, plain, unfused loss) compute the same loss, the checkpointed one re-runs every
segment, and each row carries its per-step times and phases (no timing is asserted)."""

import json
import subprocess
import sys


def test_interleaved_variants_train_the_same_step(repo_root, tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(repo_root / "bench" / "step.py"), "--variants", "a", "b", "u", "c", "--lengths", "1024",
         "--steps", "2", "--threads", "1", "--interleave", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"a", "b", "u", "c"}
    for variant in "abuc":
        row = rows[variant]
        assert len(row["step_times_s"]) == 2 and len(row["phases_s"]) == 3
        assert min(abs(row["step_s"] - t) for t in row["step_times_s"]) < 1e-3 and row["tokens_per_s"] > 0
    # Same initial weights, same tokens, the same sequence of optimizer steps (warm-up, one
    # full-length step, the timed ones): checkpointing and the fused loss must not change the loss.
    assert abs(rows["a"]["loss"] - rows["b"]["loss"]) < 1e-4
    assert abs(rows["u"]["loss"] - rows["b"]["loss"]) < 1e-4
    assert rows["a"]["checkpointed_segments"] == 2 and rows["b"]["checkpointed_segments"] == 0
    assert rows["c"]["paired_vs_c"] == 1.0


def test_interleave_refuses_an_unknown_variant(repo_root):
    proc = subprocess.run(
        [sys.executable, str(repo_root / "bench" / "step.py"), "--point", "--interleave", "--variant", "b,x",
         "--length", "1024"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0 and "--variant b,x" in proc.stderr and "valid:" in proc.stderr


def test_micro_batch_scales_tokens_per_step_not_the_per_sample_loss(repo_root, tmp_path):
    """--micro-batch 2 feeds every variant two copies of the sequence: twice the tokens per step
    (tokens/s and MFU count them), the same per-sample loss as --micro-batch 1."""
    rows = {}
    for micro_batch in (1, 2):
        out = tmp_path / f"mb{micro_batch}.json"
        proc = subprocess.run(
            [sys.executable, str(repo_root / "bench" / "step.py"), "--profile", "tiny", "--variants", "a", "b", "c",
             "--lengths", "256", "--steps", "1", "--threads", "1", "--interleave", "--micro-batch", str(micro_batch),
             "--json", str(out)],
            capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        report = json.loads(out.read_text())
        assert report["micro_batch"] == micro_batch
        rows[micro_batch] = {row["variant"]: row for row in report["rows"]}
    for variant in "abc":
        one, two = rows[1][variant], rows[2][variant]
        assert one["micro_batch"] == 1 and two["micro_batch"] == 2
        assert one["tokens_per_step"] == 256 and two["tokens_per_step"] == 512
        assert abs(two["tokens_per_s"] * two["step_s"] - 512) < 1e-6
        # MFU = micro batch x one sequence's FLOPs / step time / rate: per-token FLOPs unchanged.
        assert abs(two["mfu"] / two["tokens_per_s"] / (one["mfu"] / one["tokens_per_s"])
                   - report_rate_ratio(tmp_path)) < 1e-9
    for variant in "ab":
        assert abs(rows[2][variant]["loss"] - rows[1][variant]["loss"]) < 1e-4


def report_rate_ratio(tmp_path) -> float:
    """matmul rate of the micro-batch-1 run over the micro-batch-2 run's (MFU divides by its own)."""
    one, two = (json.loads((tmp_path / f"mb{mb}.json").read_text())["matmul_flops"] for mb in (1, 2))
    return one / two


def test_micro_batch_defaults_to_8_on_gpu_profiles_only(repo_root):
    sys.path.insert(0, str(repo_root / "bench"))
    import step

    assert step.parse_args(["--profile", "gpu-350m"]).micro_batch == 8
    assert step.parse_args(["--profile", "gpu-1b"]).micro_batch == 8
    assert step.parse_args([]).micro_batch == 1
    assert step.parse_args(["--profile", "tiny", "--micro-batch", "3"]).micro_batch == 3
    profile = step.PROFILES["gpu-350m"]
    assert step.step_flops(profile, "b", 16384, 8) == 8 * step.step_flops(profile, "b", 16384)
