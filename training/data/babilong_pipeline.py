"""The BABILong-style training source (data.source: babilong), with the pipelines' interface.

Like the memory tasks, rank r's micro-batch k holds the global samples (k*W + r)*B + i, i < B,
each built from its index alone (training/data/babilong_samples.py), so the state is the
micro-batch counter and resuming continues at the exact sample; the number of segments comes
with every next_batch call (curriculum). Registered with build_pipeline on import
(training/data/__init__.py imports this module).
"""

from __future__ import annotations

import math

import numpy as np

from training.data import pipeline
from training.data.babilong_samples import BabilongSampler
from training.data.config import BABILONG
from training.data.memory_tasks import to_batch


class BabilongPipeline(pipeline._Pipeline):
    kind = BABILONG

    def __init__(self, *args):
        super().__init__(*args)
        self.sampler = BabilongSampler(self.cfg, self.tokenizer, self.seed, self.split)
        self.micro_batches = 0
        self._task_counts = np.zeros(len(self.cfg.babilong.tasks) + 1, dtype=np.int64)

    def next_batch(self, num_segments: int) -> dict:
        B, W = self.micro_batch_size, self.world_size
        first = (self.micro_batches * W + self.rank) * B
        indices = np.arange(first, first + B)
        arrays = self.sampler.generate(indices, num_segments, self.segment_size)
        self.micro_batches += 1
        self._task_counts += np.bincount(arrays["task_ids"], minlength=len(self._task_counts))
        return to_batch(arrays, indices)

    def state_dict(self) -> dict:
        return {**self._header(), "tasks": list(self.cfg.babilong.tasks),
                "micro_batches": self.micro_batches, "task_counts": self._task_counts.tolist()}

    def load_state_dict(self, state: dict) -> None:
        reshard = self._check_header(state)
        if state.get("tasks") != list(self.cfg.babilong.tasks):
            raise pipeline.DataStateError(
                f"data state was saved with data.babilong.tasks={state.get('tasks')}, this "
                f"pipeline has {self.cfg.babilong.tasks}")
        if reshard:  # continue after every sample the old world consumed (a whole new step)
            consumed = state["micro_batches"] * state["world_size"] * state["micro_batch_size"]
            self.micro_batches = math.ceil(consumed / (self.world_size * self.micro_batch_size))
        else:
            self.micro_batches = state["micro_batches"]
        self._task_counts = np.asarray(state["task_counts"], dtype=np.int64)

    def stats(self) -> dict:
        names = list(self.cfg.babilong.tasks) + ["text"]
        out = {"samples": self.micro_batches * self.micro_batch_size}
        out.update({f"samples_{t}": int(c) for t, c in zip(names, self._task_counts)})
        return out


pipeline.EXTRA_PIPELINES[BABILONG] = BabilongPipeline
