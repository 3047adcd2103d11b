"""The model every rank starts training from: the RMT with the backbone's own (Hugging Face)
initialisation, or pretrained backbone weights (`model.init_from`, loaded in fp32 whatever the
checkpoint's dtype, so every parameter, memory included, has one dtype), ZeRO-3 aware."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from training.config import TrainConfig


def build_model(cfg: TrainConfig, rank: int, ds_config: dict) -> torch.nn.Module:
    """Every rank seeds identically, so all stages start from the same weights. Under ZeRO-3 the
    model is built inside zero.Init (no rank holds it whole) and the weights come from a plain
    copy built on rank 0 only, one gathered parameter at a time: Hugging Face's `_init_weights`
    runs after zero.Init has already partitioned the submodules, so it cannot initialise them.
    """
    import deepspeed

    from model import RMTConfig, RMTForCausalLM

    def plain() -> torch.nn.Module:
        torch.manual_seed(cfg.run.seed)
        if cfg.model.init_from is None:
            return RMTForCausalLM(RMTConfig(**cfg.model.rmt_kwargs()))
        kwargs = cfg.model.rmt_kwargs()
        kwargs.pop("backbone")
        # Not transformers' dtype='auto' (the checkpoint's, e.g. bf16 beside an fp32 memory):
        # DeepSpeed takes fp32 parameters and keeps the master weights in fp32 whatever the
        # precision; for bf16/fp16 it casts every parameter itself at initialize() (ZeRO-3:
        # zero.Init holds them in that dtype and the copy below casts).
        return RMTForCausalLM.from_backbone(pretrained_backbone(cfg.model.init_from), **kwargs)

    if cfg.deepspeed.zero_stage != 3:
        return compiled(plain(), cfg)
    reference = plain() if rank == 0 else None
    rmt_config = RMTConfig(**{**cfg.model.rmt_kwargs(), "backbone": cfg.model.resolved_backbone()})
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = RMTForCausalLM(rmt_config)
    source = dict(reference.named_parameters()) if reference is not None else {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                param.data.copy_(source[name].data)
    return compiled(model, cfg)


def pretrained_backbone(folder: str) -> torch.nn.Module:
    """model.init_from's backbone in fp32: a Hugging Face causal LM folder, or the backbone of an
    RMT model folder (this project's export of, say, a language-model run: the paper's route of a
    task run from a backbone that already reads; the new run's memory starts fresh)."""
    from transformers import AutoModelForCausalLM

    from model import RMTForCausalLM
    from training.config.sections import is_rmt_model

    if is_rmt_model(json.loads((Path(folder) / "config.json").read_text())):
        return RMTForCausalLM.from_pretrained(folder, dtype=torch.float32).backbone
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def compiled(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """The model with its segment step compiled when `model.compile` asks for it (training/compile.py)."""
    if not cfg.model.compile:
        return model
    from training.compile import compile_segment_step

    logging.getLogger("training").info(
        "model.compile: segment step compiled (torch.compile, mode %s; the first steps compile)",
        cfg.model.compile_mode or "default")
    return compile_segment_step(model, cfg.model.compile_mode)
