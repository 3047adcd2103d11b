"""Packing tokenised documents into samples of num_segments x segment_size tokens.

concat:   documents (each followed by EOS) are cut into consecutive samples; a sample may span
          documents and a document may span samples.
document: every sample starts at a document start and holds its first N*S tokens; the rest
          of a longer document is dropped (counted), a shorter one is dropped (counted) or, with
          short_documents=pad, padded (attention_mask 0, labels -100).

The packer's state is (position of the current document, tokens already taken from it): the
document is re-read and re-tokenised on resume instead of saving its tokens.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from model.conventions import IGNORE_INDEX as IGNORE  # torch- and transformers-free
from training.data.errors import DataSourceError

PACKER_COUNTERS = ("samples", "tokens", "short_documents_dropped", "short_documents_padded",
                   "padding_tokens", "truncated_tokens")


class Packer:
    """`passed_all_data(first, now)` says whether the stream went through all of its data
    between two document positions; document packing uses it to stop dropping for ever."""

    def __init__(self, mode: str, short_documents: str, pad_id: int,
                 passed_all_data: Callable[[object, object], bool]):
        if mode not in ("concat", "document"):
            raise ValueError(f"data.packing: {mode!r} must be concat or document")
        self.mode, self.pad_short, self.pad_id = mode, short_documents == "pad", pad_id
        self.passed_all_data = passed_all_data
        self.counters = dict.fromkeys(PACKER_COUNTERS, 0)
        self.current: Optional[np.ndarray] = None  # tokens of the current document
        self.current_position = None               # the position that re-yields it
        self.offset = 0                            # tokens of it already packed

    def set_current(self, tokens: np.ndarray, position, offset: int) -> None:
        self.current, self.current_position, self.offset = tokens, position, offset

    def _advance(self, documents) -> None:
        tokens, position = next(documents)
        self.set_current(tokens, position, 0)

    def pack(self, documents, batch_size: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), each [batch_size, length] int64."""
        ids = np.full((batch_size, length), self.pad_id, dtype=np.int64)
        mask = np.ones((batch_size, length), dtype=np.int64)
        if self.mode == "concat":
            flat, filled = ids.reshape(-1), 0
            while filled < flat.size:
                if self.current is None or self.offset >= len(self.current):
                    self._advance(documents)
                take = min(flat.size - filled, len(self.current) - self.offset)
                flat[filled:filled + take] = self.current[self.offset:self.offset + take]
                filled += take
                self.offset += take
        else:
            row, first_dropped = 0, None
            while row < batch_size:
                self._advance(documents)
                doc = self.current
                self.offset = len(doc)
                if len(doc) >= length:
                    ids[row] = doc[:length]
                    self.counters["truncated_tokens"] += len(doc) - length
                elif self.pad_short:
                    ids[row, :len(doc)] = doc
                    mask[row, len(doc):] = 0
                    self.counters["short_documents_padded"] += 1
                    self.counters["padding_tokens"] += length - len(doc)
                else:
                    self.counters["short_documents_dropped"] += 1
                    first_dropped = first_dropped or self.current_position
                    if self.passed_all_data(first_dropped, self.current_position):
                        raise DataSourceError(
                            f"data.short_documents: drop, but no document is {length} tokens "
                            f"long (num_segments x segment_size); use short_documents: pad, "
                            f"packing: concat or fewer segments")
                    continue
                row += 1
        self.counters["samples"] += batch_size
        self.counters["tokens"] += int(mask.sum())
        return ids, mask


def labels_for(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Language-model labels: every real token is a target (the model shifts), padding is not."""
    return np.where(attention_mask.astype(bool), input_ids, IGNORE)
