"""The segment step's attention with the mask RMT knows (model/segment_attention.py, issue 19).

transformers' own mask builder, which the step used to go through, is the reference here: with
plain_causal turned off the model takes exactly that path. The step must compute what that path
computes, read nothing back from the device to do it (transformers' path reads once per segment
forward), and hand SDPA no mask when nothing is padded, compiled too (transformers' path gives a
materialised mask under torch.compile, which rules out SDPA's causal flash kernels on a GPU).
"""

from contextlib import contextmanager

import pytest
import torch
from transformers import AutoConfig

from model import RMTConfig, RMTForCausalLM
from model import segment_attention
from test_model_common import BACKBONES, VOCAB, random_tokens
from trainer_step_worker import recorded_host_reads

torch.set_num_threads(1)

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
FAMILIES = {
    "llama": BACKBONES["llama"],
    "gpt2": dict(BACKBONES["gpt2"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "mistral": dict(model_type="mistral", sliding_window=None, **TINY),
    "qwen2": dict(model_type="qwen2", **TINY),
    "qwen3": dict(model_type="qwen3", head_dim=8, **TINY),
}
MASKING = "transformers/masking_utils.py"


def rmt(family: str, **settings) -> RMTForCausalLM:
    torch.manual_seed(0)
    return RMTForCausalLM(RMTConfig(backbone=FAMILIES[family], num_mem_tokens=3, segment_size=5,
                                    **settings))


def padded_batch():
    """3 rows of 13 tokens (S = 5: the last segment short), rows 2 and 3 right-padded: the first
    segment all real in every row, row 3 all padding in the next two."""
    ids = random_tokens(3, 13)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def step(model, ids, mask, **hint):
    """Forward and backward of a training step: (outputs, gradients by parameter name)."""
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, labels=ids.masked_fill(ids == 0, -100), return_memory=True,
                **hint)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@contextmanager
def transformers_masks(monkeypatch):
    """The reference: the segment step through transformers' mask builder."""
    with monkeypatch.context() as patch:
        patch.setattr(segment_attention, "plain_causal", lambda config: False)
        yield


def _from(sites, prefix):
    return [site for site in sites if site.split(" at ", 1)[1].startswith(prefix)]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("padded", [False, True])
def test_the_step_computes_what_transformers_masks_compute(family, padded, monkeypatch):
    """Loss, per-segment losses, memory and every gradient as through transformers' masks, in
    training mode: bitwise without padding (the same SDPA call: no mask, is_causal), and to fp32
    rounding with padding, where a segment whose rows are all real gets the explicit causal
    mask instead of is_causal (another SDPA kernel, the same attention)."""
    model = rmt(family).train()
    assert segment_attention.plain_causal(model.decoder.config)
    ids, mask = padded_batch() if padded else (random_tokens(2, 13), None)
    out, grads = step(model, ids, mask)
    with transformers_masks(monkeypatch):
        ref, ref_grads = step(model, ids, mask)
    assert model.decoder.config._attn_implementation == "sdpa"  # only set around a segment step
    tol = dict(rtol=0, atol=0) if not padded else dict(rtol=1e-5, atol=1e-6)
    for name in ("loss", "loss_sum", "memory"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), **tol)
    torch.testing.assert_close(out.segment_losses, ref.segment_losses, equal_nan=True, **tol)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=name)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_training_step_reads_nothing_back_from_the_device(family, monkeypatch):
    """On CPU the structure is what is pinned: no host read of a tensor in a forward and backward
    (3 segment steps) from transformers or the model without padding; with padding, the model's
    one check of the whole mask (an all-real mask takes the faster unmasked path), nothing per
    segment, and nothing at all when the caller says the mask is padded (as the trainer does,
    from its host batch). Through transformers' masks: one read per segment forward or more."""
    model = rmt(family).train()
    ids = random_tokens(2, 13)
    with recorded_host_reads() as sites:
        step(model, ids, None)
    assert _from(sites, ("transformers/", "model/")) == [], sites
    ids, mask = padded_batch()
    with recorded_host_reads() as sites:
        step(model, ids, mask)
    assert _from(sites, "transformers/") == [], sites
    assert [s.split(":")[0] for s in _from(sites, "model/")] == ["__bool__ at model/segments.py"], sites
    with recorded_host_reads() as sites:
        step(model, ids, mask, attention_mask_padded=True)
    assert _from(sites, ("transformers/", "model/")) == [], sites

    with transformers_masks(monkeypatch), recorded_host_reads() as sites:
        step(model, random_tokens(2, 13), None)
    assert len(_from(sites, MASKING)) == 3, sites  # the packed-sequence check, per segment forward


@pytest.mark.parametrize("padded", [False, True])
def test_a_caller_who_knows_the_mask_gets_what_the_check_gives(padded):
    """attention_mask_padded, the caller's word for what the model would read from the mask,
    takes the path the check takes: loss, memory and gradients bitwise equal to the unhinted
    step. Given for an all-real mask, False drops it (the unmasked path, as with no mask)."""
    model = rmt("llama").train()
    ids, mask = padded_batch() if padded else (random_tokens(3, 13), torch.ones(3, 13, dtype=torch.long))
    out, grads = step(model, ids, mask, attention_mask_padded=padded)
    for reference in (step(model, ids, mask), *([] if padded else [step(model, ids, None)])):
        ref, ref_grads = reference
        for name in ("loss", "loss_sum", "memory"):
            torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=0, atol=0)
        assert grads.keys() == ref_grads.keys()
        assert all(torch.equal(grads[n], ref_grads[n]) for n in grads)
    # ...and the hint is what decides the path: the SDPA calls get a mask exactly when it says so.
    for hint in (False, True):
        with sdpa_masks_seen() as masked:
            step(model, ids, mask, attention_mask_padded=hint)
        assert masked and set(masked) == {hint}, masked


@contextmanager
def sdpa_masks_seen():
    """Whether each eager scaled_dot_product_attention call got an attn_mask."""
    seen = []

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.nn.functional.scaled_dot_product_attention:
                seen.append((kwargs.get("attn_mask", args[3] if len(args) > 3 else None)) is not None)
            return func(*args, **kwargs)

    with Mode():
        yield seen


def sdpa_calls_compiled(model, ids, mask=None) -> list[dict]:
    """The scaled_dot_product_attention calls in the graphs of the segment step compiled as
    model.compile does (training/compile.py: segment_hidden, fullgraph, static shapes), each as
    {attn_mask: given or not, is_causal}; the captured graphs run without inductor."""
    calls = []

    def backend(graph_module, example_inputs):
        for node in graph_module.graph.nodes:
            if node.target is torch.nn.functional.scaled_dot_product_attention:
                calls.append({"attn_mask": node.kwargs.get("attn_mask") is not None,
                              "is_causal": node.kwargs.get("is_causal")})
        return graph_module

    torch._dynamo.reset()
    compiled = torch.compile(model.segment_hidden, backend=backend, fullgraph=True, dynamic=False)
    model.segment_hidden = lambda memory, *rest: compiled(memory.contiguous(), *rest)
    model(ids, attention_mask=mask, labels=ids)
    return calls


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_compiled_the_step_gives_sdpa_no_mask_unless_padded(family, monkeypatch):
    unpadded = sdpa_calls_compiled(rmt(family).train(), random_tokens(2, 10))
    assert unpadded and all(c == {"attn_mask": False, "is_causal": True} for c in unpadded), unpadded
    ids, mask = padded_batch()
    padded = sdpa_calls_compiled(rmt(family).train(), ids, mask)
    assert any(c["attn_mask"] for c in padded), padded
    # Why: transformers' builder cannot skip the mask while tracing.
    with transformers_masks(monkeypatch):
        reference = sdpa_calls_compiled(rmt(family).train(), random_tokens(2, 10))
    assert reference and all(c["attn_mask"] for c in reference), reference
    torch._dynamo.reset()


@pytest.mark.parametrize("backbone, expected", [
    (dict(model_type="llama"), True),
    (dict(model_type="gpt2"), True),
    (dict(model_type="qwen2"), True),
    (dict(model_type="mistral", sliding_window=None), True),
    (dict(model_type="mistral"), False),  # sliding_window 4096 by default
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=64), False),
    (dict(model_type="gemma"), False),  # a family not compared with transformers' path here
])
def test_plain_causal_only_where_every_layer_attends_causally_with_sdpa(backbone, expected):
    settings = dict(backbone)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    config._attn_implementation = "sdpa"
    assert segment_attention.plain_causal(config) is expected
    config._attn_implementation = "eager"  # eager takes additive masks: never
    assert segment_attention.plain_causal(config) is False


def test_a_layer_asking_for_a_window_is_refused_not_ignored():
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="sliding_window=16"):
        segment_attention._plain_causal_sdpa(torch.nn.Module(), q, q, q, None, sliding_window=16)
