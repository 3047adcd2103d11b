"""Model FLOPs of training, the numerator of MFU (the trainer's train/mfu and bench/step.py).

Training = forward + backward = 3x forward; the recompute of checkpointed segments is NOT counted.
One backbone call over n positions, s of which produce logits (d hidden, L layers, V vocab;
d_q = heads * head_dim, d_kv = kv_heads * head_dim, both d for plain multi-head attention):
    dense      6 * n * L * (2*d*(d_q + d_kv) + mlp)      q,o: d*d_q; k,v: d*d_kv
               mlp = 3*d*I with `intermediate_size` I (SwiGLU: gate, up, down; the Llama family),
                     2*d*I with GPT-2's `n_inner` I (default 4d; up, down)
    attention  6 * L * d_q * n*(n+1)/2                   causal QK^T and AV
    lm head    6 * s * d * V
RMT calls the backbone once per segment with n = T + 2m (memory positions included), s = T.
Norms, biases, embeddings and softmax are not counted. Pure arithmetic on the config: no torch.
(configuration_rmt imports this file, so it ships with the remote code like every model file.)
"""

from .conventions import positions_per_segment


def backbone_training_flops(backbone_config, positions: int, logit_positions: int) -> float:
    """FLOPs of training one backbone call over `positions` positions, `logit_positions` of them
    with logits (formula in the module docstring); backbone_config: a transformers config."""
    c = backbone_config.get_text_config()
    d, layers, vocab = c.hidden_size, c.num_hidden_layers, c.vocab_size
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or d // heads
    d_q = heads * head_dim
    d_kv = (getattr(c, "num_key_value_heads", None) or heads) * head_dim
    if getattr(c, "intermediate_size", None) is not None:
        mlp = 3 * d * c.intermediate_size
    else:
        mlp = 2 * d * (getattr(c, "n_inner", None) or 4 * d)
    per_position = 6 * layers * (2 * d * (d_q + d_kv) + mlp)
    n, s = positions, logit_positions
    return per_position * n + 6 * layers * d_q * n * (n + 1) / 2 + 6 * s * d * vocab


def training_flops(config, length: int, num_mem_tokens: int | None = None) -> float:
    """FLOPs of training RMT (an RMTConfig; also `config.training_flops`) on one sequence of `length`
    tokens: one backbone call per segment of T <= segment_size tokens, over positions_per_segment(T, m)
    positions, T with logits. A step's total is this times the number of sequences (micro-batch x
    accumulation x ranks). num_mem_tokens: m if not the config's (0: the backbone's plain segment
    loop, no memory)."""
    m = config.num_mem_tokens if num_mem_tokens is None else num_mem_tokens
    backbone, seg = config.backbone_config, config.segment_size
    return sum(
        backbone_training_flops(backbone, positions_per_segment(t, m), t)
        for t in (min(seg, length - start) for start in range(0, length, seg))
    )


def model_flops_utilization(flops: float, seconds: float, device_flops_per_s: float, devices: int = 1) -> float:
    """MFU: model FLOPs of a step (training_flops x sequences) / (its seconds x devices x one
    device's FLOP/s: a spec peak, or a GEMM rate measured on it as bench/step.py does)."""
    return flops / (seconds * devices * device_flops_per_s)
