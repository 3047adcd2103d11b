"""Export a training checkpoint as a Hugging Face model folder, verify it, optionally upload it.

    python -m training.export --run runs/NAME [--step N|best] --out DIR [--push-to-hub REPO_ID [--private]]
                              [--device auto|cpu|cuda|cuda:N] [--dtype auto|fp32|bf16|fp16]

Steps: consolidate the (any ZeRO stage) DeepSpeed checkpoint into one fp32 state dict, load it
into `RMTForCausalLM` built from the checkpoint's `rmt_config.json`, write safetensors + config
with `auto_map` + modeling code + tokenizer + generation config + model card into a temporary
sibling folder, reload that folder in a fresh interpreter that cannot import this repository
and compare its logits with the checkpoint model's, and only then rename it to `--out`.
Nothing half-written ever appears under `--out`.

The weights are written in --dtype and both sides of the reload check run on --device in that
dtype (default: a visible GPU in bf16, else the CPU in fp32, which writes fp32 weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from training.monitor import quiet_hub_progress_bars
from training.compute import Compute, ComputeError, add_compute_args, resolve_compute
from training.checkpoint_select import SELECTOR_HELP, Selector, resolve, selector_arg
from training.config.sections import ExportConfig
from training.export_verify import RELOAD_ATOL, ExportVerificationError, verify_in_fresh_process
from training.model_card import model_card
from training.run_dir import (CLIENT_STATE_FILE, RMT_CONFIG_FILE, RunDir, RunDirError, load_checkpoint_model,
                              load_tokenizer, read_json, read_run_config)

log = logging.getLogger("training.export")


class ExportError(Exception):
    """Bad input (missing run, incomplete checkpoint, occupied output): nothing was written."""


@dataclass
class ExportResult:
    out_dir: Path
    checkpoint_dir: Path
    step: int
    max_abs_logit_diff: float
    files: list[str]
    loaded_class: str
    dtype: str = "fp32"
    commit_url: str | None = None


@dataclass
class ExportInputs:
    """What an export reads besides the weights, all checked before the expensive consolidation."""

    checkpoint_dir: Path
    client_state: dict
    run_config: dict
    tokenizer: object


@contextmanager
def _bad_input():
    """A run folder that lacks what export needs is bad input (exit 2), reported as ExportError."""
    try:
        yield
    except RunDirError as exc:
        raise ExportError(str(exc)) from None


# --------------------------------------------------------------------------- inputs


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out_dir}: exists and is not a directory; choose a new path")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(
            f"--out {out_dir}: already exists and is not an empty directory; choose a new path"
        )


def read_inputs(run_dir: Path, step: int | Selector | None) -> ExportInputs:
    """The checkpoint (`step`, a step number or a --step selection of training/checkpoint_select.py,
    or the newest complete one), its client state, the run's config and tokenizer; rmt_config.json
    is checked to be there."""
    with _bad_input():
        checkpoint_dir = resolve(run_dir, Selector(step=step) if isinstance(step, int) else step)
        client_state = read_json(checkpoint_dir / CLIENT_STATE_FILE)
        if "step" not in client_state:
            raise ExportError(f"{checkpoint_dir / CLIENT_STATE_FILE}: no 'step' field")
        read_json(checkpoint_dir / RMT_CONFIG_FILE)
        run_config = read_run_config(run_dir)
        check_export_section(RunDir(run_dir).config, run_config)
        return ExportInputs(checkpoint_dir, client_state, run_config, load_tokenizer(run_dir))


def check_export_section(config_path: Path, run_config: dict) -> None:
    """The run's `export` section (model card license and tags), as the config gate checks it; a
    config.yaml written before the section existed has none and gets its defaults."""
    section = run_config.get("export") or {}
    valid = ", ".join(f.name for f in dataclasses.fields(ExportConfig))
    if not isinstance(section, dict) or set(section) - {f.name for f in dataclasses.fields(ExportConfig)}:
        raise ExportError(f"{config_path}: export: {section!r} must be a mapping with keys among {valid}")
    problems = ExportConfig(**section).problems()
    if problems:
        raise ExportError(f"{config_path}: " + "; ".join(problems))


def resolve_hub_token() -> str:
    """Token from HF_TOKEN or the login cache; it is handed to huggingface_hub and never logged."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ExportError("--push-to-hub: no Hugging Face token; set HF_TOKEN or run `hf auth login`")
    return token


def check_hub_target(repo_id: str) -> str:
    """The token to push `repo_id` with, once the id is valid."""
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except Exception as exc:  # HFValidationError: explain with the flag name
        raise ExportError(f"--push-to-hub {repo_id!r}: not a valid repo id ('namespace/name'): {exc}") from None
    return resolve_hub_token()


# --------------------------------------------------------------------------- consolidate


def consolidate(inputs: ExportInputs, compute: Compute):
    """The checkpoint's RMTForCausalLM (eval mode) on the device in the dtype to export, with
    generation settings from the tokenizer."""
    log.info("consolidating %s", inputs.checkpoint_dir)
    with _bad_input():
        model = load_checkpoint_model(inputs.checkpoint_dir, compute.device, compute.dtype)
    configure_generation(model, inputs.tokenizer)
    return model


def configure_generation(model, tokenizer) -> None:
    gen = model.generation_config
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.config.bos_token_id = gen.bos_token_id
    model.config.eos_token_id = gen.eos_token_id
    model.config.pad_token_id = gen.pad_token_id


# --------------------------------------------------------------------------- write + verify


def write_folder(model, tokenizer, card, folder: Path, max_shard_size: str) -> None:
    # Ship model/*.py as remote code with auto_map, whichever classes the model package registered.
    type(model.config).register_for_auto_class()
    type(model).register_for_auto_class("AutoModelForCausalLM")
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(folder)
    card.save(folder / "README.md")
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


def replace_dir(new: Path, target: Path) -> None:
    """Move the finished folder to `target`; an old `target` is set aside first, then deleted."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / target.name)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old)


def write_verified(model, tokenizer, card, out_dir: Path, max_shard_size: str) -> tuple[float, str]:
    """Write into a temporary sibling of `out_dir`, verify it, and only then move it to `out_dir`;
    returns (max |logit diff|, the reloaded class). On any failure the staging folder is removed."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        write_folder(model, tokenizer, card, staging, max_shard_size)
        verified = verify_in_fresh_process(model, staging)
        publishable_permissions(staging)
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return verified


# --------------------------------------------------------------------------- push


def push_folder(folder: Path, repo_id: str, private: bool, token: str, message: str) -> str:
    """One commit holding every file of the folder (HfApi.upload_folder); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message, repo_type="model")
    return info.commit_url


# --------------------------------------------------------------------------- orchestration


def export_run(
    run_dir,
    out_dir,
    step: int | Selector | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    device: str = "cpu",
    dtype: str = "fp32",
) -> ExportResult:
    """Export the newest (or `step`) complete checkpoint of `run_dir` to `out_dir`; see module doc.

    overwrite=True replaces an existing export only once the new one is verified (the trainer
    re-exports runs/NAME/export at the end of a resumed run). `device`/`dtype` take the CLI's
    values (training/compute.py); called from Python the export stays on the CPU in fp32 (the
    trainer's end-of-run export keeps the fp32 weights and leaves the GPUs alone).
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    # Every input check comes before consolidation, the expensive part.
    try:
        compute = resolve_compute(device, dtype)
    except ComputeError as exc:
        raise ExportError(str(exc)) from None
    check_output_dir(out_dir, overwrite)
    inputs = read_inputs(run_dir, step)
    token = check_hub_target(push_to_hub) if push_to_hub is not None else None

    quiet_hub_progress_bars()
    model = consolidate(inputs, compute)
    card = model_card(model, inputs.tokenizer, inputs.client_state, inputs.run_config, push_to_hub or str(out_dir))
    diff, loaded_class = write_verified(model, inputs.tokenizer, card, out_dir, max_shard_size)
    files = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    result = ExportResult(out_dir, inputs.checkpoint_dir, int(inputs.client_state["step"]), diff, files, loaded_class,
                          compute.dtype_name)
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
    parser.add_argument("--step", type=selector_arg, default=None, help="checkpoint: " + SELECTOR_HELP)
    parser.add_argument("--out", required=True, type=Path, help="new (or empty) output directory")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                        help="upload the verified folder (token from HF_TOKEN or the login cache)")
    parser.add_argument("--private", action="store_true", help="create the hub repo as private")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    add_compute_args(parser)
    args = parser.parse_args(argv)
    if args.private and args.push_to_hub is None:
        parser.error("--private only applies with --push-to-hub")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        result = export_run(args.run, args.out, args.step, args.push_to_hub, args.private, args.max_shard_size,
                            device=args.device, dtype=args.dtype)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ExportVerificationError as exc:
        print(f"export verification failed: {exc}", file=sys.stderr)
        return 1
    print(f"exported {result.checkpoint_dir} (step {result.step}) -> {result.out_dir}")
    print(f"  {result.dtype} weights, reloaded as {result.loaded_class}; max |logit diff| "
          f"{result.max_abs_logit_diff:.2e} <= {RELOAD_ATOL[result.dtype]}")
    print("  files: " + ", ".join(result.files))
    if result.commit_url:
        print(f"  pushed: {result.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
