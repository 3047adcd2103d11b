"""Stop signals (SPEC 2.5): SIGTERM / SIGUSR1 ask every rank to save at the next step boundary
and exit 0 (Slurm preemption, time-limit warning).

A handler only records the signal; the trainer reads `stop_signal_received()` once per step and
all-reduces it with the step's statistics, so every rank stops at the same step.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger("training")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []


def install_stop_signal_handlers() -> None:
    """Installed first thing in the entry point: a signal that arrives during start-up or resume
    must not kill the rank (SIGUSR1's default action terminates)."""
    def record(signum, frame):
        _received.append(signum)
        log.warning("received %s: saving at the next step boundary, then exiting",
                    signal.Signals(signum).name)

    for sig in STOP_SIGNALS:
        signal.signal(sig, record)


def stop_signal_received() -> bool:
    return bool(_received)
