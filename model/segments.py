"""Segment layout (positions, masks) and the loss of one segment, shared by training and decoding.

Layout of one segment step (m = num_mem_tokens, T <= S tokens of which n are real):
    index:     0 .. m-1     | m .. m+T-1            | m+T .. m+T+m-1
    content:   read memory  | tokens                | write memory
    position:  0 .. m-1     | m + (real tokens before, counting itself) - 1 | m + n .. m + n + m-1
Positions count only real tokens, so a padded row gets exactly the positions (and, because pads
are masked out, exactly the result) of the same row without its padding. Memory is always visible.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


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
        positions = torch.arange(length + 2 * m, device=device).unsqueeze(0)
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


def _chunk_loss_sum(lm_head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()  # [B, C, V]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def lm_loss_sum(lm_head, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int):
    """(sum of token cross-entropies, number of valid targets) without [B, T, V] logits alive at once.

    With more than one chunk and autograd on, each chunk's logits are recomputed in backward, so
    only one [B, chunk, V] block exists at a time.
    """
    length = hidden.shape[1]
    num_tokens = (targets != IGNORE_INDEX).sum()
    if length <= chunk_size:
        return _chunk_loss_sum(lm_head, hidden, targets), num_tokens
    recompute = torch.is_grad_enabled()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, length, chunk_size):
        h, y = hidden[:, start : start + chunk_size], targets[:, start : start + chunk_size]
        if recompute:
            total = total + checkpoint(_chunk_loss_sum, lm_head, h, y, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(lm_head, h, y)
    return total, num_tokens
