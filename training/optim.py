"""The optimizer (`build_optimizer`: which AdamW, with its parameter groups and fused-or-not
arguments) and the learning-rate schedule. The veto every variant carries belongs to the
non-finite guard (training/guard.py)."""

from __future__ import annotations

import inspect
import logging
import math
from typing import Iterable

import torch

from training.guard import GuardedAdamW

log = logging.getLogger("training")


def build_optimizer(model: torch.nn.Module, optim, state_device: str, offload: bool):
    """The trainer's AdamW for `model` (`optim`: the config's optim section).

    offload (ZeRO-Offload, state on the CPU): DeepSpeed's CPU Adam (training/cpu_adam.py); where
    its op cannot be built or loaded (no compiler, an unsupported CPU), torch's AdamW, with one
    warning saying why. Otherwise torch's AdamW, fused where `state_device` has the kernel."""
    groups = param_groups(model, optim.weight_decay)
    adam = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    if offload:
        try:
            from training.cpu_adam import GuardedCPUAdam

            return GuardedCPUAdam(groups, **adam)
        except (ImportError, OSError, RuntimeError) as e:
            cause = f" ({e.__cause__})" if e.__cause__ is not None else ""
            log.warning("deepspeed.offload_optimizer: DeepSpeed's CPU Adam is unavailable here: "
                        "%s%s; using torch's AdamW on the CPU instead (same update, slower)",
                        e, cause)
    return GuardedAdamW(groups, **adam, **adamw_kwargs(state_device, fused_adamw_devices()))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; not norms, biases or the memory M0 (a state, not a projection)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitions are flat
        (decay if ndim >= 2 and name != "memory" else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def adamw_kwargs(device_type: str, fused_devices: Iterable[str]) -> dict:
    """Extra torch AdamW arguments for optimizer state on `device_type` ("cuda", "cpu", ...):
    fused=True (one kernel for the whole update) on CUDA when this torch has the fused kernel
    there (`fused_devices`: fused_adamw_devices()); elsewhere none, torch's default (foreach on
    CUDA, the per-tensor loop on CPU), so CPU runs are unchanged."""
    if device_type == "cuda" and "cuda" in fused_devices:
        return {"fused": True}
    return {}


def fused_adamw_devices() -> tuple[str, ...]:
    """Device types this torch's fused AdamW supports (empty if it has no fused flag)."""
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return ()
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        return ("cuda",)  # the fused flag came with CUDA support first (torch 2.0)
    return tuple(_get_fused_kernels_supported_devices())


def lr_at(step: int, cfg) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine or flat."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    span = max(1, cfg.run.max_steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
