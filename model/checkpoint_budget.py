"""Memory-budgeted segment checkpointing: checkpoint only as many segments as the budget needs.

An un-checkpointed segment keeps its activations alive until backward; a checkpointed one keeps
only its inputs and memory state and recomputes the rest in backward (one extra forward). Given
a budget for activations, the first segments of a step run un-checkpointed while their measured
activations fit, and the rest are checkpointed. The size of one segment's activations is measured,
not modelled: the first segment of every step runs un-checkpointed under a saved-tensor hook that
sums the bytes autograd keeps for backward, so any backbone and any dtype are handled.

Autograd graphs cost host memory beyond the tensors the hook sees: every node and a small holder
per saved tensor (`python bench/segment_graph.py`: 1.8 KiB per saved tensor; 2.1 KiB in a 1M-token
step; torch 2.13 CPU; about 350 KiB per segment of a 4-layer Llama). An un-checkpointed segment
keeps its graph until backward; so does a segment checkpointed by torch.utils.checkpoint (used
for checkpoint options the node does not reproduce), whereas segment_recompute.RecomputedSegment
keeps one node. The graph is
estimated from the number of tensors the measured segment saved, so that over thousands of
segments the budget still holds. It lives in host memory, so it counts only when the activations
do too (CPU).
"""

from contextlib import contextmanager

import torch


def _is_parameter_like(tensor: torch.Tensor) -> bool:
    # Weights (and views of them) are saved for backward by every matmul, but they exist anyway.
    base = tensor._base if tensor._base is not None else tensor
    return base.is_leaf and base.requires_grad


# Rounded up from bench/segment_graph.py's measurement: a budget should err on the safe side.
GRAPH_BYTES_PER_SAVED_TENSOR = 2560


class SavedBytesCounter:
    """Bytes of distinct non-parameter storages that autograd saves while active, and how many
    tensors (parameters included) it saves."""

    def __init__(self):
        self.bytes = 0
        self.saved_tensors = 0
        self._storages = set()

    def _pack(self, tensor):
        self.saved_tensors += 1
        if not _is_parameter_like(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self._storages:
                self._storages.add(storage.data_ptr())
                self.bytes += storage.nbytes()
        return tensor

    @contextmanager
    def counting(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield self


class CheckpointBudget:
    """Per-step plan: which segments to checkpoint so that kept activations fit `budget_bytes`.

    Usage per segment: `measure = plan.start_segment(num_left)`; run the segment (inside the
    returned counter if it is not None, checkpointed if `plan.checkpoint` is True); then
    `plan.end_segment()`. `num_left` counts this segment and those after it.
    """

    def __init__(self, budget_bytes: float, memory_bytes: int, on_host: bool, checkpoint_keeps_graph: bool):
        self.budget_bytes = budget_bytes
        # The graph lives in host memory: it counts against a budget for CPU activations only.
        self.graph_bytes_per_saved_tensor = GRAPH_BYTES_PER_SAVED_TENSOR if on_host else 0
        self.checkpoint_keeps_graph = checkpoint_keeps_graph
        self.memory_bytes = memory_bytes  # kept per checkpointed segment: its memory in and out
        self.residue_bytes = None  # kept per checkpointed segment: memory + its autograd graph
        self.segment_bytes = None  # measured activations (+ graph) of one un-checkpointed segment
        self.kept_bytes = 0
        self.checkpoint = False
        self.checkpointed_segments = 0
        self._counter = None

    def start_segment(self, num_left: int):
        if self.segment_bytes is None:
            self.checkpoint = False
            self._counter = SavedBytesCounter()
            return self._counter
        # Room for this segment's activations, one segment's recompute in backward, and the
        # residue of every later segment should they all end up checkpointed.
        needed = self.kept_bytes + 2 * self.segment_bytes + (num_left - 1) * self.residue_bytes
        self.checkpoint = self.checkpoint or needed > self.budget_bytes
        return None

    def end_segment(self):
        if self._counter is not None:
            graph_bytes = self._counter.saved_tensors * self.graph_bytes_per_saved_tensor
            self.segment_bytes = self._counter.bytes + graph_bytes
            self.residue_bytes = self.memory_bytes + (graph_bytes if self.checkpoint_keeps_graph else 0)
            self._counter = None
        if self.checkpoint:
            self.checkpointed_segments += 1
        else:
            self.kept_bytes += self.segment_bytes
