"""The trainer's AdamW is fused on CUDA only (training/optim.adamw_kwargs, a pure rule), and the
non-finite guard's veto (GuardedAdamW.step) holds for the fused implementation too."""

import copy
import types

import pytest
import torch

from training.guard import GuardedAdamW
from training.optim import adamw_kwargs, build_optimizer, fused_adamw_devices


def test_fused_only_for_cuda_state_when_torch_has_the_kernel():
    assert adamw_kwargs("cuda", ("cuda", "cpu")) == {"fused": True}
    assert adamw_kwargs("cuda", ()) == {}           # an old torch without the fused kernel
    assert adamw_kwargs("cpu", ("cuda", "cpu")) == {}  # CPU runs (and ZeRO-Offload) unchanged
    assert adamw_kwargs("xpu", ("cuda", "xpu")) == {}
    assert "cuda" in fused_adamw_devices()  # torch >= 2.0 (requirements.txt)


def _model_and_grads():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


@pytest.mark.skipif("cpu" not in fused_adamw_devices(), reason="this torch has no fused AdamW on CPU")
def test_veto_holds_with_fused_adamw():
    """On CPU the fused kernel stands in for CUDA's: the veto is in Python, before any kernel."""
    model = _model_and_grads()
    reference = copy.deepcopy(model)
    for p, q in zip(reference.parameters(), model.parameters()):
        p.grad = q.grad.clone()
    optimizer = GuardedAdamW(model.parameters(), lr=1e-2, fused=True)
    plain = GuardedAdamW(reference.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.skip_next_step = True
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not optimizer.state  # no moments, no step count
    optimizer.skip_next_step = False
    optimizer.step()
    plain.step()
    assert all(state["step"] == 1 for state in optimizer.state.values())
    for fused_p, plain_p, old in zip(model.parameters(), reference.parameters(), before):
        assert not torch.equal(fused_p, old)
        torch.testing.assert_close(fused_p, plain_p)  # the same update as the default AdamW


def test_without_offload_the_trainer_gets_torch_adamw_with_the_recipes_settings():
    """(Under ZeRO-Offload it gets DeepSpeed's CPU Adam: tests/test_offload_cpu_adam.py.)"""
    model = _model_and_grads()
    optim = types.SimpleNamespace(lr=2e-3, betas=[0.9, 0.95], eps=1e-6, weight_decay=0.1)
    opt = build_optimizer(model, optim, "cpu", offload=False)
    assert type(opt) is GuardedAdamW
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [(8, 8), (2, 8)] and decay["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 2  # the biases
    assert (decay["lr"], decay["betas"], decay["eps"]) == (2e-3, (0.9, 0.95), 1e-6)
    assert not decay["fused"]  # CPU state: torch's default implementation
