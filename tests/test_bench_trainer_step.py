"""bench/trainer_step.py: the real Trainer (one rank, ZeRO-2 and ZeRO-3, in this process) and
bench/step.py's (b) on the same tiny profile; tokens/s, MFU with the trainer model's own FLOPs
count, and the ratio to (b); bad arguments refused before any work."""

import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import step as bench_step  # noqa: E402
import trainer_step  # noqa: E402

from model import RMTConfig  # noqa: E402
from training.config import load_config  # noqa: E402


@pytest.fixture
def clean_process():
    """init_distributed sets the launcher's variables and torch's threads: put them back."""
    from training.distributed import destroy

    environ, threads = dict(os.environ), torch.get_num_threads()
    yield
    destroy()
    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads(threads)


def test_trainer_step_rows_against_bench_b(clean_process, tmp_path):
    out = tmp_path / "rows.json"
    args = trainer_step.parse_args(["--profile", "tiny", "--length", "256", "--steps", "2", "--warmup", "1",
                                    "--threads", "1", "--in-process", "--json", str(out)])
    assert args.micro_batch == 1 and args.zero_stages == [2, 3]
    rows = trainer_step.run_driver(args)
    assert json.loads(out.read_text())["rows"] == rows
    assert [row["variant"] for row in rows] == ["b", "trainer ZeRO-2", "trainer ZeRO-3"]
    rate = json.loads(out.read_text())["matmul_flops"]

    # The model the trainer trained, from its own config: its FLOPs are what MFU divides.
    cfg = load_config(None, trainer_step.trainer_overrides("tiny", 256, 1, 2, None, str(tmp_path)))
    flops = RMTConfig(**cfg.model.rmt_kwargs()).training_flops(256)
    for row in rows:
        # step_times_s are rounded to ms (bench/step.py) or 0.1 ms (trainer_step); step_s is the fastest
        assert len(row["step_times_s"]) == 2 and row["step_s"] == pytest.approx(min(row["step_times_s"]), abs=6e-4)
        assert row["tokens_per_s"] == pytest.approx(256 / row["step_s"])
        assert row["mfu"] == pytest.approx(flops / row["step_s"] / rate)
        assert row["vs_bench_b"] == pytest.approx(rows[0]["step_s"] / row["step_s"])
        assert math.isfinite(row["loss"])
    for row in rows[1:]:
        assert row["segments"] == 256 // bench_step.PROFILES["tiny"].segment_size  # whole segments, as (b)
    # A stage that failed (None from its process) leaves the others' rows.
    assert [r["variant"] for r in trainer_step.rated_rows(rows[0], [None, rows[2]], bench_step.PROFILES["tiny"],
                                                          rate)] == ["b", "trainer ZeRO-3"]


def test_bad_arguments_exit_2_before_any_work(capsys):
    for argv, message in (
        (["--profile", "tiny", "--length", "200"], "--length 200: must be a positive multiple of the profile's "
                                                    "segment size 128"),
        (["--compile"], "--compile: model.compile is refused under ZeRO-3; pass --zero-stages 2"),
        (["--steps", "0"], "must be >= 1"),
        (["--compile", "reduce-overhead", "--zero-stages", "2"], "--compile reduce-overhead: adds CUDA graphs, "
                                                                 "which need --device cuda"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            trainer_step.parse_args(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
