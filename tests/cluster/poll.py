"""Waiting for something another process does, with a useful message when it never happens."""
from __future__ import annotations

import time
from pathlib import Path


def wait_until(predicate, timeout_s: float, what: str, log: Path | None = None, interval_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}" + (f"\n{log}:\n{tail}" if tail else ""))
        time.sleep(interval_s)


def wait_steady(predicate, seconds: float, timeout_s: float, what: str, log: Path | None = None) -> None:
    """Wait until `predicate` has held continuously for `seconds` (e.g. a node IDLE and settled)."""
    since = {"t": None}

    def steady() -> bool:
        holds = predicate()
        since["t"] = (since["t"] or time.monotonic()) if holds else None
        return holds and time.monotonic() - since["t"] >= seconds

    wait_until(steady, timeout_s, what, log, interval_s=0.5)
