"""build_pipeline: per-rank batches of packed samples, with exact, JSON-serialisable state.

Two pipelines share one interface (next_batch, state_dict, load_state_dict, stats, close):

MemoryTaskPipeline: the built-in corpus. Rank r's micro-batch k holds the global samples
    (k*W + r)*B + i, i < B, so one step over W ranks sees exactly what one rank with micro
    batch W*B sees; the state is the micro-batch counter, which a new world size or micro batch
    continues at the next global sample (elastic resume, training/elastic.py).
TextPipeline: streamed text sources -> mixture -> background tokenisation -> packer. Which
    documents a rank reads is decided by split_dataset_by_node, so runs with different world
    sizes see different (but per epoch complete and disjoint) data.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from training.data import memory_tasks
from training.data.config import BUILTIN, MEMORY_TASKS, DataConfig
from training.data.errors import DataSourceError, DataStateError
from training.data.packing import Packer, labels_for
from training.data.prefetch import BackgroundTokenizer
from training.data.sources import (COUNTERS, START, DocumentMixture, Holdout, MixturePosition,
                                   SourceReader, check_text_field)

STATE_VERSION = 1
RESHARD_HINT = ("set data.reshard=true to continue anyway (memory tasks: at the same global "
                "sample; text: every rank restarts its sources at the next epoch)")


# Corpora with their own modules register here (training/data/__init__.py imports them), so this
# module does not import them back: {data.source: pipeline class}.
EXTRA_PIPELINES: dict = {}


def build_pipeline(cfg: DataConfig, tokenizer, *, segment_size: int, micro_batch_size: int,
                   rank: int = 0, world_size: int = 1, seed: int = 0, split: str = "train"):
    problems = cfg.problems()
    if problems:
        raise ValueError("; ".join(problems))
    if split not in ("train", "eval"):
        raise ValueError(f"split {split!r} must be train or eval")
    if segment_size < 1 or micro_batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"segment_size {segment_size} and micro_batch_size {micro_batch_size} "
                         f"must be >= 1 and rank {rank} in [0, world_size {world_size})")
    cls = {MEMORY_TASKS: MemoryTaskPipeline, "text": TextPipeline}.get(cfg.source) or \
        EXTRA_PIPELINES[cfg.source]
    return cls(cfg, tokenizer, segment_size, micro_batch_size, rank, world_size, seed, split)


class _Pipeline:
    kind = ""

    def __init__(self, cfg: DataConfig, tokenizer, segment_size: int, micro_batch_size: int,
                 rank: int, world_size: int, seed: int, split: str):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.segment_size, self.micro_batch_size = segment_size, micro_batch_size
        self.rank, self.world_size, self.seed, self.split = rank, world_size, seed, split

    def _header(self) -> dict:
        return {"kind": self.kind, "version": STATE_VERSION, "split": self.split,
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "micro_batch_size": self.micro_batch_size}

    def _check_header(self, state: dict, exact: bool = False) -> bool:
        """Raise on a state of another corpus; return True when it needs resharding. `exact`: this
        pipeline continues a state of another layout exactly, so data.reshard is not needed."""
        version = state.get("version") if isinstance(state, dict) else None
        if version != STATE_VERSION:
            raise DataStateError(f"data state has version {version!r}; this code reads version "
                                 f"{STATE_VERSION} (a dict from pipe.state_dict())")
        for key in ("kind", "split", "seed"):
            if state[key] != getattr(self, key):
                raise DataStateError(f"data state was saved with {key}={state[key]!r}, this "
                                     f"pipeline has {key}={getattr(self, key)!r}")
        changed = [f"{k}={state[k]} (now {getattr(self, k)})"
                   for k in ("world_size", "micro_batch_size") if state[k] != getattr(self, k)]
        if changed and not (self.cfg.reshard or exact):
            raise DataStateError(f"data state was saved with {', '.join(changed)}; {RESHARD_HINT}")
        return bool(changed)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MemoryTaskPipeline(_Pipeline):
    kind = MEMORY_TASKS

    def __init__(self, *args):
        super().__init__(*args)
        vocab = self.tokenizer.get_vocab()
        if any(vocab.get(tok) != i for i, tok in enumerate(memory_tasks.VOCAB)):
            raise ValueError(f"data.tokenizer: the memory_tasks corpus needs the {BUILTIN} "
                             f"tokenizer (build_tokenizer with tokenizer: {BUILTIN})")
        self.task_cfg = self.cfg.memory_tasks
        self.data_seed = self.seed if self.split == "train" else memory_tasks.eval_seed(self.seed)
        self.micro_batches = 0
        self._task_counts = np.zeros(len(self.task_cfg.tasks), dtype=np.int64)

    def next_batch(self, num_segments: int) -> dict:
        B, W = self.micro_batch_size, self.world_size
        first = (self.micro_batches * W + self.rank) * B
        indices = np.arange(first, first + B)
        arrays = memory_tasks.generate(indices, num_segments, self.segment_size, self.task_cfg,
                                       self.data_seed)
        self.micro_batches += 1
        self._task_counts += np.bincount(arrays["task_ids"], minlength=len(self._task_counts))
        return memory_tasks.to_batch(arrays, indices)

    def state_dict(self) -> dict:
        return {**self._header(), "micro_batches": self.micro_batches,
                "task_counts": self._task_counts.tolist()}

    def load_state_dict(self, state: dict) -> None:
        consumed = state.get("micro_batches", 0) * state.get("world_size", 1) * state.get(
            "micro_batch_size", 1)
        # The global sample index survives a new layout: continue after every sample the old
        # world consumed. Exact (no data.reshard needed) when they fill whole micro-batches of the
        # new layout, as they do when the global batch is kept; else rounded up to one.
        if self._check_header(state, exact=consumed % (self.world_size * self.micro_batch_size)
                              == 0):
            self.micro_batches = math.ceil(consumed / (self.world_size * self.micro_batch_size))
        else:
            self.micro_batches = state["micro_batches"]
        self._task_counts = np.asarray(state["task_counts"], dtype=np.int64)

    def stats(self) -> dict:
        out = {"samples": self.micro_batches * self.micro_batch_size}
        out.update({f"samples_{t}": int(c) for t, c in zip(self.task_cfg.tasks, self._task_counts)})
        return out


class TextPipeline(_Pipeline):
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
        shuffle = cfg.shuffle_buffer if self.split == "train" else 0
        self.source_names = [s.path_or_name for s in sources]
        self._readers = [SourceReader(src, i, self.rank, self.world_size, self.seed, shuffle,
                                      holdout) for i, src in enumerate(sources)]
        self._mixture = DocumentMixture(self._readers, [s.weight for s in sources], self.seed,
                                        self.rank)
        self._packer = self._new_packer()
        self._documents: Optional[BackgroundTokenizer] = None
        self._start_prefetch()

    def _new_packer(self) -> Packer:
        return Packer(self.cfg.packing, self.cfg.short_documents, self.tokenizer.pad_token_id,
                      passed_all_data=MixturePosition.passed_all_data)

    def _start_prefetch(self) -> None:
        self._documents = BackgroundTokenizer(iter(self._mixture), self.tokenizer,
                                              self.cfg.prefetch_documents)

    def next_batch(self, num_segments: int) -> dict:
        if num_segments < 1:
            raise ValueError(f"num_segments {num_segments} must be >= 1")
        B = self.micro_batch_size
        first = self._packer.counters["samples"]
        try:
            ids, mask = self._packer.pack(self._documents, B, num_segments * self.segment_size)
        except DataSourceError:
            raise
        except (OSError, ValueError) as e:  # e.g. invalid UTF-8 in a jsonl file (pyarrow)
            raise DataSourceError(f"data sources {self.source_names}: reading failed on rank "
                                  f"{self.rank}: {type(e).__name__}: {e}") from e
        sample_ids = (np.arange(first, first + B) * self.world_size + self.rank)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                "labels": torch.from_numpy(labels_for(ids, mask)),
                "sample_ids": torch.from_numpy(sample_ids)}

    def state_dict(self) -> dict:
        p = self._packer
        current = None if p.current_position is None else p.current_position.to_json()
        return {**self._header(), "sources": self.source_names, "packing": self.cfg.packing,
                "current": current, "offset": p.offset, "packer": dict(p.counters)}

    def load_state_dict(self, state: dict) -> None:
        reshard = self._check_header(state)
        for key, mine in (("sources", self.source_names), ("packing", self.cfg.packing)):
            if state[key] != mine:
                raise DataStateError(f"data state was saved with {key}={state[key]!r}, this "
                                     f"pipeline has {mine!r}")
        self._documents.close()
        self._packer = self._new_packer()
        self._packer.counters.update(state["packer"])
        current = state["current"]
        if current is None:  # saved before the first batch: start from the beginning
            self._mixture.restore(MixturePosition(0, (START,) * len(self._readers)))
        else:
            position = MixturePosition.from_json(current)
            if reshard:
                # Positions belong to the old sharding; start the next epoch of every source.
                position = MixturePosition(position.draws, tuple(
                    r._replace(epoch=r.epoch + 1, window=0, offset=0, start=None,
                               counters=(0,) + r.counters[1:])
                    for r in position.readers))
            self._mixture.restore(position)
        self._start_prefetch()
        if current is not None and not reshard:
            tokens, position = next(self._documents)  # re-yields the document being packed
            self._packer.set_current(tokens, position, state["offset"])

    def stats(self) -> dict:
        """Packer counters, per-source reader counters (source<i>/...) and their totals."""
        out = dict(self._packer.counters)
        position = self._packer.current_position
        if position is None:
            return out
        for name in COUNTERS[1:]:
            out[name] = 0
        for i, reader in enumerate(position.readers):
            out[f"source{i}/epoch"] = reader.epoch
            for name, value in zip(COUNTERS, reader.counters):
                out[f"source{i}/{name}"] = value
                if name != "epoch_documents":
                    out[name] += value
        out["epoch"] = min(r.epoch for r in position.readers)  # full passes over every source
        return out

    def close(self) -> None:
        if self._documents is not None:
            self._documents.close()
