"""memory_noise: Gaussian noise on the memory between segments, in training only (issue 7, length
generalisation). Checked against a loop written from scratch that draws the same noise."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import RMTConfig, RMTForCausalLM
from test_model_common import BACKBONES, random_tokens, tiny_rmt

torch.set_num_threads(1)

SIGMA = 0.7


def reference_loss(model, tokens, sigma, seed, prob=1.0):
    """Mean next-token loss of one unpadded row [L]; the noise draws follow the same global RNG
    order as the model: one [1, M, D] normal draw after every segment but the last, and with
    prob < 1 one uniform draw after it that decides whether this hand-over gets the noise."""
    torch.manual_seed(seed)
    m, seg = model.config.num_mem_tokens, model.config.segment_size
    backbone = model.backbone
    memory = model.memory.unsqueeze(0)
    total, count = 0.0, 0
    starts = list(range(0, len(tokens), seg))
    for i, start in enumerate(starts):
        x = tokens[start : start + seg]
        inputs = torch.cat([memory, backbone.get_input_embeddings()(x)[None], memory], dim=1)
        hidden = backbone.base_model(inputs_embeds=inputs).last_hidden_state
        logits = backbone.get_output_embeddings()(hidden[0, m : m + len(x)])
        nxt = tokens[start + 1 : start + len(x) + 1]
        total = total + F.cross_entropy(logits[: len(nxt)], nxt, reduction="sum")
        count += len(nxt)
        memory = hidden[:, m + len(x) :]
        if i + 1 < len(starts):
            scale = torch.sqrt(torch.mean(memory.detach() ** 2, dim=-1, keepdim=True))
            noise = sigma * scale * torch.randn(memory.shape)
            if prob < 1 and not float(torch.rand(())) < prob:
                noise = torch.zeros_like(noise)
            memory = memory + noise
    return total / count


def test_training_noise_matches_reference_loss_and_gradients():
    model = tiny_rmt("llama", memory_noise=SIGMA).train()
    tokens = random_tokens(1, 18, seed=4)[0]  # 4 segments of 5, the last short
    torch.manual_seed(11)
    loss = model(tokens[None], labels=tokens[None]).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    expected = reference_loss(model, tokens, SIGMA, seed=11)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    for name, param in model.named_parameters():  # includes M0: noise scale is not differentiated
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-7, msg=name)

    noiseless = reference_loss(model, tokens, 0.0, seed=11)
    assert abs(float(loss.detach() - noiseless.detach())) > 1e-3  # the noise really changes the computation


def test_noise_probability_leaves_some_hand_overs_clean():
    """memory_noise_prob = p: a per-sample, per-hand-over coin decides which get the noise; the
    reference draws the same coins in the same order."""
    tokens = random_tokens(1, 18, seed=4)[0]
    model = tiny_rmt("llama", memory_noise=SIGMA, memory_noise_prob=0.5).train()
    losses = set()
    for seed in range(6):
        torch.manual_seed(seed)
        loss = model(tokens[None], labels=tokens[None]).loss
        torch.testing.assert_close(loss, reference_loss(model, tokens, SIGMA, seed, prob=0.5), rtol=1e-5, atol=0)
        losses.add(round(float(loss.detach()), 6))
    clean = float(reference_loss(model, tokens, 0.0, seed=0).detach())
    assert round(clean, 6) in losses  # some draw left all 3 hand-overs clean (p = 1/8 each seed)
    assert len(losses) > 2  # and others did not
    # Per sample: of 32 identical rows, those whose 3 coins all came up clean (1/8 of them on
    # average) end with exactly the clean memory, the others do not.
    rows = tokens.repeat(32, 1)
    with torch.no_grad():
        clean_memory = model.eval()(rows[:1], return_memory=True).memory[0]
        torch.manual_seed(3)
        final = model.train()(rows, labels=rows, return_memory=True).memory
    all_clean = sum(torch.allclose(row, clean_memory, rtol=0, atol=1e-6) for row in final)
    assert 1 <= all_clean <= 12, all_clean


def test_eval_mode_and_zero_noise_add_nothing():
    tokens = random_tokens(2, 23, seed=5)
    noisy = tiny_rmt("gpt2", memory_noise=SIGMA)
    plain = tiny_rmt("gpt2")  # same seed: same weights, memory_noise 0
    with torch.no_grad():
        reference = plain.eval()(tokens, labels=tokens).loss
        assert torch.equal(noisy.eval()(tokens, labels=tokens).loss, reference)
        assert torch.equal(plain.train()(tokens, labels=tokens).loss, reference)  # no dropout
        assert not torch.equal(noisy.train()(tokens, labels=tokens).loss, reference)
        # generation runs in eval mode: same tokens as without noise
        noisy.eval()
        prompt = tokens[:1, :12]
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(noisy.generate(prompt, **kwargs), plain.eval().generate(prompt, **kwargs))


def test_noise_is_drawn_once_under_segment_checkpointing():
    # The noise sits between checkpointed segment steps: the recompute in backward must see the
    # memory forward saw, so loss and gradients equal the un-checkpointed step with the same seed.
    model = tiny_rmt("llama", memory_noise=SIGMA, fused_segment_loss=False).train()
    tokens = random_tokens(2, 21, seed=6)

    def step(seed):
        torch.manual_seed(seed)
        out = model(tokens, labels=tokens)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return out.loss.detach(), grads

    plain_loss, plain_grads = step(3)
    model.activation_checkpointing_enable()
    ckpt_loss, ckpt_grads = step(3)
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=1e-6, atol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-8, msg=name)


@pytest.mark.parametrize("bad", [-0.1, math.inf, math.nan, "1.0", True, None])
def test_invalid_memory_noise_is_refused(bad):
    with pytest.raises(ValueError, match=r"memory_noise=.* is invalid: valid values are 0 \(off\) or a finite number > 0"):
        RMTConfig(backbone=dict(BACKBONES["llama"]), memory_noise=bad)


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, "half", True, float("nan")])
def test_invalid_noise_probability_is_refused_naming_the_field(bad):
    with pytest.raises(ValueError, match=r"memory_noise_prob=.* is invalid: valid values are numbers in \(0, 1\]"):
        RMTConfig(backbone=dict(BACKBONES["llama"]), memory_noise_prob=bad)


def test_from_backbone_takes_every_rmt_setting_and_refuses_unknown_ones(tmp_path):
    source = tiny_rmt("llama").backbone
    model = RMTForCausalLM.from_backbone(source, num_mem_tokens=2, segment_size=4, memory_noise=0.5,
                                         checkpoint_memory_budget_mb=64, fused_segment_loss=False)
    assert (model.config.memory_noise, model.config.checkpoint_memory_budget_mb) == (0.5, 64)
    assert model.config.fused_segment_loss is False
    with pytest.raises(ValueError, match=r"\['memory_nosie'\] are neither RMT settings"):
        RMTForCausalLM.from_backbone(source, num_mem_tokens=2, segment_size=4, memory_nosie=0.5)
    with pytest.raises(ValueError, match=r"\['segment_size'\] required"):
        RMTForCausalLM.from_backbone(source, num_mem_tokens=2)


@pytest.mark.parametrize("init_from", [False, True])
def test_training_config_reaches_the_model(tmp_path, init_from):
    """model.memory_noise (and the other RMT settings) reach the model the trainer builds, from
    scratch and from a pretrained backbone (the path that once dropped settings)."""
    from training.config import load_config
    from training.model_init import build_model

    overrides = ["model.memory_noise=0.5", "model.memory_noise_prob=0.25", "model.checkpoint_memory_budget_mb=64",
                 "deepspeed.zero_stage=1"]
    if init_from:
        backbone = load_config(None, world_size=1).model.backbone
        RMTForCausalLM(RMTConfig(backbone=backbone, segment_size=16, num_mem_tokens=8)).backbone.save_pretrained(tmp_path / "backbone")
        overrides.append(f"model.init_from={tmp_path / 'backbone'}")
    cfg = load_config(None, overrides, world_size=1)
    model = build_model(cfg, rank=0, ds_config={})
    assert model.config.memory_noise == 0.5
    assert model.config.memory_noise_prob == 0.25
    assert model.config.checkpoint_memory_budget_mb == 64
