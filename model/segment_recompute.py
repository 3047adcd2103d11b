"""Segment checkpointing with one autograd node per segment.

torch.utils.checkpoint (non-reentrant) records a segment's whole autograd graph in forward and
only drops its saved tensors: a 4-layer Llama segment leaves ~290 nodes and 165 saved-tensor
holders, ~350 KiB of host memory, alive until backward. Over 2048 segments (1M tokens at S=512)
that graph doubled the checkpointed step's resident memory (docs/benchmarks.md). Here the
segment runs without autograd in forward and one node stands for it; backward re-runs it with
autograd and asks for the gradients of the node's inputs: the memory in, the input embeddings
(when they are a differentiable input) and the trainable parameters.

The parameters are inputs of the node, so their gradients travel through the outer graph:
the autograd engine sums what every segment's node sends to a parameter's accumulator before
running it, so each parameter gets one gradient per backward, as with an un-checkpointed step.
That is what DeepSpeed's per-parameter gradient hooks need; reentrant checkpointing, which
accumulates into `.grad` once per segment, breaks them (SPEC 4).

Preserved like torch.utils.checkpoint: the CPU and device RNG states (dropout replays exactly)
and the autocast state of forward. Parameters partitioned by ZeRO-3 have no data outside their
module's forward; DeepSpeed's hooks gather them when the segment runs (forward and recompute),
and `zero_params.PartitionedParameters` lets their gradient accumulators take full-shaped gradients.
"""

from contextlib import ExitStack

import torch


class _ReplayState:
    """RNG and autocast state at the segment's forward, to re-enter for its recompute."""

    def __init__(self, device: torch.device, preserve_rng: bool):
        self.device = device
        self.device_module = None if device.type == "cpu" else torch.get_device_module(device.type)
        self.cpu_rng = torch.get_rng_state() if preserve_rng else None
        self.device_rng = (
            self.device_module.get_rng_state(device) if preserve_rng and self.device_module is not None else None
        )
        self.autocast = [
            (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
            for kind in dict.fromkeys(("cpu", device.type))
        ]
        self.autocast_cache = torch.is_autocast_cache_enabled()

    def enter(self, stack: ExitStack) -> None:
        if self.cpu_rng is not None:
            # fork_rng puts the caller's RNG back afterwards: backward must not shift later draws.
            devices = [self.device] if self.device_rng is not None else []
            stack.enter_context(torch.random.fork_rng(devices=devices, device_type=self.device.type))
            torch.set_rng_state(self.cpu_rng)
            if self.device_rng is not None:
                self.device_module.set_rng_state(self.device_rng, self.device)
        for kind, enabled, dtype in self.autocast:
            stack.enter_context(
                torch.autocast(kind, dtype=dtype, enabled=enabled, cache_enabled=self.autocast_cache)
            )


class RecomputedSegment(torch.autograd.Function):
    """(step, step_kwargs, preserve_rng, partitioned, memory, embeds, *params) -> step(memory, embeds, **kwargs).

    `step(memory [B,M,D], embeds [B,T,D] or None, fuse_loss, **kwargs)` returns (loss_sum,
    num_tokens, memory_out, logits or None); `params` are the trainable parameters it uses;
    `partitioned` is their PartitionedParameters (None without ZeRO-3 partitioning).
    """

    @staticmethod
    def forward(ctx, step, step_kwargs, preserve_rng, partitioned, memory, embeds, *params):
        ctx.step, ctx.step_kwargs, ctx.params, ctx.partitioned = step, step_kwargs, params, partitioned
        ctx.replay = _ReplayState(memory.device, preserve_rng)
        ctx.save_for_backward(memory, embeds)
        # Autograd is off in a Function's forward: nothing of the segment is kept but its inputs.
        loss_sum, num_tokens, memory_out, logits = step(memory, embeds, fuse_loss=False, **step_kwargs)
        ctx.mark_non_differentiable(num_tokens)
        return loss_sum, num_tokens, memory_out, logits

    @staticmethod
    def backward(ctx, grad_loss, _grad_num_tokens, grad_memory, grad_logits):
        memory, embeds = ctx.saved_tensors
        want_memory, want_embeds, *want_params = ctx.needs_input_grad[4:]
        memory = memory.detach().requires_grad_(want_memory)
        embeds = embeds.detach().requires_grad_(want_embeds) if embeds is not None else None
        with ExitStack() as stack:
            ctx.replay.enter(stack)
            with torch.enable_grad():
                # The recompute's loss goes straight into backward: the fused loss, which takes its
                # gradients in forward, is the cheaper way when fused_segment_loss allows it.
                outputs = ctx.step(memory, embeds, fuse_loss=True, **ctx.step_kwargs)
        loss_sum, _, memory_out, logits = outputs
        pairs = [
            (out, grad)
            for out, grad in ((loss_sum, grad_loss), (memory_out, grad_memory), (logits, grad_logits))
            if out is not None and grad is not None and out.requires_grad
        ]
        wanted = [t for t, want in ((memory, want_memory), (embeds, want_embeds)) if want]
        wanted += [p for p, want in zip(ctx.params, want_params) if want]
        grads = iter(())
        if pairs and wanted:
            grads = iter(torch.autograd.grad(
                [out for out, _ in pairs], wanted, [grad for _, grad in pairs], allow_unused=True
            ))
        input_grads = [next(grads) if want else None for want in (want_memory, want_embeds, *want_params)]
        if ctx.partitioned:
            ctx.partitioned.before_accumulation()
        return (None, None, None, None, *input_grads)


def recompute_rng_setting(checkpoint_func):
    """preserve_rng_state of `checkpoint_func` when RecomputedSegment reproduces it, else None.

    None (the default checkpointing) and torch.utils.checkpoint.checkpoint with at most
    use_reentrant=False and preserve_rng_state are reproduced; anything else (HF's offload
    wrapper, context_fn, determinism checks, a function of the user's) must run as given.
    """
    if checkpoint_func is None:
        return True
    func = getattr(checkpoint_func, "func", None)
    keywords = getattr(checkpoint_func, "keywords", None) or {}
    if func is not torch.utils.checkpoint.checkpoint or getattr(checkpoint_func, "args", ()):
        return None
    if set(keywords) - {"use_reentrant", "preserve_rng_state"} or keywords.get("use_reentrant", False):
        return None
    return bool(keywords.get("preserve_rng_state", True))
