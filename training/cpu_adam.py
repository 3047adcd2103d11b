"""ZeRO-Offload's optimizer: DeepSpeed's CPU Adam with the non-finite guard's veto.

With `deepspeed.offload_optimizer` the fp32 master weights and Adam's moments live in host memory
and the update runs on the CPU; DeepSpeedCPUAdam does it with its own vectorised kernel (the
cpu_adam op, built by DeepSpeed's JIT on first use), several times faster than torch's AdamW loop.
Its update is AdamW's (adamw_mode: decoupled weight decay, bias correction), so the recipe's optim
section means the same thing either way.
"""

from __future__ import annotations

from deepspeed.ops.adam import DeepSpeedCPUAdam

from training.guard import VetoableStep


class GuardedCPUAdam(VetoableStep, DeepSpeedCPUAdam):
    """DeepSpeedCPUAdam (AdamW mode) whose next step the guard can veto. ZeRO-Offload calls
    `step()` once per fp32 partition group (stage 3: per sub-group); each call is vetoed, so
    weights, exp_avg, exp_avg_sq and the step count stay as they were."""

    def __init__(self, params, **adam):
        super().__init__(params, adamw_mode=True, **adam)
