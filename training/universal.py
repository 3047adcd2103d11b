"""DeepSpeed universal checkpoints, converted once and cached inside the checkpoint folder.

    python -m training.universal --run runs/NAME [--step N]

converts a complete checkpoint (default: the newest) ahead of time; training.pretrain does the
same by itself when it resumes on another world size or ZeRO stage (training.elastic).

The conversion is DeepSpeed's own (deepspeed.checkpoint.ds_to_universal): every parameter's fp32
master weights and Adam moments, whole, under `step_XXXXXXXX/universal/zero/NAME/`. It is
written like every checkpoint: into a hidden temp folder, every file fsynced, a COMPLETE manifest
written atomically, then renamed to `universal/` and the parent folder fsynced. A `universal/`
folder therefore exists only complete; a crash leaves at most the temp folder, which the next
conversion removes. Each step is reported to `on_phase` (CONVERT_PHASES; the trainer's
checkpoint_phase hook point) so tests can interrupt it anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

from training.checkpoint import (CheckpointError, file_sizes, verify_checkpoint_files,
                                 write_json_atomic)
from training.run_dir import COMPLETE_MARKER, resolve_checkpoint

UNIVERSAL_DIR = "universal"
TEMP_PREFIX = ".universal.tmp-"
# In order; after "convert_files" the temp folder holds DeepSpeed's whole output, unmarked.
CONVERT_PHASES = ("convert_files", "convert_marker_partial", "convert_before_rename",
                  "convert_done")


def universal_dir(ckpt: Path) -> Path:
    return ckpt / UNIVERSAL_DIR


def is_converted(ckpt: Path) -> bool:
    return (universal_dir(ckpt) / COMPLETE_MARKER).is_file()


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):  # files before the folders holding them
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# DeepSpeed's universal load reads only the engine's metadata from a model-states file (the
# weights come from zero/), but looks for it under the name of the *loading* engine's stage:
# ZeRO-1/2 `mp_rank_00_model_states.pt`, ZeRO-3 `zero_pp_rank_0_mp_rank_00_model_states.pt`.
# ds_to_universal copies the source's own, so without a copy under the other name a stage change
# from 3 to 1/2 fails inside DeepSpeed (AssertionError: no checkpoint file). The way back, 1/2 to
# 3, needs the ZeRO-3 optimizer layout and is refused (training.elastic).
STAGE12_MODEL_STATES = "mp_rank_00_model_states.pt"
STAGE3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"


def _deepspeed_globals() -> list:
    """The DeepSpeed classes its optimizer state pickles (loss scaler, stage enum): allowed
    by name for torch.load(weights_only=True); nothing else is unpickled."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [LossScaler, DynamicLossScaler, ZeroStageEnum]


def _adapt_stage3_for_stage12(folder: Path) -> None:
    """Make a universal folder converted from ZeRO-3 loadable by a ZeRO-1/2 engine too.

    DeepSpeed 0.19's ZeRO-1/2 universal load differs from its ZeRO-3 one in three places that
    ds_to_universal leaves to the source's layout: the model-states file name (above), a
    `ds_version` in zero/optimizer_state.pt (ZeRO-3 writes none; the 1/2 load asserts it), and
    Adam's step count, which the 1/2 load reads from zero/NAME/step.pt while ZeRO-3 keeps one
    for all parameters in the optimizer state; and each state's tensor is stored flat. The
    values are copied from the source, unchanged."""
    import torch

    if not (folder / STAGE3_MODEL_STATES).is_file():
        return
    shutil.copyfile(folder / STAGE3_MODEL_STATES, folder / STAGE12_MODEL_STATES)
    meta = torch.load(folder / STAGE3_MODEL_STATES, map_location="cpu", weights_only=True)
    optim_path = folder / "zero" / "optimizer_state.pt"
    with torch.serialization.safe_globals(_deepspeed_globals()):
        optim = torch.load(optim_path, map_location="cpu", weights_only=True)
    optim.setdefault("ds_version", meta["ds_version"])
    torch.save(optim, optim_path)
    step = optim["optimizer_state_dict"]["state"][0]["step"]
    shapes = {name: shape for group in meta["param_shapes"] for name, shape in group.items()}
    for param_dir in (folder / "zero").iterdir():
        if not param_dir.is_dir():
            continue
        torch.save(step, param_dir / "step.pt")
        # ZeRO-3 stores each state flat; the 1/2 load wants {"param": tensor of the param's
        # shape} (ZeRO-3's load reads both forms).
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            flat = torch.load(param_dir / f"{key}.pt", map_location="cpu", weights_only=True)
            torch.save({"param": flat.view(shapes[param_dir.name])}, param_dir / f"{key}.pt")


def convert(ckpt: Path, on_phase: Callable[[str], None] = lambda phase: None) -> Path:
    """The universal folder of complete checkpoint `ckpt`, converting it unless that was done.
    One process (rank 0) calls it; raises CheckpointError when DeepSpeed cannot convert it."""
    target = universal_dir(ckpt)
    if is_converted(ckpt):
        return target
    if not any(ckpt.glob("*_optim_states.pt")):
        raise CheckpointError(f"{ckpt}: no ZeRO optimizer partitions (*_optim_states.pt); only "
                              f"ZeRO 1-3 checkpoints convert to DeepSpeed's universal format")
    for leftover in ckpt.glob(TEMP_PREFIX + "*"):  # an interrupted conversion
        shutil.rmtree(leftover)
    if target.exists():  # cannot be complete (checked above): never load it, never keep it
        shutil.rmtree(target)
    tmp = ckpt / f"{TEMP_PREFIX}{os.getpid()}"
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(ckpt), output_folder=str(tmp),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                              strict=True, inject_missing_state=False)
    try:
        ds_to_universal.main(args)
    except (OSError, RuntimeError, KeyError, ValueError, AssertionError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{ckpt}: DeepSpeed could not convert it to a universal checkpoint "
                              f"({type(e).__name__}: {e})") from e
    _adapt_stage3_for_stage12(tmp)
    _fsync_tree(tmp)
    on_phase("convert_files")
    write_json_atomic(tmp / COMPLETE_MARKER, {"source": ckpt.name, "files": file_sizes(tmp)},
                      lambda: on_phase("convert_marker_partial"))
    on_phase("convert_before_rename")
    os.replace(tmp, target)
    dir_fd = os.open(ckpt, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    on_phase("convert_done")
    return target


def verify_converted(ckpt: Path) -> Path:
    """The universal folder of `ckpt`, checked against its manifest."""
    target = universal_dir(ckpt)
    marker = target / COMPLETE_MARKER
    try:
        expected = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{marker}: missing or not a manifest; the universal checkpoint is "
                              f"incomplete (remove {target} to convert again)") from None
    found = file_sizes(target)
    for name, size in expected.items():
        if found.get(name) != size:
            raise CheckpointError(f"{target / name}: missing or {found.get(name)} bytes, {size} "
                                  f"when converted; remove {target} to convert again")
    return target


def prepare(ckpt: Path, rank: int, all_reduce_sum: Callable, on_phase: Callable[[str], None]
            ) -> Path:
    """Collective: rank 0 converts `ckpt` (or finds it converted), every rank learns whether that
    worked (one all-reduce, so no rank waits on a barrier rank 0 never reaches), and gets the
    checked universal folder. Raises CheckpointError on every rank when it failed."""
    import torch

    error = None
    if rank == 0:
        try:
            convert(ckpt, on_phase)
        except CheckpointError as e:
            error = e
    failed = float(all_reduce_sum(torch.tensor([float(error is not None)]))[0]) > 0
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(f"{ckpt}: rank 0 could not convert it to a universal checkpoint "
                              f"(its message says why)")
    return verify_converted(ckpt)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.universal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="run folder (runs/NAME)")
    parser.add_argument("--step", type=int, default=None,
                        help="the complete checkpoint to convert (default: the newest)")
    args = parser.parse_args(argv)
    try:
        ckpt = resolve_checkpoint(args.run, args.step)
        verify_checkpoint_files(ckpt)
        target = convert(ckpt)
        verify_converted(ckpt)
    except CheckpointError as e:
        print(f"cannot convert: {e}", file=sys.stderr)
        return 2
    print(f"universal checkpoint: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
