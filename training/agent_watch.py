"""Workers started by torchrun die with their agent.

torchrun starts every worker in a session of its own (torch.distributed.elastic's
SubprocessHandler, start_new_session=True), so a SIGKILL of the agent, or of its process group,
leaves the workers running as orphans: they go on training and writing checkpoints and
metrics.jsonl into the run folder while the rerun of the same command resumes from the same
folder. (This was the cause of tests/test_trainer_runs.py::test_resume_after_sigkill_is_bitwise_exact
failing once in five: the "killed" run finished steps 11-20 and saved step 20 under the rerun.)
Linux's parent-death signal closes that gap: the kernel SIGKILLs the worker when the agent dies.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Mapping

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_agent(env: Mapping[str, str] = os.environ) -> bool:
    """Under torchrun (TORCHELASTIC_RUN_ID set), ask the kernel to SIGKILL this process when its
    parent, the agent, exits. Returns whether it was armed. Elsewhere (srun, mpirun, DeepSpeed's
    launcher, bare processes) the launcher's own process tree handling applies."""
    if "TORCHELASTIC_RUN_ID" not in env or not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the agent died before the signal was armed
        os.kill(os.getpid(), signal.SIGKILL)
    return True
