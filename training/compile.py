"""`model.compile`: the segment step captured once by torch.compile and replayed N times a step.

What is compiled is `RMTForCausalLM.segment_hidden` from the token embeddings on (the backbone over
[read memory ; tokens ; write memory], the new memory): every FLOP of a segment but two. The LM
head's loss stays eager (the fused loss takes its gradients in forward and adds the head's into a
step-wide buffer, see model/segment_loss.py; its GEMMs gain nothing from fusion). The token lookup
stays eager so that hooks on the embedding module are not captured (one gather kernel). The model
class is not touched: the instance's attribute is replaced, so export, checkpoints and the hub copy
are the plain model.

Shapes: dynamic=False, so each distinct segment shape is one graph: the full segment, a shorter
last segment (one more), padded vs unpadded segments (a mask input or none), autograd on vs off
(the forward of a checkpointed segment runs without autograd), and memory that carries gradient
vs memory detached by BPTT truncation. A training run sees a handful. The recompile limit is
raised to RECOMPILE_LIMIT and hitting it is an error (torch would otherwise fall back to eager
silently), and fullgraph=True makes any graph break an error instead of a silent split. The
initial memory is an expanded [1, M, D] parameter (batch stride 0): it is made contiguous before
the call so it shares the graph of the later segments instead of adding one. Padding a shorter
last segment up to S instead would change what the model computes (positions, the write block)
for one saved compile: not worth it.

Exactness: compiled and eager agree to fp32 rounding, not bitwise (inductor fuses reductions and
reorders their sums; tests/test_perf_compile.py bounds the difference). Under ZeRO-3 the parameters
only exist inside DeepSpeed's module hooks, which all-gather them; those hooks are
torch.compiler.disable'd, so the step cannot be captured (a graph break at every module): the
config gate refuses model.compile with ZeRO-3 and this module refuses partitioned parameters.
"""

from __future__ import annotations

import torch

# Graphs per compiled step function: full/short segment x mask/none x autograd on/off x memory
# with/without gradient is 16 at most; torch's default limit of 8 could drop to eager silently.
RECOMPILE_LIMIT = 32


def compile_segment_step(model, mode: str | None = None):
    """Replace `model.segment_hidden` by its torch.compile (dynamic=False, fullgraph=True, the
    given inductor `mode`, None = torch's default); returns the model."""
    import torch._dynamo.config as dynamo_config

    from model.zero_params import is_partitioned

    if any(is_partitioned(p) for p in model.parameters()):
        raise ValueError("compile_segment_step: the parameters are ZeRO-3 partitioned; DeepSpeed's "
                         "gathering hooks (torch.compiler.disable'd) break the captured step. "
                         "Compile under ZeRO stage 0-2, or leave the model eager")
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    # Past the limit torch would run the step eagerly without a word: fail loudly instead.
    dynamo_config.fail_on_recompile_limit_hit = True
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit,
                                                    4 * RECOMPILE_LIMIT)
    compiled = torch.compile(model.segment_hidden, dynamic=False, fullgraph=True, mode=mode)

    def segment_hidden(memory, seg_ids, seg_embeds, seg_mask):
        if seg_embeds is None:
            # The token lookup runs eagerly, so the embedding module's hooks stay out of the graph:
            # transformers' activation_checkpointing_enable() adds one that calls requires_grad_()
            # on its output, which torch 2.11's dynamo cannot capture (fullgraph: an error). Inside
            # a checkpointed segment this costs nothing more: the wrapper runs in its recompute too.
            seg_embeds = model.get_input_embeddings()(seg_ids)
        return compiled(memory.contiguous(), None, seg_embeds, seg_mask)

    segment_hidden.compiled = compiled  # for tests and benchmarks: the torch.compile object
    model.segment_hidden = segment_hidden
    return model


def is_compiled(model) -> bool:
    return hasattr(getattr(model, "segment_hidden", None), "compiled")
