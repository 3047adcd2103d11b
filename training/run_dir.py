"""The run folder, runs/NAME: the one place that names its files, and the one reader of them.

    runs/NAME/
      config.yaml                  resolved run config (training.pretrain)
      train.log                    rank 0's log (training.monitor)
      metrics.jsonl                one JSON line of metrics per logged step (training.monitor)
      tensorboard/                 event files (rank 0)
      wandb_run_id                 the W&B run a resumed run continues (logging.wandb)
      wandb/                       W&B's local files (logging.wandb, when WANDB_DIR is not set)
      tokenizer/                   the run's tokenizer (AutoTokenizer.from_pretrained loads it)
      checkpoints/step_XXXXXXXX/   one checkpoint, written by training.checkpoint:
        rmt_config.json            RMTConfig.to_dict() of the model being trained
        client_state.json          step, tokens seen, curriculum, metrics, world size
        rank_XXXXX.json            each rank's data position and RNG
        COMPLETE                   the manifest, written last: only then is the checkpoint used
      export/                      Hugging Face folder written at the end of the run

Here: those names, listing and resolving complete checkpoints (resume, export, evaluate), the
checkpoints' JSON files, and the model (weights consolidated from any ZeRO stage) and tokenizer
a run holds, or an exported folder. How a checkpoint is written and checked against its manifest
is training.checkpoint's.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

CONFIG_FILE = "config.yaml"
LOG_FILE = "train.log"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"
TOKENIZER_DIR = "tokenizer"
CHECKPOINTS_DIR = "checkpoints"
EXPORT_DIR = "export"
# Inside a checkpoint folder.
RMT_CONFIG_FILE = "rmt_config.json"
CLIENT_STATE_FILE = "client_state.json"
COMPLETE_MARKER = "COMPLETE"
STEP_DIR_PATTERN = re.compile(r"^step_(\d{8})$")


class RunDirError(RuntimeError):
    """A run folder or one of its checkpoints cannot be used; the message names the folder/file
    and what is wrong. (training.checkpoint raises it as CheckpointError.)"""


class RunDir:
    """The paths of one run folder (`path`: runs/NAME)."""

    def __init__(self, path):
        self.path = Path(path)
        self.config = self.path / CONFIG_FILE
        self.log = self.path / LOG_FILE
        self.metrics = self.path / METRICS_FILE
        self.tensorboard = self.path / TENSORBOARD_DIR
        self.wandb_id = self.path / WANDB_ID_FILE
        self.tokenizer = self.path / TOKENIZER_DIR
        self.checkpoints = self.path / CHECKPOINTS_DIR
        self.export = self.path / EXPORT_DIR


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file_name(rank: int) -> str:
    return f"rank_{rank:05d}.json"


# --------------------------------------------------------------------------- checkpoints


def is_complete(ckpt_dir: Path) -> bool:
    return (ckpt_dir / COMPLETE_MARKER).is_file()


def step_dirs(checkpoints_root: Path) -> dict[int, Path]:
    """step -> folder for every step_XXXXXXXX folder, complete or not."""
    found = {}
    if checkpoints_root.is_dir():
        for child in checkpoints_root.iterdir():
            match = STEP_DIR_PATTERN.match(child.name)
            if match and child.is_dir():
                found[int(match.group(1))] = child
    return found


def complete_checkpoints(checkpoints_root: Path) -> dict[int, Path]:
    return {s: d for s, d in step_dirs(checkpoints_root).items() if is_complete(d)}


def newest_complete(checkpoints_root: Path) -> Optional[Path]:
    done = complete_checkpoints(checkpoints_root)
    return done[max(done)] if done else None


def resolve_resume(checkpoints_root: Path, resume: str) -> Optional[Path]:
    """The checkpoint a run resumes from (checkpoint.resume): `auto` = the newest complete one
    under the run's checkpoints folder (None if there is none), `never` = None, else the named
    folder, which must be complete. Never DeepSpeed's `latest` file, never an older checkpoint
    behind the user's back."""
    if resume == "never":
        return None
    if resume == "auto":
        return newest_complete(checkpoints_root)
    ckpt = Path(resume)
    if not is_complete(ckpt):
        raise RunDirError(f"checkpoint.resume: {ckpt} has no {COMPLETE_MARKER} marker; "
                          f"give a complete checkpoint folder")
    return ckpt


def resolve_checkpoint(run_dir: Path, step: int | None) -> Path:
    """The complete checkpoint of `run_dir` at `step` (None: the newest) that export and
    evaluate read."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise RunDirError(f"--run {run.path}: no such directory (expected runs/NAME written by training.pretrain)")
    available = complete_checkpoints(run.checkpoints)
    if not available:
        raise RunDirError(
            f"--run {run.path}: no complete checkpoint under {run.checkpoints} "
            f"(expected step_XXXXXXXX/ directories containing a {COMPLETE_MARKER} marker)"
        )
    if step is None:
        return available[max(available)]
    if step not in available:
        raise RunDirError(f"--step {step}: no complete checkpoint at that step; complete steps are {sorted(available)}")
    return available[step]


def read_json(path: Path) -> dict:
    """One JSON file of a complete checkpoint."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunDirError(f"{path}: missing from a checkpoint marked complete") from None
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path}: not valid JSON ({e})") from None


# --------------------------------------------------------------------------- what a run holds


def read_run_config(run_dir: Path) -> dict:
    """The run's resolved config.yaml as written (a plain mapping)."""
    import yaml

    path = RunDir(run_dir).config
    if not path.is_file():
        raise RunDirError(f"{path}: missing (training.pretrain writes the resolved config there)")
    with open(path) as f:
        return yaml.safe_load(f) or {}


def load_tokenizer(run_dir: Path):
    from transformers import AutoTokenizer

    tokenizer_dir = RunDir(run_dir).tokenizer
    if not tokenizer_dir.is_dir():
        raise RunDirError(f"{tokenizer_dir}: missing (training.pretrain saves the run's tokenizer there)")
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@contextmanager
def _tqdm_off_unless_terminal(module):
    """DeepSpeed's zero_to_fp32 draws tqdm bars ("Loading checkpoint shards", "Gathering sharded
    weights") and has no switch for them; into a log file every redraw is noise. Its module's
    `tqdm` is swapped for a disabled one while it runs, unless stderr is a terminal."""
    if sys.stderr is not None and sys.stderr.isatty():
        yield
        return
    original = module.tqdm
    module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        module.tqdm = original


def consolidate_checkpoint(checkpoint_dir: Path) -> dict:
    """One fp32 state dict from a DeepSpeed checkpoint of any ZeRO stage."""
    import torch

    if any(checkpoint_dir.glob("*_optim_states.pt")):
        # ZeRO 1-3: the fp32 master partitions live in the optimizer files of every rank.
        from deepspeed.utils import zero_to_fp32

        with _tqdm_off_unless_terminal(zero_to_fp32):
            return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir.parent),
                                                                         tag=checkpoint_dir.name)
    model_states = checkpoint_dir / "mp_rank_00_model_states.pt"
    if model_states.is_file():
        # ZeRO 0: rank 0 saved the whole module.
        module = torch.load(model_states, map_location="cpu", weights_only=True)["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    raise RunDirError(f"{checkpoint_dir}: neither *_optim_states.pt (ZeRO 1-3) nor mp_rank_00_model_states.pt (ZeRO 0)")


def load_checkpoint_model(checkpoint_dir: Path, device=None, dtype=None):
    """RMTForCausalLM (eval mode) holding the consolidated weights of a checkpoint: fp32 on the
    CPU unless `device`/`dtype` (torch) say otherwise."""
    from model import RMTConfig, RMTForCausalLM

    config = RMTConfig.from_dict(read_json(checkpoint_dir / RMT_CONFIG_FILE))
    model = RMTForCausalLM(config).float()
    state_dict = consolidate_checkpoint(checkpoint_dir)
    # DeepSpeed's consolidation and module state dicts both list tied weights under every name.
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise RunDirError(
            f"{checkpoint_dir}: weights do not match {RMT_CONFIG_FILE} (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return to_compute(model, device, dtype).eval()


def to_compute(model, device=None, dtype=None):
    """`model` moved to `device` with its parameters (not its buffers) cast to `dtype`.

    Buffers keep their precision, as `from_pretrained(dtype=...)` leaves them (rotary frequencies
    stay fp32), so a checkpoint model and its exported folder loaded in the same dtype compute
    the same thing.
    """
    if dtype is not None:
        for param in model.parameters():
            if param.is_floating_point():
                param.data = param.data.to(dtype)
    if device is not None:
        model.to(device)
    return model


# --------------------------------------------------------------------------- a model to evaluate


@dataclass
class ModelSource:
    """An exported folder or a run, found without loading any weights."""

    path: Path
    kind: str  # "export" or "run"
    segment_size: int
    checkpoint: Path | None = None  # runs: the newest complete checkpoint
    run_config_path: Path | None = None


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    description: dict


def find_model(path: Path) -> ModelSource:
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        return ModelSource(path, "export", int(config["segment_size"]))
    run = RunDir(path)
    if run.checkpoints.is_dir():
        checkpoint = resolve_checkpoint(path, None)
        config = read_json(checkpoint / RMT_CONFIG_FILE)
        return ModelSource(path, "run", int(config["segment_size"]), checkpoint, run.config)
    raise RunDirError("neither an exported folder (config.json) nor a run (checkpoints/)")


def load_model(source: ModelSource, device=None, dtype=None) -> LoadedModel:
    """An exported folder (through its shipped remote code) or a run's newest checkpoint, on
    `device` in `dtype` (torch; default: the CPU in fp32)."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    if source.kind == "export":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import model as rmt_package

        # The in-repo model is registered with the Auto classes whenever evaluation runs (as it
        # always was when importing the package did it); said here, not left to an import order.
        rmt_package.register_auto_classes()
        model = AutoModelForCausalLM.from_pretrained(source.path, trust_remote_code=True, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=True)
        model = to_compute(model, device)
        return LoadedModel(model.eval(), tokenizer, {"model": str(source.path), "kind": "export"})
    model = load_checkpoint_model(source.checkpoint, device, dtype)
    tokenizer = load_tokenizer(source.path)
    step = read_json(source.checkpoint / CLIENT_STATE_FILE).get("step")
    return LoadedModel(model, tokenizer, {"model": str(source.path), "kind": "run",
                                          "checkpoint": source.checkpoint.name, "step": step})
