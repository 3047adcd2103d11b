"""Issue 21: the model card's metadata (ModelCardData: license and tags from the run's `export`
section, base_model from a hub backbone, model-index from the checkpoint's eval metrics) and
`--device`/`--dtype` resolution (training/compute.py). Pure functions, no training."""

import math

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from model import RMTConfig, RMTForCausalLM
from training import compute
from training.config.sections import ExportConfig
from training.model_card import CARD_TAGS, hub_base_model, render_model_card

METRICS = {"eval/loss": 1.25, "eval/loss_segment_0": 1.5, "eval/loss_segment_1": 1.0,
           "eval/memory_exact_match_4seg": 0.75, "eval/memory_token_acc_4seg": 0.875,
           "eval/not_finite": float("nan"), "train/loss": 1.1, "train/lr": 1e-3}


def tiny_model(dtype=torch.float32) -> RMTForCausalLM:
    torch.manual_seed(0)
    backbone = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                "max_position_embeddings": 32, "tie_word_embeddings": False}
    return RMTForCausalLM(RMTConfig(backbone=backbone, num_mem_tokens=2, segment_size=8)).to(dtype).eval()


def front_matter(card: ModelCard) -> dict:
    text = str(card)
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.mark.parametrize("init_from, expected", [
    (None, None),
    ("/home/u/.cache/huggingface/hub/models--meta-llama--Llama-3.2-1B/snapshots/0123abcd", "meta-llama/Llama-3.2-1B"),
    ("cache/models--Qwen--Qwen2.5-0.5B/snapshots/main/", "Qwen/Qwen2.5-0.5B"),
    ("EleutherAI/pythia-160m", "EleutherAI/pythia-160m"),  # a bare hub name
    ("./EleutherAI/pythia-160m", None),  # spelled as a local path
    ("/data/models/my-llama", None),
    ("models--a--b", None),  # a cache folder name without snapshots/ is just a folder
])
def test_base_model_only_for_hub_backbones(init_from, expected):
    assert hub_base_model(init_from) == expected


def test_an_existing_local_folder_is_no_hub_name(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub_base_model("org/name") is None


def test_card_metadata_from_the_run_config_and_checkpoint_metrics():
    run_config = {
        "model": {"init_from": "/cache/models--meta-llama--Llama-3.2-1B/snapshots/0123abcd"},
        "data": {"source": "memory_tasks", "memory_tasks": {"tasks": ["copy", "reverse"]}},
        "export": {"license": "cc-by-4.0", "tags": ["long-context", "custom_code"]},
    }
    state = {"step": 10, "metrics": METRICS}
    card = render_model_card(tiny_model(torch.bfloat16), state, run_config, "alice/rmt", "The", None)
    meta = front_matter(card)
    assert meta["license"] == "cc-by-4.0"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == [*CARD_TAGS, "long-context"]  # given tags added once
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B"
    [index] = meta["model-index"]
    assert index["name"] == "alice/rmt"
    found = {m["name"]: (m["type"], m["value"], r["dataset"].get("config"))
             for r in index["results"] for m in r["metrics"]}
    # Every finite eval/* metric, with its value; nothing from train/*.
    assert found == {
        "eval/loss": ("loss", 1.25, None), "eval/loss_segment_0": ("loss", 1.5, None),
        "eval/loss_segment_1": ("loss", 1.0, None),
        "eval/memory_exact_match_4seg": ("exact_match", 0.75, "4 segments"),
        "eval/memory_token_acc_4seg": ("accuracy", 0.875, "4 segments"),
    }
    assert {r["dataset"]["name"] for r in index["results"]} == {"RMT memory tasks (copy, reverse)"}
    # huggingface_hub reads the same header back.
    parsed = ModelCard(str(card)).data
    assert parsed.base_model == "meta-llama/Llama-3.2-1B"
    assert {r.metric_name: r.metric_value for r in parsed.eval_results} == {
        k: v for k, v in METRICS.items() if k.startswith("eval/") and math.isfinite(v)}
    # The snippet loads the weights in the dtype they were exported in.
    assert "dtype=torch.bfloat16)" in str(card)


def test_card_defaults_without_an_export_section_or_eval_metrics():
    state = {"step": 3, "metrics": {"train/loss": 2.0}}
    meta = front_matter(render_model_card(tiny_model(), state, {"model": {"init_from": None}}, "out", "The", None))
    assert meta == {"library_name": "transformers", "license": "apache-2.0",
                    "pipeline_tag": "text-generation", "tags": list(CARD_TAGS)}


@pytest.mark.parametrize("section, problem", [
    ({"license": "apache 2"}, "export.license: 'apache 2' is not a hub license identifier; valid are apache-2.0, mit"),
    ({"license": "other"}, "export.license: 'other' is not a hub license identifier"),
    ({"tags": ["ok", "two words", ""]}, "export.tags: ['two words', ''] must be non-empty strings"),
])
def test_export_section_problems(section, problem):
    [found] = ExportConfig(**section).problems()
    assert found.startswith(problem)


def test_the_config_gate_checks_the_export_section():
    from training.config import ConfigError, load_config

    with pytest.raises(ConfigError) as exc:
        load_config("configs/tiny_cpu.yaml", ["export.license=apache", "export.tags=[a b]"], world_size=1)
    assert any(p.startswith("export.license: 'apache' is not a hub license identifier") for p in exc.value.problems)
    assert any(p.startswith("export.tags: ['a b']") for p in exc.value.problems)
    cfg = load_config("configs/tiny_cpu.yaml", ["export.license=mit", "export.tags=[babi]"], world_size=1)
    assert cfg.to_dict()["export"] == {"license": "mit", "tags": ["babi"]}


def test_export_section_defaults_are_valid():
    assert ExportConfig().problems() == [] and ExportConfig().license == "apache-2.0"
    assert ExportConfig(license="llama3.1", tags=["babi"]).problems() == []


# --------------------------------------------------------------------------- --device / --dtype


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks the GPU here")
def test_auto_is_cpu_fp32_without_a_gpu():
    got = compute.resolve_compute("auto", "auto")
    assert (got.device, got.dtype) == (torch.device("cpu"), torch.float32)
    assert compute.resolve_compute("cpu", "bf16").dtype == torch.bfloat16
    assert compute.resolve_compute("CPU", "fp32").describe() == {"device": "cpu", "dtype": "fp32"}


@pytest.mark.parametrize("device, dtype, message", [
    ("gpu", "auto", "--device 'gpu': valid values are auto, cpu, cuda or cuda:N"),
    ("cpu:0", "auto", "--device 'cpu:0': valid values are"),
    ("cuda:x", "auto", "--device 'cuda:x': valid values are"),
    ("cpu", "float64", "--dtype 'float64': valid values are auto, fp32, bf16, fp16"),
    ("cpu", "fp16", "--dtype fp16: not supported on the CPU"),
])
def test_bad_values_name_the_flag(device, dtype, message):
    with pytest.raises(compute.ComputeError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        compute.resolve_compute(device, dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(compute.ComputeError, match="--device cuda: no CUDA GPU is visible here"):
        compute.resolve_compute("cuda", "auto")


def fake_gpus(monkeypatch, count: int, bf16: bool):
    # Only the questions resolve_compute asks of torch.cuda; nothing is allocated on a device.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")


def test_auto_picks_the_gpu_in_bf16_where_it_can(monkeypatch):
    fake_gpus(monkeypatch, 2, bf16=True)
    assert compute.resolve_compute().describe() == {"device": "cuda:0", "dtype": "bf16"}
    assert compute.resolve_compute("cuda:1", "fp16").describe() == {"device": "cuda:1", "dtype": "fp16"}
    assert compute.resolve_compute("cpu").describe() == {"device": "cpu", "dtype": "fp32"}
    with pytest.raises(compute.ComputeError, match=r"--device cuda:2: only 2 GPU\(s\) visible"):
        compute.resolve_compute("cuda:2")
    fake_gpus(monkeypatch, 1, bf16=False)
    assert compute.resolve_compute().describe() == {"device": "cuda:0", "dtype": "fp32"}
    with pytest.raises(compute.ComputeError, match="--dtype bf16: Tesla V100 does not support bfloat16"):
        compute.resolve_compute("cuda", "bf16")
