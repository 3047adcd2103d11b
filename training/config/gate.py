"""The one gate: every check of a whole TrainConfig, each problem listed, nothing expensive.

Each section checks itself (`problems()`); here the checks that need several sections, the file
system (data files, tokenizer folder, pretrained backbone), the world size (how the batch splits)
or the accelerator (which precisions it trains in). Cross-section checks run only on sections
that are themselves sound, so one mistake is reported once."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from training import checkpoint_select
from training.config.sections import TrainConfig


# model.compile_mode values that capture CUDA graphs (torch.compile's modes).
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def validate(cfg: TrainConfig, world_size: Optional[int] = None, accelerator=None,
             skip: set[str] = frozenset()) -> list[str]:
    """Every problem of `cfg`: each section's own checks (not those in `skip`, whose types are
    already wrong), the world size's batch split and the accelerator's precisions when given,
    then the checks across sections, run only over sections found sound."""
    by_section: dict[str, list[str]] = {}
    for f in dataclasses.fields(cfg):
        if f.name in skip:
            continue
        section = getattr(cfg, f.name)
        found = section.problems(world_size) if f.name == "batch" else section.problems()
        by_section[f.name] = [p if p.startswith(f.name) else f"{f.name}: {p}" for p in found]
    problems = [p for found in by_section.values() for p in found]
    if world_size is not None and world_size < 1:
        problems.append(f"world size {world_size} must be >= 1")
    if accelerator is not None and "deepspeed" not in skip:
        problems += precision_problems(cfg, accelerator)

    def sound(*names: str) -> bool:
        return all(name not in skip and not by_section.get(name) for name in names)

    if sound("model", "deepspeed") and cfg.model.compile and cfg.deepspeed.zero_stage == 3:
        # ZeRO-3's parameter-gathering hooks are torch.compiler.disable'd: the step cannot be
        # captured whole (training/compile.py).
        problems.append("model.compile: true needs deepspeed.zero_stage 0, 1 or 2 (got 3: ZeRO-3's "
                        "parameter hooks break the compiled segment step); set model.compile: false "
                        "or a lower zero_stage")
    if (accelerator is not None and sound("model") and cfg.model.compile_mode in CUDA_GRAPH_MODES
            and accelerator.device_name() != "cuda"):
        # torch.compile would skip the CUDA graphs on another device without an error.
        problems.append(f"model.compile_mode: {cfg.model.compile_mode} adds CUDA graphs, which need a "
                        f"CUDA device (this run's: {accelerator.device_name()}); valid here: null, "
                        f"default, max-autotune-no-cudagraphs")
    if sound("model", "data", "curriculum", "eval"):
        problems += _model_problems(cfg)
    if sound("data"):
        problems += _data_file_problems(cfg)
    if not ({"data", "eval"} & skip):
        problems += _eval_data_problems(cfg)
    if sound("checkpoint", "eval", "data"):
        problems += checkpoint_select.config_problems(cfg)
    return problems


def precision_problems(cfg: TrainConfig, accelerator) -> list[str]:
    """deepspeed.precision the accelerator cannot train in (e.g. fp16 on DeepSpeed's CPU
    accelerator, which DeepSpeed refuses only after the model is built)."""
    supported = {"fp32": True, "bf16": accelerator.is_bf16_supported(),
                 "fp16": accelerator.is_fp16_supported()}
    if supported[cfg.deepspeed.precision]:
        return []
    valid = ", ".join(k for k, ok in supported.items() if ok)
    return [f"deepspeed.precision: {cfg.deepspeed.precision} is not supported by DeepSpeed's "
            f"{accelerator.device_name()} accelerator (valid here: {valid})"]


def _eval_data_problems(cfg: TrainConfig) -> list[str]:
    """Held-out batches of a text run need held-out documents; without this check every rank
    fails when it builds its eval pipeline, after the model is built."""
    data, batches = cfg.data, cfg.eval.batches
    if data.source != "text" or batches <= 0 or data.eval_sources or data.eval_fraction > 0:
        return []
    return [f"eval.batches: {batches} held-out batches, but data.source text has no eval data "
            f"(data.eval_sources is empty and data.eval_fraction is {data.eval_fraction}); set "
            f"data.eval_sources, data.eval_fraction > 0 (e.g. 0.01), or eval.batches=0"]


def _data_file_problems(cfg: TrainConfig) -> list[str]:
    """Open the local files the data section names (tokenizer folder or cached hub tokenizer,
    first record of every source) so a bad file fails here, not after the model is built on
    every rank."""
    from training.data.errors import DataSourceError
    from training.data.sources import check_text_field

    data, problems = cfg.data, []
    if data.source not in ("text", "babilong"):
        return problems
    for name in ("sources", "eval_sources"):
        for i, src in enumerate(getattr(data, name)):
            try:
                check_text_field(src, f"data.{name}[{i}]")
            except DataSourceError as e:
                problems.append(str(e))
    tok_dir = Path(data.tokenizer)
    if not tok_dir.exists() and not _is_hub_name(data.tokenizer):
        return problems + [f"data.tokenizer: {data.tokenizer!r} is no such directory and not a "
                           f"Hugging Face hub name (name or owner/name); train one with python -m "
                           f"training.tokenizer --out {data.tokenizer} or give a hub name such as "
                           f"gpt2"]
    local_dir = tok_dir.is_dir() and any(tok_dir.iterdir())  # empty: about to be written
    # A hub name is checked here only when it is in the local Hugging Face cache (validation never
    # goes to the network); one that is not is checked when the ranks download it.
    if local_dir or _in_hub_cache(data.tokenizer):
        from training.data import build_tokenizer

        try:
            tokenizer = build_tokenizer(data, local_files_only=not local_dir)
        except ValueError as e:
            if not local_dir and e.__cause__ is not None:
                return problems  # cached only in part: the ranks download the rest
            return problems + [str(e)]
        try:
            vocab = cfg.model.resolved_backbone().get("vocab_size")
        except (OSError, ValueError):  # a bad model.init_from is reported by the model section
            vocab = None
        if isinstance(vocab, int) and len(tokenizer) > vocab:
            problems.append(f"model.backbone.vocab_size: {vocab} is smaller than data.tokenizer "
                            f"{data.tokenizer!r} ({len(tokenizer)} tokens); set it >= "
                            f"{len(tokenizer)}")
        if data.source == "babilong":  # do the stories fit the segments (needs the tokenizer)
            from training.data.babilong_samples import layout_problems

            counts = {n for _, n in cfg.curriculum.schedule} | set(cfg.eval.memory_task_segments)
            try:
                problems += layout_problems(data, tokenizer, cfg.model.segment_size, counts)
            except DataSourceError as e:  # an unreadable bAbI file
                problems.append(str(e))
    return problems


def _is_hub_name(name: str) -> bool:
    """A valid hub repository id (gpt2, owner/name); absolute, ./ or ~ paths are not."""
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except ValueError:  # huggingface_hub's HFValidationError
        return False
    return True


def _in_hub_cache(name: str) -> bool:
    """Whether `name` is a hub repository id whose tokenizer files are in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    if not _is_hub_name(name):
        return False
    return any(isinstance(try_to_load_from_cache(name, f), str)
               for f in ("tokenizer_config.json", "tokenizer.json"))


def _model_problems(cfg: TrainConfig) -> list[str]:
    from model import RMTConfig  # imported here: transformers is slow to import

    try:
        rmt = RMTConfig(**{**cfg.model.rmt_kwargs(), "backbone": cfg.model.resolved_backbone()})
    except (ValueError, TypeError, KeyError) as e:
        return [f"model: {e}"]
    problems = []
    vocab = rmt.vocab_size
    need = cfg.data.required_vocab_size() if hasattr(cfg.data, "required_vocab_size") else None
    if vocab is not None and need is not None and vocab < need:
        problems.append(f"model.backbone.vocab_size: {vocab} is smaller than the data's tokenizer "
                        f"({need} tokens)")
    max_segments = max(cfg.curriculum.max_segments(), *cfg.eval.memory_task_segments)
    seq = cfg.model.max_sequence_length
    S = cfg.model.segment_size
    if seq is not None and (seq % S or seq // S != cfg.curriculum.max_segments()):
        problems.append(f"model.max_sequence_length: {seq} must be a multiple of segment_size {S} "
                        f"and equal segment_size x the curriculum's largest num_segments "
                        f"({S * cfg.curriculum.max_segments()})")
    if cfg.data.source == "memory_tasks":
        from training.data.memory_tasks import check_layout

        counts = {n for _, n in cfg.curriculum.schedule} | set(cfg.eval.memory_task_segments)
        for n in sorted(counts):
            try:
                check_layout(cfg.data.memory_tasks, n, S)
            except ValueError as e:
                problems.append(f"model.segment_size: {e}")
                break
    if cfg.model.loss_from_segment >= max_segments:
        problems.append(f"model.loss_from_segment: {cfg.model.loss_from_segment} leaves no loss at "
                        f"{max_segments} segments (curriculum/eval maximum)")
    return problems
