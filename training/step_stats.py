"""What a step (or an eval pass) reports: the sums every rank accumulates ON ITS DEVICE during the
micro-steps (`StepSums`: no host read until the step's end), the one vector they are all-reduced
as, read back to the host ONCE (`StepStats.unpack`), and the metrics the trainer logs from them
(`step_metrics`, pure: no DeepSpeed, no process group). Tags are listed in training/monitor.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from model.flops import model_flops_utilization
from training.monitor import segment_scalars

# loss_sum, loss_nonfinite, stop_requested, grads_nonfinite, targets, target_mismatch
_SCALARS = 6


@dataclass
class StepStats:
    """The all-reduced sums of a step on the host (one rank's before the all-reduce in tests).

    loss_sum          sum of token losses (0 from a rank that saw anything non-finite)
    loss_nonfinite    ranks whose loss was non-finite
    stop_requested    ranks asked to stop (SIGTERM / SIGUSR1)
    grads_nonfinite   ranks that saw a non-finite gradient
    targets           valid targets as the trainer counted them (the loss weighting's total)
    target_mismatch   sum of |model's target count - trainer's| over micro-batches: must be 0
    segment_loss_sums [N] float64, sum of token losses per segment index
    segment_counts    [N] float64, targets per segment index
    """

    loss_sum: float
    loss_nonfinite: float
    stop_requested: float
    grads_nonfinite: float
    targets: float
    target_mismatch: float
    segment_loss_sums: torch.Tensor
    segment_counts: torch.Tensor

    def segment_losses(self) -> torch.Tensor:
        """Mean loss per segment index; nan where a segment had no target."""
        n = self.segment_counts
        return (self.segment_loss_sums / n.clamp(min=1)).masked_fill(n == 0, math.nan)

    def pack(self) -> torch.Tensor:
        head = torch.tensor([self.loss_sum, self.loss_nonfinite, self.stop_requested,
                             self.grads_nonfinite, self.targets, self.target_mismatch],
                            dtype=torch.float64)
        return torch.cat([head, self.segment_loss_sums, self.segment_counts])

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> "StepStats":
        """From the all-reduced vector, already on the host (one transfer for the whole step)."""
        n = (packed.numel() - _SCALARS) // 2
        head = packed[:_SCALARS].tolist()
        return cls(*head, packed[_SCALARS:_SCALARS + n], packed[_SCALARS + n:])


class StepSums:
    """One rank's sums of a step, kept on `device` while the micro-steps run: every update is a
    tensor op queued behind the forward and backward, so nothing here waits for the device.
    `pack` builds the vector for the step's one all-reduce, in `StepStats`' layout."""

    def __init__(self, n_segments: int, device: torch.device):
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)
        self.loss_sum = zeros(())         # NaN stays NaN: the guard reads it at the step's end
        self.target_mismatch = zeros(())
        self.segment_loss_sums = zeros(n_segments)
        self.segment_counts = zeros(n_segments)

    def add(self, out, loss_sum: torch.Tensor, expected_targets: Optional[int] = None) -> None:
        """Add one forward's sums: `loss_sum` (what went into backward, unscaled; it may differ
        from out.loss_sum when a hook changed it), the per-segment losses weighted by their target
        counts, and how far the model's target count is from `expected_targets`."""
        self.loss_sum += loss_sum.detach().double()
        seg_n = out.segment_token_counts.detach().double()
        self.segment_loss_sums += torch.nan_to_num(out.segment_losses.detach().double()) * seg_n
        self.segment_counts += seg_n
        if expected_targets is not None:
            self.target_mismatch += (out.num_tokens.detach().double() - expected_targets).abs()

    def pack(self, grads_nonfinite: Optional[torch.Tensor] = None, stop_requested: bool = False,
             targets: float = 0.0) -> torch.Tensor:
        """The [6 + 2N] float64 vector on the device; a non-finite loss or gradient zeroes the
        loss sum (a NaN must not reach the all-reduced sum of the other ranks' losses)."""
        loss_bad = ~torch.isfinite(self.loss_sum)
        grads_bad = (grads_nonfinite.to(self.loss_sum.device) if grads_nonfinite is not None
                     else torch.zeros_like(loss_bad))
        bad = loss_bad | grads_bad
        host = torch.tensor([float(stop_requested), float(targets)], dtype=torch.float64)
        host = host.to(self.loss_sum.device, non_blocking=True)
        head = torch.stack([torch.where(bad, 0.0, self.loss_sum), loss_bad.double(),
                            host[0], grads_bad.double(), host[1], self.target_mismatch])
        return torch.cat([head, self.segment_loss_sums, self.segment_counts])


def gradient_norm(model: torch.nn.Module) -> torch.Tensor:
    """Global L2 norm of the (already all-reduced) gradients, before clipping, on the device.
    For fp32 without ZeRO, where DeepSpeed's basic-optimizer path clips but keeps no norm
    (engine.get_global_grad_norm() stays None); every other path reports DeepSpeed's own."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


def step_metrics(stats: StepStats, *, total_targets: int, skipped: bool, lr: float,
                 grad_norm: Optional[float], skipped_steps: int, samples_seen: int,
                 positions: int, step_time: float, memory_gb: float,
                 loss_scale: Optional[float] = None, flops: Optional[float] = None,
                 world_size: int = 1, peak_flops: Optional[float] = None) -> dict[str, float]:
    """The scalars of one optimizer step from its all-reduced `stats`.

    positions: tokens of the global batch this step; flops: the model FLOPs of the step (MFU is
    logged only when both it and the per-device `peak_flops` are given); a skipped step logs nan
    loss and grad norm."""
    loss = stats.loss_sum / max(total_targets, 1) if not skipped else math.nan
    metrics = {
        "train/loss": loss,
        "train/ppl": math.exp(min(loss, 50.0)) if math.isfinite(loss) else math.nan,
        "train/lr": lr,
        "train/grad_norm": float(grad_norm) if grad_norm is not None and not skipped else math.nan,
        "train/skipped_steps": float(skipped_steps),
        "train/tokens_per_s": positions / step_time,
        "train/samples_seen": float(samples_seen),
        "train/num_segments": float(len(stats.segment_counts)),
        "train/step_time_s": step_time,
        "system/memory_gb": memory_gb,
        **segment_scalars("train", stats.segment_losses().tolist()),
    }
    if loss_scale is not None:
        metrics["train/loss_scale"] = float(loss_scale)
    if flops is not None and peak_flops:
        metrics["train/mfu"] = model_flops_utilization(flops, step_time, peak_flops, world_size)
    return metrics
