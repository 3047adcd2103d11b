"""Document streams: one reader per source, a weighted mixture over them, exact positions.

A reader streams its source with `datasets` (streaming=True), keeps this rank's part
(`split_dataset_by_node`) and shuffles within windows of `shuffle_buffer` documents. A window
is re-readable from the `datasets` state taken before its first record and its order is a
counter-based hash of (seed, rank, source, epoch, window), so a position is five small values
(epoch, window, offset, start state, counters) and restoring one re-reads at most one window.
Every source repeats without end (the epoch is counted), so ranks never run out at different
times (SPEC 4); the trainer stops on its step count.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Iterator, NamedTuple, Optional

import numpy as np

from training.data import rng
from training.data.config import LOCAL_FORMATS, SourceConfig, is_local_pattern, resolve_local_files
from training.data.errors import DataSourceError

UNSHUFFLED_WINDOW = 256  # records read per window when shuffling is off
COUNTERS = ("epoch_documents", "documents", "empty_documents", "missing_text", "replaced_utf8",
            "held_out")
EPOCH_DOCS, DOCS, EMPTY, MISSING, REPLACED, HELD_OUT = range(len(COUNTERS))


class ReaderPosition(NamedTuple):
    epoch: int
    window: int          # window index within the epoch
    offset: int          # records of that window already handed out
    start: Optional[dict]  # datasets state before the window's first record (None: epoch start)
    counters: tuple      # values of COUNTERS

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "window": self.window, "offset": self.offset,
                "start": self.start, "counters": dict(zip(COUNTERS, self.counters))}

    @classmethod
    def from_json(cls, d: dict) -> "ReaderPosition":
        return cls(d["epoch"], d["window"], d["offset"], d["start"],
                   tuple(d["counters"][c] for c in COUNTERS))


START = ReaderPosition(0, 0, 0, None, (0,) * len(COUNTERS))


class Holdout(NamedTuple):
    """Documents whose content hash falls below `fraction` belong to eval, the rest to train."""
    fraction: float
    keep_eval: bool

    def keeps(self, text: str) -> bool:
        if self.fraction <= 0:
            return True
        is_eval = zlib.crc32(text.encode("utf-8", "surrogatepass")) < self.fraction * 2**32
        return is_eval == self.keep_eval


def _local_format(files: list[str]) -> str:
    return LOCAL_FORMATS[os.path.splitext(files[0])[1].lower()]


def _first_record_fields(path: str, fmt: str) -> Optional[list[str]]:
    """Field names of a local file's first record (None when it has no record at all)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    if fmt == "text":
        return ["text"]
    with open(path, "rb") as f:
        if path.lower().endswith(".jsonl"):
            line = next((ln for ln in f if ln.strip()), None)
            if line is None:
                return None
            record = json.loads(line.decode("utf-8", "replace"))
        else:
            data = json.loads(f.read().decode("utf-8", "replace"))
            record = data[0] if isinstance(data, list) and data else data
    return list(record) if isinstance(record, dict) else None


def check_text_field(src: SourceConfig, where: str) -> None:
    """Fail before training when a local file's records lack the text field."""
    if not is_local_pattern(src.path_or_name):
        return
    files = resolve_local_files(src.path_or_name, f"{where}.path_or_name")
    fmt = _local_format(files)
    if fmt == "text" and src.text_field != "text":
        raise DataSourceError(f"{where}.text_field: {src.text_field!r}; txt files only have the "
                              f"field 'text'")
    for path in files:
        try:
            fields = _first_record_fields(path, fmt)
        except (ValueError, OSError) as e:
            raise DataSourceError(f"{where}: cannot read {path} as {fmt} ({e})") from e
        if fields is not None and src.text_field not in fields:
            raise DataSourceError(f"{where}.text_field: {src.text_field!r} is not a field of the "
                                  f"records in {path} (fields: {fields})")


def load_source(src: SourceConfig):
    """The whole source as a streaming datasets.IterableDataset (loaded once per reader)."""
    import datasets

    if is_local_pattern(src.path_or_name):
        # load_dataset pings the hub to count downloads even for local files; on an offline
        # node the DNS lookup can block for minutes (seen in this sandbox), so never do that.
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
        files = resolve_local_files(src.path_or_name, "data source")
        fmt = _local_format(files)
        extra = {"encoding_errors": "replace", "sample_by": src.sample_by} if fmt == "text" else {}
        return datasets.load_dataset(fmt, data_files=files, split="train", streaming=True, **extra)
    # A hub name, or a dataset folder (a directory, loaded like a hub repository: no download
    # count to send, and no DNS lookup to block on, as for local files).
    if os.path.isdir(os.path.expanduser(src.path_or_name)):
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    return datasets.load_dataset(os.path.expanduser(src.path_or_name), src.config_name,
                                 split=src.split, streaming=True)


class SourceReader:
    """Endless, window-shuffled documents of one source for one rank, with exact positions."""

    def __init__(self, src: SourceConfig, source_index: int, rank: int, world_size: int,
                 seed: int, shuffle_buffer: int, holdout: Holdout, dataset=None):
        """`rank` of `world_size`: the part of the source read (a data shard, training/data/
        shards.py); `dataset`: load_source(src) when the caller already has it."""
        self.src, self.index, self.rank, self.world_size = src, source_index, rank, world_size
        self.seed, self.holdout = seed, holdout
        self.shuffle = shuffle_buffer > 1
        self.window_size = shuffle_buffer if self.shuffle else UNSHUFFLED_WINDOW
        self.is_txt = is_local_pattern(src.path_or_name) and _local_format(
            resolve_local_files(src.path_or_name, "data source")) == "text"
        self._source = load_source(src) if dataset is None else dataset
        self.restore(START)

    def _open(self):
        """A fresh iteration over this rank's part (a restored dataset restarts at its state)."""
        from datasets.distributed import split_dataset_by_node

        return split_dataset_by_node(self._source, rank=self.rank, world_size=self.world_size)

    def restore(self, pos: ReaderPosition) -> None:
        self._ds = self._open()
        if pos.start is not None:
            self._ds.load_state_dict(pos.start)
        self._iter = iter(self._ds)
        self._epoch, self._window_index, self._counters = pos.epoch, pos.window, list(pos.counters)
        self._read_window(pos.start)
        self._offset = pos.offset

    @property
    def position(self) -> ReaderPosition:
        return ReaderPosition(self._epoch, self._window_index, self._offset, self._start,
                              tuple(self._counters))

    def _read_window(self, start: Optional[dict]) -> None:
        self._start = start
        records = []
        for record in self._iter:
            records.append(record.get(self.src.text_field))
            if len(records) == self.window_size:
                break
        self._records = records
        if self.shuffle:
            keys = rng.permutation_keys(self.seed, "shuffle", self.rank, self.index, self._epoch,
                                        self._window_index, np.arange(len(records)))
            self._order = np.argsort(keys, kind="stable").tolist()
        else:
            self._order = range(len(records))
        self._offset = 0

    def _next_window(self) -> None:
        start = self._ds.state_dict()
        self._window_index += 1
        self._read_window(start)
        if self._records:
            return
        if self._counters[EPOCH_DOCS] == 0:
            raise DataSourceError(
                f"data source {self.src.path_or_name!r} gave rank {self.rank} of "
                f"{self.world_size} no usable document in a whole epoch (counters: "
                f"{dict(zip(COUNTERS, self._counters))}); check the files, text_field and "
                f"eval_fraction")
        self._epoch, self._window_index, self._counters[EPOCH_DOCS] = self._epoch + 1, 0, 0
        self._ds = self._open()
        self._iter = iter(self._ds)
        self._read_window(None)

    def next_document(self) -> tuple[str, ReaderPosition]:
        """The next accepted document and the position that re-yields it."""
        c = self._counters
        while True:
            if self._offset >= len(self._records):
                self._next_window()
            before = self.position
            text = self._records[self._order[self._offset]]
            self._offset += 1
            if not isinstance(text, str):
                c[MISSING] += 1
            elif not text.strip():
                c[EMPTY] += 1
            elif not self.holdout.keeps(text):
                c[HELD_OUT] += 1
            else:
                if self.is_txt and "\ufffd" in text:
                    c[REPLACED] += 1  # decoded with errors="replace"; counted, then used
                c[EPOCH_DOCS] += 1
                c[DOCS] += 1
                return text, before


class MixturePosition(NamedTuple):
    draws: int                          # documents drawn from the mixture so far
    readers: tuple[ReaderPosition, ...]

    def to_json(self) -> dict:
        return {"draws": self.draws, "readers": [r.to_json() for r in self.readers]}

    @staticmethod
    def passed_all_data(first: "MixturePosition", now: "MixturePosition") -> bool:
        """Every source read one whole epoch between the two positions (two epoch turns are
        sufficient whatever the offsets)."""
        return all(b.epoch >= a.epoch + 2 for a, b in zip(first.readers, now.readers))

    @classmethod
    def from_json(cls, d: dict) -> "MixturePosition":
        return cls(d["draws"], tuple(ReaderPosition.from_json(r) for r in d["readers"]))


class DocumentMixture:
    """Documents drawn from the readers by weight; draw k's source is a hash of (seed, rank, k)."""

    def __init__(self, readers: list[SourceReader], weights: list[float], seed: int, rank: int):
        self.readers, self.weights, self.seed, self.rank = readers, weights, seed, rank
        self.draws = 0

    def restore(self, pos: MixturePosition) -> None:
        for reader, p in zip(self.readers, pos.readers):
            reader.restore(p)
        self.draws = pos.draws

    @property
    def position(self) -> MixturePosition:
        """The position that re-yields the next document."""
        return MixturePosition(self.draws, tuple(r.position for r in self.readers))

    def next_document(self) -> tuple[str, MixturePosition]:
        """The next document and the position that re-yields it."""
        s = 0
        if len(self.readers) > 1:
            s = int(rng.weighted_choice(self.weights, self.seed, "mixture", self.rank,
                                        self.draws)[0])
        text, before = self.readers[s].next_document()
        positions = tuple(before if i == s else r.position for i, r in enumerate(self.readers))
        self.draws += 1
        return text, MixturePosition(self.draws - 1, positions)

    def __iter__(self) -> Iterator[tuple[str, MixturePosition]]:
        while True:
            yield self.next_document()
