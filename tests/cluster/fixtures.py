"""pytest fixtures for the cluster helpers. Import them into a test module to use them."""
from __future__ import annotations

import os
import shutil

import pytest

from tests.cluster.slurm import SlurmCluster, missing_binaries


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(missing: list[str], install_hint: str) -> None:
    """Skip on a developer machine without the software; in CI its absence is a failure."""
    if not missing:
        return
    message = f"missing {', '.join(missing)} ({install_hint})"
    if in_ci():
        pytest.fail(f"CI=true but {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    require(missing_binaries(), "bash launch/setup.sh --test")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def mpirun_binary() -> str:
    require([] if shutil.which("mpirun") else ["mpirun"], "bash launch/setup.sh --test")
    return shutil.which("mpirun")
