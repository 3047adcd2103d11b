"""The deepspeed section and the DeepSpeed config dict built from it, the batch and the optimizer:
the template from ds_configs/, then what the recipe owns (batch sizes, precision, offload), then
`extra`. The recipe owns DS_KEYS_OWNED_BY_RECIPE, so a template can never disagree with it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from training.config.batch import BatchConfig
from training.config.paths import DS_CONFIG_DIR, REPO_ROOT
from training.data.config import described as doc

# Keys the trainer fills from the recipe; a template that sets them could disagree with it.
DS_KEYS_OWNED_BY_RECIPE = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "gradient_clipping", "optimizer", "scheduler", "fp16", "bf16",
)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = doc(3, "ZeRO stage 0-3")
    offload_optimizer: bool = doc(False, "ZeRO-Offload: optimizer state on CPU (stage >= 1)")
    offload_param: bool = doc(False, "ZeRO-Infinity: parameters on CPU (stage 3)")
    precision: Literal["fp32", "bf16", "fp16"] = doc("fp32", "training precision")
    initial_scale_power: int = doc(16, "fp16: dynamic loss scale starts at 2^this")
    min_loss_scale: float = doc(1.0, "fp16: the loss scale never goes below this; a non-finite "
                                "step at this scale stops the run (exit 3)")
    template: Optional[str] = doc(None, "DeepSpeed JSON template; null = ds_configs/zero{stage}"
                                  "[_offload].json")
    extra: dict = doc(text="keys merged into the DeepSpeed config last (not batch/precision/"
                      "optimizer keys)", factory=dict)

    def template_path(self) -> Path:
        if self.template is not None:
            path = Path(self.template)
            return path if path.is_absolute() or path.exists() else REPO_ROOT / path
        both = self.offload_optimizer and self.offload_param
        return DS_CONFIG_DIR / (f"zero{self.zero_stage}" + ("_offload" if both else "") + ".json")

    def problems(self) -> list[str]:
        out = []
        if self.zero_stage not in (0, 1, 2, 3):
            return [f"deepspeed.zero_stage: {self.zero_stage} must be 0, 1, 2 or 3"]
        if not 0 <= self.initial_scale_power <= 32:
            out.append(f"deepspeed.initial_scale_power: {self.initial_scale_power} must be in "
                       f"[0, 32]")
        if not self.min_loss_scale > 0 or self.min_loss_scale > 2.0 ** self.initial_scale_power:
            out.append(f"deepspeed.min_loss_scale: {self.min_loss_scale} must be > 0 and <= "
                       f"2^initial_scale_power ({2.0 ** self.initial_scale_power:g})")
        if self.offload_optimizer and self.zero_stage == 0:
            out.append("deepspeed.offload_optimizer: needs zero_stage >= 1")
        if self.offload_param and self.zero_stage != 3:
            out.append("deepspeed.offload_param: needs zero_stage 3")
        for key in sorted(set(self.extra) & set(DS_KEYS_OWNED_BY_RECIPE)):
            out.append(f"deepspeed.extra.{key}: set by the recipe (batch/optim/deepspeed sections), "
                       f"not by extra")
        path = self.template_path()
        if not path.is_file():
            return out + [f"deepspeed.template: {path} does not exist (valid: a JSON file, e.g. "
                          f"{', '.join(sorted(p.name for p in DS_CONFIG_DIR.glob('*.json')))})"]
        try:
            template = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            return out + [f"deepspeed.template: {path} is not valid JSON ({e})"]
        out += template_problems(template, str(path))
        zero = template.get("zero_optimization", {}) if isinstance(template, dict) else {}
        if zero.get("stage", 0) != self.zero_stage:
            out.append(f"deepspeed.zero_stage: {self.zero_stage} disagrees with {path} "
                       f"(zero_optimization.stage {zero.get('stage', 0)})")
        for key in ("offload_optimizer", "offload_param"):
            if _offload_enabled(zero, key) and not getattr(self, key):
                out.append(f"deepspeed.{key}: false, but {path} enables zero_optimization.{key}; "
                           f"set it true or use a template without it")
        return out

    def engine_config(self, batch: BatchConfig, optim, world_size: int) -> dict:
        """The DeepSpeed config dict: template, then the recipe's batch/precision/offload, then
        extra. `optim`: the optim section (its grad_clip)."""
        batch = batch.for_world(world_size)
        ds = json.loads(self.template_path().read_text())
        zero = ds.setdefault("zero_optimization", {"stage": 0})
        for key in ("offload_optimizer", "offload_param"):
            if getattr(self, key) and not _offload_enabled(zero, key):
                zero[key] = {"device": "cpu", "pin_memory": True}
        ds.update({
            "train_micro_batch_size_per_gpu": batch.micro_batch_size,
            "gradient_accumulation_steps": batch.grad_accum_steps,
            "train_batch_size": batch.global_batch_size,
            "gradient_clipping": optim.grad_clip,
            "bf16": {"enabled": self.precision == "bf16"},
            "fp16": {"enabled": self.precision == "fp16", "loss_scale": 0,
                     "initial_scale_power": self.initial_scale_power,
                     "min_loss_scale": self.min_loss_scale},
            # The trainer passes its own torch AdamW (see trainer.build_optimizer).
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
        })
        return _deep_merge(ds, self.extra)


def _offload_enabled(zero: dict, key: str) -> bool:
    block = zero.get(key)
    return isinstance(block, dict) and block.get("device", "none") not in ("none", None)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (_deep_merge(out[key], value)
                    if isinstance(value, dict) and isinstance(out.get(key), dict) else value)
    return out


def template_problems(template: Any, where: str) -> list[str]:
    if not isinstance(template, dict):
        return [f"{where}: must hold a JSON object"]
    return [f"{where}: sets {key!r}, which the recipe owns; remove it from the template"
            for key in DS_KEYS_OWNED_BY_RECIPE if key in template]
