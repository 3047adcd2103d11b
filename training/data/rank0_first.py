"""Hub datasets (and dataset folders) are resolved by rank 0 first; the other ranks wait.

With 16-128 ranks starting at once, every rank resolving a hub dataset at the same moment means
as many simultaneous hub requests (rate limits, HTTP 429) and as many processes racing to fill
the same `datasets`/`huggingface_hub` cache. So, as `main_process_first` does for `datasets` and
`accelerate` users: rank 0 resolves every such source (streaming `load_dataset`), then tells the
others whether that worked; they resolve after it, finding what it downloaded (dataset card,
metadata, a loading module) in the Hugging Face cache. The readers' own `load_dataset` calls in
the trainer's set-up come after this on every rank. A source rank 0 cannot resolve (unknown
name, missing config or split, no network and nothing cached) fails every rank alike as bad
input, instead of leaving the others waiting at a barrier.

Local files and globs are opened directly (no resolution), so they are skipped. A dataset folder
(a directory) goes through the same `datasets` resolution as a hub repository, so it is ordered
the same way.

Every rank logs one line per source ("rank 0 resolved data source X ... in 1.20 s", "rank 1
resolved data source X ... after rank 0, in 0.30 s"), so the order is visible in the console log
(and from the times and durations, that rank 1 started only once rank 0 was done).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

from training.data.config import MEMORY_TASKS, DataConfig, SourceConfig, is_local_pattern
from training.data.errors import DataSourceError

# Other ranks log warnings only (training.monitor.setup_logging); these lines are the per-rank
# record of the order, so this logger speaks at INFO on every rank.
log = logging.getLogger("training.data.rank0_first")


def sources_to_resolve(data: DataConfig) -> list[tuple[str, SourceConfig]]:
    """(config path, source) of the sources (text, babilong filler) that need `datasets`
    resolution, each (name, config, split) once."""
    if data.source == MEMORY_TASKS:
        return []
    seen, out = set(), []
    for name in ("sources", "eval_sources"):
        for i, src in enumerate(getattr(data, name)):
            key = (src.path_or_name, src.config_name, src.split)
            if not is_local_pattern(src.path_or_name) and key not in seen:
                seen.add(key)
                out.append((f"data.{name}[{i}]", src))
    return out


def _resolve(where: str, src: SourceConfig, load) -> tuple[Optional[str], float]:
    """(None when `load(src)` worked, else the error message naming the source; seconds taken)."""
    started = time.perf_counter()
    try:
        load(src)
    except Exception as e:  # datasets raises many kinds (DatasetNotFoundError, OSError, ...)
        return (f"{where}.path_or_name: cannot resolve dataset {src.path_or_name!r} "
                f"(config {src.config_name!r}, split {src.split!r}): {type(e).__name__}: {e}",
                time.perf_counter() - started)
    return None, time.perf_counter() - started


def broadcast_from_rank0(obj):
    """Rank 0's `obj` on every rank (every rank must call it); `obj` itself without a process
    group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def resolve_rank0_first(data: DataConfig, rank: int,
                        share: Callable = broadcast_from_rank0) -> None:
    """Resolve the config's hub sources on rank 0, then (after `share`, a broadcast from rank 0
    that every rank enters) on the others. Raises DataSourceError on every rank when rank 0
    could not resolve a source, or on the rank that failed when only another rank could not."""
    from training.data.sources import load_source

    todo = sources_to_resolve(data)
    if not todo:
        return
    log.setLevel(logging.INFO)
    error = None
    if rank == 0:
        for where, src in todo:
            error, seconds = _resolve(where, src, load_source)
            if error:
                break
            log.info("rank 0 resolved data source %s (%s) in %.2f s", src.path_or_name, where,
                     seconds)
    error = share(error)
    if error:
        raise DataSourceError(error)
    if rank == 0:
        return
    for where, src in todo:
        error, seconds = _resolve(where, src, load_source)
        if error:
            raise DataSourceError(error)
        log.info("rank %d resolved data source %s (%s) after rank 0, in %.2f s", rank,
                 src.path_or_name, where, seconds)
