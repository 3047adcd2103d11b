"""What a step (or an eval pass) reports: the statistics every rank contributes to ONE all-reduce
(`StepStats.pack` / `unpack`), and the metrics the trainer logs from them (`step_metrics`, pure:
no DeepSpeed, no process group). Tags are listed in training/monitor.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from training.monitor import segment_scalars

_SCALARS = 4  # loss_sum, loss_nonfinite, stop_requested, grads_nonfinite


@dataclass
class StepStats:
    """One rank's sums before the all-reduce, the sums over ranks after it.

    loss_sum          sum of token losses (0 from a rank that saw anything non-finite)
    loss_nonfinite    ranks whose loss was non-finite
    stop_requested    ranks asked to stop (SIGTERM / SIGUSR1)
    grads_nonfinite   ranks that saw a non-finite gradient
    segment_loss_sums [N] float64, sum of token losses per segment index
    segment_counts    [N] float64, targets per segment index
    """

    loss_sum: float
    loss_nonfinite: float
    stop_requested: float
    grads_nonfinite: float
    segment_loss_sums: torch.Tensor
    segment_counts: torch.Tensor

    @classmethod
    def empty(cls, n_segments: int) -> "StepStats":
        return cls(0.0, 0.0, 0.0, 0.0, torch.zeros(n_segments, dtype=torch.float64),
                   torch.zeros(n_segments, dtype=torch.float64))

    def add_segments(self, out) -> None:
        """Add a model output's per-segment losses (weighted by their target counts)."""
        seg_n = out.segment_token_counts.detach().double().cpu()
        self.segment_loss_sums += torch.nan_to_num(out.segment_losses.detach().double().cpu()) * seg_n
        self.segment_counts += seg_n

    def segment_losses(self) -> torch.Tensor:
        """Mean loss per segment index; nan where a segment had no target."""
        n = self.segment_counts
        return (self.segment_loss_sums / n.clamp(min=1)).masked_fill(n == 0, math.nan)

    def pack(self) -> torch.Tensor:
        head = torch.tensor([self.loss_sum, self.loss_nonfinite, self.stop_requested,
                             self.grads_nonfinite], dtype=torch.float64)
        return torch.cat([head, self.segment_loss_sums, self.segment_counts])

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> "StepStats":
        n = (packed.numel() - _SCALARS) // 2
        head = [packed[i].item() for i in range(_SCALARS)]
        return cls(*head, packed[_SCALARS:_SCALARS + n], packed[_SCALARS + n:])


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
        metrics["train/mfu"] = flops / (step_time * world_size * peak_flops)
    return metrics
