"""Issue 22 with streamed text, real DeepSpeed runs: a 2-rank ZeRO-3 text run's step-10 checkpoint
continued on 4 ranks and on 1 rank (data.elastic_shards=4), every document token trained exactly
once across the change.

The token count is checked against an independent sum: the tokens the runs trained on (global
batch x segments x segment size, step by step through the curriculum) must equal what the final
data positions say each shard consumed, counted on each shard's own uninterrupted stream (rank v
of a 4-rank world reads shard v, a path without any merge). A lost document would make the
positions account for more tokens than were trained on, a repeated one for fewer.
"""

import json
import shutil
import subprocess

import pytest

from tests.test_trainer_runs import REPO, pretrain_command
from training.data import DataConfig, SourceConfig, build_pipeline, build_tokenizer
from training.data.shards import RankPosition
from training.data.sources import COUNTERS
from training.data.tokenization import train_bpe_tokenizer

SHARDS, SEGMENT, SEED = 4, 16, 1234
SCHEDULE = [(0, 2), (12, 3)]  # the tiny runs' curriculum: segments from step 0 and from step 12
DOCS = [f"doc {i} " + " ".join(f"w{(i * 7 + j) % 53}" for j in range(5 + i % 23))
        for i in range(600)]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic_text")
    with open(root / "corpus.jsonl", "w") as f:
        for d in DOCS:
            f.write(json.dumps({"text": d}) + "\n")
    train_bpe_tokenizer(DOCS, 300, str(root / "tok"))
    args = ["data.source=text", f"data.tokenizer={root / 'tok'}",
            f"data.sources=[{{path_or_name: '{root / 'corpus.jsonl'}'}}]",
            "model.backbone.vocab_size=320", "data.shuffle_buffer=32", "eval.batches=0",
            f"data.elastic_shards={SHARDS}", "deepspeed.zero_stage=3", "batch.global_batch_size=8",
            f"model.segment_size={SEGMENT}", f"run.seed={SEED}"]
    first = root / "runs" / "text2"
    cmd, env = pretrain_command(first, 2, [*args, "batch.micro_batch_size=4", "run.max_steps=10"])
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, args, first


def trained_tokens(steps: int, global_batch: int = 8) -> int:
    return sum(global_batch * max(n for s, n in SCHEDULE if s <= step) * SEGMENT
               for step in range(steps))


def shard_document_lengths(root, tok_dir) -> list[list[int]]:
    """Token lengths (EOS included) of each shard's documents in its own order."""
    cfg = DataConfig(source="text", sources=[SourceConfig(str(root / "corpus.jsonl"))],
                     tokenizer=str(tok_dir), shuffle_buffer=32, elastic_shards=SHARDS)
    tok = build_tokenizer(cfg)
    out = []
    for v in range(SHARDS):
        with build_pipeline(cfg, tok, segment_size=SEGMENT, micro_batch_size=8, rank=v,
                            world_size=SHARDS, seed=SEED) as pipe:
            ids = [int(t) for _ in range(12) for t in pipe.next_batch(2)["input_ids"].reshape(-1)]
        ends = [i for i, t in enumerate(ids) if t == tok.eos_token_id]
        out.append([b - a for a, b in zip([-1] + ends, ends)])
    return out


def consumed_tokens(final_ckpt, world: int, lengths: list[list[int]]) -> int:
    """Tokens the final data positions say were consumed, summed over shards."""
    docs = COUNTERS.index("documents")
    total = 0
    for rank in range(world):
        data = json.loads((final_ckpt / f"rank_{rank:05d}.json").read_text())["data"]
        assert data["shards"] == SHARDS and data["world_size"] == world
        pos = RankPosition.from_json(data["current"])
        current = pos.turn % len(pos.shards)
        for i, (v, shard) in enumerate(zip(range(rank, SHARDS, world), pos.shards)):
            reader = shard.readers[0]
            assert reader.epoch == 0  # continued, not restarted at the next epoch (data.reshard)
            total += sum(lengths[v][:reader.counters[docs]]) + pos.skips[i]
            if i == current:
                total += data["offset"]
    return total


@pytest.mark.parametrize("world", [4, 1])
def test_text_run_continues_on_another_world_size_with_every_token_once(text_run, world):
    root, args, first = text_run
    run_dir = root / "runs" / f"text{world}"
    shutil.copytree(first, run_dir)
    cmd, env = pretrain_command(run_dir, world, [*args, f"batch.micro_batch_size={8 // world}",
                                                 "run.max_steps=20"])
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = (run_dir / "train.log").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "written by 2 rank(s) with ZeRO-3, through" in log
    lengths = shard_document_lengths(root, root / "tok")
    ckpts = run_dir / "checkpoints"
    assert consumed_tokens(ckpts / "step_00000010", 2, lengths) == trained_tokens(10)
    assert consumed_tokens(ckpts / "step_00000020", world, lengths) == trained_tokens(20)
    rank0 = json.loads((ckpts / "step_00000020" / "rank_00000.json").read_text())["data"]
    assert rank0["sample_base"] == 80 and rank0["micro_batches"] * world * (8 // world) == 80
