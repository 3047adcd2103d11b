"""Run configuration: one dataclass per concern, loaded from YAML plus dotted overrides.

Precedence (lowest to highest): the defaults written in the dataclasses below, then the recipe
YAML (`--config configs/NAME.yaml`), then `key.path=value` overrides on the command line (values
parsed as YAML, so `optim.lr=3e-4`, `eval.memory_task_segments=[2,4]` and `model.init_from=null`
work). Every problem found on the way (unknown keys, wrong types, values out of range, arithmetic
that does not add up, model or data settings the model/data modules reject, missing files) is
collected and raised together as one `ConfigError`, so a user fixes a config in one pass.

`python -m training.config --reference` prints the config reference table for the README.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from training.data.config import DataConfig, described as doc
from training.data.curriculum import CurriculumConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DS_CONFIG_DIR = REPO_ROOT / "ds_configs"
# Keys the trainer fills from the recipe; a template that sets them could disagree with it.
DS_KEYS_OWNED_BY_RECIPE = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "gradient_clipping", "optimizer", "scheduler", "fp16", "bf16",
)
# What a Hugging Face model folder keeps its weights in (model.init_from needs one of them).
INIT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class ConfigError(ValueError):
    """Every problem found in a run configuration, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def report(self) -> str:
        lines = [f"invalid configuration ({len(self.problems)} problem(s)):"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------

def _tiny_llama_backbone() -> dict:
    return {
        "model_type": "llama", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    }


@dataclass
class RunConfig:
    name: str = doc("tiny_cpu", "run name; outputs go to runs_dir/name")
    runs_dir: str = doc("runs", "directory that holds one folder per run")
    seed: int = doc(1234, "seed for model init, data order and dropout")
    max_steps: int = doc(1000, "optimizer steps to train (skipped non-finite steps count)")
    export: bool = doc(True, "write the Hugging Face export into runs_dir/name/export at the end")

    def problems(self) -> list[str]:
        out = []
        if not self.name or "/" in self.name or self.name in (".", ".."):
            out.append(f"run.name: {self.name!r} must be a non-empty folder name without '/'")
        if self.max_steps < 1:
            out.append(f"run.max_steps: {self.max_steps} must be >= 1")
        return out


@dataclass
class ModelConfig:
    backbone: dict = doc(text="Hugging Face config dict of the backbone (model_type + fields)",
                         factory=_tiny_llama_backbone)
    num_mem_tokens: int = doc(8, "memory tokens m (read and write blocks each hold m)")
    segment_size: int = doc(16, "segment length S in tokens")
    bptt_depth: int = doc(-1, "segments gradients flow back through memory; -1 = all")
    loss_from_segment: int = doc(0, "drop the targets of segments before this one")
    gradient_checkpointing: bool = doc(True, "segment-level activation checkpointing")
    checkpoint_memory_budget_mb: Optional[float] = doc(None, "MiB of activations a step may keep; "
                                                       "checkpoints only the segments that do not "
                                                       "fit (null = none or all, per "
                                                       "gradient_checkpointing)")
    loss_chunk_size: int = doc(1024, "segment positions whose logits exist at once in the loss")
    memory_noise: float = doc(0.0, "training only: Gaussian noise of this x the memory's RMS added "
                              "between segments, for length generalisation (1.0 in "
                              "docs/results.md; 0 = off)")
    memory_noise_prob: float = doc(1.0, "chance that a sample's hand-over gets memory_noise (drawn "
                                   "per sample and hand-over; the rest pass clean, as in "
                                   "evaluation); 1 = every one")
    init_from: Optional[str] = doc(None, "pretrained backbone folder (HF format) or null")
    max_sequence_length: Optional[int] = doc(None, "longest training sample in tokens; if set, "
                                             "must equal segment_size x the curriculum's largest "
                                             "num_segments")

    def rmt_kwargs(self) -> dict:
        return {"backbone": copy.deepcopy(self.backbone), "num_mem_tokens": self.num_mem_tokens,
                "segment_size": self.segment_size, "bptt_depth": self.bptt_depth,
                "loss_from_segment": self.loss_from_segment,
                "checkpoint_memory_budget_mb": self.checkpoint_memory_budget_mb,
                "loss_chunk_size": self.loss_chunk_size, "memory_noise": self.memory_noise,
                "memory_noise_prob": self.memory_noise_prob}

    def problems(self) -> list[str]:
        out = []
        if self.init_from is not None:
            cfg_file = Path(self.init_from) / "config.json"
            if not cfg_file.is_file():
                out.append(f"model.init_from: {self.init_from!r} is not a Hugging Face model "
                           f"folder (no {cfg_file})")
            else:
                if not any((Path(self.init_from) / name).is_file() for name in INIT_WEIGHTS):
                    out.append(f"model.init_from: {self.init_from!r} holds no weights (none of "
                               f"{', '.join(INIT_WEIGHTS)}); give a folder saved with "
                               f"save_pretrained, or model.init_from=null to start from scratch")
                try:
                    pretrained = json.loads(cfg_file.read_text())
                except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                    return out + [f"model.init_from: cannot read {cfg_file} as JSON ({e})"]
                if not isinstance(pretrained, dict):
                    return out + [f"model.init_from: {cfg_file} must hold a JSON object"]
                clashes = sorted(k for k, v in self.backbone.items()
                                 if k in pretrained and pretrained[k] != v)
                for k in clashes:
                    out.append(f"model.backbone.{k}: {self.backbone[k]!r} disagrees with "
                               f"{cfg_file} ({pretrained[k]!r}); remove it or make them equal")
        return out

    def resolved_backbone(self) -> dict:
        """The backbone config dict: the pretrained folder's, overlaid by the recipe's keys."""
        if self.init_from is None:
            return copy.deepcopy(self.backbone)
        pretrained = json.loads((Path(self.init_from) / "config.json").read_text())
        return {**pretrained, **self.backbone}


@dataclass
class OptimConfig:
    lr: float = doc(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = doc(0.01, "AdamW weight decay on matrices (not on norms, biases, memory)")
    betas: list[float] = doc(text="AdamW betas", factory=lambda: [0.9, 0.95])
    eps: float = doc(1e-8, "AdamW epsilon")
    warmup_steps: int = doc(100, "linear warm-up steps from 0 to lr")
    schedule: Literal["cosine", "constant"] = doc("cosine", "after warm-up: cosine decay to "
                                                  "min_lr_ratio * lr at max_steps, or constant")
    min_lr_ratio: float = doc(0.1, "final learning rate as a fraction of lr (cosine)")
    grad_clip: float = doc(1.0, "clip the global gradient norm to this; 0 = off")

    def problems(self) -> list[str]:
        out = []
        if not self.lr > 0:
            out.append(f"optim.lr: {self.lr} must be > 0")
        if self.weight_decay < 0:
            out.append(f"optim.weight_decay: {self.weight_decay} must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            out.append(f"optim.betas: {self.betas} must be two numbers in [0, 1)")
        if not self.eps > 0:
            out.append(f"optim.eps: {self.eps} must be > 0")
        if self.warmup_steps < 0:
            out.append(f"optim.warmup_steps: {self.warmup_steps} must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            out.append(f"optim.min_lr_ratio: {self.min_lr_ratio} must be in [0, 1]")
        if self.grad_clip < 0:
            out.append(f"optim.grad_clip: {self.grad_clip} must be >= 0 (0 = off)")
        return out


@dataclass
class BatchConfig:
    micro_batch_size: int = doc(16, "samples per rank per forward/backward: the most a rank takes "
                                "(less where global_batch_size / world size is less)")
    grad_accum_steps: Optional[int] = doc(None, "micro-batches accumulated per optimizer step; "
                                          "null = derived from global_batch_size (1 without it)")
    global_batch_size: Optional[int] = doc(None, "samples per optimizer step over all ranks, kept "
                                           "on any world size (grad_accum_steps, and "
                                           "micro_batch_size where needed, derived from it); "
                                           "null = micro_batch_size x grad_accum_steps x world size")

    def problems(self, world_size: Optional[int] = None) -> list[str]:
        """`world_size` None: the checks that hold on any world size (commands that do not train)."""
        out = []
        if self.micro_batch_size < 1:
            out.append(f"batch.micro_batch_size: {self.micro_batch_size} must be >= 1")
        if self.grad_accum_steps is not None and self.grad_accum_steps < 1:
            out.append(f"batch.grad_accum_steps: {self.grad_accum_steps} must be >= 1 or null")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            out.append(f"batch.global_batch_size: {self.global_batch_size} must be >= 1 or null")
        if not out and world_size is not None and world_size >= 1:
            try:
                self.for_world(world_size)
            except ConfigError as e:
                out += e.problems
        return out

    def for_world(self, world_size: int) -> "BatchConfig":
        """The sizes a run on `world_size` ranks uses, all three set, as DeepSpeed derives the third
        of train_batch / micro / accumulation: with global_batch_size fixed, accumulation is
        global / (micro x world); where the world is too large for the recipe's micro batch, the
        micro batch shrinks to global / world (never grows). Raises ConfigError naming values that
        work when no such split exists."""
        micro, accum, total = self.micro_batch_size, self.grad_accum_steps, self.global_batch_size
        if total is None:
            accum = accum or 1
            return BatchConfig(micro, accum, micro * accum * world_size)
        where = (f"batch.global_batch_size: {total} over world size {world_size} with "
                 f"micro_batch_size {micro}" + (f" and grad_accum_steps {accum}" if accum else ""))
        if total % world_size:
            raise _no_split(where, f"{total} samples do not split over {world_size} ranks",
                            "world sizes", _divisors(total, total), total, world_size)
        per_rank = total // world_size
        derived_micro = min(micro, per_rank)
        if per_rank % derived_micro:
            raise _no_split(where, f"{per_rank} samples per rank are not a multiple of the micro "
                            "batch", "micro_batch_size", _divisors(per_rank, micro), total,
                            micro * world_size)
        derived_accum = per_rank // derived_micro
        if accum is not None and accum != derived_accum:
            raise ConfigError([f"{where}: needs grad_accum_steps {derived_accum}, not {accum} "
                               f"(set batch.grad_accum_steps=null to derive it)"])
        return BatchConfig(derived_micro, derived_accum, total)

    def describe(self, world_size: int) -> str:
        """How the run's batch is made up, e.g. for the log: 'global 32 = micro 16 x accum 2 x 1 rank(s)'."""
        used = self.for_world(world_size)
        text = (f"global {used.global_batch_size} = micro {used.micro_batch_size} x accum "
                f"{used.grad_accum_steps} x {world_size} rank(s)")
        derived = [name for name in ("micro_batch_size", "grad_accum_steps")
                   if getattr(used, name) != getattr(self, name)]
        return text + (f" ({' and '.join(derived)} derived from batch.global_batch_size)"
                       if derived and self.global_batch_size is not None else "")


def _no_split(where: str, what: str, name: str, fits: list[int], total: int,
              multiple: int) -> ConfigError:
    return ConfigError([f"{where}: {what} ({name} that work: {_some(fits)}; or a "
                        f"global_batch_size that is a multiple of {multiple}, e.g. "
                        f"{_nearest_multiples(total, multiple)})"])


def _divisors(n: int, at_most: int) -> list[int]:
    return [d for d in range(1, at_most + 1) if n % d == 0]


def _some(values: list[int], limit: int = 8) -> str:
    return ", ".join(map(str, values[:limit])) + (", ..." if len(values) > limit else "")


def _nearest_multiples(value: int, step: int) -> str:
    below, above = value // step * step, -(-value // step) * step
    return " or ".join(str(v) for v in dict.fromkeys((below, above)) if v > 0)


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

    def engine_config(self, batch: "BatchConfig", optim: "OptimConfig", world_size: int) -> dict:
        """The DeepSpeed config dict: template, then the recipe's batch/precision/offload, then extra."""
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


@dataclass
class EvalConfig:
    every: int = doc(250, "evaluate every N steps and at the end; 0 = only at the end")
    batches: int = doc(4, "held-out micro-batches per rank for the per-segment loss")
    memory_task_segments: list[int] = doc(text="segment counts for memory-task accuracy "
                                          "(built-in corpus only)", factory=lambda: [2, 4])
    memory_task_samples: int = doc(256, "memory-task samples per segment count (split over ranks)")

    def problems(self) -> list[str]:
        out = []
        if self.every < 0:
            out.append(f"eval.every: {self.every} must be >= 0")
        if self.batches < 0:
            out.append(f"eval.batches: {self.batches} must be >= 0")
        if any(n < 1 for n in self.memory_task_segments):
            out.append(f"eval.memory_task_segments: {self.memory_task_segments} must all be >= 1")
        if self.memory_task_samples < 1:
            out.append(f"eval.memory_task_samples: {self.memory_task_samples} must be >= 1")
        return out


@dataclass
class CheckpointConfig:
    every: int = doc(500, "save every N steps (and always at the end); 0 = only at the end")
    keep_last: int = doc(3, "complete checkpoints to keep (the newest complete one is never "
                         "deleted)")
    resume: str = doc("auto", "auto (newest complete checkpoint of this run, if any), never, or a "
                      "checkpoint folder path")

    def problems(self) -> list[str]:
        out = []
        if self.every < 0:
            out.append(f"checkpoint.every: {self.every} must be >= 0")
        if self.keep_last < 1:
            out.append(f"checkpoint.keep_last: {self.keep_last} must be >= 1")
        if self.resume not in ("auto", "never"):
            marker = Path(self.resume) / "COMPLETE"
            if not marker.is_file():
                out.append(f"checkpoint.resume: {self.resume!r} must be auto, never, or a complete "
                           f"checkpoint folder (no {marker})")
        return out


@dataclass
class LoggingConfig:
    every: int = doc(10, "log train scalars every N steps")
    tensorboard: bool = doc(True, "write TensorBoard events to runs_dir/name/tensorboard")
    progress_bar: bool = doc(True, "tqdm progress bar on rank 0")
    peak_tflops: Optional[float] = doc(None, "per-device peak TFLOP/s for MFU; null = from the "
                                       "GPU name when known (MFU is GPU-only)")

    def problems(self) -> list[str]:
        out = []
        if self.every < 1:
            out.append(f"logging.every: {self.every} must be >= 1")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            out.append(f"logging.peak_tflops: {self.peak_tflops} must be > 0 or null")
        return out


@dataclass
class GuardConfig:
    max_nonfinite_in_a_row: int = doc(5, "abort after this many consecutive non-finite steps")
    inject_nonfinite_steps: list[int] = doc(text="TEST ONLY: steps whose loss or grads are made "
                                            "non-finite on one rank", factory=list)
    inject_nonfinite_kind: Literal["loss", "grad"] = doc("loss", "TEST ONLY: what to poison")
    inject_rank: int = doc(0, "TEST ONLY: the rank that poisons")

    def problems(self) -> list[str]:
        if self.max_nonfinite_in_a_row < 1:
            return [f"guard.max_nonfinite_in_a_row: {self.max_nonfinite_in_a_row} must be >= 1"]
        return []


@dataclass
class DistributedConfig:
    # A rank that crashes or is killed is noticed at once (its peers' connections break); these
    # bound how long the others wait on a rank that hangs (stuck kernel, hung file system, a node
    # gone without closing its sockets). While training, ranks legitimately drift apart for a
    # checkpoint write or pruning on a slow shared file system and the first steps' compilation:
    # 900 s is 1.5x torch's NCCL default (600 s, what most clusters train under) for that
    # headroom, and still ends a hung job within 15 minutes instead of at its time limit.
    timeout_s: float = doc(900.0, "seconds a collective may wait for the other ranks while "
                           "training; a hung rank fails the job after this")
    # Set-up is slower and more uneven than a step: imports from a shared file system on many
    # nodes, ZeRO-3 partitioning while a large model is built, loading (and converting) a
    # checkpoint (a universal one converted for a new world size). 1800 s is 3x the 10 minutes
    # torch and DeepSpeed give any collective by default, and bounds a start-up that hangs.
    setup_timeout_s: float = doc(1800.0, "seconds the rendezvous and every collective may wait "
                                 "until the trainer is built and resumed (then timeout_s applies)")

    def problems(self) -> list[str]:
        out = []
        for name in ("timeout_s", "setup_timeout_s"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                out.append(f"distributed.{name}: {value} must be a positive number of seconds")
        return out


@dataclass
class TrainConfig:
    run: RunConfig = doc(text="", factory=RunConfig)
    model: ModelConfig = doc(text="", factory=ModelConfig)
    data: DataConfig = doc(text="", factory=DataConfig)
    curriculum: CurriculumConfig = doc(text="", factory=CurriculumConfig)
    optim: OptimConfig = doc(text="", factory=OptimConfig)
    batch: BatchConfig = doc(text="", factory=BatchConfig)
    deepspeed: DeepSpeedConfig = doc(text="", factory=DeepSpeedConfig)
    eval: EvalConfig = doc(text="", factory=EvalConfig)
    checkpoint: CheckpointConfig = doc(text="", factory=CheckpointConfig)
    logging: LoggingConfig = doc(text="", factory=LoggingConfig)
    guard: GuardConfig = doc(text="", factory=GuardConfig)
    distributed: DistributedConfig = doc(text="", factory=DistributedConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.runs_dir) / self.run.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Generic loading: dict -> dataclass with type checks, every problem collected
# --------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        inner = [a for a in args if a is not type(None)]
        name = " | ".join(_type_name(a) for a in inner)
        return f"{name} | null" if len(inner) < len(args) else name
    if origin in (list, tuple):
        return f"list[{', '.join(_type_name(a) for a in typing.get_args(tp) if a is not ...)}]"
    if origin is dict:
        return "dict"
    return getattr(tp, "__name__", str(tp))


_YAML11_EXPONENT = re.compile(r"[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+")


def _check_value(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Return `value` converted to `tp` (int -> float only), appending problems when it is not."""
    origin = typing.get_origin(tp)
    bad = f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping of {_type_name(tp)} keys, got {value!r}")
            return tp()
        return _build(tp, value, where, problems)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(value, inner[0], where, problems) if len(inner) == 1 else value
    if origin is Literal:
        if value not in typing.get_args(tp):
            problems.append(f"{where}: {value!r} is not one of {_type_name(tp)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            problems.append(bad)
            return value
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_check_value(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append(bad)
        return value
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(bad)
            return value
        return float(value)
    if tp is int or tp is bool or tp is str:
        if type(value) is not tp:
            problems.append(bad)
        return value
    raise TypeError(f"config type {tp!r} of {where} is not supported by the loader")


def _build(cls: type, raw: dict, where: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    prefix = f"{where}." if where else ""
    for key in raw:
        if key not in names:
            problems.append(f"{prefix}{key}: unknown key (valid: {', '.join(names)})")
    kwargs = {k: _check_value(v, hints[k], f"{prefix}{k}", problems)
              for k, v in raw.items() if k in names}
    n_before = len(problems)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        if len(problems) == n_before:
            problems.append(f"{where or 'config'}: {e}")
        return cls()
    return obj


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        child = node.get(p)
        if not isinstance(child, dict):
            child = node[p] = {} if child is None else child
        if not isinstance(child, dict):
            raise ConfigError([f"override {dotted}: {p} is not a section"])
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> tuple[list[tuple[str, Any]], list[str]]:
    parsed, problems = [], []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {item!r}: expected key.path=value, e.g. optim.lr=3e-4")
            continue
        try:
            parsed.append((key, yaml.safe_load(text) if text != "" else ""))
        except yaml.YAMLError as e:
            problems.append(f"override {item!r}: value is not valid YAML ({e})")
    return parsed, problems


def _known_paths(cls: type, prefix: str = "") -> set[str]:
    hints = typing.get_type_hints(cls)
    out = set()
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        out.add(path)
        if dataclasses.is_dataclass(hints[f.name]):
            out |= _known_paths(hints[f.name], f"{path}.")
    return out


def load_config(path: Optional[str | os.PathLike], overrides: list[str] = (),
                world_size: Optional[int] = None) -> TrainConfig:
    """Defaults < recipe YAML < dotted overrides; raises ConfigError listing every problem.
    `world_size`: the ranks a training run starts with (its batch must split over them); None for
    commands that do not train (tokenizer, config check, export, evaluate)."""
    problems: list[str] = []
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"--config: {path} is not a file (recipes: "
                               f"{', '.join(sorted(str(c) for c in Path('configs').glob('*.yaml')))})"])
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"--config: {path} is not valid YAML ({e})"])
        if not isinstance(raw, dict):
            raise ConfigError([f"--config: {path} must hold a mapping of sections"])
    parsed, problems = parse_overrides(list(overrides))
    known = _known_paths(TrainConfig)
    for key, value in parsed:
        # Keys inside free-form dicts (model.backbone.*, deepspeed.extra.*) are open-ended.
        open_dict = any(key.startswith(f"{p}.") for p in ("model.backbone", "deepspeed.extra"))
        if key not in known and not open_dict:
            problems.append(f"override {key}: unknown key")
            continue
        try:
            _set_dotted(raw, key, value)
        except ConfigError as e:
            problems += e.problems
    cfg = _build(TrainConfig, raw, "", problems)
    # Sections whose fields already failed the type checks are not range-checked again.
    broken = {p.split(".")[0].split(":")[0].split("[")[0] for p in problems}
    problems += validate(cfg, world_size, skip=broken)
    if problems:
        raise ConfigError(problems)
    return cfg


def validate(cfg: TrainConfig, world_size: Optional[int], skip: set[str] = frozenset()) -> list[str]:
    """Range and cross-field checks of every section whose types are right (not in `skip`)."""
    problems = []
    for f in dataclasses.fields(cfg):
        if f.name in skip:
            continue
        section = getattr(cfg, f.name)
        found = section.problems(world_size) if f.name == "batch" else section.problems()
        problems += [p if p.startswith(f"{f.name}") else f"{f.name}: {p}" for p in found]
    if world_size is not None and world_size < 1:
        problems.append(f"world size {world_size} must be >= 1")
    cross = {"model", "data", "curriculum", "eval"}
    if not (cross & skip) and not any(p.startswith(tuple(cross)) for p in problems):
        problems += _model_problems(cfg)
    if "data" not in skip and not any(p.startswith("data") for p in problems):
        problems += _data_file_problems(cfg)
    if not ({"data", "eval"} & skip):
        problems += _eval_data_problems(cfg)
    return problems


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
    if data.source != "text":
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


# --------------------------------------------------------------------------------------------
# Reference documentation
# --------------------------------------------------------------------------------------------

def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _reference_rows(cls: type, prefix: str) -> list[str]:
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, path = hints[f.name], f"{prefix}{f.name}"
        (item_tp, *_) = typing.get_args(tp) or (None,)
        if dataclasses.is_dataclass(tp):
            rows += _reference_rows(tp, f"{path}.")
            continue
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(item_tp):
            rows.append(f"| `{path}` | list | `[]` | {f.metadata.get('doc', '')}; each item: |")
            rows += _reference_rows(item_tp, f"{path}[].")
            continue
        text = f.metadata.get("doc", "")
        if not text:
            raise ValueError(f"config field {path} has no doc text")
        default = _default_of(f)
        default = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default
        type_text = _type_name(tp).replace("|", "\\|")
        rows.append(f"| `{path}` | {type_text} | `{json.dumps(default)}` | {text} |")
    return rows


def config_reference_markdown() -> str:
    """Markdown tables of every config key (type, default, one-line doc), one per section."""
    lines = ["Precedence: dataclass defaults < recipe YAML (`--config`) < `key.path=value` "
             "command-line overrides.", ""]
    hints = typing.get_type_hints(TrainConfig)
    for section in dataclasses.fields(TrainConfig):
        lines += [f"### `{section.name}`", "", "| key | type | default | meaning |",
                  "|---|---|---|---|"]
        lines += _reference_rows(hints[section.name], f"{section.name}.")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Run-config tools.")
    parser.add_argument("--reference", action="store_true", help="print the config reference")
    parser.add_argument("--check", metavar="YAML", help="validate a recipe and print it resolved")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="with --check: also check that the batch splits over N ranks and "
                        "print how")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides for --check")
    args = parser.parse_args(argv)
    if args.reference:
        sys.stdout.write(config_reference_markdown())
        return 0
    if args.check:
        try:
            cfg = load_config(args.check, args.overrides, world_size=args.world_size)
        except ConfigError as e:
            print(e.report(), file=sys.stderr)
            return 2
        sys.stdout.write(cfg.to_yaml())
        if args.world_size is not None:
            print(f"# batch on {args.world_size} rank(s): {cfg.batch.describe(args.world_size)}")
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
