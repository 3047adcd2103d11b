"""The model card (README.md) of an exported folder: what the model is, its RMT settings, the
data it saw, its steps and final metrics, and how to load it and generate (SPEC 2.7).

Every number comes from the checkpoint's client state, the model and the run's config, not from
defaults. The metadata header is huggingface_hub's ModelCardData: license and extra tags from the
run's `export` section, `base_model` when the backbone came from the hub, and a `model-index`
holding the checkpoint's eval/* metrics, so the hub shows the license, lineage and results.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from training.config.sections import ExportConfig, flatten

CARD_TAGS = ("rmt", "recurrent-memory-transformer", "custom_code")
# `hf download ORG/NAME` (snapshot_download) keeps a hub model in .../models--ORG--NAME/snapshots/REV.
_HUB_CACHE_DIR = re.compile(r"^models--([^/]+?)--([^/]+)$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]$")
_MEMORY_METRIC = re.compile(r"^eval/memory_(exact_match|token_acc)_(\d+)seg$")


def _format_metric(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return "[" + ", ".join(_format_metric(v) for v in value) + "]"
    return str(value)


def example_prompt(model, run_config: dict, tokenizer) -> tuple[str, str | None]:
    """(prompt, expected continuation) for the card's snippet, in the run's own vocabulary."""
    data_cfg = run_config.get("data") or {}
    if data_cfg.get("source", "memory_tasks") != "memory_tasks":
        return "The history of", None
    from training.data.config import MemoryTaskConfig
    from training.data.memory_tasks import make_eval_batch

    task_cfg = MemoryTaskConfig(**(data_cfg.get("memory_tasks") or {}))
    batch = make_eval_batch(task_cfg.tasks[0], 2, model.config.segment_size, 1, 0, cfg=task_cfg)
    answer = batch["answer_mask"][0].nonzero().flatten()
    first, last = int(answer[0]), int(answer[-1])
    ids = batch["input_ids"][0]
    return tokenizer.decode(ids[:first]), tokenizer.decode(ids[first : last + 1])


def hub_base_model(init_from: str | None) -> str | None:
    """The hub repo id `model.init_from` named: a folder of the hub cache (models--ORG--NAME/
    snapshots/REV, what `hf download` prints) or a bare ORG/NAME that is no local path; None
    for any other local folder, which names nothing a hub user could follow."""
    if not init_from:
        return None
    parts = Path(init_from).parts
    for i, part in enumerate(parts[:-1]):
        match = _HUB_CACHE_DIR.match(part)
        if match and parts[i + 1] == "snapshots":
            return f"{match.group(1)}/{match.group(2)}"
    if _REPO_ID.match(init_from) and ".." not in init_from and not Path(init_from).exists():
        return init_from
    return None


def _eval_dataset(run_config: dict) -> tuple[str, str]:
    """(type, name) of the held-out data the trainer evaluated on."""
    data_cfg = run_config.get("data") or {}
    if data_cfg.get("source", "memory_tasks") == "memory_tasks":
        tasks = (data_cfg.get("memory_tasks") or {}).get("tasks") or []
        return "memory_tasks", f"RMT memory tasks ({', '.join(map(str, tasks)) or 'default'})"
    sources = data_cfg.get("eval_sources") or data_cfg.get("sources") or []
    names = [str(s.get("path_or_name")) for s in sources if isinstance(s, dict)]
    return str(data_cfg.get("source")), ", ".join(names) or "held-out text"


def eval_results(metrics: dict, run_config: dict) -> list[EvalResult]:
    """One EvalResult per finite eval/* metric of the checkpoint, named by its key."""
    dataset_type, dataset_name = _eval_dataset(run_config)
    results = []
    for key, value in sorted(metrics.items()):
        if not key.startswith("eval/") or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            continue
        memory = _MEMORY_METRIC.match(key)
        if memory:
            metric_type = "exact_match" if memory.group(1) == "exact_match" else "accuracy"
            config = f"{memory.group(2)} segments"
        else:
            metric_type, config = ("loss" if key.startswith("eval/loss") else key.split("/")[-1]), None
        results.append(EvalResult(task_type="text-generation", dataset_type=dataset_type,
                                  dataset_name=dataset_name, dataset_config=config, dataset_split="eval",
                                  metric_type=metric_type, metric_name=key, metric_value=float(value)))
    return results


def card_data(client_state: dict, run_config: dict, repo_id: str) -> ModelCardData:
    export_cfg = ExportConfig(**(run_config.get("export") or {}))
    results = eval_results(client_state.get("metrics") or {}, run_config)
    tags = list(dict.fromkeys([*CARD_TAGS, *export_cfg.tags]))
    return ModelCardData(
        license=export_cfg.license, library_name="transformers", pipeline_tag="text-generation", tags=tags,
        base_model=hub_base_model((run_config.get("model") or {}).get("init_from")),
        model_name=repo_id if results else None, eval_results=results or None,
    )


def render_model_card(model, client_state: dict, run_config: dict, repo_id: str,
                      prompt: str, expected: str | None) -> ModelCard:
    """Model card whose numbers come from the checkpoint and run config, not from defaults."""
    cfg = model.config
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    backbone = cfg.backbone if isinstance(cfg.backbone, dict) else cfg.backbone.to_dict()
    num_params = sum(p.numel() for p in model.parameters())
    data_cfg = run_config.get("data", {})
    metrics = client_state.get("metrics") or {}
    curriculum = client_state.get("curriculum") or {}
    schedule = ", ".join(f"{n} from step {s}" for s, n in curriculum.get("schedule", []))
    rows = [
        ("backbone", backbone.get("model_type")),
        ("layers", backbone.get("num_hidden_layers", backbone.get("n_layer"))),
        ("hidden size (d)", backbone.get("hidden_size", backbone.get("n_embd"))),
        ("attention heads", backbone.get("num_attention_heads", backbone.get("n_head"))),
        ("vocabulary", backbone.get("vocab_size")),
        ("parameters", f"{num_params:,}"),
        ("memory tokens (m)", cfg.num_mem_tokens),
        ("segment size (S)", cfg.segment_size),
        ("BPTT depth (k)", "full" if cfg.bptt_depth == -1 else cfg.bptt_depth),
        ("memory noise in training (x RMS)", cfg.memory_noise),
        ("share of hand-overs with noise", cfg.memory_noise_prob),
    ]
    arch = "\n".join(f"| {k} | {v} |" for k, v in rows)
    # Only the settings of the corpus that was actually used.
    builtin = data_cfg.get("source", "memory_tasks") == "memory_tasks"
    data_items = [(k, v) for k, v in flatten(data_cfg)
                  if k == "source" or k.startswith("memory_tasks.") == builtin]
    data_lines = "\n".join(f"- `{k}`: {_format_metric(v)}" for k, v in data_items) or "- (not recorded)"
    metric_lines = "\n".join(f"| {k} | {_format_metric(v)} |" for k, v in sorted(metrics.items()))
    metric_table = f"| metric | value |\n|---|---|\n{metric_lines}" if metric_lines else "(no metrics recorded)"
    max_new = len(expected.split()) if expected else 40
    expected_line = f"\nExpected continuation: `{expected}`\n" if expected else ""
    return ModelCard(f"""---
{card_data(client_state, run_config, repo_id).to_yaml()}
---

# {repo_id}

A Recurrent Memory Transformer (Bulatov et al., NeurIPS 2022) over a {backbone.get("model_type")}
decoder. A sequence is read in segments of {cfg.segment_size} tokens; each segment is framed by
{cfg.num_mem_tokens} read and {cfg.num_mem_tokens} write memory embeddings, and the backbone's final
hidden states at the write positions become the memory of the next segment, so the model can
carry information across any number of segments at constant cost per segment.

## Architecture

| setting | value |
|---|---|
{arch}

## Training

- steps: {client_state["step"]}
- tokens seen: {_format_metric(client_state.get("tokens_seen", "not recorded"))}
- samples seen: {_format_metric(client_state.get("samples_seen", "not recorded"))}
- segments per sample (curriculum): {schedule or "not recorded"}; at the last step: {curriculum.get("num_segments", "not recorded")}
- sequence length at the last step: {_format_metric(curriculum["num_segments"] * cfg.segment_size) + " tokens" if "num_segments" in curriculum else "not recorded"}

Data:
{data_lines}

## Final metrics (from the checkpoint at step {client_state["step"]})

{metric_table}

## Load and generate

The modeling code ships with the weights (`trust_remote_code=True`).

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

repo = "{repo_id}"
tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True, dtype=torch.{dtype})
inputs = tokenizer({prompt!r}, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens={max_new}, do_sample=False)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:]))
```
{expected_line}""")


def model_card(model, tokenizer, client_state: dict, run_config: dict, repo_id: str) -> ModelCard:
    """The card of `model` exported as `repo_id` (a hub repo id, or the output folder)."""
    return render_model_card(model, client_state, run_config, repo_id,
                             *example_prompt(model, run_config, tokenizer))
