"""Export a training checkpoint as a Hugging Face model folder, verify it, optionally upload it.

    python -m training.export --run runs/NAME [--step N] --out DIR [--push-to-hub REPO_ID [--private]]

Steps: consolidate the (any ZeRO stage) DeepSpeed checkpoint into one fp32 state dict, load it
into `RMTForCausalLM` built from the checkpoint's `rmt_config.json`, write safetensors + config
with `auto_map` + modeling code + tokenizer + generation config + model card into a temporary
sibling folder, reload that folder in a fresh interpreter that cannot import this repository
and compare its logits with the checkpoint model's, and only then rename it to `--out`.
Nothing half-written ever appears under `--out`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from training.checkpoint import CHECKPOINTS_DIR, COMPLETE_MARKER, complete_checkpoints

log = logging.getLogger("training.export")

RELOAD_ATOL = 1e-5
PROBE_SEED = 1234
RELOAD_CHECK_SCRIPT = Path(__file__).with_name("hub_reload_check.py")


class ExportError(Exception):
    """Bad input (missing run, incomplete checkpoint, occupied output): nothing was written."""


class ExportVerificationError(Exception):
    """The exported folder does not reproduce the checkpoint: the export was discarded."""


@dataclass
class ExportResult:
    out_dir: Path
    checkpoint_dir: Path
    step: int
    max_abs_logit_diff: float
    files: list[str]
    loaded_class: str
    commit_url: str | None = None


# --------------------------------------------------------------------------- inputs


def resolve_checkpoint(run_dir: Path, step: int | None) -> Path:
    if not run_dir.is_dir():
        raise ExportError(f"--run {run_dir}: no such directory (expected runs/NAME written by training.pretrain)")
    available = complete_checkpoints(run_dir / CHECKPOINTS_DIR)
    if not available:
        raise ExportError(
            f"--run {run_dir}: no complete checkpoint under {run_dir / CHECKPOINTS_DIR} "
            f"(expected step_XXXXXXXX/ directories containing a {COMPLETE_MARKER} marker)"
        )
    if step is None:
        return available[max(available)]
    if step not in available:
        raise ExportError(f"--step {step}: no complete checkpoint at that step; complete steps are {sorted(available)}")
    return available[step]


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out_dir}: exists and is not a directory; choose a new path")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(
            f"--out {out_dir}: already exists and is not an empty directory; choose a new path"
        )


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ExportError(f"{path}: missing (every checkpoint written by training.checkpoint has it)")
    with open(path) as f:
        return json.load(f)


def resolve_hub_token() -> str:
    """Token from HF_TOKEN or the login cache; it is handed to huggingface_hub and never logged."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ExportError("--push-to-hub: no Hugging Face token; set HF_TOKEN or run `hf auth login`")
    return token


# --------------------------------------------------------------------------- weights


def consolidate_checkpoint(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """One fp32 state dict from a DeepSpeed checkpoint of any ZeRO stage."""
    if any(checkpoint_dir.glob("*_optim_states.pt")):
        # ZeRO 1-3: the fp32 master partitions live in the optimizer files of every rank.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir.parent), tag=checkpoint_dir.name)
    model_states = checkpoint_dir / "mp_rank_00_model_states.pt"
    if model_states.is_file():
        # ZeRO 0: rank 0 saved the whole module.
        module = torch.load(model_states, map_location="cpu", weights_only=True)["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    raise ExportError(f"{checkpoint_dir}: neither *_optim_states.pt (ZeRO 1-3) nor mp_rank_00_model_states.pt (ZeRO 0)")


def load_checkpoint_model(checkpoint_dir: Path):
    """RMTForCausalLM (fp32, eval mode) holding the consolidated weights of a checkpoint."""
    from model import RMTConfig, RMTForCausalLM

    config = RMTConfig.from_dict(read_json(checkpoint_dir / "rmt_config.json"))
    model = RMTForCausalLM(config).float()
    state_dict = consolidate_checkpoint(checkpoint_dir)
    # DeepSpeed's consolidation and module state dicts both list tied weights under every name.
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ExportError(
            f"{checkpoint_dir}: weights do not match rmt_config.json (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model.eval()


def load_run_tokenizer(run_dir: Path):
    from transformers import AutoTokenizer

    tokenizer_dir = run_dir / "tokenizer"
    if not tokenizer_dir.is_dir():
        raise ExportError(f"{tokenizer_dir}: missing (training.pretrain saves the run's tokenizer there)")
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def load_run_config(run_dir: Path) -> dict:
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ExportError(f"{path}: missing (training.pretrain writes the resolved config there)")
    with open(path) as f:
        return yaml.safe_load(f) or {}


# --------------------------------------------------------------------------- model card


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


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for key, value in tree.items():
        if isinstance(value, dict):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


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
    data_items = [(k, v) for k, v in _flatten(data_cfg)
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


# --------------------------------------------------------------------------- writing


def configure_generation(model, tokenizer) -> None:
    gen = model.generation_config
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.config.bos_token_id = gen.bos_token_id
    model.config.eos_token_id = gen.eos_token_id
    model.config.pad_token_id = gen.pad_token_id


def write_folder(model, tokenizer, card: str, folder: Path, max_shard_size: str) -> None:
    # Ship model/*.py as remote code with auto_map, whichever classes the model package registered.
    type(model.config).register_for_auto_class()
    type(model).register_for_auto_class("AutoModelForCausalLM")
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text(card)
    written = {p.name for p in folder.iterdir()}
    if not any(name.endswith(".safetensors") for name in written) or any(
        name.endswith((".bin", ".pt", ".pth")) for name in written
    ):
        raise ExportVerificationError(f"{folder}: expected safetensors weights only, found {sorted(written)}")


def publishable_permissions(folder: Path) -> None:
    # mkdtemp and safetensors' atomic writes create owner-only modes; give the umask's usual ones.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


# --------------------------------------------------------------------------- verification


def make_probe(config, generator_seed: int = PROBE_SEED) -> dict[str, torch.Tensor]:
    """Two and a half segments (memory is carried twice, the last segment is short), one row padded."""
    gen = torch.Generator().manual_seed(generator_seed)
    vocab = config.vocab_size if hasattr(config, "vocab_size") and config.vocab_size else config.backbone["vocab_size"]
    length = 2 * config.segment_size + config.segment_size // 2
    input_ids = torch.randint(0, vocab, (2, length), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    prompt_ids = input_ids[:1, : config.segment_size + 3].clone()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "prompt_ids": prompt_ids}


def verify_in_fresh_process(model, folder: Path) -> tuple[float, str]:
    """Reload `folder` in `python -I` (no repository on sys.path); compare logits and greedy tokens."""
    from safetensors.torch import load_file, save_file

    probe = make_probe(model.config)
    max_new_tokens = model.config.segment_size + 2  # crosses one segment boundary while decoding
    with torch.no_grad():
        reference = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        reference_gen = model.generate(
            probe["prompt_ids"],
            attention_mask=torch.ones_like(probe["prompt_ids"]),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
        )
    with tempfile.TemporaryDirectory(prefix="rmt-reload-") as scratch:
        probe_path = Path(scratch) / "probe.safetensors"
        result_path = Path(scratch) / "reloaded.safetensors"
        save_file({k: v.contiguous() for k, v in probe.items()}, str(probe_path))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["HF_HUB_OFFLINE"] = "1"
        cmd = [sys.executable, "-I", str(RELOAD_CHECK_SCRIPT), "--model", str(folder.resolve()),
               "--probe", str(probe_path), "--max-new-tokens", str(max_new_tokens), "--out", str(result_path)]
        proc = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ExportVerificationError(f"reloading {folder} with transformers failed:\n{proc.stderr[-4000:]}")
        reloaded = load_file(str(result_path))
        with open(str(result_path) + ".json") as f:
            report = json.load(f)
    if reloaded["logits"].shape != reference.shape:
        raise ExportVerificationError(f"reloaded logits shape {tuple(reloaded['logits'].shape)} != {tuple(reference.shape)}")
    # Padded positions have no defined logits; compare the real tokens only.
    valid = probe["attention_mask"].bool()
    diff = (reloaded["logits"] - reference)[valid].abs().max().item()
    if not diff <= RELOAD_ATOL:
        raise ExportVerificationError(f"reloaded logits differ from the checkpoint's by {diff:.3e} > {RELOAD_ATOL}")
    if not torch.equal(reloaded["generated"], reference_gen):
        raise ExportVerificationError(
            f"reloaded greedy generation {reloaded['generated'].tolist()} != checkpoint's {reference_gen.tolist()}"
        )
    if not report["model_class"].startswith("transformers_modules."):
        raise ExportVerificationError(f"reloaded class {report['model_class']} did not come from the folder's code")
    return diff, report["model_class"]


def replace_dir(new: Path, target: Path) -> None:
    """Move the finished folder to `target`; an old `target` is set aside first, then deleted."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / target.name)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old)


# --------------------------------------------------------------------------- hub


def push_folder(folder: Path, repo_id: str, private: bool, token: str, message: str) -> str:
    """One commit holding every file of the folder; returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    operations = [
        CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]
    info = api.create_commit(repo_id, operations=operations, commit_message=message, repo_type="model")
    return info.commit_url


# --------------------------------------------------------------------------- orchestration


def export_run(
    run_dir,
    out_dir,
    step: int | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> ExportResult:
    """Export the newest (or `step`) complete checkpoint of `run_dir` to `out_dir`; see module doc.

    overwrite=True replaces an existing export only once the new one is verified (the trainer
    re-exports runs/NAME/export at the end of a resumed run).
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    # Every input check comes before consolidation, the expensive part.
    check_output_dir(out_dir, overwrite)
    checkpoint_dir = resolve_checkpoint(run_dir, step)
    client_state = read_json(checkpoint_dir / "client_state.json")
    if "step" not in client_state:
        raise ExportError(f"{checkpoint_dir / 'client_state.json'}: no 'step' field")
    read_json(checkpoint_dir / "rmt_config.json")
    run_config = load_run_config(run_dir)
    tokenizer = load_run_tokenizer(run_dir)
    token = None
    if push_to_hub is not None:
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(push_to_hub)
        except Exception as exc:  # HFValidationError: explain with the flag name
            raise ExportError(f"--push-to-hub {push_to_hub!r}: not a valid repo id ('namespace/name'): {exc}") from None
        token = resolve_hub_token()

    log.info("consolidating %s", checkpoint_dir)
    model = load_checkpoint_model(checkpoint_dir)
    configure_generation(model, tokenizer)
    card = render_model_card(model, client_state, run_config, push_to_hub or str(out_dir),
                             *example_prompt(model, run_config, tokenizer))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        write_folder(model, tokenizer, card, staging, max_shard_size)
        diff, loaded_class = verify_in_fresh_process(model, staging)
        publishable_permissions(staging)
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    result = ExportResult(out_dir, checkpoint_dir, int(client_state["step"]), diff, files, loaded_class)
    log.info("exported step %d to %s (reload max |dlogit| = %.2e)", result.step, out_dir, diff)
    if push_to_hub is not None:
        result.commit_url = push_folder(
            out_dir, push_to_hub, private, token, f"RMT export of {run_dir.name} at step {result.step}"
        )
        log.info("pushed %s: %s", push_to_hub, result.commit_url)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="run directory (runs/NAME)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest complete)")
    parser.add_argument("--out", required=True, type=Path, help="new (or empty) output directory")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                        help="upload the verified folder (token from HF_TOKEN or the login cache)")
    parser.add_argument("--private", action="store_true", help="create the hub repo as private")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    args = parser.parse_args(argv)
    if args.private and args.push_to_hub is None:
        parser.error("--private only applies with --push-to-hub")
    if args.step is not None and args.step < 0:
        parser.error(f"--step {args.step}: must be >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        result = export_run(args.run, args.out, args.step, args.push_to_hub, args.private, args.max_shard_size)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ExportVerificationError as exc:
        print(f"export verification failed: {exc}", file=sys.stderr)
        return 1
    print(f"exported {result.checkpoint_dir} (step {result.step}) -> {result.out_dir}")
    print(f"  reloaded as {result.loaded_class}; max |logit diff| {result.max_abs_logit_diff:.2e} <= {RELOAD_ATOL}")
    print("  files: " + ", ".join(result.files))
    if result.commit_url:
        print(f"  pushed: {result.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
