"""Checkpoints that are either complete or ignored (SPEC 2.5, docs/architecture.md).

Layout of one checkpoint, `runs/NAME/checkpoints/step_XXXXXXXX/`:
  DeepSpeed's files (every rank)      model/optimizer partitions
  rank_XXXXX.json (every rank)        data pipeline position and torch/numpy/python RNG
  rmt_config.json, client_state.json  (rank 0) model config; step, tokens, curriculum, metrics
  COMPLETE                            (rank 0) written last, atomically, after a barrier

Resume reads only checkpoints with COMPLETE, never DeepSpeed's `latest` file (written before
all ranks finish); training.run_dir names these files and finds and reads complete checkpoints.
COMPLETE holds a manifest (every file's size), so a checkpoint damaged after it was written is
refused with the file named instead of half-loaded. Nothing here unpickles:
our files are JSON, RNG states included.

`CheckpointManager.save` reports each of its SAVE_PHASES to an `on_phase` callback (the trainer's
`checkpoint_phase` hook point, training/hooks.py), so tests can interrupt a save at every point.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from training import elastic
from training.data.pipeline import world_state
from training.run_dir import (CLIENT_STATE_FILE, COMPLETE_MARKER, RMT_CONFIG_FILE, RunDir,
                              complete_checkpoints, rank_file_name, read_json, step_dir_name,
                              step_dirs)
from training.run_dir import RunDirError as CheckpointError

# The points of CheckpointManager.save, in order, reported to its `on_phase` (a test may kill a
# rank at any of them).
# (Before the first and after the last, a crash is a crash between steps: nothing of this save.)
SAVE_PHASES = ("model_files", "rank_file_partial", "rank_file", "before_marker", "marker_partial",
               "after_marker")


def write_atomic(path: Path, text: str, halfway: Callable[[], None] = lambda: None) -> None:
    """Write via a temp file, fsync it, rename over `path`, fsync the folder.

    `halfway` runs when half the text is on disk (a save phase, see SAVE_PHASES)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        half = len(text) // 2
        f.write(text[:half])
        f.flush()
        halfway()
        f.write(text[half:])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json_atomic(path: Path, obj: Any, halfway: Callable[[], None] = lambda: None) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n", halfway)


def file_sizes(ckpt_dir: Path) -> dict[str, int]:
    """Relative path -> size of every file of a checkpoint (the marker and temp files excluded)."""
    return {str(p.relative_to(ckpt_dir)): p.stat().st_size for p in sorted(ckpt_dir.rglob("*"))
            if p.is_file() and p.name != COMPLETE_MARKER and not p.name.startswith(".")}


def verify_checkpoint_files(ckpt_dir: Path) -> dict:
    """Check a complete checkpoint's files against its manifest; return its client state.

    Raises CheckpointError naming the folder/file when the marker is missing or not a manifest,
    or a file is missing or has another size than when it was saved (truncated, replaced)."""
    marker = ckpt_dir / COMPLETE_MARKER
    if not marker.is_file():
        raise CheckpointError(f"{ckpt_dir}: no {COMPLETE_MARKER} marker, so it is not a complete "
                              f"checkpoint; give a step_XXXXXXXX folder that has one")
    try:
        manifest = json.loads(marker.read_text())
    except ValueError:
        manifest = None
    expected = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(expected, dict):
        raise CheckpointError(f"{marker}: not a checkpoint manifest (JSON with 'files'); the "
                              f"folder was not written by training.pretrain")
    found = file_sizes(ckpt_dir)
    for name, size in sorted(expected.items()):
        if name not in found:
            raise CheckpointError(f"{ckpt_dir / name}: listed in {marker} but missing; the "
                                  f"checkpoint is damaged, resume from another one "
                                  f"(checkpoint.resume=PATH) or move it away")
        if found[name] != size:
            raise CheckpointError(f"{ckpt_dir / name}: {found[name]} bytes, {size} when saved "
                                  f"(truncated or replaced); resume from another checkpoint "
                                  f"(checkpoint.resume=PATH) or move it away")
    client_state = read_json(ckpt_dir / CLIENT_STATE_FILE)
    if not isinstance(client_state.get("world_size"), int):
        raise CheckpointError(f"{ckpt_dir / CLIENT_STATE_FILE}: no world_size; the folder was "
                              f"not written by training.pretrain")
    return client_state


def verify_checkpoint(ckpt_dir: Path, world_size: int, reshard: bool, *,
                      zero_stage: Optional[int] = None, global_batch_size: Optional[int] = None,
                      elastic_shards: int = 0) -> dict:
    """verify_checkpoint_files, then whether this job (world size, ZeRO stage, global batch,
    data shards) can continue it (training.elastic); return its client state. `zero_stage`
    None: the checkpoint's (no stage change)."""
    client_state = verify_checkpoint_files(ckpt_dir)
    rank0 = ckpt_dir / rank_file_name(0)
    data_state = read_json(rank0).get("data") if rank0.is_file() else None
    why = elastic.refusal(client_state, world_size=world_size, zero_stage=zero_stage,
                          global_batch_size=global_batch_size, data_state=data_state,
                          elastic_shards=elastic_shards, reshard=reshard)
    if why:
        raise CheckpointError(f"{ckpt_dir}: {why}")
    return client_state


# --------------------------------------------------------------------------------------------
# RNG states as JSON
# --------------------------------------------------------------------------------------------

def rng_state() -> dict:
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": [py_version, list(py_internal), py_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # Dropout and memory noise on a GPU draw from the device's generator, not the CPU one.
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def seed_rng(seed: int, rank: int, step: int = 0) -> None:
    """Seed torch (CUDA included), numpy and random from (seed, rank) alone: what setup drew from
    them before differs between ranks and launchers, and dropout and memory noise draw from torch.
    `step` > 0: the RNG re-derived after a change of world size (training.elastic)."""
    mixed = (elastic.rederived_seed(seed, step) * 1_000_003 + rank) % 2**32
    torch.manual_seed(mixed)
    np.random.seed(mixed)
    random.seed(mixed)


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# --------------------------------------------------------------------------------------------
# Save / load / prune
# --------------------------------------------------------------------------------------------

class CheckpointManager:
    """Saves and finds the checkpoints of one run; `barrier` synchronises all ranks. `protect()`
    (rank 0, after each save) names steps pruning must keep besides the newest `keep_last`: the
    best one by an eval metric (checkpoint.keep_best, training/checkpoint_select.py)."""

    def __init__(self, run_dir: Path, rank: int, keep_last: int, barrier: Callable[[], None],
                 protect: Callable[[], set[int]] = set):
        self.root = RunDir(run_dir).checkpoints
        self.rank = rank
        self.keep_last = keep_last
        self.barrier = barrier
        self.protect = protect

    def save(self, engine, step: int, client_state: dict, rank_state: dict, rmt_config: dict,
             on_phase: Callable[[str], None] = lambda phase: None) -> Path:
        """Collective: every rank calls it at the same step. `on_phase(phase)` runs at each of
        SAVE_PHASES this rank reaches."""
        ckpt = self.root / step_dir_name(step)
        if self.rank == 0 and ckpt.exists():
            # A folder at a step we are about to save is the leftover of a crashed save (resume
            # starts from the newest complete one) or of a run the user chose not to resume.
            shutil.rmtree(ckpt)
        self.barrier()
        engine.save_checkpoint(str(self.root), tag=ckpt.name, save_latest=False)
        on_phase("model_files")
        write_json_atomic(ckpt / rank_file_name(self.rank), rank_state,
                          lambda: on_phase("rank_file_partial"))
        on_phase("rank_file")
        if self.rank == 0:
            write_json_atomic(ckpt / RMT_CONFIG_FILE, rmt_config)
            write_json_atomic(ckpt / CLIENT_STATE_FILE, client_state)
        self.barrier()  # every rank's files are on disk before the marker says so
        if self.rank == 0:
            on_phase("before_marker")
            write_json_atomic(ckpt / COMPLETE_MARKER, {"step": step, "files": file_sizes(ckpt)},
                              lambda: on_phase("marker_partial"))
            on_phase("after_marker")
            self.prune()
        self.barrier()
        return ckpt

    def prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints and the protected ones; drop older
        partial ones."""
        done = sorted(complete_checkpoints(self.root))
        if not done:
            return
        keep = set(done[-self.keep_last:]) | self.protect()
        for step, folder in step_dirs(self.root).items():
            if step not in keep and step < done[-1]:
                shutil.rmtree(folder, ignore_errors=True)

    def load(self, engine, ckpt: Path, universal: Optional[Path] = None) -> tuple[dict, dict]:
        """Restore the engine; return (client_state, this rank's state). `universal`: the
        checkpoint's universal folder (training.universal), for a job on another world size or
        ZeRO stage; this rank's state is then the one of the saved rank with the same number, or
        rank 0's (the caller re-derives what depends on the rank)."""
        rank_path = ckpt / rank_file_name(self.rank)
        if universal is not None and not rank_path.is_file():
            rank_path = ckpt / rank_file_name(0)
        if not rank_path.is_file():
            saved = sorted(p.name for p in ckpt.glob("rank_*.json"))
            raise CheckpointError(
                f"{ckpt}: no {rank_path.name} for rank {self.rank} (saved: {saved}); resume with the "
                f"world size the checkpoint was written with ({len(saved)})")
        client_state = read_json(ckpt / CLIENT_STATE_FILE)
        rank_state = read_json(rank_path)
        if universal is not None:  # a new world continues the old one's data as a whole
            rank_state["data"] = world_state([read_json(ckpt / rank_file_name(r))["data"]
                                              for r in range(client_state["world_size"])])
        load_dir, tag = (ckpt.parent, ckpt.name) if universal is None else (ckpt, universal.name)
        # DeepSpeed reads the universal layout only when its engine config says so; the flag is
        # raised for this one load (the engine's later saves and loads are native).
        engine._config.load_universal_checkpoint = universal is not None
        # DeepSpeed's ZeRO-3 universal load gives every param group the hyperparameters of the
        # first (weight decay included, so the no-decay group would decay); they come from the
        # config, not the checkpoint, so the ones the engine was built with are put back.
        groups = [{k: v for k, v in g.items() if k != "params"}
                  for g in engine.optimizer.param_groups]
        try:
            load_path, _ = engine.load_checkpoint(str(load_dir), tag=tag,
                                                  load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        except (OSError, EOFError, RuntimeError, KeyError, ValueError, IndexError,
                AssertionError) as e:  # DeepSpeed asserts on layouts it cannot read
            raise CheckpointError(f"{ckpt}: DeepSpeed could not load it ({type(e).__name__}: "
                                  f"{e})") from e
        finally:
            engine._config.load_universal_checkpoint = False
        if universal is not None:
            for group, hyper in zip(engine.optimizer.param_groups, groups):
                group.update(hyper)
            # ZeRO-3's universal load hands one step tensor to every sub-group's Adam state;
            # torch's AdamW increments it in place, once per sub-group, so without own copies
            # the bias correction runs ahead (seen: loss off by 2.7e-3 after 6 steps on 1 rank).
            inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
            for state in inner.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
        if load_path is None:
            raise CheckpointError(f"{ckpt}: DeepSpeed could not load it")
        return client_state, rank_state
