"""bench/zero_gathers.py counts what it claims: each collective once (not again for the torch call
it delegates to), with the bytes of its largest tensor; bad variant specs are refused by name."""

import importlib.util
import socket

import pytest
import torch
import torch.distributed as dist

# torch 2.13 deprecates the *_tensor collectives that DeepSpeed calls; the test calls them on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

@pytest.fixture(scope="module")
def zero_gathers(repo_root):
    spec = importlib.util.spec_from_file_location("zero_gathers", repo_root / "bench" / "zero_gathers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def single_rank_group():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_counter_counts_each_collective_once_with_its_bytes(zero_gathers, single_rank_group):
    counter = zero_gathers.CollectiveCounter()
    installed = zero_gathers.install_collective_counter(counter)
    try:
        flat = torch.zeros(10)  # float32: 40 bytes
        for _ in range(3):  # torch 2.13 routes this through all_gather_single: one call, not two
            dist.all_gather_into_tensor(flat, torch.ones(10))
        dist.all_gather([torch.zeros(6)], torch.ones(6))
        dist.reduce_scatter_tensor(torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64))
        dist.reduce_scatter_tensor(torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64))
        dist.all_reduce(torch.ones(2))
    finally:
        zero_gathers.uninstall_collective_counter(installed)
    assert torch.equal(flat, torch.ones(10))  # the wrapped call still did its work
    assert counter.calls == {"all_gather": 4, "reduce_scatter": 2, "all_reduce": 1}
    assert counter.bytes == {"all_gather": 3 * 40 + 24, "reduce_scatter": 2 * 40, "all_reduce": 8}
    dist.all_reduce(torch.ones(2))  # uninstalled: no longer counted
    assert counter.calls["all_reduce"] == 1


def test_per_step_delta_and_loss_check(zero_gathers):
    before = {"calls": {"all_gather": 2}, "n": 1}
    after = {"calls": {"all_gather": 5, "reduce_scatter": 1}, "n": 4}
    assert zero_gathers._delta(after, before) == {"calls": {"all_gather": 3, "reduce_scatter": 1}, "n": 3}
    relative = zero_gathers.max_relative_loss_diff({1: 2.0, 2: 1.1}, {1: 2.0, 2: 1.0, 3: 0.5})
    assert relative == pytest.approx(0.1)


@pytest.mark.parametrize("spec", ["z1", "z2:stage3_max_reuse_distance=0", "z3:stage3_max_reuse_distance"])
def test_bad_variant_is_refused_with_the_valid_forms(zero_gathers, spec):
    with pytest.raises(ValueError, match="valid values|KEY=VALUE"):
        zero_gathers.parse_variant(spec)


def test_variant_parsing(zero_gathers):
    assert zero_gathers.parse_variant("z2") == (2, [])
    assert zero_gathers.parse_variant("z3:a=1,b=x") == (3, ["a=1", "b=x"])
