"""bench/gpu_check.sh, every check that needs a GPU in one command within a time budget: it refuses
bad settings (all of them in one message) and a machine without CUDA before writing anything (exit
2); its --dry-run drives the same three parts on the CPU: the CUDA-only tests (whose skip it
reports), the users' `deepspeed launch/pretrain.sh` shortened (checkpoint, TensorBoard, export), and
bench/gpu_report.sh; a part that fails, times out or gets no time fails the check (exit 1)."""

import os
import subprocess
import sys

import pytest
import torch


def run_check(repo_root, *args, timeout=600, **settings):
    env = {**os.environ, "PYTHON": sys.executable, **settings}
    return subprocess.run(["bash", str(repo_root / "bench" / "gpu_check.sh"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def summary_rows(out):
    """{part: result} from summary.md's table."""
    table = (out / "summary.md").read_text().split("| part | command | result | wall s | log |\n")[1]
    rows = [line.split(" | ") for line in table.split("\n\n")[0].splitlines()[1:]]
    return {row[0].lstrip("| "): row[2] for row in rows}


def test_bad_settings_are_all_named_before_anything_runs(repo_root, tmp_path):
    out = tmp_path / "out"
    proc = run_check(repo_root, "--dry-run", str(out), GPU_CHECK_PARTS="tests bench", GPU_CHECK_BUDGET_S="9m",
                     GPU_CHECK_PRETRAIN_STEPS="0", timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "GPU_CHECK_PARTS has 'bench' (valid: tests, pretrain, report)" in proc.stderr
    assert "GPU_CHECK_BUDGET_S='9m' is not a whole number >= 1" in proc.stderr
    assert "GPU_CHECK_PRETRAIN_STEPS='0' is not a whole number >= 1" in proc.stderr
    assert not out.exists()
    proc = run_check(repo_root, "--bogus", timeout=60)
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_refuses_without_a_cuda_device(repo_root, tmp_path):
    proc = run_check(repo_root, str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_dry_run_makes_every_part_and_sums_them_up(repo_root, tmp_path):
    out = tmp_path / "check"
    proc = run_check(repo_root, "--dry-run", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = summary_rows(out)
    # The CUDA sync test is skipped on the CPU, and the summary says so (on a GPU a skip fails).
    assert rows == {"tests": "passed, 1 skipped (tests.log)", "pretrain": "passed", "report": "passed"}, rows
    assert "1 skipped" in (out / "tests.log").read_text()
    run = out / "runs" / "tiny_cpu"
    assert "step 2/2" in (run / "train.log").read_text()
    assert (run / "checkpoints" / "step_00000002").is_dir()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run / "tensorboard"))
    assert (run / "export" / "config.json").is_file()
    summary = (out / "summary.md").read_text()
    assert "dry run on the CPU" in summary
    assert "GPU: none (dry run on CPU" in summary  # the report's table, appended
    assert (out / "gpu_report" / "report.md").is_file()


def test_a_part_that_times_out_or_gets_no_time_fails_the_check(repo_root, tmp_path):
    out = tmp_path / "check"
    (out / "gpu_report").mkdir(parents=True)  # an earlier check's report: not this one's
    (out / "gpu_report" / "report.md").write_text("STALE REPORT\n")
    proc = run_check(repo_root, "--dry-run", str(out), GPU_CHECK_PARTS="pretrain report",
                     GPU_CHECK_PRETRAIN_TIMEOUT_S="1", GPU_CHECK_BUDGET_S="100", timeout=120)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = summary_rows(out)
    assert rows["pretrain"] == "timed out (1 s)"
    assert rows["report"].startswith("not run: ") and "s of the budget left" in rows["report"]
    assert "STALE" not in (out / "summary.md").read_text() and not (out / "gpu_report").exists()
