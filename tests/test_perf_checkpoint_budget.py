"""Memory-budgeted segment checkpointing (issue 6, point 3): same loss and gradients as no
checkpointing, and the number of checkpointed segments follows the budget."""

import pytest
import torch

from model import RMTConfig
from test_model_common import BACKBONES, random_tokens, tiny_rmt

torch.set_num_threads(1)

SEGMENTS, SEG = 8, 6


def run_step(model, ids, mask, seed):
    """(loss, grads, backbone calls) of one training forward + backward."""
    calls = []
    hook = model.decoder.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(seed)
    out = model(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads, len(calls)


@pytest.mark.parametrize("backbone", ["llama", "gpt2"])
def test_budgeted_checkpointing_matches_plain_step_at_every_budget(backbone, monkeypatch):
    # Checkpointed segments take the plain loss, the others the fused one (same maths, other
    # rounding; tests/test_perf_fused_loss.py): the plain loss everywhere isolates checkpointing.
    # The graph estimate is off here (it would dwarf these tiny activations and squeeze the budgets
    # below into a sliver); the next test checks the accounting with it.
    monkeypatch.setattr("model.checkpoint_budget.GRAPH_BYTES_PER_SAVED_TENSOR", 0)
    model = tiny_rmt(backbone, dropout=0.2, num_mem_tokens=2, segment_size=SEG, bptt_depth=3,
                     fused_segment_loss=False).train()
    ids = random_tokens(2, SEGMENTS * SEG - 2, seed=4)  # a short last segment
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    plain_loss, plain_grads, plain_calls = run_step(model, ids, mask, seed=7)
    assert plain_calls == SEGMENTS and model.last_checkpointed_segments == 0

    checkpointed = []
    for budget_mb in (1e6, 1.0, 0.6, 0.35, 1e-6):  # from "everything fits" to "nothing fits"
        model.config.checkpoint_memory_budget_mb = budget_mb
        loss, grads, calls = run_step(model, ids, mask, seed=7)
        count = model.last_checkpointed_segments
        assert calls == SEGMENTS + count, budget_mb  # each checkpointed segment recomputes once
        torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)
        for name, grad in plain_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-8, msg=f"{name} at {budget_mb} MiB")
        checkpointed.append(count)
    model.config.checkpoint_memory_budget_mb = None
    # The first segment always runs un-checkpointed: it is where the activations are measured.
    assert checkpointed[0] == 0 and checkpointed[-1] == SEGMENTS - 1, checkpointed
    assert checkpointed == sorted(checkpointed), checkpointed  # a smaller budget never checkpoints less
    assert any(0 < c < SEGMENTS - 1 for c in checkpointed), checkpointed  # and some budget splits the step


def test_budget_is_measured_from_saved_activations_not_weights():
    """A budget between k and k + 1 segments' activations keeps exactly k segments un-checkpointed."""
    from model.checkpoint_budget import GRAPH_BYTES_PER_SAVED_TENSOR, SavedBytesCounter
    from model.segments import shifted_targets

    model = tiny_rmt("llama", num_mem_tokens=2, segment_size=SEG).train()
    ids = random_tokens(1, SEG)
    counter = SavedBytesCounter()
    with counter.counting():  # one segment step, as the model's first (measured) segment runs it
        model._segment_step(model.memory[None], ids, None, shifted_targets(ids, None), None, None, fuse_loss=True)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    # Independent bound: a segment's saved activations scale with its positions, not the weights.
    assert 0 < counter.bytes < weights, (counter.bytes, weights)

    length = SEGMENTS * SEG
    # A checkpointed segment keeps its memory in + out (one autograd node, no graph); an
    # un-checkpointed one its activations and its autograd graph (estimated per saved tensor).
    graph = counter.saved_tensors * GRAPH_BYTES_PER_SAVED_TENSOR
    assert 20 < counter.saved_tensors < 1000, counter.saved_tensors  # one per op input kept
    residue = 2 * 2 * model.config.hidden_size * 4
    segment = counter.bytes + graph
    for kept in (1, 3, 5):
        # Segment t stays un-checkpointed while kept + 2 segments + residue of later ones fit.
        # (half a segment's activations of slack, well inside the gap between k and k + 1)
        budget = (kept + 1) * segment + (SEGMENTS - kept) * residue + counter.bytes // 2
        model.config.checkpoint_memory_budget_mb = budget / 2**20
        model(random_tokens(1, length), labels=random_tokens(1, length)).loss.backward()
        assert model.last_checkpointed_segments == SEGMENTS - kept, kept
    model.config.checkpoint_memory_budget_mb = None


@pytest.mark.parametrize("budget", [0, -5, "100", True, float("nan")])
def test_invalid_budget_is_refused_naming_the_field(budget):
    with pytest.raises(ValueError, match="checkpoint_memory_budget_mb"):
        RMTConfig(backbone=BACKBONES["llama"], checkpoint_memory_budget_mb=budget)
