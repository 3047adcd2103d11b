"""model.compile (training/compile.py): the segment step under torch.compile (inductor, CPU) gives
the eager step's loss and the gradient of every parameter, with activation checkpointing (the
one-node recompute and torch.utils.checkpoint), BPTT truncation, padding and a shorter last
segment; ZeRO-3, and CUDA-graph modes off CUDA, are refused by the config gate.

Tolerance, fp32: loss within 1e-6 relative, each parameter's gradient within 1e-5 of its largest
entry. Not bitwise: inductor fuses the norms' and softmax's reductions and sums in another order.
One compiled model serves every case (each new shape is one more graph, and CPU compiles are
slow). The real trainer run with model.compile (vs eager) is opt-in: RMT_SLOW_TESTS=1."""

import copy
import os

import pytest
import torch

from model import RMTConfig, RMTForCausalLM
from training.compile import compile_segment_step, is_compiled
from training.config import ConfigError, load_config
from tests.test_reliability_helpers import train_losses
from tests.test_trainer_runs import run

SEGMENT, MEMORY = 8, 2
# The trainer run's backbone too (configs/tiny_cpu.yaml with tests/test_trainer_runs.py's TINY
# overrides and one layer), so that its graphs are the ones compiled here.
BACKBONE = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    eager = RMTForCausalLM(RMTConfig(backbone=BACKBONE, num_mem_tokens=MEMORY, segment_size=SEGMENT)).train()
    compiled = compile_segment_step(copy.deepcopy(eager))
    assert is_compiled(compiled) and not is_compiled(eager)
    return eager, compiled


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def loss_and_grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


CASES = {  # name: (setting applied to both models, padded with a shorter last segment)
    "plain": ({}, False),
    "checkpointing": ({"checkpoint": None}, False),
    "torch_utils_checkpoint": ({"checkpoint": {"use_reentrant": False, "determinism_check": "default"}}, False),
    "bptt": ({"bptt_depth": 2}, False),
    "padding_short_last_segment": ({}, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_step_equals_eager(models, case):
    setting, padded = CASES[case]
    # 3 full segments (the trainer's packed batches), or 2 and a shorter last one (5 tokens) with
    # row 1 right-padded from inside segment 1; few distinct shapes, as each costs a compile.
    length = 2 * SEGMENT + 5 if padded else 3 * SEGMENT
    ids = torch.randint(0, BACKBONE["vocab_size"], (2, length), generator=torch.Generator().manual_seed(1))
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, SEGMENT + 3:] = 0
    before = graphs()
    results = []
    for model in models:
        model.config.bptt_depth = setting.get("bptt_depth", -1)
        if "checkpoint" in setting:
            model.activation_checkpointing_enable(setting["checkpoint"])
            assert model._checkpointed_step()[1] == (setting["checkpoint"] is not None)
        try:
            results.append(loss_and_grads(model, ids, mask))
        finally:
            model.activation_checkpointing_disable()
            model.config.bptt_depth = -1
    (eager_loss, eager_grads), (loss, grads) = results
    assert torch.isfinite(eager_loss) and abs(loss - eager_loss) <= 1e-6 * abs(eager_loss)
    assert grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        scale = grad.abs().max()
        assert scale > 0, name  # every parameter gets a gradient, so the comparison means something
        assert (grads[name] - grad).abs().max() <= 1e-5 * scale, name
    if case != "torch_utils_checkpoint":  # that one replays the plain case's graphs
        assert graphs() > before  # shapes of its own were compiled: the compiled path ran


def test_the_embedding_modules_hooks_run_eagerly(models):
    """transformers' activation_checkpointing_enable() hooks the input embeddings with a
    requires_grad_() call that torch 2.11's dynamo cannot capture (fullgraph: the compile fails);
    the compiled step runs the token lookup eagerly, so any hook there runs, outside the graph. The
    hook below breaks every graph that captures it, on every torch, and counts its calls."""
    _, compiled = models
    ids = torch.randint(0, BACKBONE["vocab_size"], (2, 3 * SEGMENT), generator=torch.Generator().manual_seed(2))
    calls = []

    def uncapturable(module, args, output):
        torch._dynamo.graph_break()
        calls.append(tuple(output.shape))

    handle = compiled.get_input_embeddings().register_forward_hook(uncapturable)
    try:
        loss_and_grads(compiled, ids, None)
        assert calls == [(2, SEGMENT, BACKBONE["hidden_size"])] * 3  # once per segment, eagerly
        compiled.activation_checkpointing_enable()  # and transformers' own hook with it
        try:
            calls.clear()
            loss, _ = loss_and_grads(compiled, ids, None)
        finally:
            compiled.activation_checkpointing_disable()
        assert torch.isfinite(loss) and len(calls) == 6  # forward and recompute of each segment
    finally:
        handle.remove()


def test_zero3_with_compile_is_a_config_error():
    with pytest.raises(ConfigError, match="model.compile: true needs deepspeed.zero_stage 0, 1 or 2"):
        load_config(None, ["model.compile=true", "deepspeed.zero_stage=3"])
    with pytest.raises(ConfigError, match="model.compile_mode: 'max-autotune' needs model.compile: true"):
        load_config(None, ["model.compile_mode=max-autotune", "deepspeed.zero_stage=2"])
    with pytest.raises(ConfigError, match="model.compile_mode: 'fast' is not one of"):
        load_config(None, ["model.compile=true", "model.compile_mode=fast", "deepspeed.zero_stage=2"])
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cuda":  # CUDA graphs on the CPU would be skipped silently: refused
        with pytest.raises(ConfigError, match="model.compile_mode: reduce-overhead adds CUDA graphs, which "
                                              "need a CUDA device"):
            load_config(None, ["model.compile=true", "model.compile_mode=reduce-overhead", "deepspeed.zero_stage=2"],
                        accelerator=accelerator)
    cfg = load_config(None, ["model.compile=true", "model.compile_mode=max-autotune-no-cudagraphs",
                             "deepspeed.zero_stage=2"], accelerator=accelerator)
    assert cfg.model.compile and cfg.model.compile_mode == "max-autotune-no-cudagraphs"


@pytest.mark.skipif(not os.environ.get("RMT_SLOW_TESTS"), reason="two trainer runs and a compile: 23 s warm, "
                    "~110 s cold on 2 loaded cores, over the suite's budget; RMT_SLOW_TESTS=1 runs it")
def test_trainer_run_with_compile_matches_eager(tmp_path):
    """The real trainer (1 rank, ZeRO-2, segment checkpointing on) with model.compile:
    the same loss curve as the eager run, within fp32 rounding carried over 4 AdamW steps."""
    extra = ["run.max_steps=4", "checkpoint.every=0", "eval.batches=0", "curriculum.schedule=[[0,3]]",
             "batch.micro_batch_size=2", "deepspeed.zero_stage=2", f"model.segment_size={SEGMENT}",
             f"model.num_mem_tokens={MEMORY}", "model.backbone.num_hidden_layers=1",
             "model.gradient_checkpointing=true", "data.memory_tasks.span_length=3"]
    losses = {}
    for name, setting in (("eager", []), ("compiled", ["model.compile=true"])):
        run(tmp_path / name, 1, extra + setting)
        losses[name] = train_losses(tmp_path / name)
    assert "model.compile: segment step compiled" in (tmp_path / "compiled" / "train.log").read_text()
    assert "model.compile" not in (tmp_path / "eager" / "train.log").read_text()
    assert sorted(losses["compiled"]) == sorted(losses["eager"]) == [1, 2, 3, 4]
    for step, loss in losses["eager"].items():
        assert abs(losses["compiled"][step] - loss) <= 1e-5 * loss, (step, losses)
