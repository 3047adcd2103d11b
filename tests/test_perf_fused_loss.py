"""Fused linear + cross-entropy of the segment loss (issue 6): same loss and gradients as
F.cross_entropy on materialised logits, chunk by chunk, with ignored targets."""


import pytest
import torch
import torch.nn.functional as F

from model import IGNORE_INDEX
from model import segment_loss as segments
from model.segment_loss import FusedLinearCrossEntropy, HeadGradient, lm_loss_sum
from test_model_common import random_tokens, tiny_rmt

torch.set_num_threads(1)

B, T, D, V = 2, 13, 16, 37


def head_and_inputs(bias: bool, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(D, V, bias=bias).to(dtype)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    hidden = torch.randn(B, T, D, generator=generator).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=generator)
    targets[0, 3] = targets[1, 0] = targets[1, -1] = IGNORE_INDEX
    return head, hidden, targets


def reference(head, hidden, targets, scale):
    """Loss sum and gradients the plain way: full [B*T, V] fp32 logits, F.cross_entropy."""
    logits = head(hidden).float().reshape(-1, V)
    loss = F.cross_entropy(logits, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    params = [hidden, *head.parameters()]
    return loss.detach(), torch.autograd.grad(loss * scale, params)


def fused(head, hidden, targets, scale, chunk):
    loss = FusedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, head, chunk)
    return loss.detach(), torch.autograd.grad(loss * scale, [hidden, *head.parameters()])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])  # 4 and 5 do not divide T = 13
def test_fused_loss_and_gradients_equal_cross_entropy_on_logits(bias, chunk):
    head, hidden, targets = head_and_inputs(bias)
    want_loss, want_grads = reference(head, hidden, targets, scale=0.37)
    got_loss, got_grads = fused(head, hidden, targets, scale=0.37, chunk=chunk)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-5)
    assert len(got_grads) == len(want_grads) == (3 if bias else 2)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Ignored positions get no gradient at all.
    assert got_grads[0][0, 3].abs().max() == 0 and got_grads[0][1, -1].abs().max() == 0


def test_fused_loss_all_targets_ignored_is_zero_with_zero_gradients():
    head, hidden, targets = head_and_inputs(bias=True)
    targets.fill_(IGNORE_INDEX)
    loss, grads = fused(head, hidden, targets, scale=1.0, chunk=4)
    assert loss.item() == 0.0
    assert all(g.abs().max() == 0 for g in grads)


def test_fused_loss_is_finite_where_a_target_probability_underflows():
    # Logit gaps of ~1e3: the target's fp32 softmax probability is exactly 0, its loss is not.
    head, hidden, targets = head_and_inputs(bias=False)
    with torch.no_grad():
        head.weight.mul_(400.0)
    want_loss, want_grads = reference(head, hidden, targets, scale=1.0)
    got_loss, got_grads = fused(head, hidden, targets, scale=1.0, chunk=5)
    assert want_loss > 1e3 and torch.isfinite(got_loss)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-3)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_fused_loss_bf16_head_matches_reference_within_bf16_rounding():
    head, hidden, targets = head_and_inputs(bias=False, dtype=torch.bfloat16)
    want_loss, want_grads = reference(head, hidden, targets, scale=1.0)
    got_loss, got_grads = fused(head, hidden, targets, scale=1.0, chunk=5)
    assert got_grads[0].dtype == got_grads[1].dtype == torch.bfloat16
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-4)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_lm_loss_sum_fuses_only_when_training_a_plain_linear_head():
    head, hidden, targets = head_and_inputs(bias=False)
    assert segments._can_fuse(head, hidden)
    with torch.no_grad():
        assert not segments._can_fuse(head, hidden)
        loss, count = lm_loss_sum(head, hidden, targets, chunk_size=4)
    assert count.item() == (targets != IGNORE_INDEX).sum().item()
    torch.testing.assert_close(loss, reference(head, hidden, targets, 1.0)[0], rtol=1e-6, atol=1e-5)
    head.weight.ds_id = 0  # what a ZeRO-3 partitioned parameter carries
    assert not segments._can_fuse(head, hidden)


@pytest.mark.parametrize("backbone", ["llama", "gpt2"])
def test_rmt_training_step_with_fused_loss_equals_unfused_step(backbone, monkeypatch):
    ids = random_tokens(2, 23, seed=3)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # padding: ignored targets inside a segment
    fused_calls = []
    apply = segments.FusedLinearCrossEntropy.apply
    monkeypatch.setattr(segments.FusedLinearCrossEntropy, "apply", lambda *a: fused_calls.append(1) or apply(*a))
    results = []
    for fuse in (True, False):
        model = tiny_rmt(backbone, loss_chunk_size=2, bptt_depth=2, fused_segment_loss=fuse).train()
        block_lengths = []
        hook = model.get_output_embeddings().register_forward_hook(lambda m, a, out: block_lengths.append(out.shape[1]))
        out = model(ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        hook.remove()
        assert max(block_lengths) <= 2  # one [B, <= chunk, V] block at a time either way
        assert len(fused_calls) == 5  # 23 tokens = 5 segments, all fused; none when fuse=False
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fused_loss, fused_grads), (plain_loss, plain_grads) = results
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_fused_loss_switch_must_be_a_bool():
    from model import RMTConfig

    with pytest.raises(ValueError, match="fused_segment_loss='yes' is invalid.*False or True"):
        RMTConfig(fused_segment_loss="yes")


def test_checkpointed_segments_fuse_the_loss_only_in_their_recompute(monkeypatch):
    """A checkpointed segment runs forward twice: its first forward (no autograd) takes the plain
    loss, and only the recompute in backward, whose gradients are used at once, the fused one."""
    ids = random_tokens(2, 23, seed=4)
    fused_calls = []
    apply = segments.FusedLinearCrossEntropy.apply
    monkeypatch.setattr(segments.FusedLinearCrossEntropy, "apply", lambda *a: fused_calls.append(1) or apply(*a))
    model = tiny_rmt("llama", fused_segment_loss=True).train()
    model.activation_checkpointing_enable()
    out = model(ids, labels=ids)
    assert fused_calls == []
    out.loss.backward()
    assert len(fused_calls) == 5  # 5 segments, one recompute each
    checkpointed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing_disable()
    model(ids, labels=ids).loss.backward()
    assert len(fused_calls) == 10
    for name, param in model.named_parameters():
        torch.testing.assert_close(checkpointed_grads[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)
    model.config.fused_segment_loss = False
    model.activation_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    assert len(fused_calls) == 10  # the switch holds for the recompute too


def segment_inputs(seed):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=generator).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=generator)
    targets[0, seed % T] = IGNORE_INDEX
    return hidden, targets


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.3, -1.2, 0.3)])  # equal, then unequal incoming grads
def test_head_gradient_summed_over_segments_equals_per_segment_cross_entropy(bias, weights):
    """Three segments share one HeadGradient; the stacked loss sums are weighted (the second case
    needs the exact correction of segments whose incoming gradient differs from the first's)."""
    head, _, _ = head_and_inputs(bias)
    segments_in = [segment_inputs(seed) for seed in (1, 2, 3)]
    weights = torch.tensor(weights)

    ref_sums = [
        F.cross_entropy(head(h).float().reshape(-1, V), y.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        for h, y in segments_in
    ]
    params = [*head.parameters(), *[h for h, _ in segments_in]]
    want = torch.autograd.grad((torch.stack(ref_sums) * weights).sum(), params)

    head_grad = HeadGradient()
    sums = [lm_loss_sum(head, h, y, chunk_size=4, head_grad=head_grad, position=i)[0]
            for i, (h, y) in enumerate(segments_in)]
    assert len(head_grad.segments) == 3 and head_grad.grad_weight.shape == (V, D)
    stacked = head_grad.stack(sums)
    torch.testing.assert_close(stacked.detach(), torch.stack(ref_sums).detach(), rtol=1e-6, atol=1e-5)
    got = torch.autograd.grad((stacked * weights).sum(), params)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_fused_step_keeps_one_head_gradient_not_one_per_segment():
    """A fused step saves no [V, D] tensor per segment: the head's gradient is one step-wide sum."""
    model = tiny_rmt("llama", fused_segment_loss=True).train()
    head_shape = tuple(model.get_output_embeddings().weight.shape)
    saved_head_shaped = []

    def pack(tensor):
        if tuple(tensor.shape) == head_shape and not tensor.requires_grad:
            saved_head_shaped.append(tensor.untyped_storage().data_ptr())
        return tensor

    ids = random_tokens(2, 23, seed=5)  # 5 segments
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(ids, labels=ids)
    assert len(set(saved_head_shaped)) == 1, saved_head_shaped
    out.loss.backward()


@pytest.mark.parametrize("backbone", ["llama", "gpt2"])
def test_weighted_segment_losses_backprop_like_the_unfused_step(backbone):
    """Gradients through segment_losses (each segment's loss sum gets its own incoming gradient)
    equal the unfused step's: HeadGradient's correction path inside a whole RMT step."""
    ids = random_tokens(2, 23, seed=6)
    weights = torch.tensor([0.1, 0.5, 1.0, 2.0, 0.7])
    grads = []
    for fuse in (True, False):
        model = tiny_rmt(backbone, fused_segment_loss=fuse).train()
        out = model(ids, labels=ids)
        (out.segment_losses * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backbone", ["llama", "gpt2"])
def test_a_loss_through_the_total_compares_no_gradients_on_the_host(backbone, monkeypatch):
    """Issue 19: the trainer's loss reaches the segment sums only through their total, whose
    gradient is one value expanded over the stack; the fused backward then makes no host
    comparison (torch.equal would stall a GPU once per backward) and still equals the unfused
    step. A weighted loss still gets compared (and corrected: the test above)."""
    ids = random_tokens(2, 23, seed=7)  # 5 segments
    calls = []
    real_equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: calls.append(1) or real_equal(a, b))
    grads = []
    for fuse in (True, False):
        model = tiny_rmt(backbone, fused_segment_loss=fuse).train()
        out = model(ids, labels=ids)
        (out.loss_sum * 0.25).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert calls == []
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    model = tiny_rmt(backbone, fused_segment_loss=True).train()
    out = model(ids, labels=ids)
    (out.segment_losses * torch.tensor([0.1, 0.5, 1.0, 2.0, 0.7])).sum().backward()
    assert calls == [1]
