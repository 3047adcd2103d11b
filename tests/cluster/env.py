"""A child environment free of the test process's own launcher variables."""
from __future__ import annotations

import os

LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMIX_", "PMI_")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_launch_env(base: dict | None = None, **extra: str) -> dict[str, str]:
    """Without these, a test run inside a Slurm job or under mpirun would inherit its rank."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith(LAUNCHER_PREFIXES) and k not in TORCHRUN_VARS}
    env.update(extra)
    return env
