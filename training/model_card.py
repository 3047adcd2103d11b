"""The model card (README.md) of an exported folder: what the model is, its RMT settings, the
data it saw, its steps and final metrics, and how to load it and generate (SPEC 2.7).

Every number comes from the checkpoint's client state, the model and the run's config, not from
defaults.
"""

from __future__ import annotations

from training.config.sections import flatten


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


def render_model_card(model, client_state: dict, run_config: dict, repo_id: str,
                      prompt: str, expected: str | None) -> str:
    """Model card whose numbers come from the checkpoint and run config, not from defaults."""
    cfg = model.config
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
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- rmt
- recurrent-memory-transformer
- custom_code
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
model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True, dtype=torch.float32)
inputs = tokenizer({prompt!r}, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens={max_new}, do_sample=False)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:]))
```
{expected_line}"""


def model_card(model, tokenizer, client_state: dict, run_config: dict, repo_id: str) -> str:
    """The card of `model` exported as `repo_id` (a hub repo id, or the output folder)."""
    return render_model_card(model, client_state, run_config, repo_id,
                             *example_prompt(model, run_config, tokenizer))
