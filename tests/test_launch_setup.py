"""launch/setup.sh: argument checks and a second run that finds everything installed."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

TEST_PACKAGES = ("slurm-wlm", "munge", "openmpi-bin", "libopenmpi-dev", "libtcmalloc-minimal4")


def installed(pkg: str) -> bool:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True).stdout
    return "install ok installed" in out


def run_setup(repo_root, *args, **env):
    return subprocess.run(["bash", "launch/setup.sh", *args], cwd=repo_root, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=600)


def test_unknown_argument_is_refused(repo_root):
    result = run_setup(repo_root, "--tests")
    assert result.returncode == 2 and "unknown argument '--tests' (valid: --test, --help)" in result.stderr


def test_missing_interpreter_is_named(repo_root):
    result = run_setup(repo_root, PYTHON="/nonexistent/python9")
    assert result.returncode == 2 and "PYTHON='/nonexistent/python9' not found" in result.stderr


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="not a Debian system")
def test_rerun_with_everything_installed_changes_nothing(repo_root):
    # Never install from a test: only a machine already set up (CI runs setup.sh --test first).
    if not all(installed(p) for p in TEST_PACKAGES):
        pytest.skip("test packages not installed; run bash launch/setup.sh --test")
    result = run_setup(repo_root, "--test")
    assert result.returncode == 0, result.stderr
    assert "system packages present" in result.stderr and "apt-get install" not in result.stderr


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="not a Debian system")
def test_plain_setup_checks_for_tcmalloc_which_cpu_runs_preload(repo_root):
    # The quick start's setup (no --test) looks for the allocator launch/pretrain.sh preloads.
    if not installed("libtcmalloc-minimal4"):
        pytest.skip("libtcmalloc-minimal4 not installed; run bash launch/setup.sh --test")
    result = run_setup(repo_root)
    assert result.returncode == 0, result.stderr
    assert "system packages present: libtcmalloc-minimal4" in result.stderr and "apt-get install" not in result.stderr
