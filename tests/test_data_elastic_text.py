"""Streamed text continued on another world size (issue 22): data shards, world states, refusals.

The checks are against independent computations: the corpus' own documents (each read exactly
once per epoch across the change), and uninterrupted reads of every shard (a V-rank world reads
shard v on rank v), against which the merged world's token stream is rebuilt by hand.
"""

from collections import Counter

import numpy as np
import pytest

from training.data import DataStateError, SourceConfig, build_pipeline, build_tokenizer
from training.data.pipeline import world_state
from training.data.shards import owned_shards
from tests.test_data_text import S, corpus, doc_of, text_cfg  # noqa: F401  (corpus: a fixture)


def pipes(cfg, tok, world, micro=1, seed=3):
    return [build_pipeline(cfg, tok, segment_size=S, micro_batch_size=micro, rank=r,
                           world_size=world, seed=seed) for r in range(world)]


def drawn_epoch(pipe) -> int:
    """Epoch of the document the packer is in (its shard's reader; one source)."""
    pos = pipe._packer.current_position
    return pos.shards[pos.turn % len(pos.shards)].readers[0].epoch


@pytest.mark.parametrize("old_world,new_world,shards", [(2, 1, 0), (2, 4, 4), (4, 3, 4)])
def test_a_world_change_mid_epoch_reads_every_document_exactly_once(corpus, old_world,
                                                                    new_world, shards):
    """Document packing with padding: one sample per document, so documents are counted by id
    over the old world's steps, the change, and the new world's steps to the end of the epoch."""
    cfg = text_cfg(corpus, packing="document", short_documents="pad", shuffle_buffer=16,
                   elastic_shards=shards)
    tok = build_tokenizer(cfg)
    seen, sample_ids = Counter(), []

    def step(world_pipes) -> None:
        for pipe in world_pipes:
            batch = pipe.next_batch(4)
            if drawn_epoch(pipe) == 0:
                seen[doc_of(tok, batch["input_ids"][0])] += 1
            sample_ids.extend(batch["sample_ids"].tolist())

    old = pipes(cfg, tok, old_world)
    for _ in range(7):  # mid-epoch, mid shuffle window
        step(old)
    saved = world_state([p.state_dict() for p in old])
    for p in old:
        p.close()
    new = pipes(cfg, tok, new_world)
    for p in new:
        p.load_state_dict(saved)
    step(new)
    while min(p.stats()["epoch"] for p in new) == 0:
        step(new)
    for p in new:
        p.close()
    assert sorted(seen) == sorted(" ".join(t.split()[:2]) for t in corpus["alpha"])
    assert set(seen.values()) == {1}, [d for d, n in seen.items() if n > 1]
    assert len(sample_ids) == len(set(sample_ids))  # ids continue after the old world's
    assert sorted(sample_ids)[:7 * old_world] == list(range(7 * old_world))


def flat(batches) -> list[int]:
    return np.concatenate([b["input_ids"].reshape(-1).numpy() for b in batches]).tolist()


def test_concat_packing_continues_half_packed_documents_on_their_new_owner(corpus):
    """2 ranks -> 1 rank with concat packing, documents spanning samples. Expected: shard v's
    uninterrupted stream (rank v of a 2-rank world), the old world having taken its first c_v
    tokens; the new rank takes its shards in turn, a document (to its EOS) per turn, the first
    of each shard starting after the c_v tokens already packed."""
    cfg = text_cfg(corpus, shuffle_buffer=16,
                   sources=[SourceConfig(str(corpus["root"] / "alpha_*.jsonl"))])
    tok = build_tokenizer(cfg)
    eos, steps_before, n = tok.eos_token_id, 5, 3

    reference = []
    for p in pipes(cfg, tok, 2, micro=2):
        reference.append(flat([p.next_batch(n) for _ in range(40)]))
        p.close()

    old = pipes(cfg, tok, 2, micro=2)
    taken = [flat([p.next_batch(n) for _ in range(steps_before)]) for p in old]
    for v in range(2):
        assert taken[v] == reference[v][:len(taken[v])]  # same read as the reference so far
    saved = world_state([p.state_dict() for p in old])
    for p in old:
        p.close()
    [new] = pipes(cfg, tok, 1, micro=4)
    new.load_state_dict(saved)
    got = flat([new.next_batch(n) for _ in range(10)])
    new.close()

    expected, cursor, turn = [], [len(t) for t in taken], 0
    while len(expected) < len(got):
        v = owned_shards(2, 1, 0)[turn % 2]
        # A shard's first turn is the document its old owner was in: nothing left of it when
        # the old owner's last token was that document's EOS.
        whole = turn < 2 and cursor[v] > 0 and reference[v][cursor[v] - 1] == eos
        end = cursor[v] if whole else reference[v].index(eos, cursor[v]) + 1
        expected += reference[v][cursor[v]:end]
        cursor[v], turn = end, turn + 1
    assert got == expected[:len(got)]
    assert any(t[-1] != eos for t in taken)  # an old rank stopped inside a document


def test_a_single_rank_state_of_another_world_is_refused_and_reshard_restarts(corpus):
    cfg = text_cfg(corpus)
    tok = build_tokenizer(cfg)
    old = pipes(cfg, tok, 2, micro=2, seed=1)
    for p in old:
        p.next_batch(2)
    states = [p.state_dict() for p in old]
    for p in old:
        p.close()
    [other] = pipes(cfg, tok, 1, micro=2, seed=1)
    with other:
        with pytest.raises(DataStateError, match=r"needs all 2 ranks' states.*data.reshard=true"):
            other.load_state_dict(states[0])
    grown = pipes(cfg, tok, 3, micro=2, seed=1)
    with pytest.raises(DataStateError, match=r"at most 2 ranks can continue it exactly.*"
                                             r"data.elastic_shards"):
        grown[0].load_state_dict(world_state(states))
    for p in grown:
        p.close()
    resharded = text_cfg(corpus, reshard=True)
    for p in pipes(resharded, tok, 3, micro=2, seed=1):
        with p:
            p.load_state_dict(world_state(states))
            p.next_batch(2)
            assert p.stats()["epoch"] == 1  # restarted at the next epoch on 3 shards


def test_data_shards_are_fixed_for_a_run(corpus):
    tok = build_tokenizer(text_cfg(corpus))
    [p] = pipes(text_cfg(corpus, elastic_shards=2), tok, 1, micro=2)
    with p:
        p.next_batch(2)
        state = p.state_dict()
    assert state["shards"] == 2
    [q] = pipes(text_cfg(corpus, elastic_shards=4), tok, 1, micro=2)
    with q, pytest.raises(DataStateError, match=r"data.elastic_shards: 4.*started with 2.*0 or 2"):
        q.load_state_dict(state)
    with pytest.raises(ValueError, match=r"data.elastic_shards: 1 is below the world size 2"):
        pipes(text_cfg(corpus, elastic_shards=1), tok, 2)
    assert "data.elastic_shards: -1 must be >= 0" in " ".join(
        text_cfg(corpus, elastic_shards=-1).problems())


def test_a_state_written_before_data_shards_existed_continues_exactly(corpus):
    """The old format: `current` a mixture position, no shards, no sample_base."""
    cfg = text_cfg(corpus, shuffle_buffer=16)
    tok = build_tokenizer(cfg)
    [p] = pipes(cfg, tok, 1, micro=2)
    with p:
        p.next_batch(3)
        state = p.state_dict()
        after = [p.next_batch(3)["input_ids"] for _ in range(3)]
    legacy = {k: v for k, v in state.items() if k not in ("shards", "sample_base",
                                                          "micro_batches")}
    legacy["current"] = state["current"]["shards"][0]
    [q] = pipes(cfg, tok, 1, micro=2)
    with q:
        q.load_state_dict(legacy)
        again = [q.next_batch(3)["input_ids"] for _ in range(3)]
    assert all((a == b).all() for a, b in zip(after, again))
