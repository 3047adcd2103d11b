"""The CPU allocator a benchmark's processes run on: the launcher's choice or one named on purpose.

`launch/pretrain.sh` picks the allocator of CPU runs (configure_cpu_allocator: tcmalloc, else
jemalloc, else tuned glibc malloc); benchmarks read its choice from the script itself, so they
measure what a user's run gets.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ALLOCATOR_VARIABLE = re.compile(r"^(LD_PRELOAD|MALLOC_\w+|TCMALLOC_\w+)$")
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
CHOICES = ("launcher", "glibc", "jemalloc")


def launcher_env() -> dict:
    """The allocator variables launch/pretrain.sh sets for a CPU run (none of the caller's)."""
    script = (
        f'log() {{ :; }}; source <(sed -n "/^configure_cpu_allocator()/,/^}}/p" {REPO_ROOT}/launch/pretrain.sh); '
        "for v in $(compgen -e | grep -E '^(LD_PRELOAD|MALLOC_|TCMALLOC_)'); do unset $v; done; "
        "configure_cpu_allocator; env -0"
    )
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    pairs = (item.split("=", 1) for item in out.split("\0") if "=" in item)
    return {k: v for k, v in pairs if ALLOCATOR_VARIABLE.match(k) and v}


def process_env(allocator: str, malloc_conf: str | None = None, base: dict | None = None) -> dict:
    """`base` (default os.environ) without allocator variables, plus those of `allocator`:
    launcher (what launch/pretrain.sh sets), glibc (its defaults) or jemalloc (with MALLOC_CONF =
    `malloc_conf`, jemalloc's defaults when None)."""
    if allocator not in CHOICES:
        raise ValueError(f"allocator={allocator!r} is invalid: valid values are {', '.join(CHOICES)}")
    if malloc_conf is not None and allocator != "jemalloc":
        raise ValueError("a MALLOC_CONF applies to allocator jemalloc only")
    env = {k: v for k, v in (os.environ if base is None else base).items() if not ALLOCATOR_VARIABLE.match(k)}
    if allocator == "launcher":
        env.update(launcher_env())
    elif allocator == "jemalloc":
        if not os.path.isfile(JEMALLOC):
            raise ValueError(f"allocator jemalloc: {JEMALLOC} not found (apt-get install libjemalloc2)")
        env["LD_PRELOAD"] = JEMALLOC
        if malloc_conf is not None:
            env["MALLOC_CONF"] = malloc_conf
    return env
