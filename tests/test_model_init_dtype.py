"""model.init_from loads the backbone in the dtype DeepSpeed takes (fp32), whatever the
checkpoint's dtype: no bf16 backbone beside an fp32 memory parameter."""

import torch
from safetensors.torch import load_file

from model import RMTConfig, RMTForCausalLM


def test_bf16_backbone_is_loaded_as_fp32_with_its_weights(tmp_path):
    from training.config import load_config
    from training.model_init import build_model

    backbone = load_config(None, world_size=1).model.backbone
    source = RMTForCausalLM(RMTConfig(backbone=backbone, segment_size=16, num_mem_tokens=8))
    source.backbone.to(torch.bfloat16).save_pretrained(tmp_path / "backbone")
    saved = load_file(tmp_path / "backbone" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}  # the checkpoint really is bf16

    cfg = load_config(None, [f"model.init_from={tmp_path / 'backbone'}", "deepspeed.precision=fp32",
                             "deepspeed.zero_stage=0"], world_size=1)
    model = build_model(cfg, rank=0, ds_config={})
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert set(dtypes.values()) == {torch.float32}, dtypes
    params = dict(model.backbone.named_parameters())
    assert "memory" in dtypes
    for name, tensor in saved.items():
        if name in params:  # tied weights are saved once
            assert torch.equal(params[name].detach(), tensor.to(torch.float32)), name
    assert sum(name in params for name in saved) == len(saved)


def test_an_rmt_folder_gives_its_backbone_and_a_fresh_memory(tmp_path):
    """model.init_from may name an RMT model folder (this project's export of a language-model
    run): the new run takes its backbone's weights, in fp32, and starts its own memory; the
    config gate compares the recipe's backbone keys with the RMT's backbone config."""
    from training.config import ConfigError, load_config
    from training.model_init import build_model

    backbone = load_config(None, world_size=1).model.backbone
    source = RMTForCausalLM(RMTConfig(backbone=backbone, segment_size=16, num_mem_tokens=8))
    with torch.no_grad():
        source.memory.fill_(0.5)
        for p in source.backbone.parameters():
            p.add_(0.01)  # not what any fresh initialisation gives
    source.save_pretrained(tmp_path / "rmt")
    cfg = load_config(None, [f"model.init_from={tmp_path / 'rmt'}", "deepspeed.zero_stage=0",
                             "model.num_mem_tokens=4"], world_size=1)
    model = build_model(cfg, rank=0, ds_config={})
    want = dict(source.backbone.named_parameters())
    got = dict(model.backbone.named_parameters())
    assert set(got) == set(want)
    for name, p in got.items():
        assert p.dtype == torch.float32 and torch.equal(p.detach(), want[name].detach()), name
    assert model.memory.shape[0] == 4 and not torch.any(model.memory == 0.5)
    # ZeRO-3 builds the model from the config first (zero.Init), then copies the weights in.
    shell = RMTForCausalLM(RMTConfig(**{**cfg.model.rmt_kwargs(), "backbone": cfg.model.resolved_backbone()}))
    assert {n: p.shape for n, p in shell.backbone.named_parameters()} == {n: p.shape for n, p in want.items()}

    try:
        load_config(None, [f"model.init_from={tmp_path / 'rmt'}", "model.backbone.hidden_size=24"],
                    world_size=1)
    except ConfigError as e:
        assert any(p.startswith("model.backbone.hidden_size: 24 disagrees with") for p in e.problems), e.problems
    else:
        raise AssertionError("a backbone key that disagrees with the RMT folder's backbone passed")


def test_an_rmt_folder_without_a_backbone_config_is_refused(tmp_path):
    """An RMT config.json must carry its backbone config; without one the gate names the file."""
    from training.config import ConfigError, load_config

    folder = tmp_path / "rmt"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "rmt"}')
    (folder / "model.safetensors").write_bytes(b"")
    try:
        load_config(None, [f"model.init_from={folder}"], world_size=1)
    except ConfigError as e:
        assert any("RMT model's config without a backbone object" in p for p in e.problems), e.problems
    else:
        raise AssertionError("an RMT folder without a backbone config passed the gate")
