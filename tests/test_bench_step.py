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
