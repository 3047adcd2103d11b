"""Real DeepSpeed runs on CPU (gloo): ZeRO-3 on 2 ranks vs ZeRO-0 on 1 rank, exact resume after
SIGKILL, preemption by signal, and TensorBoard's own reader on the event files."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_reliability_helpers import train_losses

REPO = Path(__file__).resolve().parents[1]
# A tiny model and run: every step is real DeepSpeed work, but a run takes seconds.
TINY = ["run.max_steps=20", "run.export=false", "logging.every=1", "logging.progress_bar=false",
        "optim.warmup_steps=5", "optim.lr=3e-3", "eval.every=0", "eval.batches=1",
        "eval.memory_task_samples=16", "eval.memory_task_segments=[2]",
        "curriculum.schedule=[[0,2],[12,3]]", "model.backbone.hidden_size=32",
        "model.backbone.intermediate_size=64", "model.backbone.num_attention_heads=2",
        "model.backbone.num_key_value_heads=2", "checkpoint.every=10",
        "batch.global_batch_size=null"]


def pretrain_command(run_dir: Path, nproc: int, extra: list[str]) -> tuple[list[str], dict]:
    """(command, environment) of a tiny torchrun pretraining run into `run_dir`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "training.pretrain",
           f"run.runs_dir={run_dir.parent}", f"run.name={run_dir.name}", *TINY, *extra]
    return cmd, env


def launch(run_dir: Path, nproc: int, extra: list[str], **popen) -> subprocess.Popen:
    cmd, env = pretrain_command(run_dir, nproc, extra)
    log = open(run_dir.parent / f"{run_dir.name}.console.log", "a")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, **popen)


def run(run_dir: Path, nproc: int, extra: list[str]) -> None:
    proc = launch(run_dir, nproc, extra)
    code = proc.wait(timeout=300)
    console = (run_dir.parent / f"{run_dir.name}.console.log").read_text()
    assert code == 0, console[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def zero3_two_ranks(runs):
    """The reference: 20 steps, ZeRO-3, 2 ranks x micro 4, checkpoints at 10 and 20."""
    run_dir = runs / "zero3"
    run(run_dir, 2, ["deepspeed.zero_stage=3", "batch.micro_batch_size=4"])
    return run_dir


def test_zero3_two_ranks_matches_zero0_one_rank(zero3_two_ranks, runs):
    """Same global batch of 8 (2 ranks x 4 vs 1 rank x 8), fp32: same loss curve within 1e-4."""
    run_dir = runs / "zero0"
    run(run_dir, 1, ["deepspeed.zero_stage=0", "batch.micro_batch_size=8"])
    a, b = train_losses(zero3_two_ranks), train_losses(run_dir)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    diffs = [abs(a[s] - b[s]) for s in a]
    assert max(diffs) <= 1e-4, diffs
    # The run learned something, so the comparison is not between two flat lines.
    assert a[20] < a[1] - 0.3


def test_zero2_one_node_recompute_matches_zero3(zero3_two_ranks, runs):
    """Segment checkpointing is on in both (the default), one recompute node per segment whose
    parameter gradients reach DeepSpeed's bucketed reduction (ZeRO-2) or its partitioned one."""
    run_dir = runs / "zero2"
    run(run_dir, 2, ["deepspeed.zero_stage=2", "batch.micro_batch_size=4", "checkpoint.every=0"])
    a, b = train_losses(zero3_two_ranks), train_losses(run_dir)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-4


def test_grad_accumulation_matches_bigger_micro_batch(zero3_two_ranks, runs):
    """2 ranks x micro 2 x accumulation 2 = the same global batch of 8."""
    run_dir = runs / "accum"
    run(run_dir, 2, ["deepspeed.zero_stage=3", "batch.micro_batch_size=2",
                     "batch.grad_accum_steps=2", "checkpoint.every=0"])
    a, b = train_losses(zero3_two_ranks), train_losses(run_dir)
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-4


def test_resume_after_sigkill_is_bitwise_exact(zero3_two_ranks, runs):
    """Kill every process as soon as the step-10 checkpoint is complete, rerun the same
    command: steps 11..20 reproduce the uninterrupted run bit for bit."""
    run_dir = runs / "killed"
    proc = launch(run_dir, 2, ["deepspeed.zero_stage=3", "batch.micro_batch_size=4"])
    marker = run_dir / "checkpoints" / "step_00000010" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, "run ended before its step-10 checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "checkpoints" / "step_00000020" / "COMPLETE").exists(), \
        "the run finished before it was killed; the test proves nothing"

    run(run_dir, 2, ["deepspeed.zero_stage=3", "batch.micro_batch_size=4"])
    console = (runs / "killed.console.log").read_text()
    assert "resumed from" in console and "step_00000010" in console
    ref, resumed = train_losses(zero3_two_ranks), train_losses(run_dir)
    for step in range(11, 21):
        assert resumed[step] == ref[step], (step, resumed[step], ref[step])
    state = json.loads((run_dir / "checkpoints" / "step_00000020" / "client_state.json")
                       .read_text())
    assert state["step"] == 20 and state["samples_seen"] == 20 * 8


def worker_pids(agent_pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == agent_pid:
            children.append(int(stat.parent.name))
    return children


def test_sigusr1_saves_at_step_boundary_and_exits_0(runs):
    """Slurm's pre-timeout signal to one rank: every rank saves at the same step, exits 0."""
    run_dir = runs / "preempted"
    proc = launch(run_dir, 2, ["deepspeed.zero_stage=3", "batch.micro_batch_size=4",
                               "run.max_steps=100000", "checkpoint.every=0"])
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").exists() or "train" not in (
            run_dir / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    workers = worker_pids(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGUSR1)  # rank 1 only: the ranks must agree on stopping
    assert proc.wait(timeout=120) == 0
    complete = sorted((run_dir / "checkpoints").glob("step_*/COMPLETE"))
    assert len(complete) == 1
    ckpt = complete[0].parent
    assert {p.name for p in ckpt.glob("rank_*.json")} == {"rank_00000.json", "rank_00001.json"}
    last_logged = max(train_losses(run_dir))
    assert json.loads((ckpt / "client_state.json").read_text())["step"] == last_logged


def test_tensorboard_has_every_spec_scalar(zero3_two_ranks):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(zero3_two_ranks / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    required = {"train/loss", "train/ppl", "train/lr", "train/grad_norm", "train/skipped_steps",
                "train/tokens_per_s", "train/samples_seen", "train/num_segments",
                "train/step_time_s", "system/memory_gb", "train/loss_segment_1",
                "train/loss_segment_2", "eval/loss", "eval/memory_exact_match_2seg",
                "eval/memory_token_acc_2seg"}
    assert required <= tags, required - tags
    assert any(t.startswith("eval/loss_segment_") for t in tags)
    # Values are the ones the run computed (float32 in the event file).
    losses = train_losses(zero3_two_ranks)
    for event in acc.Scalars("train/loss"):
        assert math.isclose(event.value, losses[event.step], rel_tol=1e-6)
    segments = {e.step: e.value for e in acc.Scalars("train/num_segments")}
    assert segments[1] == 2 and segments[20] == 3  # the curriculum switched at step 12
    lrs = {e.step: e.value for e in acc.Scalars("train/lr")}
    assert math.isclose(lrs[1], 3e-3 / 5, rel_tol=1e-6)  # warm-up: (step+1)/warmup * lr
    (text,) = acc.Tensors("config/text_summary")
    config_text = text.tensor_proto.string_val[0].decode()
    assert "zero_stage: 3" in config_text and "micro_batch_size: 4" in config_text
