"""Incremental decoding for RMT: memory rolls forward while tokens arrive one chunk at a time.

Inside the current segment the backbone keeps a KV cache over [read memory ; tokens so far].
When the segment holds S tokens, the write block runs against that cache to produce the next
memory, and a fresh segment (new cache, read block of the new memory) starts. This reproduces
the teacher-forced forward exactly (same positions, masks and memory; see segments.py).
"""

import torch
from transformers import DynamicCache

from .segments import read_positions, token_positions, write_positions


class RMTDecodingState:
    """What generate() carries between steps (returned as `cache`).

    memory [B, M, D]: read memory of the current segment.  kv: backbone cache of the segment.
    visible [B, M + length]: 2D attention mask of the cached positions.
    real [B]: real (unpadded) tokens in the segment.  length: tokens in the segment.
    num_tokens: tokens consumed since the start (how much of input_ids generate has fed).
    """

    def __init__(self, memory: torch.Tensor):
        self.memory = memory
        self.kv = None
        self.visible = None
        self.real = None
        self.length = 0
        self.num_tokens = 0

    @classmethod
    def start(cls, model, memory: torch.Tensor) -> "RMTDecodingState":
        state = cls(memory.detach().clone())
        _open_segment(model, state)
        return state

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: rows follow their beams."""
        self.memory = self.memory.index_select(0, beam_idx.to(self.memory.device))
        self.kv.reorder_cache(beam_idx)
        self.visible = self.visible.index_select(0, beam_idx.to(self.visible.device))
        self.real = self.real.index_select(0, beam_idx.to(self.real.device))


def _run_cached(model, state: RMTDecodingState, embeds, positions, mask) -> torch.Tensor:
    state.visible = torch.cat([state.visible, mask], dim=1)
    return model.decoder(
        inputs_embeds=embeds,
        position_ids=positions,
        attention_mask=state.visible,
        cache=state.kv,
        use_cache=True,
    ).last_hidden_state


def _open_segment(model, state: RMTDecodingState) -> None:
    batch, m = state.memory.shape[0], state.memory.shape[1]
    device = state.memory.device
    state.kv = DynamicCache(config=model.decoder.config)
    state.visible = torch.zeros(batch, 0, dtype=torch.long, device=device)
    state.real = torch.zeros(batch, dtype=torch.long, device=device)
    state.length = 0
    ones = torch.ones(batch, m, dtype=torch.long, device=device)
    _run_cached(model, state, state.memory, read_positions(m, device).expand(batch, -1), ones)


def _close_segment(model, state: RMTDecodingState) -> None:
    batch, m = state.memory.shape[0], state.memory.shape[1]
    ones = torch.ones(batch, m, dtype=torch.long, device=state.memory.device)
    hidden = _run_cached(model, state, state.memory, write_positions(m, state.real), ones)
    # Same rule as training: a segment that was all padding leaves the memory unchanged.
    state.memory = torch.where((state.real > 0)[:, None, None], hidden, state.memory)
    _open_segment(model, state)


def decode_tokens(model, state: RMTDecodingState, input_ids, attention_mask, logits_to_keep: int) -> torch.Tensor:
    """Feed input_ids [B, n] into the state; logits [B, n or logits_to_keep, V] of those tokens."""
    seg_size = model.config.segment_size
    m = model.config.num_mem_tokens
    count = input_ids.shape[1]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    first_kept = count - logits_to_keep if logits_to_keep else 0
    embed, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
    logits = []
    start = 0
    while start < count:
        take = min(seg_size - state.length, count - start)
        ids, mask = input_ids[:, start : start + take], attention_mask[:, start : start + take]
        positions = token_positions(m, mask, state.real, take, ids.device)
        hidden = _run_cached(model, state, embed(ids), positions, mask)
        if start + take > first_kept:
            logits.append(lm_head(hidden[:, max(first_kept - start, 0) :]))
        state.real = state.real + mask.long().sum(dim=1)
        state.length += take
        state.num_tokens += take
        if state.length == seg_size:
            _close_segment(model, state)
        start += take
    return torch.cat(logits, dim=1)
