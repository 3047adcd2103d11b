"""Test-only faults for real training runs, installed through the trainer's hook points.

A test starts `python -m training.pretrain` (under torchrun or bare) with `RMT_PLUGINS=tests.faults`
(training/hooks.py) and says which fault in the environment, e.g. `faults.env(crash_at=...)`:

  RMT_FAULT_NONFINITE=KIND:RANK:STEPS  at the 0-based steps STEPS (comma-separated), RANK makes
                                       its loss non-finite (KIND loss: the loss and so every
                                       gradient) or only its gradients under a finite loss (KIND
                                       grad: NaN flows back from the loss into the model).
  RMT_FAULT_CRASH_AT=PHASE:RANK:STEP   RANK SIGKILLs itself at PHASE of the save of step STEP
                                       (training.checkpoint.SAVE_PHASES, or a phase of the
                                       conversion to the universal format,
                                       training.universal.CONVERT_PHASES).
  RMT_DUMP_RESUMED_STATE=PATH          not a fault: after resuming, rank 0 saves every
                                       parameter's full fp32 master weights and Adam moments
                                       as the engine holds them ({name: {fp32, exp_avg,
                                       exp_avg_sq}}, torch.save) for the test to compare.
"""

from __future__ import annotations

import os
import signal

import torch

NONFINITE_ENV = "RMT_FAULT_NONFINITE"
CRASH_ENV = "RMT_FAULT_CRASH_AT"
DUMP_ENV = "RMT_DUMP_RESUMED_STATE"


def env(nonfinite: str | None = None, crash_at: str | None = None,
        dump_state: str | None = None) -> dict[str, str]:
    """The environment that installs these faults in a training process."""
    out = {"RMT_PLUGINS": "tests.faults"}
    if dump_state is not None:
        out[DUMP_ENV] = dump_state
    if nonfinite is not None:
        out[NONFINITE_ENV] = nonfinite
    if crash_at is not None:
        out[CRASH_ENV] = crash_at
    return out


class _NanGradient(torch.autograd.Function):
    """Identity forward; NaN gradient backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def register(hooks) -> None:
    if os.environ.get(NONFINITE_ENV):
        kind, bad_rank, steps = os.environ[NONFINITE_ENV].split(":")
        poisoned = {int(s) for s in steps.split(",")}
        if kind not in ("loss", "grad"):
            raise ValueError(f"{NONFINITE_ENV}: kind {kind!r} is neither loss nor grad")

        def poison(step, rank, loss):
            if step not in poisoned or rank != int(bad_rank):
                return loss
            return loss * float("nan") if kind == "loss" else _NanGradient.apply(loss)

        hooks.register("after_forward", poison)
    if os.environ.get(CRASH_ENV):
        wanted = os.environ[CRASH_ENV]

        def crash(phase, rank, step):
            if wanted == f"{phase}:{rank}:{step}":
                os.kill(os.getpid(), signal.SIGKILL)

        hooks.register("checkpoint_phase", crash)
    if os.environ.get(DUMP_ENV):
        hooks.register("after_resume", _dump_state)


def _dump_state(engine, rank, step) -> None:
    # DeepSpeed's public accessors of the whole fp32 parameter and optimizer state (collective
    # under ZeRO-3: every rank calls them in the same order).
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    state = {}
    for name, param in engine.module.named_parameters():
        state[name] = {"fp32": safe_get_full_fp32_param(param).detach().cpu().clone(),
                       **{key: safe_get_full_optimizer_state(param, key).detach().cpu().clone()
                          for key in ("exp_avg", "exp_avg_sq")}}
    if rank == 0:
        torch.save({"step": step, "params": state}, os.environ[DUMP_ENV])
