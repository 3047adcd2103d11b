"""Issue 5, promise 3: a NaN loss or gradient on one rank is caught on every rank before the
optimizer step, the step is skipped and counted in TensorBoard, and K in a row stop the job with
exit code 3 and the last good checkpoint intact. fp32 and bf16 run on every CPU; fp16 runs only
where DeepSpeed's accelerator supports it (a GPU, or a CPU with AVX512-FP16) and is skipped
elsewhere: tests/test_reliability_bad_input.py shows it is then refused up front with exit 2, and
tests/test_guard_policy.py pins what an fp16 overflow counts as."""

from __future__ import annotations

import json
import math

import pytest

from training.checkpoint import verify_checkpoint
from training.trainer import EXIT_NONFINITE
from tests import faults
from tests.test_reliability_helpers import (all_steps, complete_steps, console, launch_torchrun,
                                            train_losses)

# 0-based step indices poisoned on rank 1 only (tests/faults.py); the trainer logs them 1-based
# (3, 6, 7). Step 3 is an isolated bad step; 6 and 7 are two in a row = guard.max_nonfinite_in_a_row.
POISONED = [2, 5, 6]
POISONED_RANK = 1
GUARD = ["run.max_steps=20", "checkpoint.every=2", "checkpoint.keep_last=5",
         "guard.max_nonfinite_in_a_row=2"]


def _fp16_supported() -> bool:
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


# Every precision, and both ways to poison a step: a NaN loss (every gradient NaN too) and a NaN
# gradient under a finite loss (only the hooks see it). In fp16 a NaN gradient under a finite loss
# is a loss-scale overflow (not counted towards the abort; tests/test_guard_policy.py), so fp16
# poisons the loss.
@pytest.mark.parametrize("precision,kind", [("fp32", "loss"), ("bf16", "grad"), ("fp16", "loss")])
def test_nonfinite_skipped_on_every_rank_counted_and_k_in_a_row_abort(precision, kind, tmp_path):
    if precision == "fp16" and not _fp16_supported():
        pytest.skip("DeepSpeed's accelerator here has no fp16 (CPU without AVX512-FP16)")
    run_dir = tmp_path / f"{precision}_{kind}"
    # fp16: a modest initial scale, so that no natural overflow joins the injected ones.
    scale = ["deepspeed.initial_scale_power=8"] if precision == "fp16" else []
    poison = f"{kind}:{POISONED_RANK}:{','.join(map(str, POISONED))}"
    proc = launch_torchrun(run_dir, *GUARD, *scale, f"deepspeed.precision={precision}",
                           env=faults.env(nonfinite=poison))
    code = proc.wait(timeout=300)
    out = console(run_dir)
    assert code != 0 and f"exitcode  : {EXIT_NONFINITE}" in out, out[-4000:]
    assert "2 non-finite steps in a row (guard.max_nonfinite_in_a_row=2) at step 7" in out

    # Rank 1 poisoned; rank 0 saw it too (the flag is all-reduced before the step).
    for rank in (0, 1):
        for step, in_a_row, total in ((3, 1, 1), (6, 1, 2), (7, 2, 3)):
            assert (f"[rank {rank}] WARNING step {step}: non-finite loss or gradient on some "
                    f"rank; step skipped ({in_a_row} in a row, {total} total)") in out, (rank, step)

    # Skipped, not applied: a NaN update would poison the weights and every later loss.
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 8))
    assert [s for s, v in losses.items() if not math.isfinite(v)] == [3, 6, 7]
    assert all(math.isfinite(losses[s]) for s in (4, 5))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    skipped = {e.step: e.value for e in acc.Scalars("train/skipped_steps")}
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 2, 7: 3}

    # The abort came before any save of step 7; the last good checkpoint is complete and sound.
    assert complete_steps(run_dir) == [2, 4, 6] and all_steps(run_dir) == [2, 4, 6]
    state = verify_checkpoint(run_dir / "checkpoints" / "step_00000006", 2, False)
    assert state["step"] == 6 and state["skipped_steps"] == 2
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 7
