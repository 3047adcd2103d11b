"""The BABILong-style training source (data.source: babilong), with the pipelines' interface.

Like the memory tasks, rank r's micro-batch k holds the global samples (k*W + r)*B + i, i < B,
each built from its index alone (training/data/babilong_samples.py), so the state is the
micro-batch counter and resuming continues at the exact sample; the number of segments comes
with every next_batch call (curriculum). Registered with build_pipeline on import
(training/data/__init__.py imports this module).
"""

from __future__ import annotations

import numpy as np

from training.data import pipeline
from training.data.babilong_samples import BabilongSampler
from training.data.config import BABILONG


class BabilongPipeline(pipeline.IndexedPipeline):
    kind = BABILONG

    def __init__(self, *args):
        super().__init__(*args)
        self.sampler = BabilongSampler(self.cfg, self.tokenizer, self.seed, self.split)

    def _task_names(self) -> list[str]:
        return list(self.cfg.babilong.tasks) + ["text"]

    def _generate(self, indices: np.ndarray, num_segments: int) -> dict:
        return self.sampler.generate(indices, num_segments, self.segment_size)

    def _extra_state(self) -> dict:
        return {"tasks": list(self.cfg.babilong.tasks)}


pipeline.EXTRA_PIPELINES[BABILONG] = BabilongPipeline
