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
