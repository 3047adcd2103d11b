"""build_pipeline: per-rank batches of packed samples, with exact, JSON-serialisable state.

Every pipeline has one interface (next_batch, state_dict, load_state_dict, stats, close):

IndexedPipeline (memory_tasks here, babilong in babilong_pipeline.py): rank r's micro-batch k
    holds the global samples (k*W + r)*B + i, i < B, each built from its index alone, so one step
    over W ranks sees exactly what one rank with micro batch W*B sees; the state is the
    micro-batch counter, which a new world size or micro batch continues at the next global
    sample (elastic resume, training/elastic.py).
TextPipeline (text_pipeline.py): streamed text sources read as data shards dealt to the ranks
    (shards.py); a whole saved world's states continue on another world size shard by shard.

load_state_dict takes this rank's own state or a whole saved world's (`world_state`), which is
what the trainer passes after a change of world size.
"""

from __future__ import annotations

import math
import numpy as np

from training.data import memory_tasks
from training.data.config import BUILTIN, MEMORY_TASKS, DataConfig
from training.data.errors import DataStateError

STATE_VERSION = 1
RESHARD_HINT = ("set data.reshard=true to continue anyway (memory tasks: at the same global "
                "sample; text: every rank restarts its sources at the next epoch)")


WORLD = "world"  # the key of a whole saved world's states


def world_state(states: list[dict]) -> dict:
    """Every rank's saved data state as one state that any rank of another world loads."""
    return {WORLD: list(states)}


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
    cls = MemoryTaskPipeline if cfg.source == MEMORY_TASKS else EXTRA_PIPELINES[cfg.source]
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


class IndexedPipeline(_Pipeline):
    """Samples built from their global index alone (`_generate`); the state is a counter."""

    def __init__(self, *args):
        super().__init__(*args)
        self.micro_batches = 0
        self._task_counts = np.zeros(len(self._task_names()), dtype=np.int64)

    def _task_names(self) -> list[str]:
        raise NotImplementedError

    def _generate(self, indices: np.ndarray, num_segments: int) -> dict:
        """Arrays of the samples `indices` (memory_tasks.generate's, with task_ids)."""
        raise NotImplementedError

    def _extra_state(self) -> dict:
        """Settings of data.<kind> the state must match when loaded (load_state_dict checks)."""
        return {}

    def next_batch(self, num_segments: int) -> dict:
        B, W = self.micro_batch_size, self.world_size
        first = (self.micro_batches * W + self.rank) * B
        indices = np.arange(first, first + B)
        arrays = self._generate(indices, num_segments)
        self.micro_batches += 1
        self._task_counts += np.bincount(arrays["task_ids"], minlength=len(self._task_counts))
        return memory_tasks.to_batch(arrays, indices)

    def state_dict(self) -> dict:
        return {**self._header(), **self._extra_state(), "micro_batches": self.micro_batches,
                "task_counts": self._task_counts.tolist()}

    def load_state_dict(self, state: dict) -> None:
        if WORLD in state:  # every rank of a world is at the same counter; this rank's counts
            saved = state[WORLD]
            state = next((s for s in saved if s.get("rank") == self.rank), saved[0])
        for key, mine in self._extra_state().items():
            if state.get(key) != mine:
                raise DataStateError(f"data state was saved with data.{self.kind}.{key}="
                                     f"{state.get(key)!r}, this pipeline has {mine!r}")
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
        out.update({f"samples_{t}": int(c) for t, c in zip(self._task_names(), self._task_counts)})
        return out


class MemoryTaskPipeline(IndexedPipeline):
    kind = MEMORY_TASKS

    def __init__(self, *args):
        super().__init__(*args)
        vocab = self.tokenizer.get_vocab()
        if any(vocab.get(tok) != i for i, tok in enumerate(memory_tasks.VOCAB)):
            raise ValueError(f"data.tokenizer: the memory_tasks corpus needs the {BUILTIN} "
                             f"tokenizer (build_tokenizer with tokenizer: {BUILTIN})")
        self.data_seed = self.seed if self.split == "train" else memory_tasks.eval_seed(self.seed)

    def _task_names(self) -> list[str]:
        return list(self.cfg.memory_tasks.tasks)

    def _generate(self, indices: np.ndarray, num_segments: int) -> dict:
        return memory_tasks.generate(indices, num_segments, self.segment_size,
                                     self.cfg.memory_tasks, self.data_seed)
