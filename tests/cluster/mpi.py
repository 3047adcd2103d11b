"""Open MPI's mpirun as the test machine (root, few cores) needs it."""
from __future__ import annotations


def mpirun_command(mpirun: str, nprocs: int, argv: list[str]) -> list[str]:
    # --oversubscribe: a CI runner may have fewer cores than ranks.
    return [mpirun, "-np", str(nprocs), "--allow-run-as-root", "--oversubscribe", *argv]
