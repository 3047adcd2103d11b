"""Streamed text as a fixed number of data shards dealt to the ranks, so that a run continues
exactly on another world size.

A run reads its text sources as V data shards (data.elastic_shards; 0 = the world size of the
first start). Shard v reads part v of V of every source (split_dataset_by_node), shuffled and
mixed by (seed, v) exactly as rank v of a V-rank run would (training/data/sources.py). Rank r of
a W-rank world owns the shards v with v % W == r and draws documents from them in turn. V is
saved with the data state and never changes for a run, so on any world size W' <= V every shard
has exactly one new owner, which continues it at its exact position (merge_world): every
document of an epoch is still read exactly once, whatever the worlds in between. A document that
an old rank had partly packed continues on its shard's new owner after the tokens already
packed (the shard's `skip`). With V = W (the default) every rank owns one shard and reads what it
read before shards existed. (The same idea as canonical nodes in MosaicML's streaming datasets.)
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

from training.data.sources import COUNTERS, START, DocumentMixture, MixturePosition, ReaderPosition


class RankPosition(NamedTuple):
    turn: int                            # documents this rank drew; the next comes from shard turn % n
    shards: tuple[MixturePosition, ...]  # each owned shard's position, in owned_shards order
    skips: tuple[int, ...]               # tokens of each shard's next document packed already

    @property
    def skip(self) -> int:
        """Tokens of the document drawn at this position that an earlier world packed."""
        return self.skips[self.turn % len(self.shards)]

    def to_json(self) -> dict:
        return {"turn": self.turn, "shards": [m.to_json() for m in self.shards],
                "skips": list(self.skips)}

    @classmethod
    def from_json(cls, d: dict) -> "RankPosition":
        return cls(d["turn"], tuple(MixturePosition.from_json(m) for m in d["shards"]),
                   tuple(d["skips"]))

    @staticmethod
    def passed_all_data(first: "RankPosition", now: "RankPosition") -> bool:
        return all(MixturePosition.passed_all_data(a, b) for a, b in zip(first.shards, now.shards))


def owned_shards(num_shards: int, world_size: int, rank: int) -> list[int]:
    return list(range(rank, num_shards, world_size))


def start_position(num_owned: int, num_sources: int, epochs: Optional[list[int]] = None
                   ) -> RankPosition:
    """Every owned shard at the start of epoch `epochs[i]` of source i (default 0)."""
    readers = tuple(START._replace(epoch=e) for e in (epochs or [0] * num_sources))
    return RankPosition(0, (MixturePosition(0, readers),) * num_owned, (0,) * num_owned)


class RankStream:
    """One rank's documents: its shards' mixtures in turn, with the position re-yielding each."""

    def __init__(self, mixtures: list[DocumentMixture]):
        self.mixtures = mixtures
        self.turn, self.skips = 0, [0] * len(mixtures)

    def restore(self, pos: RankPosition) -> None:
        for mixture, p in zip(self.mixtures, pos.shards):
            mixture.restore(p)
        self.turn, self.skips = pos.turn, list(pos.skips)

    @property
    def position(self) -> RankPosition:
        return RankPosition(self.turn, tuple(m.position for m in self.mixtures), tuple(self.skips))

    def __iter__(self) -> Iterator[tuple[str, RankPosition]]:
        while True:
            i, skips = self.turn % len(self.mixtures), tuple(self.skips)
            # The drawn shard's position is the one just before its document (past the records
            # it passed over and any epoch turn), as DocumentMixture gives it: stats stay exact.
            text, drawn = self.mixtures[i].next_document()
            shards = tuple(drawn if j == i else m.position for j, m in enumerate(self.mixtures))
            self.skips[i] = 0
            self.turn += 1
            yield text, RankPosition(self.turn - 1, shards, skips)


def unpacked_tokens(documents: Iterator) -> Iterator:
    """(tokens, position) with the tokens an earlier world packed already cut off (`skip`); a
    document with nothing left is passed over (it was packed whole)."""
    for tokens, position in documents:
        if position.skip:
            tokens = tokens[position.skip:]
            if not len(tokens):
                continue
        yield tokens, position


def _saved_shards(state: dict, num_sources: int) -> dict[int, tuple[MixturePosition, int]]:
    """Each shard a saved rank owned -> (its position, tokens of its next document packed)."""
    owned = owned_shards(state["shards"], state["world_size"], state["rank"])
    current = state["current"]
    if current is None:  # saved before its first batch
        pos = start_position(len(owned), num_sources)
        return dict(zip(owned, zip(pos.shards, pos.skips)))
    pos = RankPosition.from_json(current)
    skips = list(pos.skips)
    # `current` re-yields the document the packer was in, `offset` of whose tokens it had taken
    # after the `skip` it started with: all of them are consumed.
    skips[pos.turn % len(owned)] += state["offset"]
    return dict(zip(owned, zip(pos.shards, skips)))


def merge_world(states: list[dict], world_size: int, rank: int, num_sources: int) -> RankPosition:
    """Where `rank` of a `world_size` world continues the saved world `states` (every rank's data
    state, any order): its shards at the exact positions their old owners left them."""
    shards: dict[int, tuple[MixturePosition, int]] = {}
    for state in states:
        shards.update(_saved_shards(state, num_sources))
    num_shards = states[0]["shards"]
    if sorted(shards) != list(range(num_shards)):
        raise ValueError(f"the saved data states cover shards {sorted(shards)}, not all "
                         f"{num_shards}")
    mine = owned_shards(num_shards, world_size, rank)
    return RankPosition(0, tuple(shards[v][0] for v in mine), tuple(shards[v][1] for v in mine))


def next_epochs(states: list[dict], num_sources: int) -> list[int]:
    """Per source, the epoch after the newest any saved shard reached (data.reshard restarts)."""
    newest = [0] * num_sources
    for state in states:
        for position, _ in _saved_shards(state, num_sources).values():
            for i, reader in enumerate(position.readers):
                newest[i] = max(newest[i], reader.epoch)
    return [e + 1 for e in newest]


def reader_totals(position: RankPosition) -> dict:
    """Reader counters summed over the owned shards, per source (source<i>/...) and in all;
    a source's epoch is the fewest full passes any of its shards made."""
    out = dict.fromkeys([c for c in COUNTERS[1:]], 0)
    for i in range(len(position.shards[0].readers)):
        readers: list[ReaderPosition] = [m.readers[i] for m in position.shards]
        out[f"source{i}/epoch"] = min(r.epoch for r in readers)
        for j, name in enumerate(COUNTERS):
            value = sum(r.counters[j] for r in readers)
            out[f"source{i}/{name}"] = value
            if name != "epoch_documents":
                out[name] += value
    out["epoch"] = min(out[f"source{i}/epoch"] for i in range(len(position.shards[0].readers)))
    return out
