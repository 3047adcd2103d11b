"""Text evaluation: held-out loss by number of segments and by segment index, under the
conditions of training/evaluate.py, and beside them an optional full-attention baseline.

The baseline (`--baseline DIR_OR_RUN`) is a model trained to read the whole sample at once: an
RMT run or export whose segment size holds the longest sample evaluated (a recipe with
model.segment_size = segments x segment size and a 1-segment curriculum), so it reads every
sample in one segment with full causal attention. Its losses are cut at the evaluated model's
segment boundaries, so `full_attention` sits beside the RMT segment by segment: at segment k it
has seen every earlier token, the upper bound that memory approximates.

Shifted windows (`--shifted-windows`, concat-packed text only): the held-out stream is cut into
N-segment windows N times, starting 0, S, ..., (N-1)*S tokens in, so chunk c of the stream (tokens
c*S to (c+1)*S) is scored at segment index i in the cut that starts (c - i) mod N chunks in. Over
the N cuts, index i scores chunks i to i + K*N - 1 (K windows per cut): the same text at every
index but for i chunks at either end. The loss by index then differs by context alone (how much
of the past the model holds), not by what the text at that position is; with one cut it can
differ by content too, because the same windows put the same text at the same index in every
model and seed.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from model import IGNORE_INDEX
from model.segments import shifted_targets

FULL_ATTENTION = "full_attention"


def _losses(logits_by_segment, targets, bounds) -> tuple[torch.Tensor, torch.Tensor]:
    sums, counts = [], []
    for (start, end), logits in zip(bounds, logits_by_segment):
        y = targets[:, start:end]
        sums.append(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                                    ignore_index=IGNORE_INDEX, reduction="sum"))
        counts.append((y != IGNORE_INDEX).sum())
    return torch.stack(sums).double().cpu(), torch.stack(counts).cpu()


def segment_token_losses(model, condition: str, input_ids, attention_mask, labels,
                         segment_logits: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum [N], target count [N]) per segment index, targets shifted over the whole
    sequence; `segment_logits` is training.evaluate's (start, end, logits) per segment."""
    targets = shifted_targets(labels, attention_mask).to(model.device)
    parts = list(segment_logits(model, condition, input_ids, attention_mask))
    return _losses([lg for _, _, lg in parts], targets, [(s, e) for s, e, _ in parts])


def full_attention_losses(baseline, input_ids, attention_mask, labels,
                          segment_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline over the whole sample in one segment, its losses cut every `segment_size`."""
    if baseline.config.segment_size < input_ids.shape[1]:
        raise ValueError(f"the baseline reads segments of {baseline.config.segment_size} tokens, "
                         f"the sample has {input_ids.shape[1]}")
    ids, mask = input_ids.to(baseline.device), attention_mask.to(baseline.device)
    logits = baseline(input_ids=ids, attention_mask=mask, return_logits=True).logits
    targets = shifted_targets(labels, attention_mask).to(baseline.device)
    bounds = [(s, min(s + segment_size, ids.shape[1])) for s in range(0, ids.shape[1], segment_size)]
    return _losses([logits[:, s:e] for s, e in bounds], targets, bounds)


def evaluate_text(model, tokenizer, settings, data_cfg, conditions: tuple,
                  segment_logits: Callable, baseline=None) -> dict:
    from training.data import build_pipeline

    names = conditions + ((FULL_ATTENTION,) if baseline is not None else ())
    rows = []
    pipe = build_pipeline(data_cfg, tokenizer, segment_size=model.config.segment_size,
                          micro_batch_size=settings.batch_size, rank=0, world_size=1,
                          seed=settings.seed, split="eval")
    start = pipe.state_dict()
    try:
        for n_seg in settings.segments:
            pipe.load_state_dict(start)  # every segment count reads the eval stream from its start
            sums = {c: torch.zeros(n_seg, dtype=torch.float64) for c in names}
            counts = {c: torch.zeros(n_seg, dtype=torch.long) for c in names}
            batches = (shifted_batches(pipe, n_seg, model.config.segment_size, settings.text_batches,
                                       settings.batch_size) if settings.shifted_windows else
                       (pipe.next_batch(n_seg) for _ in range(settings.text_batches)))
            for batch in batches:
                args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
                for c in names:
                    s, n = (full_attention_losses(baseline, *args, model.config.segment_size)
                            if c == FULL_ATTENTION else
                            segment_token_losses(model, c, *args, segment_logits))
                    sums[c] += s
                    counts[c] += n
            rows.append(text_row(n_seg, model.config.segment_size, sums, counts))
    finally:
        pipe.close()
    return {"metric": "loss", "shifted_windows": bool(settings.shifted_windows), "results": rows}


def shifted_batches(pipe, n_seg: int, segment_size: int, batches: int, batch_size: int):
    """The first `batches` batches of a concat-packed pipe (its rows are consecutive pieces of one
    stream), then the same stream cut again starting 1, ..., n_seg - 1 segments in (module doc)."""
    length, windows = n_seg * segment_size, batches * batch_size
    # One more batch holds the tail the later cuts reach into ((n_seg - 1) segments).
    read = [pipe.next_batch(n_seg) for _ in range(batches + (n_seg > 1))]
    ids = torch.cat([b["input_ids"].reshape(-1) for b in read])
    mask = torch.cat([b["attention_mask"].reshape(-1) for b in read])
    for shift in range(n_seg):
        lo = shift * segment_size
        cut_ids = ids[lo:lo + windows * length].view(windows, length)
        cut_mask = mask[lo:lo + windows * length].view(windows, length)
        for first in range(0, windows, batch_size):
            b_ids, b_mask = cut_ids[first:first + batch_size], cut_mask[first:first + batch_size]
            yield {"input_ids": b_ids, "attention_mask": b_mask,
                   "labels": torch.where(b_mask.bool(), b_ids, torch.full_like(b_ids, IGNORE_INDEX))}


def text_row(n_seg: int, segment_size: int, sums: dict, counts: dict) -> dict:
    row = {"num_segments": n_seg, "tokens": n_seg * segment_size}
    for condition in sums:
        loss = (sums[condition].sum() / counts[condition].sum()).item()
        per_segment = (sums[condition] / counts[condition].clamp(min=1)).tolist()
        row[condition] = {"loss": loss, "ppl": math.exp(loss), "segment_losses": per_segment,
                          "targets": int(counts[condition].sum())}
    return row


def baseline_problem(baseline_segment_size: int, segment_size: int,
                     segments: list[int]) -> Optional[str]:
    """Why a baseline cannot read the longest evaluated sample at once, or None."""
    longest = max(segments) * segment_size
    if baseline_segment_size >= longest:
        return None
    return (f"reads segments of {baseline_segment_size} tokens, so it cannot attend over a "
            f"{max(segments)}-segment sample ({longest} tokens) at once: train it with "
            f"model.segment_size >= {longest} and a 1-segment curriculum, or evaluate fewer "
            f"--segments (at most {baseline_segment_size // segment_size})")
