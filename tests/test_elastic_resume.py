"""Issue 22, elastic resume: the rules and the data continuation, without training.

The real runs (2 ranks ZeRO-3 -> 1 rank, -> 4 ranks ZeRO-2, a kill during the conversion) are in
tests/test_trainer_runs.py, next to the reference run they continue.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from training import elastic
from training.checkpoint import CheckpointError, seed_rng, verify_checkpoint
from training.config import ConfigError
from training.config.batch import BatchConfig
from training.data import DataConfig, build_pipeline, build_tokenizer
from training.data.errors import DataStateError

SAVED = {"world_size": 2, "zero_stage": 3, "global_batch_size": 8, "step": 10}


def _refusal(saved=SAVED, world=1, stage=3, batch=8, data=None, shards=0, reshard=False):
    return elastic.refusal(saved, world_size=world, zero_stage=stage, global_batch_size=batch,
                           data_state=data, elastic_shards=shards, reshard=reshard)


TEXT_2_SHARDS = {"kind": "text", "shards": 2}
TEXT_UNSHARDED = {"kind": "text"}  # saved before data shards existed


def test_what_may_change_and_what_is_refused_with_the_values_that_work():
    assert elastic.resume_mode(SAVED, 2, 3) == elastic.NATIVE
    assert elastic.resume_mode(SAVED, 2, None) == elastic.NATIVE
    assert elastic.resume_mode(SAVED, 4, 3) == elastic.UNIVERSAL
    assert elastic.resume_mode(SAVED, 2, 2) == elastic.UNIVERSAL
    for world, stage in ((1, 3), (4, 3), (3, 2), (2, 1)):
        assert _refusal(world=world, stage=stage) is None
    assert _refusal(world=2, stage=3, batch=16) is None  # nothing changed: not judged here
    why = _refusal(batch=16)
    assert "global batch of 8" in why and "batch.global_batch_size=8" in why
    why = _refusal(stage=0)
    assert "ZeRO 1-3" in why and "launch 2 rank(s) with deepspeed.zero_stage=3" in why
    why = _refusal({**SAVED, "zero_stage": 0}, world=1, stage=0)
    assert "ZeRO 1-3" in why and "deepspeed.zero_stage=0" in why
    why = _refusal({**SAVED, "zero_stage": 2}, world=2, stage=3)
    assert "keep deepspeed.zero_stage=2" in why
    # Text continues exactly on up to its data shards; more ranks need data.reshard.
    assert _refusal(data=TEXT_2_SHARDS, world=1) is None
    why = _refusal(data=TEXT_2_SHARDS, world=4)
    assert "read as 2 data shard(s)" in why and "launch 1 to 2 rank(s)" in why
    assert "data.reshard=true" in why and "next epoch" in why
    assert _refusal(data=TEXT_2_SHARDS, world=4, reshard=True) is None
    why = _refusal(data=TEXT_UNSHARDED)
    assert "before data shards existed" in why and "data.reshard=true" in why
    assert _refusal(data=TEXT_UNSHARDED, reshard=True) is None
    # The data shards are fixed for a run, checked even when nothing else changed.
    why = _refusal(data=TEXT_2_SHARDS, world=2, shards=4)
    assert "data.elastic_shards: 4" in why and "set 0 or 2" in why
    assert _refusal(data=TEXT_2_SHARDS, world=2, shards=2) is None
    assert _refusal(data={"kind": "babilong"}, world=4) is None  # indexed: exact
    old = {k: v for k, v in SAVED.items() if k != "zero_stage"}
    assert "does not record its ZeRO stage" in _refusal(old)


def test_verify_checkpoint_refuses_before_any_work(tmp_path):
    ckpt = tmp_path / "step_00000010"
    ckpt.mkdir()
    (ckpt / "client_state.json").write_text(json.dumps(SAVED))
    size = (ckpt / "client_state.json").stat().st_size
    (ckpt / "COMPLETE").write_text(json.dumps({"step": 10, "files": {"client_state.json": size}}))
    assert verify_checkpoint(ckpt, 4, False, zero_stage=2, global_batch_size=8)["step"] == 10
    with pytest.raises(CheckpointError, match=r"step_00000010: written by 2 rank\(s\) with ZeRO-3 "
                       r"with a global batch of 8.*batch.global_batch_size=8"):
        verify_checkpoint(ckpt, 4, False, zero_stage=3, global_batch_size=12)


def test_global_batch_that_cannot_split_names_the_world_sizes_that_work():
    with pytest.raises(ConfigError) as e:
        BatchConfig(micro_batch_size=4, global_batch_size=8).for_world(3)
    assert "world sizes that work: 1, 2, 4, 8" in e.value.problems[0]
    assert BatchConfig(micro_batch_size=4, global_batch_size=8).for_world(1).grad_accum_steps == 2
    four = BatchConfig(micro_batch_size=4, global_batch_size=8).for_world(4)
    assert (four.micro_batch_size, four.grad_accum_steps) == (2, 1)


@pytest.mark.parametrize("new_world", [1, 4])
def test_memory_tasks_continue_at_the_next_global_sample_on_another_world_size(new_world):
    """2 ranks x micro 4 for 10 steps, then the global batch of 8 on `new_world` ranks for 10
    more (accumulation and micro batch re-derived): every sample id 0..159 exactly once."""
    cfg = DataConfig()
    tok = build_tokenizer(cfg)
    seen = Counter()
    old = [build_pipeline(cfg, tok, segment_size=16, micro_batch_size=4, rank=r, world_size=2,
                          seed=3) for r in range(2)]
    for _ in range(10):
        for pipe in old:
            seen.update(pipe.next_batch(2)["sample_ids"].tolist())
    saved = json.loads(json.dumps(old[0].state_dict()))  # what rank_00000.json holds
    batch = BatchConfig(micro_batch_size=4, global_batch_size=8).for_world(new_world)
    new = [build_pipeline(cfg, tok, segment_size=16, micro_batch_size=batch.micro_batch_size,
                          rank=r, world_size=new_world, seed=3) for r in range(new_world)]
    for pipe in new:
        pipe.load_state_dict(saved)  # exact: no data.reshard needed
    for _ in range(10):
        for _ in range(batch.grad_accum_steps):
            for pipe in new:
                seen.update(pipe.next_batch(3)["sample_ids"].tolist())
    assert sorted(seen) == list(range(160)) and set(seen.values()) == {1}


def test_memory_tasks_layout_that_would_skip_samples_still_needs_reshard():
    cfg = DataConfig()
    tok = build_tokenizer(cfg)
    pipe = build_pipeline(cfg, tok, segment_size=16, micro_batch_size=4, rank=0, world_size=2)
    for _ in range(3):
        pipe.next_batch(2)
    other = build_pipeline(cfg, tok, segment_size=16, micro_batch_size=4, rank=0, world_size=4)
    with pytest.raises(DataStateError, match="data.reshard=true"):
        other.load_state_dict(pipe.state_dict())  # 24 samples are not whole micro-batches of 16


def test_rng_is_rederived_from_seed_step_and_rank():
    def draws(seed, rank, step):
        seed_rng(seed, rank, step)
        return torch.rand(3).tolist(), np.random.rand(), __import__("random").random()

    # Step 0 is a fresh run's seeding, unchanged: (seed * 1_000_003 + rank) mod 2**32.
    torch.manual_seed((5 * 1_000_003 + 1) % 2**32)
    fresh = torch.rand(3).tolist()
    assert draws(5, 1, 0)[0] == fresh
    assert draws(5, 1, 10) == draws(5, 1, 10)
    assert draws(5, 1, 10) != draws(5, 1, 11) != draws(5, 0, 11)
    assert draws(5, 0, 10) != draws(5, 1, 10)


def test_convert_refuses_a_checkpoint_without_zero_partitions(tmp_path, capsys):
    from training.universal import convert, main

    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (ckpt / "client_state.json").write_text(json.dumps({**SAVED, "zero_stage": 0}))
    files = {p.name: p.stat().st_size for p in ckpt.iterdir()}
    (ckpt / "COMPLETE").write_text(json.dumps({"step": 2, "files": files}))
    with pytest.raises(CheckpointError, match=r"only ZeRO 1-3 checkpoints convert"):
        convert(ckpt)
    assert main(["--run", str(tmp_path / "run")]) == 2
    assert "cannot convert" in capsys.readouterr().err
    assert main(["--run", str(tmp_path / "run"), "--step", "7"]) == 2
    assert "complete steps are [2]" in capsys.readouterr().err
    assert sorted(p.name for p in ckpt.iterdir()) == ["COMPLETE", "client_state.json",
                                                      "mp_rank_00_model_states.pt"]


def test_a_failed_conversion_stops_every_rank_instead_of_leaving_them_waiting(tmp_path):
    """prepare() is collective: rank 0's failure reaches the others through the all-reduce that
    every rank calls (here the sum rank 0 contributes)."""
    from training.universal import prepare

    ckpt = tmp_path / "step_00000002"
    ckpt.mkdir()
    with pytest.raises(CheckpointError, match="only ZeRO 1-3 checkpoints convert"):
        prepare(ckpt, 0, lambda flags: flags, lambda phase: None)
    with pytest.raises(CheckpointError, match="rank 0 could not convert"):
        prepare(ckpt, 1, lambda flags: flags + 1, lambda phase: None)
    assert list(ckpt.iterdir()) == []
