"""Named hook points of a training run, and the plugins that fill them.

Code outside the training stack (tests injecting faults, profilers, ...) acts on a run through
these points only; the stack itself registers nothing. Hook points and what a hook receives
(keyword arguments):

  after_forward(step, rank, loss) -> loss
      After each micro-batch's forward, before its backward. `step` is the 0-based index of the
      optimizer step being computed, `loss` the scaled loss sum about to be backpropagated; the
      hook returns the loss to backpropagate (the same tensor, or one that replaces it).
  checkpoint_phase(phase, rank, step)
      At each point of a checkpoint save, in order (training.checkpoint.SAVE_PHASES). `step` is
      the step being saved. A resume on another world size or ZeRO stage reports the phases of
      its conversion to the universal format here too (training.universal.CONVERT_PHASES, rank
      0, `step` the checkpoint's).
  after_resume(engine, rank, step)
      Once a checkpoint is loaded, before the first step: `engine` the DeepSpeed engine holding
      the restored weights and optimizer state, `step` the restored step.

Plugins: `RMT_PLUGINS=pkg.mod[,pkg.other]` names modules that every training process imports
when its Trainer is built; each must define `register(hooks: Hooks)`, which calls
`hooks.register(point, fn)`. In-process users pass their own `Hooks` to the Trainer instead.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable, Mapping

PLUGINS_ENV = "RMT_PLUGINS"
HOOK_POINTS = ("after_forward", "checkpoint_phase", "after_resume")


class Hooks:
    def __init__(self):
        self._hooks: dict[str, list[Callable]] = {point: [] for point in HOOK_POINTS}

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Hooks":
        """Hooks registered by the plugin modules that RMT_PLUGINS names (none when unset)."""
        hooks = cls()
        for name in filter(None, (n.strip() for n in env.get(PLUGINS_ENV, "").split(","))):
            module = importlib.import_module(name)
            if not callable(getattr(module, "register", None)):
                raise ValueError(f"{PLUGINS_ENV}: plugin module {name} has no register(hooks)")
            module.register(hooks)
        return hooks

    def register(self, point: str, fn: Callable) -> None:
        if point not in self._hooks:
            raise ValueError(f"hook point {point!r}: valid points are {', '.join(HOOK_POINTS)}")
        self._hooks[point].append(fn)

    def after_forward(self, step: int, rank: int, loss):
        for fn in self._hooks["after_forward"]:
            loss = fn(step=step, rank=rank, loss=loss)
        return loss

    def checkpoint_phase(self, phase: str, rank: int, step: int) -> None:
        for fn in self._hooks["checkpoint_phase"]:
            fn(phase=phase, rank=rank, step=step)

    def after_resume(self, engine, rank: int, step: int) -> None:
        for fn in self._hooks["after_resume"]:
            fn(engine=engine, rank=rank, step=step)
