"""Curriculum over the number of segments per sample (SPEC 2.3).

The number of segments is a pure function of the optimizer step, so every rank computes the
same value without communicating, and the checkpoint's step restores it exactly.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from training.data.config import described


@dataclass
class CurriculumConfig:
    schedule: list[list[int]] = described(
        text="[[step, num_segments], ...]: from each step on, samples hold that many segments",
        factory=lambda: [[0, 2]])

    def problems(self, where: str = "curriculum") -> list[str]:
        bad = [e for e in self.schedule if not (isinstance(e, (list, tuple)) and len(e) == 2
                                                and all(type(v) is int for v in e))]
        if not self.schedule or bad:
            return [f"{where}.schedule: {self.schedule} must be a non-empty list of "
                    f"[step, num_segments] integer pairs, e.g. [[0, 1], [500, 2], [1500, 4]]"]
        out = []
        steps = [s for s, _ in self.schedule]
        if steps[0] != 0:
            out.append(f"{where}.schedule: first entry starts at step {steps[0]}; it must start "
                       f"at step 0")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            out.append(f"{where}.schedule: steps {steps} must be strictly increasing")
        if any(n < 1 for _, n in self.schedule):
            out.append(f"{where}.schedule: every num_segments must be >= 1 ({self.schedule})")
        return out

    def max_segments(self) -> int:
        return max(n for _, n in self.schedule)


class SegmentCurriculum:
    """Maps an optimizer step to the number of segments per sample."""

    def __init__(self, schedule: list[list[int]] | CurriculumConfig):
        cfg = schedule if isinstance(schedule, CurriculumConfig) else CurriculumConfig(
            [list(e) for e in schedule])
        problems = cfg.problems()
        if problems:
            raise ValueError("; ".join(problems))
        self.schedule = [list(e) for e in cfg.schedule]
        self._steps = [s for s, _ in self.schedule]

    def num_segments(self, step: int) -> int:
        if step < 0:
            raise ValueError(f"step {step} must be >= 0")
        return self.schedule[bisect.bisect_right(self._steps, step) - 1][1]

    __call__ = num_segments

    def max_segments(self) -> int:
        return max(n for _, n in self.schedule)

    def state_dict(self) -> dict:
        """For the checkpoint's client state: the schedule; the step gives the position."""
        return {"schedule": self.schedule}
