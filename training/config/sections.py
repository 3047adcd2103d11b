"""The recipe's sections, one dataclass per concern; each lists its own problems (`problems()`).
Checks that need more than one section live in the gate (gate.py); batch and deepspeed sections
have their own modules (batch.py, deepspeed_config.py)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import yaml

from training.config.batch import BatchConfig
from training.config.deepspeed_config import DeepSpeedConfig
from training.data.config import DataConfig, described as doc
from training.data.curriculum import CurriculumConfig

def at_least(section_obj, section: str, **minimums) -> list[str]:
    """'section.name: value must be >= minimum' for each named field below its minimum."""
    return [f"{section}.{name}: {getattr(section_obj, name)} must be >= {low}"
            for name, low in minimums.items() if getattr(section_obj, name) < low]


# What a Hugging Face model folder keeps its weights in (model.init_from needs one of them).
INIT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


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
        out = at_least(self, "run", max_steps=1)
        if not self.name or "/" in self.name or self.name in (".", ".."):
            out.append(f"run.name: {self.name!r} must be a non-empty folder name without '/'")
        return out


def flatten(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, leaf) pairs of nested dicts, in order."""
    items = []
    for key, value in tree.items():
        if isinstance(value, dict):
            items += flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


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
    fused_segment_loss: bool = doc(True, "training: each segment's LM-head loss computes its "
                                   "gradients in forward, chunk by chunk (false: plain "
                                   "cross-entropy per chunk, recomputed in backward)")
    memory_noise: float = doc(0.0, "training only: Gaussian noise of this x the memory's RMS added "
                              "between segments, for length generalisation (1.0 in "
                              "docs/results.md; 0 = off)")
    memory_noise_prob: float = doc(1.0, "chance that a sample's hand-over gets memory_noise (drawn "
                                   "per sample and hand-over; the rest pass clean, as in "
                                   "evaluation); 1 = every one")
    init_from: Optional[str] = doc(None, "pretrained backbone folder (HF format), or an RMT "
                                   "export/save_pretrained folder (its backbone is taken, the "
                                   "memory starts fresh), or null")
    max_sequence_length: Optional[int] = doc(None, "longest training sample in tokens; if set, "
                                             "must equal segment_size x the curriculum's largest "
                                             "num_segments")
    compile: bool = doc(False, "capture the segment step (backbone over memory + tokens) once "
                        "with torch.compile and replay it every segment (training/compile.py); "
                        "not with deepspeed.zero_stage 3")
    compile_mode: Optional[Literal["default", "reduce-overhead", "max-autotune",
                                   "max-autotune-no-cudagraphs"]] = doc(
        None, "torch.compile mode with model.compile (null = torch's default; reduce-overhead "
        "and max-autotune add CUDA graphs, on a CUDA device only)")

    def rmt_kwargs(self) -> dict:
        """RMTConfig's arguments: the backbone and every setting the model names in RMT_SETTINGS
        (each is a field here; tests/test_config.py keeps the two lists equal)."""
        from model.configuration_rmt import RMT_SETTINGS  # transformers: imported when needed

        return {"backbone": copy.deepcopy(self.backbone),
                **{name: getattr(self, name) for name in RMT_SETTINGS}}

    def problems(self) -> list[str]:
        out = []
        if self.compile_mode is not None and not self.compile:
            out.append(f"model.compile_mode: {self.compile_mode!r} needs model.compile: true "
                       f"(or compile_mode: null)")
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
                pretrained = backbone_of(pretrained)
                if not isinstance(pretrained, dict):
                    return out + [f"model.init_from: {cfg_file} is an RMT model's config without "
                                  f"a backbone object; give an RMT export or a backbone folder"]
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
        pretrained = backbone_of(json.loads((Path(self.init_from) / "config.json").read_text()))
        if not isinstance(pretrained, dict):
            raise ValueError(f"model.init_from: {self.init_from!r} has no backbone config")
        return {**pretrained, **self.backbone}


def is_rmt_model(pretrained: dict) -> bool:
    """Whether a model folder's config.json is an RMT model's (e.g. this project's export)."""
    from model.configuration_rmt import RMTConfig  # transformers: imported when needed

    return pretrained.get("model_type") == RMTConfig.model_type


def backbone_of(pretrained: dict):
    """The backbone config in a model folder's config.json: the file itself, or for an RMT
    model its `backbone` entry."""
    return pretrained.get("backbone") if is_rmt_model(pretrained) else pretrained


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
        out = at_least(self, "optim", weight_decay=0, warmup_steps=0)
        if not self.lr > 0:
            out.append(f"optim.lr: {self.lr} must be > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            out.append(f"optim.betas: {self.betas} must be two numbers in [0, 1)")
        if not self.eps > 0:
            out.append(f"optim.eps: {self.eps} must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            out.append(f"optim.min_lr_ratio: {self.min_lr_ratio} must be in [0, 1]")
        if self.grad_clip < 0:
            out.append(f"optim.grad_clip: {self.grad_clip} must be >= 0 (0 = off)")
        return out


@dataclass
class EvalConfig:
    every: int = doc(250, "evaluate every N steps and at the end; 0 = only at the end")
    batches: int = doc(4, "held-out micro-batches per rank for the per-segment loss")
    memory_task_segments: list[int] = doc(text="segment counts for answer accuracy (memory tasks: "
                                          "their mixture; babilong: each task)",
                                          factory=lambda: [2, 4])
    memory_task_samples: int = doc(256, "answer-accuracy samples per segment count and set "
                                   "(split over ranks)")

    def problems(self) -> list[str]:
        out = at_least(self, "eval", every=0, batches=0, memory_task_samples=1)
        if any(n < 1 for n in self.memory_task_segments):
            out.append(f"eval.memory_task_segments: {self.memory_task_segments} must all be >= 1")
        return out


@dataclass
class CheckpointConfig:
    every: int = doc(500, "save every N steps (and always at the end); 0 = only at the end")
    keep_last: int = doc(3, "complete checkpoints to keep (the newest complete one is never "
                         "deleted)")
    resume: str = doc("auto", "auto (newest complete checkpoint of this run, if any), never, or a "
                      "checkpoint folder path")
    keep_best: str = doc("", "eval metric (e.g. eval/memory_exact_match_64seg) whose best "
                         "checkpoint is kept out of keep_last pruning and recorded in "
                         "runs_dir/name/best_checkpoint.json (training/checkpoint_select.py); "
                         "empty = off")
    best_mode: Literal["max", "min"] = doc("max", "whether a higher (max) or a lower (min) "
                                           "keep_best is better")

    def problems(self) -> list[str]:
        out = at_least(self, "checkpoint", every=0, keep_last=1)
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
    progress_bar: bool = doc(True, "tqdm progress bar on rank 0 when its stderr is a terminal; "
                             "otherwise (or false) a plain progress line every logging.every steps")
    peak_tflops: Optional[float] = doc(None, "per-device peak TFLOP/s for MFU; null = from the "
                                       "GPU name when known (MFU is GPU-only)")
    wandb: bool = doc(False, "also log the scalars and the resolved config to Weights & Biases "
                      "(rank 0; a resumed run continues its W&B run)")
    wandb_project: Optional[str] = doc(None, "W&B project (null = WANDB_PROJECT, else W&B's "
                                       "default)")
    wandb_entity: Optional[str] = doc(None, "W&B entity: user or team (null = WANDB_ENTITY, else "
                                      "the API key's default)")
    wandb_run_name: Optional[str] = doc(None, "W&B run name (null = run.name)")
    wandb_mode: Optional[Literal["online", "offline"]] = doc(
        None, "online, offline (sync later with `wandb sync`) or null = WANDB_MODE, else online")

    def problems(self) -> list[str]:
        out = at_least(self, "logging", every=1)
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            out.append(f"logging.peak_tflops: {self.peak_tflops} must be > 0 or null")
        for name in ("wandb_project", "wandb_entity", "wandb_run_name"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                out.append(f"logging.{name}: empty; give a name or null")
        if self.wandb:
            import importlib.util

            # find_spec locates the package without importing it (a run without W&B never does).
            if importlib.util.find_spec("wandb") is None:
                out.append("logging.wandb: true, but the wandb package is not installed; "
                           "pip install -r requirements.txt, or set logging.wandb=false")
        return out


@dataclass
class GuardConfig:
    max_nonfinite_in_a_row: int = doc(5, "abort after this many consecutive non-finite steps")

    def problems(self) -> list[str]:
        return at_least(self, "guard", max_nonfinite_in_a_row=1)


@dataclass
class ExportConfig:
    license: str = doc("apache-2.0", "model card license: a hub license identifier (mit, "
                       "cc-by-4.0, llama3.1, ...; training/config/hub_licenses.py)")
    tags: list[str] = doc(text="model card tags besides rmt, recurrent-memory-transformer and "
                          "custom_code", factory=list)

    def problems(self) -> list[str]:
        from training.config.hub_licenses import HUB_LICENSES

        out = []
        if self.license not in HUB_LICENSES:
            out.append(f"export.license: {self.license!r} is not a hub license identifier; valid "
                       f"are {', '.join(HUB_LICENSES)}")
        bad = [t for t in self.tags if not isinstance(t, str) or not t or any(c.isspace() or
                                                                                c == "," for c in t)]
        if bad:
            out.append(f"export.tags: {bad} must be non-empty strings without spaces or commas")
        return out


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
    export: ExportConfig = doc(text="", factory=ExportConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.runs_dir) / self.run.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat_dict(self) -> dict[str, object]:
        """Every setting under its dotted key (optim.lr, ...); lists and nulls as they are."""
        return dict(flatten(self.to_dict()))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
