"""What model/ knows of DeepSpeed ZeRO-3's partitioned parameters; no other file reads their attributes.

zero.Init converts a parameter in place: it gains `ds_id`, `ds_shape` (the full shape) and
`ds_status`, and outside its module's forward its `.data` holds only this rank's shard or nothing.
DeepSpeed itself is never imported here: a plain parameter simply lacks the attributes.
"""

from contextlib import contextmanager

import torch


def is_partitioned(param) -> bool:
    """Converted by ZeRO-3: its `.data` may not hold the full tensor outside its module's forward."""
    return hasattr(param, "ds_id")


def full_shape(param):
    """The full shape of a ZeRO-3 parameter (`ds_shape`); None for a plain parameter."""
    return getattr(param, "ds_shape", None)


def is_released(param) -> bool:
    """DeepSpeed has released the parameter: not gathered, nor being gathered."""
    status = getattr(param, "ds_status", None)
    return status is not None and status.name == "NOT_AVAILABLE"


class PartitionedParameters:
    """Lets the nodes' full-shaped gradients reach ZeRO-3-partitioned parameters.

    ZeRO-3 keeps an empty tensor in a partitioned parameter's `.data` outside its module's
    forward (its full shape is `full_shape(param)`) and gathers it through module hooks, which
    do run in the node's forward and recompute. Two moments fall outside any module: the node's creation,
    where autograd makes the parameter's gradient accumulator and records its shape, and the
    accumulation of the summed gradient after the last node's backward, which copies it into a
    tensor shaped like `.data`. Both would see the empty tensor. So the accumulators are made
    here from a full-shaped stand-in (no storage: a stride-0 view of one element), and kept alive
    until the nodes hold them; and each node's backward puts the stand-in back into a released
    parameter before it returns, until the backward has finished (the accumulation and DeepSpeed's
    gradient hook, which reads the full gradient, have run); then `.data` is the empty tensor
    again, as DeepSpeed leaves a released parameter. Gathers, releases and the gradient
    reduction are DeepSpeed's own: nothing here moves parameter data.
    """

    def __init__(self, params):
        self.params = [p for p in params if full_shape(p) is not None]
        self.accumulators = []
        self._release_queued = False
        with torch.enable_grad():
            for param in self.params:
                with self._full_shaped(param):
                    self.accumulators.append(param.view_as(param).grad_fn.next_functions[0][0])

    def __bool__(self) -> bool:
        return bool(self.params)

    @contextmanager
    def _full_shaped(self, param):
        released = param.data
        if tuple(released.shape) == tuple(full_shape(param)):
            yield
            return
        param.data = self._stand_in(param)
        try:
            yield
        finally:
            param.data = released

    @staticmethod
    def _stand_in(param):
        return torch.empty(1, dtype=param.dtype, device=param.device).expand(full_shape(param))

    def before_accumulation(self) -> None:
        """Put the stand-in into every released parameter until this backward has finished."""
        for param in self.params:
            if is_released(param) and tuple(param.data.shape) != tuple(full_shape(param)):
                param.data = self._stand_in(param)
        if not self._release_queued:
            # Runs when the whole backward is done: after every accumulation and gradient hook.
            torch.autograd.Variable._execution_engine.queue_callback(self._release)
            self._release_queued = True

    def _release(self) -> None:
        """Released parameters hold an empty tensor again, as DeepSpeed leaves them."""
        for param in self.params:
            if is_released(param):
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        self._release_queued = False
