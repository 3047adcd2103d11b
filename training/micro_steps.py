"""A step's micro-steps without host reads of the device (issue 19).

On a GPU every `.item()`, `.cpu()`, `bool()` or `float()` of a device tensor makes the host wait
for all the work queued before it; one per gradient or per micro-batch serialised the step. So
the micro-batches go to the device as queued copies with their target counts read from the host
labels beforehand (`prepare`), and the forward/backward loop (`run`) keeps every sum, flag and
check as a device tensor (training/step_stats.StepSums) until the step's one all-reduce.
"""

from __future__ import annotations

import torch

from model import count_targets
from training.step_stats import StepSums


def prepare(batch: dict, device: torch.device, segment_size: int,
            loss_from_segment: int) -> tuple[dict, int]:
    """The engine's arguments for a micro-batch, copied towards `device` without waiting, and its
    valid targets as the model counts them (num_tokens). Both facts that would otherwise be
    read back from the device are read here, from the host batch: the target count, and whether
    the attention mask hides anything (attention_mask_padded: an all-real mask takes the
    unmasked path, a padded one the masked path, without the model checking it)."""
    mask = batch["attention_mask"]
    count = int(count_targets(batch["labels"], segment_size, loss_from_segment, attention_mask=mask))
    args = {key: batch[key].to(device, non_blocking=True)
            for key in ("input_ids", "labels", "attention_mask")}
    args["attention_mask_padded"] = not bool(mask.bool().all())
    return args, count


def run(engine, hooks, step: int, rank: int, batches: list[dict], counts: list[int],
        scale: torch.Tensor, sums: StepSums) -> StepSums:
    """Forward and backward of every micro-batch into `sums`; `scale` (a device tensor) turns a
    loss sum into the loss to backward (the trainer's exact token weighting). The model's target
    count is checked against `counts` on the device (StepSums.target_mismatch)."""
    for k, (batch, count) in enumerate(zip(batches, counts)):
        if k:
            engine.step()  # DeepSpeed counts micro-steps here; no update before the last
        out = engine(**batch)
        loss = hooks.after_forward(step=step, rank=rank,
                                   loss=out.loss_sum * scale.to(out.loss_sum.dtype))
        engine.backward(loss)
        # The loss as it went into backward, unscaled: a NaN stays NaN, the guard sees it.
        sums.add(out, loss.detach().double() / scale, expected_targets=count)
    return sums
