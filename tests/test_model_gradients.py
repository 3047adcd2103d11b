"""Truncated BPTT and segment-level checkpointing (issue 2, acceptance 3 and 4)."""

import pytest
import torch

from bench.segment_graph import graph_nodes
from test_model_common import random_tokens, tiny_rmt

torch.set_num_threads(1)  # tiny models: one thread is as fast and immune to oversubscription

SEGMENTS, SEG = 8, 4


def reached_segments(bptt_depth, checkpointed=False):
    """For each segment t, the set of segments whose token embeddings get gradient from loss t."""
    model = tiny_rmt("llama", num_mem_tokens=2, segment_size=SEG, bptt_depth=bptt_depth)
    if checkpointed:
        model.train().activation_checkpointing_enable()  # no dropout: train mode only turns it on
    else:
        model.eval()
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


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("bptt_depth", [-1, 1, 2, 3])
def test_gradient_reaches_exactly_the_segments_truncation_allows(bptt_depth, checkpointed):
    reached = reached_segments(bptt_depth, checkpointed)
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
    model.activation_checkpointing_enable()
    assert model.gradient_checkpointing
    ckpt_loss, ckpt_grads = loss_and_grads(model, ids, mask, seed=5)
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=1e-6, atol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-6, atol=1e-8, msg=name)
    assert plain_grads["memory"].abs().sum() > 0


def test_checkpointing_runs_one_recompute_per_segment_and_no_layer_checkpointing():
    model = tiny_rmt("llama", segment_size=5).train()
    model.activation_checkpointing_enable()
    calls = []
    model.decoder.register_forward_hook(lambda *_: calls.append(1))
    model(random_tokens(1, 15), labels=random_tokens(1, 15)).loss.backward()
    assert len(calls) == 6  # 3 segments: forward + recompute each
    assert not any(getattr(layer, "gradient_checkpointing", False) for layer in model.decoder.layers)


def test_reentrant_checkpointing_is_refused():
    model = tiny_rmt("llama")
    with pytest.raises(ValueError, match="use_reentrant"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})


def test_checkpointed_segment_keeps_one_autograd_node_not_its_graph():
    """Between forward and backward a checkpointed segment keeps O(1) autograd nodes (issue 6,
    flat memory to 1M tokens); torch.utils.checkpoint, still used where asked for, keeps them all."""
    ids = random_tokens(1, 8 * SEG)
    model = tiny_rmt("llama", segment_size=SEG).train()
    plain = graph_nodes(model(ids, labels=ids).loss)
    model.activation_checkpointing_enable()
    out = model(ids, labels=ids)
    per_segment = graph_nodes(out.loss) / 8
    # Per segment: the segment's node, the memory-noise-free hand-over, the loss sums; the
    # parameters' accumulators are shared by all segments.
    assert per_segment < 6, per_segment
    assert plain / 8 > 60  # an un-checkpointed 2-layer segment has ~100 nodes
    out.loss.backward()
    assert all(p.grad is not None for p in model.backbone.parameters())
    # Any checkpoint option the one-node recompute does not reproduce runs torch.utils.checkpoint.
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False,
                                                                       "determinism_check": "none"})
    assert graph_nodes(model(ids, labels=ids).loss) / 8 > 60


@pytest.mark.parametrize("checkpointed", [False, True])
def test_each_parameter_gets_one_gradient_per_backward(checkpointed):
    """DeepSpeed reduces a parameter's gradient when its accumulator runs: that must happen once
    per backward however many segments used the parameter (SPEC 4: reentrant checkpointing
    accumulates once per segment and breaks ZeRO)."""
    model = tiny_rmt("llama", segment_size=SEG).train()
    if checkpointed:
        model.activation_checkpointing_enable()
    counts = {}
    for name, param in model.named_parameters():
        param.register_post_accumulate_grad_hook(lambda p, name=name: counts.__setitem__(name, counts.get(name, 0) + 1))
    ids = random_tokens(2, 6 * SEG)
    model(ids, labels=ids).loss.backward()
    assert counts == {name: 1 for name, _ in model.named_parameters()}


def test_checkpointed_segments_replay_autocast():
    """The recompute in backward runs outside the caller's autocast block: it must re-enter it,
    or the gradients are those of an fp32 recompute of a bf16 forward."""
    ids = random_tokens(2, 4 * SEG)
    grads = []
    for checkpointed in (False, True):
        model = tiny_rmt("llama", segment_size=SEG, fused_segment_loss=False).train()
        if checkpointed:
            model.activation_checkpointing_enable()
        # Without the cast cache: with it, the plain step sums every segment's bf16 weight
        # gradient in bf16 before one cast, the recompute casts per segment (rounding, not a bug).
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            out = model(ids, labels=ids)
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-6, atol=1e-7, msg=name)
