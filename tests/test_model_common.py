"""Shared builders for the model tests (no tests here)."""

import torch

from model import RMTConfig, RMTForCausalLM

VOCAB = 48

BACKBONES = {
    "llama": dict(
        model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
    ),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64),
}


def tiny_rmt(backbone="llama", seed=0, dropout=0.0, **rmt_settings) -> RMTForCausalLM:
    """A tiny fp32 RMT; dropout applies to every dropout the backbone has."""
    settings = dict(BACKBONES[backbone])
    if backbone == "llama":
        settings["attention_dropout"] = dropout
    else:
        settings.update(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    rmt_settings.setdefault("num_mem_tokens", 3)
    rmt_settings.setdefault("segment_size", 5)
    torch.manual_seed(seed)
    return RMTForCausalLM(RMTConfig(backbone=settings, **rmt_settings))


def random_tokens(batch, length, seed=1, low=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, (batch, length), generator=generator)
