"""The trainer's non-finite guard: detection, verdict, veto.

Every rank flags a non-finite loss and, separately, non-finite gradients (`GradientFlag`: tensor
hooks on every parameter, before any reduction); the trainer all-reduces both flags, so every
rank classifies the step the same way (`classify_step`), and a skipped step is vetoed in the
optimizer (`VetoableStep`: torch's AdamW, or DeepSpeed's CPU Adam under ZeRO-Offload):

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

import torch

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


class VetoableStep:
    """Mixin for an optimizer whose next step can be vetoed: the trainer sets `skip_next_step`
    when any rank saw a non-finite loss or gradient. DeepSpeed (every ZeRO stage, and the
    ZeRO-Offload CPU step) calls the optimizer's `step` for the update, so a vetoed step changes
    neither weights nor moments nor Adam's step count. The veto is decided on the host before
    any kernel runs, so it holds for every implementation (torch's loop, foreach, fused, and
    DeepSpeed's CPU Adam)."""

    skip_next_step = False

    def step(self, *args, **kwargs):
        if self.skip_next_step:
            return None
        return super().step(*args, **kwargs)


class GuardedAdamW(VetoableStep, torch.optim.AdamW):
    """torch's AdamW with the guard's veto (training/cpu_adam.py: DeepSpeed's CPU Adam with it)."""


class GradientFlag:
    """Flags non-finite gradients as they arrive, on this rank, before any reduction: a tensor
    hook on every trainable parameter. The flag is a tensor on `device` updated by tensor ops
    only, so the hooks never wait for the device (a host read per gradient serialised the whole
    backward on a GPU); the trainer reads it once, packed into the step's all-reduced vector.
    `zero_()` before a step's backward; `flag` (or `bool()`, a host read) after it."""

    def __init__(self, model: torch.nn.Module, device: Optional[torch.device] = None):
        self.flag = torch.zeros((), dtype=torch.bool, device=device)

        def check(grad: torch.Tensor) -> torch.Tensor:
            bad = ~torch.isfinite(grad).all()
            if bad.device != self.flag.device:
                # Only a copy TO the host must wait; one towards the device is queued.
                bad = bad.to(self.flag.device, non_blocking=self.flag.device.type != "cpu")
            self.flag.logical_or_(bad)
            return grad

        for p in model.parameters():
            if p.requires_grad:
                p.register_hook(check)

    def zero_(self) -> None:
        self.flag.zero_()

    def __bool__(self) -> bool:
        return bool(self.flag)
