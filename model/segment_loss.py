"""The LM-head loss of one segment, chunked so that [B, T, V] logits never exist at once.

`lm_loss_sum` is what a segment step calls. In training it takes the fused path: the loss's
gradients w.r.t. the hidden states and the head are computed in forward, one [B, chunk, V] block
at a time (FusedLinearCrossEntropy), and the un-checkpointed segments of a step add their head
gradient into one step-wide sum (HeadGradient). Otherwise it is F.cross_entropy per chunk.
"""

import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .conventions import IGNORE_INDEX
from .segments import num_targets
from .zero_params import is_partitioned


def _chunk_loss_sum(lm_head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()  # [B, C, V]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def lm_loss_sum(
    lm_head, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int, fused: bool = True,
    head_grad: "HeadGradient | None" = None, position: int = 0,
):
    """(sum of token cross-entropies, number of valid targets) without [B, T, V] logits alive at once.

    Training (autograd on, a plain nn.Linear head) uses the fused loss below when `fused`. With
    `head_grad`, the head's gradient goes into that step-wide sum instead of the segment's own
    (`position`: this loss sum's index in the step's `head_grad.stack`). Otherwise, with more
    than one chunk and autograd on, each chunk's logits are recomputed in backward, so only one
    [B, chunk, V] block exists at a time.
    """
    length = hidden.shape[1]
    num_tokens = num_targets(targets)
    if fused and _can_fuse(lm_head, hidden):
        shared = head_grad if head_grad is not None and head_grad.wants(lm_head) else None
        weight, bias = lm_head.weight, lm_head.bias
        if shared is not None:
            # The head's gradient reaches autograd through the step's stack (HeadGradient), once.
            weight, bias = weight.detach(), bias.detach() if bias is not None else None
        total = FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, lm_head, chunk_size, shared, position)
        return total, num_tokens
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


def _can_fuse(lm_head, hidden: torch.Tensor) -> bool:
    if not torch.is_grad_enabled() or type(lm_head) is not nn.Linear:
        return False
    params = [p for p in (lm_head.weight, lm_head.bias) if p is not None]
    if not (hidden.requires_grad or any(p.requires_grad for p in params)):
        return False
    # ZeRO-3 keeps only a shard in .data outside the module's own forward; the fused loss reads
    # the full weight directly, so partitioned heads take the unfused path.
    return not any(is_partitioned(p) for p in params)


def _head_gradient_dtype(param: torch.Tensor) -> torch.dtype:
    # Summed over chunks and segments in at least fp32 so a low-precision head loses nothing.
    return torch.promote_types(param.dtype, torch.float32)


def _fused_chunks(hidden, weight, targets, lm_head, chunk_size, grad_hidden, grad_weight, grad_bias):
    """Loss sum of hidden [B, T, D] over chunks; writes d(loss)/d(hidden) into grad_hidden and adds
    d(loss)/d(weight, bias) into grad_weight [V, D] and grad_bias [V] (each may be None)."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[1], chunk_size):
        h = hidden[:, start : start + chunk_size]  # [B, C, D]
        # [B*C, V] logits passed unnamed, so the callee can free them once softmax is taken.
        grad_logits, valid, loss = _loss_and_grad_logits(
            lm_head(h).float().flatten(0, 1), targets[:, start : start + chunk_size].reshape(-1)
        )
        total += loss
        # Ignored rows are zeroed on the [rows, D] side of each product, which is V/D times
        # cheaper than zeroing their [rows, V] gradient and needs no host sync.
        if grad_hidden is not None:
            block = (grad_logits.to(weight.dtype) @ weight) * valid.to(weight.dtype).unsqueeze(1)
            grad_hidden[:, start : start + chunk_size] = block.view(h.shape)
        if grad_weight is not None:
            valid_h = h.reshape(-1, h.shape[-1]) * valid.to(h.dtype).unsqueeze(1)
            if grad_weight.dtype == valid_h.dtype:
                grad_weight.addmm_(grad_logits.to(valid_h.dtype).t(), valid_h)  # no [V, D] temporary
            else:
                grad_weight += (grad_logits.to(valid_h.dtype).t() @ valid_h).to(grad_weight.dtype)
        if grad_bias is not None:
            grad_bias += (valid @ grad_logits).to(grad_bias.dtype)
    return total


class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum over valid targets of cross_entropy(lm_head(hidden).float(), targets), ignore_index -100.

    The gradients w.r.t. hidden, weight and bias are computed in forward, one [B, chunk, V] block
    of logits at a time, and only they are kept for backward, which just scales them by the
    incoming gradient (exact: the loss is a scalar). No logits or log-softmax outlive their chunk,
    backward recomputes nothing, the logits are freed once their softmax exists and the softmax
    block turns into d(loss)/d(logits) in place, which saves the log-softmax, the zero-filled
    [chunk, V] gradient and its extra passes of the unfused loss.

    With a HeadGradient (`shared`; weight and bias then come detached), the head's gradient is
    added to the step's sum instead of being kept per segment: see HeadGradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, lm_head, chunk_size, shared=None, position=0):
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None  # [B, T, D]
        if shared is not None:
            grad_weight, grad_bias = shared.add_segment(position, hidden, targets, lm_head, chunk_size)
        else:
            grad_weight = torch.zeros(weight.shape, dtype=_head_gradient_dtype(weight), device=weight.device) \
                if want_weight else None
            grad_bias = torch.zeros(bias.shape, dtype=_head_gradient_dtype(bias), device=bias.device) \
                if want_bias else None
        total = _fused_chunks(hidden, weight, targets, lm_head, chunk_size, grad_hidden, grad_weight, grad_bias)
        if shared is not None:
            grad_weight = grad_bias = None  # the step's sum, not this segment's
        ctx.grad_dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        # With `shared`, the hidden states are kept for HeadGradient's exact correction; saving them
        # here too costs nothing more and lets saved-tensor hooks (the memory budget) see them.
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, hidden if shared is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias, _ = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.grad_dtypes
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_total).to(bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


class HeadGradient:
    """The LM head's gradient of one training step, summed over its fused segments in forward.

    Kept per segment, d(loss_sum_t)/d(head) is a [V, D] fp32 tensor per segment (8 MiB on the CPU
    profile, ~200 MiB for a 50K x 1024 head), zero-filled, scaled in backward and summed by autograd
    across segments. Here every fused segment adds its part into one buffer (addmm_, no temporary),
    and `stack(loss_sums)` hands the head one gradient in backward: g x sum_t G_t, where g is the
    gradient the fused segments' loss sums receive. That is exact whenever they all receive the same
    g (loss and loss_sum do); for segments that receive another g_t (e.g. a weighted sum of
    segment_losses), (g_t - g) x G_t is recomputed from the segment's saved hidden states and added.
    """

    def __init__(self):
        self.lm_head = self.chunk_size = None  # the step's head and loss_chunk_size, set by its first segment
        self.grad_weight = self.grad_bias = None
        self.segments = []  # (position, hidden [B,T,D], targets [B,T])

    def wants(self, lm_head) -> bool:
        if self.lm_head is not None and lm_head is not self.lm_head:
            return False  # another head (never in one RMT step): keep its gradient per segment
        bias = lm_head.bias
        return lm_head.weight.requires_grad or (bias is not None and bias.requires_grad)

    def add_segment(self, position, hidden, targets, lm_head, chunk_size):
        """Registers a fused segment; returns the buffers it adds its head gradient into."""
        if self.lm_head is None:
            self.lm_head, self.chunk_size = lm_head, chunk_size
            weight, bias = lm_head.weight, lm_head.bias
            if weight.requires_grad:
                self.grad_weight = torch.zeros(weight.shape, dtype=_head_gradient_dtype(weight), device=weight.device)
            if bias is not None and bias.requires_grad:
                self.grad_bias = torch.zeros(bias.shape, dtype=_head_gradient_dtype(bias), device=bias.device)
        self.segments.append((position, hidden.detach(), targets))
        return self.grad_weight, self.grad_bias

    def stack(self, loss_sums: list) -> torch.Tensor:
        """torch.stack(loss_sums) [N], through which the summed head gradient reaches autograd."""
        if not self.segments:
            return torch.stack(loss_sums)
        return _StackWithHeadGradient.apply(self, self.lm_head.weight, self.lm_head.bias, *loss_sums)


class _StackWithHeadGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, head_grad, weight, bias, *loss_sums):
        ctx.lm_head, ctx.chunk_size = head_grad.lm_head, head_grad.chunk_size
        ctx.positions = [position for position, _, _ in head_grad.segments]
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        ctx.save_for_backward(
            head_grad.grad_weight, head_grad.grad_bias,
            *[hidden for _, hidden, _ in head_grad.segments], *[targets for _, _, targets in head_grad.segments],
        )
        return torch.stack(loss_sums)

    @staticmethod
    def backward(ctx, grad_stack):
        grad_weight, grad_bias, *per_segment = ctx.saved_tensors
        count = len(ctx.positions)
        hiddens, targets = per_segment[:count], per_segment[count:]
        grads = grad_stack[ctx.positions].float()  # [n fused segments]
        common = grads[0]
        grad_weight = grad_weight * common if grad_weight is not None else None
        grad_bias = grad_bias * common if grad_bias is not None else None
        if _may_differ(grad_stack, count) and not torch.equal(grads, common.expand_as(grads)):
            for i in (grads != common).nonzero().flatten().tolist():
                part_weight = torch.zeros_like(grad_weight) if grad_weight is not None else None
                part_bias = torch.zeros_like(grad_bias) if grad_bias is not None else None
                _fused_chunks(hiddens[i], ctx.lm_head.weight.detach(), targets[i], ctx.lm_head, ctx.chunk_size,
                              None, part_weight, part_bias)
                if part_weight is not None:
                    grad_weight += part_weight * (grads[i] - common)
                if part_bias is not None:
                    grad_bias += part_bias * (grads[i] - common)
        weight_dtype, bias_dtype = ctx.dtypes
        return (
            None,
            grad_weight.to(weight_dtype) if grad_weight is not None else None,
            grad_bias.to(bias_dtype) if grad_bias is not None else None,
            *grad_stack.unbind(),
        )


def _may_differ(grad_stack: torch.Tensor, fused: int) -> bool:
    """Whether the fused segments' incoming gradients can differ, decided without reading them.

    A loss that uses the segment sums only through their total (loss, loss_sum: the trainer's
    case) hands back `sum`'s gradient, one value expanded over the stack (stride 0), so every entry
    is the same by construction and no host read is needed: comparing them on the host would stall
    the GPU once per backward. Any other gradient (a weighted sum of segment_losses, two consumers
    accumulated) is compared on the host.
    """
    return fused > 1 and grad_stack.stride(0) != 0


def _loss_and_grad_logits(logits: torch.Tensor, targets: torch.Tensor):
    """(softmax - one_hot(target), valid [R] as 0/1, loss sum) of fp32 logits [R, V], targets [R].

    Rows whose target is IGNORE_INDEX add no loss; their gradient row is left as a plain softmax
    for the caller to zero (see `valid`).
    """
    valid_mask = targets != IGNORE_INDEX
    valid = valid_mask.to(logits.dtype)
    safe_targets = torch.where(valid_mask, targets, 0).unsqueeze(1)
    target_logits = logits.gather(1, safe_targets).squeeze(1)
    row_max = logits.amax(dim=1)
    # softmax's row-at-a-time kernel is about twice as fast as logsumexp plus exp over [R, V].
    probs = torch.softmax(logits, dim=1)
    del logits
    # The largest probability is exp(max - logsumexp) >= 1/V, so its log recovers logsumexp
    # without underflow (a target's own probability may be 0 in fp32).
    log_norm = row_max - probs.amax(dim=1).log()
    loss = ((log_norm - target_logits) * valid).sum()
    probs.scatter_add_(1, safe_targets, -valid.unsqueeze(1))
    return probs, valid, loss
