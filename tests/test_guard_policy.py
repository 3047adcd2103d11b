"""Issue 5, promise 3 in fp16: what the non-finite guard does with a step, per precision.

DeepSpeed's CPU accelerator cannot train in fp16 on this hardware (no AVX512-FP16), so the
end-to-end fp16 run in tests/test_reliability_nonfinite.py is skipped here; these tests pin the
policy the trainer applies to the all-reduced flags and the DeepSpeed settings it relies on.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from training.config import load_config
from training.guard import NONFINITE, OK, OVERFLOW, GradientFlag, classify_step


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_without_loss_scaling_any_nonfinite_value_counts(precision):
    for loss_ok, grads_ok in itertools.product([True, False], repeat=2):
        v = classify_step(loss_ok, grads_ok, precision)
        assert v.kind == (OK if loss_ok and grads_ok else NONFINITE)
        assert v.skipped == (not (loss_ok and grads_ok))
        assert v.counts_towards_abort == v.skipped and not v.fatal_before_step


def test_fp16_overflow_is_the_scalers_business_until_the_minimum_scale():
    # A fresh fp16 run overflows several times in a row while the scale comes down from 2^16;
    # those steps are skipped but must not count towards the abort.
    for scale in (65536.0, 1024.0, 2.0):
        v = classify_step(True, False, "fp16", loss_scale=scale, min_loss_scale=1.0)
        assert (v.kind, v.skipped, v.counts_towards_abort, v.fatal_before_step) == \
            (OVERFLOW, True, False, False)
    # At the minimum the scaler can do nothing more (DeepSpeed would raise): stop cleanly.
    v = classify_step(True, False, "fp16", loss_scale=1.0, min_loss_scale=1.0)
    assert (v.kind, v.counts_towards_abort, v.fatal_before_step) == (NONFINITE, True, True)


def test_fp16_nonfinite_loss_counts_at_any_scale():
    v = classify_step(False, False, "fp16", loss_scale=65536.0)
    assert (v.kind, v.counts_towards_abort, v.fatal_before_step) == (NONFINITE, True, False)
    v = classify_step(False, True, "fp16", loss_scale=4.0, min_loss_scale=4.0)
    assert (v.kind, v.fatal_before_step) == (NONFINITE, True)
    assert classify_step(True, True, "fp16", loss_scale=4.0).kind == OK


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="precision 'fp8'"):
        classify_step(True, True, "fp8")
    with pytest.raises(ValueError, match="loss scale"):
        classify_step(True, False, "fp16")


def test_fp16_settings_reach_deepspeed_and_are_validated():
    cfg = load_config("configs/tiny_cpu.yaml", ["deepspeed.precision=fp16",
                                                "deepspeed.initial_scale_power=12",
                                                "deepspeed.min_loss_scale=0.5"], world_size=2)
    ds = cfg.deepspeed.engine_config(cfg.batch, cfg.optim, 2)
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 12,
                          "min_loss_scale": 0.5}
    assert ds["bf16"] == {"enabled": False}
    from training.config import ConfigError
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny_cpu.yaml", ["deepspeed.min_loss_scale=0",
                                              "deepspeed.initial_scale_power=40"], world_size=2)
    report = e.value.report()
    assert "deepspeed.min_loss_scale: 0" in report and "deepspeed.initial_scale_power: 40" in report


def test_gradient_flag_is_a_device_tensor_set_by_any_nonfinite_gradient():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    flag = GradientFlag(model, torch.device("cpu"))
    x = torch.randn(3, 4)
    model(x).sum().backward()
    assert isinstance(flag.flag, torch.Tensor) and not flag
    (model(x) * float("nan")).sum().backward()
    assert flag
    flag.zero_()
    assert not flag
    (model(x) * float("inf")).sum().backward()  # an infinite gradient counts too
    assert flag
