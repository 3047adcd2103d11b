"""The held-out sets the trainer scores answer spans on, for corpora whose samples mark an answer:
the built-in memory tasks (one set, their mixture: `eval/memory_*`) and BABILong-style stories
(one set per configured task: `eval/babilong_qa1_*`, ...). Scoring itself is training/scoring.py.

Every set is indexed by sample, so rank r of W scores samples [r*T/W, (r+1)*T/W) of the same T
held-out samples at every segment count and every eval, whatever the world size.
"""

from __future__ import annotations

from training.data.config import BABILONG, MEMORY_TASKS

ANSWER_SOURCES = (MEMORY_TASKS, BABILONG)


class AnswerEvalSets:
    def __init__(self, cfg, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self._sampler = None  # BABILong's filler pool is read once, at the first eval

    def names(self) -> list[str]:
        if self.cfg.data.source == MEMORY_TASKS:
            return ["memory"]
        # A bAbI file task ("file") is scored like a generated one.
        return [f"babilong_{t}" for t in self.cfg.data.babilong.tasks]

    def batch(self, name: str, n_segments: int, lo: int, hi: int) -> dict:
        """Samples lo..hi of set `name` at `n_segments` (CPU tensors, labels on the answer)."""
        cfg = self.cfg
        if cfg.data.source == MEMORY_TASKS:
            from training.data.memory_tasks import make_eval_batch

            return make_eval_batch("mixture", n_segments, cfg.model.segment_size, hi - lo,
                                   cfg.run.seed, cfg=cfg.data.memory_tasks, start=lo)
        from training.data.babilong_samples import BabilongSampler
        from training.data.memory_tasks import to_batch

        if self._sampler is None:
            self._sampler = BabilongSampler(cfg.data, self.tokenizer, cfg.run.seed, "eval")
        task = name[len("babilong_"):]
        arrays = self._sampler.generate(range(lo, hi), n_segments, cfg.model.segment_size,
                                        task=task)
        return to_batch(arrays, range(lo, hi))
