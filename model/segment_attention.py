"""The backbone's attention in a segment step, with the mask RMT already knows.

A segment step is causal attention over [read memory ; tokens ; write memory] with padded token
keys hidden (segments.py owns that layout). transformers' mask builder (create_causal_mask)
rediscovers the pattern from the position ids and the 2D mask instead, and pays for it:
  - eagerly, it reads device tensors on the host (the packed-sequence check of the position ids,
    `padding_mask.all()`): on a GPU, a stall in every segment forward;
  - under torch.compile or CUDA-graph capture it cannot decide, so it materialises a [B, 1, n, n]
    mask for every segment and SDPA runs masked, never its flash/cuDNN causal kernels.

For a backbone whose attention over a segment is exactly that pattern (SDPA; every layer full
causal attention; a family in PLAIN_CAUSAL_FAMILIES, each checked against transformers' own path
in tests/test_model_segment_attention.py), the segment step runs with the backbone's config
naming PLAIN_CAUSAL_SDPA: transformers' SDPA function, registered under a name that has no mask
builder, for which create_causal_mask passes on what it is given (transformers' path for attention
that brings its own mask). The step gives no mask when nothing is padded (SDPA's is_causal) and,
with padding, the 4D mask transformers would have built (segments.segment_attention_mask). The
name is set only around the segment step: the backbone called on its own, and decoding with a
KV cache, keep transformers' masks. Any other backbone keeps transformers' path throughout.
"""

from contextlib import contextmanager, nullcontext

from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .segments import segment_attention_mask

PLAIN_CAUSAL_SDPA = "rmt_plain_causal_sdpa"
# Families whose decoders build masks with create_causal_mask and reach attention through
# ALL_ATTENTION_FUNCTIONS only: the ones compared with transformers' path in the tests.
PLAIN_CAUSAL_FAMILIES = ("llama", "gpt2", "mistral", "qwen2", "qwen3")


def _plain_causal_sdpa(module, query, key, value, attention_mask, **kwargs):
    if kwargs.get("sliding_window"):  # a layer asking for a window: the pattern is not plain causal
        raise RuntimeError(
            f"{PLAIN_CAUSAL_SDPA}: {type(module).__name__} asks for sliding_window="
            f"{kwargs['sliding_window']}; segment_attention.plain_causal must not select it")
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(PLAIN_CAUSAL_SDPA, _plain_causal_sdpa)


def plain_causal(config) -> bool:
    """Whether a backbone with this config attends over a segment exactly causally, with SDPA."""
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    return (
        config.model_type in PLAIN_CAUSAL_FAMILIES
        and config._attn_implementation == "sdpa"
        and not getattr(config, "sliding_window", None)
        and layer_types == {"full_attention"}
    )


def backbone_mask(config, visible):
    """What the backbone is handed for segment_layout's 2D mask `visible` [B, n] (or None): inside
    segment_step_attention the step's own 4D mask, else `visible`, for transformers' builder."""
    if visible is None or config._attn_implementation != PLAIN_CAUSAL_SDPA:
        return visible
    return segment_attention_mask(visible)


@contextmanager
def _named(config, implementation: str):
    before = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = before


def segment_step_attention(config):
    """Context for one segment step of a backbone with this config: PLAIN_CAUSAL_SDPA where
    plain_causal holds, transformers' path otherwise (and inside one already)."""
    if plain_causal(config):
        return _named(config, PLAIN_CAUSAL_SDPA)
    return nullcontext()
