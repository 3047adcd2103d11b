"""The batch section: micro batch, accumulation and global batch, and how a world size splits them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from training.config.errors import ConfigError
from training.data.config import described as doc


@dataclass
class BatchConfig:
    micro_batch_size: int = doc(16, "samples per rank per forward/backward: the most a rank takes "
                                "(less where global_batch_size / world size is less)")
    grad_accum_steps: Optional[int] = doc(None, "micro-batches accumulated per optimizer step; "
                                          "null = derived from global_batch_size (1 without it)")
    global_batch_size: Optional[int] = doc(None, "samples per optimizer step over all ranks, kept "
                                           "on any world size (grad_accum_steps, and "
                                           "micro_batch_size where needed, derived from it); "
                                           "null = micro_batch_size x grad_accum_steps x world size")

    def problems(self, world_size: Optional[int] = None) -> list[str]:
        """`world_size` None: the checks that hold on any world size (commands that do not train)."""
        out = []
        if self.micro_batch_size < 1:
            out.append(f"batch.micro_batch_size: {self.micro_batch_size} must be >= 1")
        if self.grad_accum_steps is not None and self.grad_accum_steps < 1:
            out.append(f"batch.grad_accum_steps: {self.grad_accum_steps} must be >= 1 or null")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            out.append(f"batch.global_batch_size: {self.global_batch_size} must be >= 1 or null")
        if not out and world_size is not None and world_size >= 1:
            try:
                self.for_world(world_size)
            except ConfigError as e:
                out += e.problems
        return out

    def for_world(self, world_size: int) -> "BatchConfig":
        """The sizes a run on `world_size` ranks uses, all three set, as DeepSpeed derives the third
        of train_batch / micro / accumulation: with global_batch_size fixed, accumulation is
        global / (micro x world); where the world is too large for the recipe's micro batch, the
        micro batch shrinks to global / world (never grows). Raises ConfigError naming values that
        work when no such split exists."""
        micro, accum, total = self.micro_batch_size, self.grad_accum_steps, self.global_batch_size
        if total is None:
            accum = accum or 1
            return BatchConfig(micro, accum, micro * accum * world_size)
        where = (f"batch.global_batch_size: {total} over world size {world_size} with "
                 f"micro_batch_size {micro}" + (f" and grad_accum_steps {accum}" if accum else ""))
        if total % world_size:
            raise _no_split(where, f"{total} samples do not split over {world_size} ranks",
                            "world sizes", _divisors(total, total), total, world_size)
        per_rank = total // world_size
        derived_micro = min(micro, per_rank)
        if per_rank % derived_micro:
            raise _no_split(where, f"{per_rank} samples per rank are not a multiple of the micro "
                            "batch", "micro_batch_size", _divisors(per_rank, micro), total,
                            micro * world_size)
        derived_accum = per_rank // derived_micro
        if accum is not None and accum != derived_accum:
            raise ConfigError([f"{where}: needs grad_accum_steps {derived_accum}, not {accum} "
                               f"(set batch.grad_accum_steps=null to derive it)"])
        return BatchConfig(derived_micro, derived_accum, total)

    def describe(self, world_size: int) -> str:
        """How the run's batch is made up, e.g. for the log: 'global 32 = micro 16 x accum 2 x 1 rank(s)'."""
        used = self.for_world(world_size)
        text = (f"global {used.global_batch_size} = micro {used.micro_batch_size} x accum "
                f"{used.grad_accum_steps} x {world_size} rank(s)")
        derived = [name for name in ("micro_batch_size", "grad_accum_steps")
                   if getattr(used, name) != getattr(self, name)]
        return text + (f" ({' and '.join(derived)} derived from batch.global_batch_size)"
                       if derived and self.global_batch_size is not None else "")


def _no_split(where: str, what: str, name: str, fits: list[int], total: int,
              multiple: int) -> ConfigError:
    return ConfigError([f"{where}: {what} ({name} that work: {_some(fits)}; or a "
                        f"global_batch_size that is a multiple of {multiple}, e.g. "
                        f"{_nearest_multiples(total, multiple)})"])


def _divisors(n: int, at_most: int) -> list[int]:
    return [d for d in range(1, at_most + 1) if n % d == 0]


def _some(values: list[int], limit: int = 8) -> str:
    return ", ".join(map(str, values[:limit])) + (", ..." if len(values) > limit else "")


def _nearest_multiples(value: int, step: int) -> str:
    below, above = value // step * step, -(-value // step) * step
    return " or ".join(str(v) for v in dict.fromkeys((below, above)) if v > 0)
