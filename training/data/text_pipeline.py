"""TextPipeline (data.source: text): streamed sources -> data shards -> background tokenisation
-> packer, with an exact state that continues on the same or another world size.

The rank reads its data shards (training/data/shards.py) in turn; a background thread tokenises
ahead; the packer cuts samples. The state is the position that re-yields the document being
packed and how many of its tokens were taken, so nothing read ahead is lost. A whole saved
world's states ({"world": [...]}, what the trainer passes after a change of world size) are
merged shard by shard: each shard continues on its new owner where it stopped.
Registered with build_pipeline on import (training/data/__init__.py imports this module).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from training.data import pipeline
from training.data.pipeline import WORLD
from training.data.errors import DataSourceError, DataStateError
from training.data.packing import PACKER_COUNTERS, Packer, labels_for
from training.data.prefetch import BackgroundTokenizer
from training.data.shards import (RankPosition, RankStream, merge_world, next_epochs,
                                  owned_shards, reader_totals, start_position, unpacked_tokens)
from training.data.sources import (DocumentMixture, Holdout, MixturePosition, SourceReader,
                                   check_text_field, load_source)

def _upgraded(state: dict) -> dict:
    """A state written before data shards existed is that of shard = rank of V = world size."""
    if "shards" in state:
        return state
    current = state["current"]
    if current is not None:
        current = RankPosition(0, (MixturePosition.from_json(current),), (0,)).to_json()
    return {**state, "shards": state["world_size"], "current": current, "sample_base": 0,
            "micro_batches": state["packer"]["samples"] // state["micro_batch_size"]}


class TextPipeline(pipeline._Pipeline):
    kind = "text"

    def __init__(self, *args):
        super().__init__(*args)
        cfg = self.cfg
        if self.split == "train":
            sources, holdout = cfg.sources, Holdout(cfg.eval_fraction, keep_eval=False)
        elif cfg.eval_sources:
            sources, holdout = cfg.eval_sources, Holdout(0.0, keep_eval=True)
        elif cfg.eval_fraction > 0:
            sources, holdout = cfg.sources, Holdout(cfg.eval_fraction, keep_eval=True)
        else:
            raise ValueError("split eval: no eval data; set data.eval_sources or data.eval_fraction")
        name = "sources" if sources is cfg.sources else "eval_sources"
        for i, src in enumerate(sources):
            check_text_field(src, f"data.{name}[{i}]")
        self._sources, self._holdout = sources, holdout
        self._shuffle = cfg.shuffle_buffer if self.split == "train" else 0
        self.source_names = [s.path_or_name for s in sources]
        self._datasets = [load_source(s) for s in sources]  # once; every owned shard splits it
        self.num_shards = cfg.elastic_shards or self.world_size
        if self.num_shards < self.world_size:
            raise ValueError(f"data.elastic_shards: {cfg.elastic_shards} is below the world size "
                             f"{self.world_size}; every rank needs a shard: 0 (= the world size) "
                             f"or >= {self.world_size}")
        self.sample_base, self.micro_batches = 0, 0
        self._tokenized: Optional[BackgroundTokenizer] = None
        self._build_stream(self.num_shards)
        self._packer = self._new_packer()
        self._start_prefetch()

    def _build_stream(self, num_shards: int) -> None:
        self.num_shards = num_shards
        weights = [s.weight for s in self._sources]
        self._stream = RankStream([
            DocumentMixture([SourceReader(src, i, v, num_shards, self.seed, self._shuffle,
                                          self._holdout, dataset=ds)
                             for i, (src, ds) in enumerate(zip(self._sources, self._datasets))],
                            weights, self.seed, v)
            for v in owned_shards(num_shards, self.world_size, self.rank)])

    def _new_packer(self) -> Packer:
        return Packer(self.cfg.packing, self.cfg.short_documents, self.tokenizer.pad_token_id,
                      passed_all_data=RankPosition.passed_all_data)

    def _start_prefetch(self) -> None:
        self._tokenized = BackgroundTokenizer(iter(self._stream), self.tokenizer,
                                              self.cfg.prefetch_documents)
        self._documents = unpacked_tokens(self._tokenized)

    def next_batch(self, num_segments: int) -> dict:
        if num_segments < 1:
            raise ValueError(f"num_segments {num_segments} must be >= 1")
        B, W = self.micro_batch_size, self.world_size
        try:
            ids, mask = self._packer.pack(self._documents, B, num_segments * self.segment_size)
        except DataSourceError:
            raise
        except (OSError, ValueError) as e:  # e.g. invalid UTF-8 in a jsonl file (pyarrow)
            raise DataSourceError(f"data sources {self.source_names}: reading failed on rank "
                                  f"{self.rank}: {type(e).__name__}: {e}") from e
        # Global sample ids: interleaved over this world's ranks, after every earlier world's.
        first = self.micro_batches * B
        sample_ids = self.sample_base + (np.arange(first, first + B) * W + self.rank)
        self.micro_batches += 1
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                "labels": torch.from_numpy(labels_for(ids, mask)),
                "sample_ids": torch.from_numpy(sample_ids)}

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        p = self._packer
        current = None if p.current_position is None else p.current_position.to_json()
        return {**self._header(), "sources": self.source_names, "packing": self.cfg.packing,
                "shards": self.num_shards, "current": current, "offset": p.offset,
                "packer": dict(p.counters), "sample_base": self.sample_base,
                "micro_batches": self.micro_batches}

    def _checked(self, state: dict) -> dict:
        self._check_header(state, exact=True)
        for key, mine in (("sources", self.source_names), ("packing", self.cfg.packing)):
            if state[key] != mine:
                raise DataStateError(f"data state was saved with {key}={state[key]!r}, this "
                                     f"pipeline has {mine!r}")
        state = _upgraded(state)
        wanted = self.cfg.elastic_shards
        if wanted and wanted != state["shards"]:
            raise DataStateError(f"data.elastic_shards: {wanted}, but the run started with "
                                 f"{state['shards']} data shards, which it keeps for good: set "
                                 f"0 or {state['shards']}")
        return state

    def load_state_dict(self, state: dict) -> None:
        """This rank's own saved state, or a whole saved world's (pipeline.world_state), which a
        world of up to its data shards continues exactly, a world of more ranks only with data.reshard."""
        states = [self._checked(s) for s in (state[WORLD] if WORLD in state else [state])]
        old = states[0]
        same_world = old["world_size"] == self.world_size
        whole = len(states) == old["world_size"]
        if same_world and old["shards"] >= self.world_size:
            own = next((s for s in states if s["rank"] == self.rank), None)
            if own is not None:
                return self._restore(old["shards"], own)
        fits = self.world_size <= old["shards"]
        if whole and fits:
            return self._merge(states)
        if not self.cfg.reshard:
            raise DataStateError(
                f"data state was saved by {old['world_size']} rank(s) reading "
                f"{old['shards']} data shard(s); this pipeline is rank {self.rank} of "
                f"{self.world_size}: " + (
                    f"continuing needs all {old['world_size']} ranks' states ("
                    f"{pipeline.__name__}.world_state), as the trainer passes from a checkpoint"
                    if fits else
                    f"at most {old['shards']} ranks can continue it exactly (data.elastic_shards "
                    f"is fixed when a run starts)") +
                "; or set data.reshard=true to restart every source at its next epoch")
        self._restart(states)

    def _restore(self, num_shards: int, own: dict) -> None:
        """Continue exactly where this rank stopped."""
        self._reset(num_shards, own["packer"])
        self.sample_base, self.micro_batches = own["sample_base"], own["micro_batches"]
        current = own["current"]
        self._stream.restore(start_position(len(self._stream.mixtures), len(self._sources))
                             if current is None else RankPosition.from_json(current))
        self._start_prefetch()
        if current is not None:
            tokens, position = next(self._documents)  # re-yields the document being packed
            self._packer.set_current(tokens, position, own["offset"])

    def _merge(self, states: list[dict]) -> None:
        """Continue another world's shards, each where its old owner stopped."""
        self._new_world(states, states[0]["shards"])
        self._stream.restore(merge_world(states, self.world_size, self.rank, len(self._sources)))
        self._start_prefetch()

    def _restart(self, states: list[dict]) -> None:
        """data.reshard: a new layout of the shards, every source from its next epoch."""
        self._new_world(states, self.cfg.elastic_shards or self.world_size)
        self._stream.restore(start_position(len(self._stream.mixtures), len(self._sources),
                                            next_epochs(states, len(self._sources))))
        self._start_prefetch()

    def _new_world(self, states: list[dict], num_shards: int) -> None:
        """Counters and sample ids of a world that continues `states`' world."""
        self._reset(num_shards, self._summed_counters(states))
        old = states[0]  # every rank of a world consumed the same number of samples
        self.sample_base = old["sample_base"] + (old["micro_batches"] * old["micro_batch_size"] *
                                                 old["world_size"])
        self.micro_batches = 0

    def _reset(self, num_shards: int, counters: dict) -> None:
        self._tokenized.close()
        if num_shards != self.num_shards:
            self._build_stream(num_shards)
        self._packer = self._new_packer()
        self._packer.counters.update(counters)

    def _summed_counters(self, states: list[dict]) -> dict:
        """The old world's packer counters, kept once (on rank 0) so that totals over ranks hold."""
        if self.rank != 0:
            return dict.fromkeys(PACKER_COUNTERS, 0)
        return {k: sum(s["packer"].get(k, 0) for s in states) for k in PACKER_COUNTERS}

    def stats(self) -> dict:
        """Packer counters, per-source reader counters (source<i>/...) and their totals."""
        out = dict(self._packer.counters)
        position = self._packer.current_position
        if position is not None:
            out.update(reader_totals(position))
        return out

    def close(self) -> None:
        if self._tokenized is not None:
            self._tokenized.close()


pipeline.EXTRA_PIPELINES["text"] = TextPipeline
