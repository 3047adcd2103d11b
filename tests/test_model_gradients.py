"""Truncated BPTT and segment-level checkpointing (issue 2, acceptance 3 and 4)."""

import pytest
import torch

from test_model_common import random_tokens, tiny_rmt

torch.set_num_threads(1)  # tiny models: one thread is as fast and immune to oversubscription

SEGMENTS, SEG = 8, 4


def reached_segments(bptt_depth):
    """For each segment t, the set of segments whose token embeddings get gradient from loss t."""
    model = tiny_rmt("llama", num_mem_tokens=2, segment_size=SEG, bptt_depth=bptt_depth).eval()
    ids = random_tokens(2, SEGMENTS * SEG, seed=11)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # explicit leaf
    out = model(inputs_embeds=embeds, labels=ids)
    reached = []
    for t in range(SEGMENTS):
        (grad,) = torch.autograd.grad(out.segment_losses[t], embeds, retain_graph=True)
        per_segment = grad.abs().reshape(2, SEGMENTS, SEG, -1).sum(dim=(0, 2, 3))
        assert torch.all((per_segment == 0) | (per_segment > 1e-7)), per_segment  # no tiny leaks
        reached.append({s for s in range(SEGMENTS) if per_segment[s] > 0})
    return reached


@pytest.mark.parametrize("bptt_depth", [-1, 1, 2, 3])
def test_gradient_reaches_exactly_the_segments_truncation_allows(bptt_depth):
    reached = reached_segments(bptt_depth)
    for t in range(SEGMENTS):
        oldest = 0 if bptt_depth == -1 else (t // bptt_depth) * bptt_depth
        assert reached[t] == set(range(oldest, t + 1)), (t, reached[t])
    if bptt_depth == -1:
        assert 0 in reached[SEGMENTS - 1]  # full BPTT: the last of 8 segments reaches the first


def loss_and_grads(model, ids, mask, seed):
    torch.manual_seed(seed)
    out = model(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


@pytest.mark.parametrize("backbone", ["llama", "gpt2"])
def test_segment_checkpointing_gives_same_loss_and_gradients_with_dropout(backbone):
    # Plain loss on both sides: checkpointed segments never use the fused loss (other rounding;
    # its equivalence is tests/test_perf_fused_loss.py), so this isolates checkpointing.
    model = tiny_rmt(backbone, dropout=0.2, num_mem_tokens=2, segment_size=6, bptt_depth=2,
                     fused_segment_loss=False).train()
    ids = random_tokens(2, 27, seed=12)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    plain_loss, plain_grads = loss_and_grads(model, ids, mask, seed=5)
    other_loss, _ = loss_and_grads(model, ids, mask, seed=6)
    assert abs(float(plain_loss - other_loss)) > 1e-4  # dropout is really on
    model.gradient_checkpointing_enable()
    assert model.gradient_checkpointing
    ckpt_loss, ckpt_grads = loss_and_grads(model, ids, mask, seed=5)
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=1e-6, atol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-6, atol=1e-9, msg=name)
    assert plain_grads["memory"].abs().sum() > 0


def test_checkpointing_runs_one_recompute_per_segment_and_no_layer_checkpointing():
    model = tiny_rmt("llama", segment_size=5).train()
    model.gradient_checkpointing_enable()
    calls = []
    model.decoder.register_forward_hook(lambda *_: calls.append(1))
    model(random_tokens(1, 15), labels=random_tokens(1, 15)).loss.backward()
    assert len(calls) == 6  # 3 segments: forward + recompute each
    assert not any(getattr(layer, "gradient_checkpointing", False) for layer in model.decoder.layers)


def test_reentrant_checkpointing_is_refused():
    model = tiny_rmt("llama")
    with pytest.raises(ValueError, match="use_reentrant"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
