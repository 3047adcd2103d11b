"""Elastic resume: which checkpoints may continue on another world size or ZeRO stage, and how.

A checkpoint records the world size, ZeRO stage and global batch it was trained with
(client_state.json). Resuming with the same world size and stage loads DeepSpeed's own files
("native"). Otherwise the run continues from DeepSpeed's universal checkpoint (training.universal
converts once and caches it in the checkpoint folder), provided that:

  - both stages are ZeRO 1-3: the universal format is built from ZeRO's per-parameter fp32
    fragments and Adam moments; a ZeRO-0 checkpoint has none, and DeepSpeed's universal load
    needs a ZeRO optimizer to place them;
  - the global batch is the checkpoint's: the learning-rate schedule, the curriculum and the data
    position are counted in optimizer steps of that batch (accumulation is re-derived for the new
    world by BatchConfig.for_world);
  - the data can continue exactly: the memory-task and babilong corpora are indexed by global
    sample, so they continue at the very next sample; streamed text is read as the data shards
    the run started with (data.elastic_shards, training/data/shards.py), which any world of up
    to that many ranks continues shard by shard; more ranks need data.reshard=true, which
    restarts every source at its next epoch (docs/reliability.md, section 9).

RNG after such a change is re-derived from (run.seed, step, rank): the per-rank generator states
of the old world have no counterpart in the new one.

Pure functions of the saved and the current settings; nothing here touches files.
"""

from __future__ import annotations

from typing import Optional

NATIVE = "native"
UNIVERSAL = "universal"


def resume_mode(saved: dict, world_size: int, zero_stage: Optional[int]) -> str:
    """NATIVE when the checkpoint was written by this world size and ZeRO stage, else UNIVERSAL
    (check `refusal` first). `zero_stage` None: the checkpoint's."""
    same_stage = zero_stage is None or saved.get("zero_stage", zero_stage) == zero_stage
    return NATIVE if saved.get("world_size") == world_size and same_stage else UNIVERSAL


def refusal(saved: dict, *, world_size: int, zero_stage: Optional[int],
            global_batch_size: Optional[int], data_state: Optional[dict] = None,
            elastic_shards: int = 0, reshard: bool = False) -> Optional[str]:
    """Why a checkpoint with client state `saved` (and rank 0's saved `data_state`) cannot
    continue on this job, or None. `elastic_shards`: this job's data.elastic_shards.

    Apart from the data shards (fixed for a run), only a change of world size or stage is
    judged here; None and NATIVE when nothing changed."""
    data = data_state or {}
    shards = data.get("shards") if data.get("kind") == "text" else None
    if shards is not None and elastic_shards and elastic_shards != shards:
        return (f"data.elastic_shards: {elastic_shards}, but the run started with {shards} data "
                f"shards, which it keeps for good: set 0 or {shards}")
    if resume_mode(saved, world_size, zero_stage) == NATIVE:
        return None
    old_world, old_stage = saved.get("world_size"), saved.get("zero_stage")
    was = f"written by {old_world} rank(s)" + (f" with ZeRO-{old_stage}" if old_stage is not None
                                              else "")
    now = f"this job has {world_size} rank(s)" + (f" with ZeRO-{zero_stage}"
                                                 if zero_stage is not None else "")
    same = f"launch {old_world} rank(s)" + (f" with deepspeed.zero_stage={old_stage}"
                                            if old_stage is not None else "")
    if old_stage is None:
        return (f"{was}, {now}; the checkpoint does not record its ZeRO stage (written before "
                f"elastic resume existed), so it can only resume as it was: {same}")
    if old_stage == 0 or zero_stage == 0:
        return (f"{was}, {now}; a change of world size or stage needs ZeRO 1-3 on both sides "
                f"(DeepSpeed's universal checkpoint is made of ZeRO's fp32 partitions and Adam "
                f"moments): {same}")
    if old_stage in (1, 2) and zero_stage == 3:
        return (f"{was}, {now}; DeepSpeed's ZeRO-3 universal load needs the optimizer layout "
                f"of a ZeRO-3 checkpoint (one Adam step count in zero/optimizer_state.pt), which "
                f"a ZeRO-{old_stage} checkpoint does not have: keep deepspeed.zero_stage="
                f"{old_stage} (any world size) or {same}")
    old_batch = saved.get("global_batch_size")
    if old_batch is not None and global_batch_size is not None and old_batch != global_batch_size:
        return (f"{was} with a global batch of {old_batch} samples, this job's is "
                f"{global_batch_size}; set batch.global_batch_size={old_batch} so that the "
                f"schedule, curriculum and data position continue (accumulation is derived for "
                f"{world_size} rank(s)), or {same}")
    if data.get("kind") == "text" and not reshard and old_world != world_size:
        if shards is None:
            return (f"{was}, {now}; its text positions were saved before data shards existed "
                    f"and cannot be re-split over another world size: {same}, or set "
                    f"data.reshard=true to restart every source at its next epoch")
        if world_size > shards:
            return (f"{was}, {now}; its text is read as {shards} data shard(s) "
                    f"(data.elastic_shards, fixed when the run started), so at most {shards} "
                    f"rank(s) continue it exactly: launch 1 to {shards} rank(s), or set "
                    f"data.reshard=true to restart every source at its next epoch")
    return None


def rederived_seed(seed: int, step: int) -> int:
    """The seed a run re-derives its RNG from after a change of world size (with the rank, by
    training.checkpoint.seed_rng): a fresh run's at step 0, another one at every step."""
    return (seed + step * 0x9E3779B1) % 2**32
