"""Memory-budgeted segment checkpointing: checkpoint only as many segments as the budget needs.

An un-checkpointed segment keeps its activations alive until backward; a checkpointed one keeps
only its inputs and memory state and recomputes the rest in backward (one extra forward). Given
a budget for activations, the first segments of a step run un-checkpointed while their measured
activations fit, and the rest are checkpointed. The size of one segment's activations is measured,
not modelled: the first segment of every step runs un-checkpointed under a saved-tensor hook that
sums the bytes autograd keeps for backward, so any backbone and any dtype are handled.
"""

from contextlib import contextmanager

import torch


def _is_parameter_like(tensor: torch.Tensor) -> bool:
    # Weights (and views of them) are saved for backward by every matmul, but they exist anyway.
    base = tensor._base if tensor._base is not None else tensor
    return base.is_leaf and base.requires_grad


class SavedBytesCounter:
    """Bytes of distinct non-parameter storages that autograd saves while active."""

    def __init__(self):
        self.bytes = 0
        self._storages = set()

    def _pack(self, tensor):
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

    def __init__(self, budget_bytes: float, residue_bytes: int):
        self.budget_bytes = budget_bytes
        self.residue_bytes = residue_bytes  # kept per checkpointed segment (its memory in/out)
        self.segment_bytes = None  # measured activations of one un-checkpointed segment
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
            self.segment_bytes = self._counter.bytes
            self._counter = None
        if self.checkpoint:
            self.checkpointed_segments += 1
        else:
            self.kept_bytes += self.segment_bytes
