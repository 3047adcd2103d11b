"""Issue 5, promise 4: exactly-once data across two ranks with a resume in the middle of an epoch.

A finite local corpus of D documents, each carrying its id in its text, is read by two ranks
with document packing (one whole document per sample, padded), so every sample's id can be read
back from its tokens. Each rank reads part of the epoch, saves its state through JSON (what the
trainer writes to rank_XXXXX.json), is rebuilt from scratch, restores and reads the rest of its
share. Over both ranks every document id must appear exactly once, and the resumed batches must
be the very batches an uninterrupted reader produces. (That the trainer stores and restores this
state at every checkpoint is shown bit for bit by tests/test_reliability_resume.py.)
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from training.data import DataConfig, build_pipeline, build_tokenizer
from training.data.config import SourceConfig
from training.data.tokenization import train_bpe_tokenizer

DOCS, WORLD, MICRO, SEGMENT = 64, 2, 4, 32
PER_RANK_BATCHES = DOCS // (WORLD * MICRO)  # one epoch
RESUME_AFTER = 3  # batches before the "crash": mid-epoch
ID = re.compile(r"doc-(\d{4})-end")


@pytest.fixture(scope="module")
def data_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("once")
    texts = [f"doc-{i:04d}-end " + "word " * (i % 7) for i in range(DOCS)]
    (root / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    train_bpe_tokenizer(texts, 300, str(root / "tok"))
    return DataConfig(source="text", sources=[SourceConfig(path_or_name=str(root / "c.jsonl"))],
                      tokenizer=str(root / "tok"), packing="document", short_documents="pad",
                      shuffle_buffer=16, prefetch_documents=8)


def pipe(cfg, tok, rank):
    return build_pipeline(cfg, tok, segment_size=SEGMENT, micro_batch_size=MICRO, rank=rank,
                          world_size=WORLD, seed=7, split="train")


def ids_of(batch, tok) -> list[int]:
    out = []
    for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
        text = tok.decode(row[mask.bool()].tolist())
        found = ID.findall(text)
        assert len(found) == 1, text  # one whole document per sample
        out.append(int(found[0]))
    return out


def test_two_ranks_mid_epoch_resume_sees_every_document_exactly_once(data_cfg):
    tok = build_tokenizer(data_cfg)
    seen, uninterrupted, resumed = Counter(), {}, {}
    for rank in range(WORLD):
        with pipe(data_cfg, tok, rank) as p:
            uninterrupted[rank] = [p.next_batch(1) for _ in range(PER_RANK_BATCHES)]
        first = pipe(data_cfg, tok, rank)
        before = [first.next_batch(1) for _ in range(RESUME_AFTER)]
        state = json.loads(json.dumps(first.state_dict()))  # as rank_XXXXX.json holds it
        first.close()
        with pipe(data_cfg, tok, rank) as second:
            second.load_state_dict(state)
            after = [second.next_batch(1) for _ in range(PER_RANK_BATCHES - RESUME_AFTER)]
        resumed[rank] = before + after
        for batch in resumed[rank]:
            seen.update(ids_of(batch, tok))
    assert sorted(seen) == list(range(DOCS)), sorted(set(range(DOCS)) - set(seen))
    assert set(seen.values()) == {1}, {k: v for k, v in seen.items() if v != 1}
    # Not only the same set: the same batches, in the same order, as without the interruption.
    for rank in range(WORLD):
        for a, b in zip(uninterrupted[rank], resumed[rank]):
            assert a["input_ids"].equal(b["input_ids"]) and a["sample_ids"].equal(b["sample_ids"])
    # The ranks' shares are disjoint (no document read by both).
    shares = [{i for b in resumed[r] for i in ids_of(b, tok)} for r in range(WORLD)]
    assert not shares[0] & shares[1]
