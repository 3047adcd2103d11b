"""bench/kernel_rates.py prints a rate for every GEMM shape of a segment and both SDPA backends, and
refuses sizes that cannot describe a model."""

import subprocess
import sys


def run_kernels(repo_root, *args):
    return subprocess.run([sys.executable, str(repo_root / "bench" / "kernel_rates.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_every_shape_and_backend_gets_a_rate(repo_root):
    proc = run_kernels(repo_root, "--threads", "1", "--seconds", "0.05", "--hidden", "64", "--intermediate", "128",
                       "--vocab", "256", "--heads", "2", "--segment", "32", "--mem", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert "[40, 64] x [64, 192]" in proc.stdout  # fused q/k/v over T + 2m = 40 positions
    assert "[32, 64] x [64, 256]" in proc.stdout  # LM head over the T = 32 tokens only
    assert sum("GFLOP/s" in line and "x [" in line for line in lines) == 8
    assert any("attention flash" in line for line in lines) and any("attention math" in line for line in lines)


def test_bad_sizes_are_refused_by_name(repo_root):
    proc = run_kernels(repo_root, "--hidden", "65", "--heads", "2")
    assert proc.returncode != 0 and "--hidden 65" in proc.stderr and "--heads 2" in proc.stderr
