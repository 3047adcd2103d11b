"""Segment layout (positions, masks) and which positions are loss targets, shared by training and decoding.

Layout of one segment step (m = num_mem_tokens, T <= S tokens of which n are real):
    index:     0 .. m-1     | m .. m+T-1            | m+T .. m+T+m-1
    content:   read memory  | tokens                | write memory
    position:  0 .. m-1     | m + (real tokens before, counting itself) - 1 | m + n .. m + n + m-1
Positions count only real tokens, so a padded row gets exactly the positions (and, because pads
are masked out, exactly the result) of the same row without its padding. Memory is always visible.
"""

import torch

from .conventions import IGNORE_INDEX, positions_per_segment


def read_positions(num_mem_tokens: int, device) -> torch.Tensor:
    return torch.arange(num_mem_tokens, device=device).unsqueeze(0)  # [1, M]


def token_positions(num_mem_tokens: int, token_mask, real_before, length: int, device) -> torch.Tensor:
    """Positions of `length` new tokens; token_mask [B, T] or None (all real); real_before [B] or int."""
    if token_mask is None:
        steps = torch.arange(1, length + 1, device=device).unsqueeze(0)  # [1, T]
    else:
        steps = token_mask.long().cumsum(dim=1)  # [B, T]
    if torch.is_tensor(real_before):
        real_before = real_before.unsqueeze(1)
    return num_mem_tokens - 1 + real_before + steps


def write_positions(num_mem_tokens: int, real_in_segment: torch.Tensor) -> torch.Tensor:
    """Write-block positions right after the segment's last real token; real_in_segment [B]."""
    offsets = torch.arange(num_mem_tokens, device=real_in_segment.device)
    return num_mem_tokens + real_in_segment.unsqueeze(1) + offsets  # [B, M]


def segment_layout(num_mem_tokens: int, token_mask, length: int, device):
    """Position ids and 2D attention mask of a whole segment step [read ; tokens ; write].

    Returns (position_ids [1 or B, T + 2M], attention_mask [B, T + 2M] or None, real_tokens [B] or None).
    """
    m = num_mem_tokens
    if token_mask is None:
        positions = torch.arange(positions_per_segment(length, m), device=device).unsqueeze(0)
        return positions, None, None
    batch = token_mask.shape[0]
    real = token_mask.long().sum(dim=1)  # [B]
    positions = torch.cat(
        [
            read_positions(m, device).expand(batch, -1),
            token_positions(m, token_mask, 0, length, device),
            write_positions(m, real),
        ],
        dim=1,
    )
    ones = token_mask.new_ones(batch, m)
    return positions, torch.cat([ones, token_mask, ones], dim=1), real


def mask_in_use(attention_mask, padded):
    """The 2D mask the segment loop runs with: None when every position is real (the backbone's
    plain causal path: faster, and the same result). `padded` says whether attention_mask hides
    any position where the caller already knows (the trainer reads its host batch): None makes
    this check the mask itself, which for a mask on a GPU is a host read, a wait for the device."""
    if attention_mask is None:
        return None
    if padded is None:
        padded = not bool(attention_mask.bool().all())
    return attention_mask if padded else None


def segment_attention_mask(visible: torch.Tensor) -> torch.Tensor:
    """[B, 1, n, n] boolean mask of a segment step (True: may attend): causal, and only to the keys
    that segment_layout's 2D mask `visible` [B, n] shows; what transformers' SDPA mask builder makes
    of that 2D mask when a row is padded (segment_attention.py says when the model builds it)."""
    n = visible.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=visible.device).tril()
    return causal[None, None] & visible.bool()[:, None, None, :]


def shifted_targets(labels: torch.Tensor, attention_mask) -> torch.Tensor:
    """Targets over the whole sequence: position i predicts labels[i + 1].

    A target counts only when both the predicting token and the target token are real.
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if attention_mask is not None:
        real = attention_mask.bool()
        valid = torch.zeros_like(real)
        valid[:, :-1] = real[:, :-1] & real[:, 1:]
        targets = targets.masked_fill(~valid, IGNORE_INDEX)
    return targets


def loss_targets(labels: torch.Tensor, attention_mask, segment_size: int, loss_from_segment: int) -> torch.Tensor:
    """[B, L] target of every position as the loss takes it; IGNORE_INDEX where there is none.

    shifted_targets, and no targets in the segments before `loss_from_segment` (position i
    belongs to segment i // segment_size).
    """
    targets = shifted_targets(labels, attention_mask)
    targets[:, : loss_from_segment * segment_size] = IGNORE_INDEX
    return targets


def num_targets(targets: torch.Tensor) -> torch.Tensor:
    """How many targets count (0-dim int64, on targets' device)."""
    return (targets != IGNORE_INDEX).sum()


def count_targets(labels: torch.Tensor, segment_size: int, loss_from_segment: int,
                  attention_mask=None) -> torch.Tensor:
    """Targets the model's loss averages over (its `num_tokens`) for labels [B, L] and an optional
    attention_mask [B, L]: 0-dim int64 on labels' device, computed without a host sync."""
    return num_targets(loss_targets(labels, attention_mask, segment_size, loss_from_segment))
