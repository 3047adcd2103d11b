"""Issue 21 item 6: under ZeRO-Offload the trainer's optimizer is DeepSpeed's CPU Adam (its own
vectorised kernel, several times faster than torch's AdamW loop on CPU), and the non-finite
guard's veto still holds. One real one-rank ZeRO-3 offload run (tests/trainer_step_worker.py):

  - DeepSpeed's CPU Adam is what ZeRO-Offload steps with, and its first 5 losses equal torch
    AdamW's (the fallback) within rtol 1e-5. Not bit-equal: the cpu_adam op computes the same
    fp32 AdamW update with its own SIMD kernel (fused multiply-adds, another operation order), so
    the weights drift apart by a few ulps per step (measured: 2e-7 relative in the 5th loss).
    The tolerance still tells a different algorithm apart: in the kernel check below, Adam with
    L2 instead of AdamW's decoupled decay moves the weights 1e4 times further than the kernels'
    rounding does;
  - a vetoed step leaves the fp32 master weights, the model's partitions and exp_avg, exp_avg_sq
    and step of every group bit-identical: a NaN loss injected through tests/faults.py, and a
    step vetoed with finite gradients (DeepSpeed's ZeRO-3 skips a step with non-finite gradients
    on its own, so only this one shows that the optimizer's veto holds);
  - where the op cannot be built, the trainer says so once and trains with torch's AdamW.
"""

from __future__ import annotations

import math

from tests.test_trainer_sync import run_worker

LOSS_RTOL = 1e-5


def test_offload_steps_with_cpu_adam_like_torch_adamw_and_the_veto_holds(tmp_path):
    result = run_worker("offload", tmp_path, "deepspeed.offload_optimizer=true")
    assert result["cpu_adam_optimizer"] == "GuardedCPUAdam"
    assert result["torch_optimizer"] == "GuardedAdamW"  # the fallback, with its one warning
    assert result["console"].count("deepspeed.offload_optimizer: DeepSpeed's CPU Adam is "
                                   "unavailable here: cpu_adam op disabled by the test; using "
                                   "torch's AdamW") == 1, result["console"][-3000:]
    cpu, torch_adamw = result["cpu_adam"], result["torch_adamw"]
    assert len(cpu) == 5 and cpu[0] == torch_adamw[0]  # the same start, before any update
    for a, b in zip(cpu, torch_adamw):
        assert math.isclose(a, b, rel_tol=LOSS_RTOL), (cpu, torch_adamw)
    assert cpu[-1] < cpu[0] - 0.3  # it trains
    kernel = result["kernel"]
    assert kernel["cpu_adam"] < 1e-5 < 1e-3 < kernel["adam_l2"], kernel

    veto = result["veto"]  # steps 6 (NaN loss), 7 (vetoed, finite gradients), 8 (normal)
    keys = veto["keys"]
    for kind in ("master_", "exp_avg_", "exp_avg_sq_", "step_", "param_"):
        assert any(k.startswith(kind) for k in keys), (kind, keys)
    nan_step, vetoed, normal = veto["changed"]
    assert nan_step == [] and vetoed == []  # bit-identical weights, moments and step counts
    assert set(normal) == set(keys)  # a normal update changes them all: the snapshot sees it
    assert [set(s) for s in veto["state_steps"]] == [{5.0}, {5.0}, {5.0}, {6.0}]
    assert veto["skipped_steps"] == 2 and math.isnan(veto["losses"][0])
    assert all(math.isnan(v) for v in veto["losses"][:2]) and math.isfinite(veto["losses"][2])
