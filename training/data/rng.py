"""Counter-based random numbers: a value is a hash of (seed, stream, counters).

Any sample, window or mixture draw can be recomputed from its coordinates alone, so the data
order needs no saved generator state and every rank can build any global sample by itself.
"""

from __future__ import annotations

import zlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def stream_id(name: str) -> int:
    """A stable integer for a named stream (crc32 does not depend on PYTHONHASHSEED)."""
    return zlib.crc32(name.encode())


def hash64(seed: int, stream: str, *counters) -> np.ndarray:
    """uint64 hash of (seed, stream, counters...); counters broadcast like numpy arrays."""
    with np.errstate(over="ignore"):
        h = _splitmix64(np.asarray([seed & (2**64 - 1)], dtype=np.uint64))
        h = _splitmix64(h ^ np.uint64(stream_id(stream)))
        for c in counters:
            h = _splitmix64(h ^ np.asarray(c).astype(np.uint64))
    return h


def randint(n: int, seed: int, stream: str, *counters) -> np.ndarray:
    """Integers in [0, n); the modulo bias is below 2**-40 for the small n used here."""
    return (hash64(seed, stream, *counters) >> np.uint64(11)) % np.uint64(n)


def uniform(seed: int, stream: str, *counters) -> np.ndarray:
    """Floats in [0, 1)."""
    return (hash64(seed, stream, *counters) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def weighted_choice(weights, seed: int, stream: str, *counters) -> np.ndarray:
    """Index drawn with probability proportional to `weights`."""
    cum = np.cumsum(np.asarray(weights, dtype=np.float64))
    return np.searchsorted(cum / cum[-1], uniform(seed, stream, *counters), side="right")


def permutation_keys(seed: int, stream: str, *counters) -> np.ndarray:
    """argsort of these hashes along the last axis is a uniformly random permutation."""
    return hash64(seed, stream, *counters)
