"""RMTConfig validation (issue 2, acceptance 8) and serialisation."""

import pytest

from model import RMTConfig
from test_model_common import BACKBONES


@pytest.mark.parametrize(
    "settings, field, valid_range",
    [
        (dict(backbone=dict(BACKBONES["gpt2"]), segment_size=60, num_mem_tokens=3), "segment_size + 2 * num_mem_tokens", "<= 64"),
        (dict(backbone=dict(BACKBONES["llama"]), segment_size=50, num_mem_tokens=8), "segment_size + 2 * num_mem_tokens", "<= 64"),
        (dict(num_mem_tokens=0), "num_mem_tokens", ">= 1"),
        (dict(num_mem_tokens=-3), "num_mem_tokens", ">= 1"),
        (dict(bptt_depth=0), "bptt_depth", "-1 (full BPTT) or an integer >= 1"),
        (dict(bptt_depth=-2), "bptt_depth", "-1 (full BPTT) or an integer >= 1"),
        (dict(segment_size=0), "segment_size", ">= 1"),
        (dict(segment_size=2.5), "segment_size", ">= 1"),
        (dict(loss_from_segment=-1), "loss_from_segment", ">= 0"),
        (dict(loss_chunk_size=0), "loss_chunk_size", ">= 1"),
        (dict(backbone={"model_type": "no_such_model"}), "backbone['model_type']", "causal-LM model types"),
        (dict(backbone={"model_type": "bert"}), "backbone['model_type']", "causal decoders"),
        (dict(backbone={"model_type": "roberta"}), "backbone['model_type']", "causal decoders"),
        (dict(backbone={"model_type": "t5"}), "backbone['model_type']", "decoder-only causal LMs"),
        (dict(backbone={"model_type": "bart"}), "backbone['model_type']", "causal decoders"),
        (dict(backbone={"hidden_size": 8}), "backbone", "model_type"),
        (dict(backbone={"model_type": "llama", "hidden_size": "big"}), "backbone", "hidden_size"),
    ],
)
def test_invalid_settings_raise_value_error_naming_field_and_range(settings, field, valid_range):
    with pytest.raises(ValueError) as err:
        RMTConfig(**settings)
    assert field in str(err.value) and valid_range in str(err.value)


def test_position_limit_is_inclusive():
    RMTConfig(backbone=dict(BACKBONES["gpt2"]), segment_size=58, num_mem_tokens=3)  # 58 + 6 = 64


def test_round_trip_keeps_settings_and_builds_backbone_config(tmp_path):
    config = RMTConfig(backbone=dict(BACKBONES["llama"]), num_mem_tokens=4, segment_size=16, bptt_depth=2,
                       loss_from_segment=1, loss_chunk_size=7)
    config.save_pretrained(tmp_path)
    loaded = RMTConfig.from_pretrained(tmp_path)
    for name in ("num_mem_tokens", "segment_size", "bptt_depth", "loss_from_segment", "loss_chunk_size"):
        assert getattr(loaded, name) == getattr(config, name)
    assert loaded.model_type == "rmt"
    backbone = loaded.backbone_config
    assert backbone.model_type == "llama" and backbone.hidden_size == 32 and loaded.hidden_size == 32
    assert loaded.vocab_size == BACKBONES["llama"]["vocab_size"]


def test_loading_an_invalid_saved_config_fails_with_value_error(tmp_path):
    config = RMTConfig(backbone=dict(BACKBONES["llama"]), num_mem_tokens=4, segment_size=16)
    config.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text().replace('"num_mem_tokens": 4', '"num_mem_tokens": 0')
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match="num_mem_tokens"):
        RMTConfig.from_pretrained(tmp_path)
