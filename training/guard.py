"""What a step with non-finite values means, per precision (the trainer's non-finite guard).

Every rank flags a non-finite loss and, separately, non-finite gradients (tensor hooks); the
trainer all-reduces both flags, so every rank classifies the step the same way:

  ok          finite loss and gradients: apply the update.
  overflow    fp16 only: finite loss, non-finite gradients, loss scale above its minimum. This
              is the dynamic loss scaler's normal business (the scaled gradients overflowed):
              DeepSpeed skips the update and halves the scale. Counted as a skipped step, but
              not towards `guard.max_nonfinite_in_a_row`: a fresh fp16 run overflows several
              times in a row while the scale (2^16 at start) comes down, and aborting there would
              kill healthy runs.
  nonfinite   a non-finite loss (any precision), non-finite gradients in fp32 or bf16 (no
              scaling could have caused them), or an fp16 overflow with the scale already at its
              minimum. Skipped and counted towards the abort.
  fatal_before_step  fp16 with the loss scale already at its minimum and anything non-finite:
              DeepSpeed's loss scaler raises when asked to go below min_loss_scale, so the trainer
              stops before `engine.step()` (exit code 3, last complete checkpoint untouched)
              rather than die with a traceback from inside DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

OK, OVERFLOW, NONFINITE = "ok", "overflow", "nonfinite"


@dataclass(frozen=True)
class StepVerdict:
    kind: str                # OK | OVERFLOW | NONFINITE
    fatal_before_step: bool  # stop before engine.step(): DeepSpeed itself would raise

    @property
    def skipped(self) -> bool:
        return self.kind != OK

    @property
    def counts_towards_abort(self) -> bool:
        return self.kind == NONFINITE


def classify_step(loss_finite: bool, grads_finite: bool, precision: str,
                  loss_scale: Optional[float] = None,
                  min_loss_scale: float = 1.0) -> StepVerdict:
    """Verdict for one optimizer step from the all-reduced flags (see module docstring).

    `loss_scale` is DeepSpeed's current dynamic loss scale (fp16 only)."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision {precision!r} must be fp32, bf16 or fp16")
    if loss_finite and grads_finite:
        return StepVerdict(OK, False)
    if precision != "fp16":
        return StepVerdict(NONFINITE, False)
    if loss_scale is None:
        raise ValueError("fp16 needs the current loss scale to classify an overflow")
    at_min = loss_scale <= min_loss_scale
    if not loss_finite:
        return StepVerdict(NONFINITE, at_min)
    return StepVerdict(NONFINITE if at_min else OVERFLOW, at_min)
