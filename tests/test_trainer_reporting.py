"""What a run reports besides its scalars: the HParams tab (read back with TensorBoard's own
reader) and progress that suits a log file (plain lines, no '\\r') when stderr is no terminal."""

import io
import json
import logging
import math
import re
import subprocess

import pytest
import yaml

from tests.test_trainer_runs import REPO, TINY, pretrain_command
from training import monitor as monitor_lib
from training.config.sections import flatten
from training.pretrain import DEFAULT_RECIPE

MAX_STEPS, EVERY = 7, 3
# Progress lines at every EVERY-th step and at the last: ceil(MAX_STEPS / EVERY) of them.
PROGRESS_STEPS = [3, 6, 7]
PROGRESS = re.compile(r"step (\d+)/(\d+)  loss (\S+)  tokens/s (\d+)  ETA (\d+:\d\d:\d\d)$")


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory):
    """One rank, stdout and stderr as pipes (no TTY), logging.progress_bar left true; evals at
    steps 3, 6 and 7 (the last), so 'the final eval metrics' differ from the first ones. It
    starts from a saved bf16 backbone (model.init_from), whose loading has a bar of its own."""
    import torch

    from model import RMTConfig, RMTForCausalLM
    from training.config import load_config

    root = tmp_path_factory.mktemp("runs")
    backbone = load_config(REPO / DEFAULT_RECIPE,
                           [o for o in TINY if o.startswith("model.")]).model.backbone
    RMTForCausalLM(RMTConfig(backbone=backbone, segment_size=16, num_mem_tokens=8)).backbone.to(
        torch.bfloat16).save_pretrained(root / "backbone")
    run_dir = root / "piped"
    cmd, env = pretrain_command(run_dir, 1, [f"model.init_from={root / 'backbone'}",
        f"run.max_steps={MAX_STEPS}", f"logging.every={EVERY}", "logging.progress_bar=true",
        "deepspeed.zero_stage=0", "batch.micro_batch_size=4", "checkpoint.every=0",
        "eval.every=3"])
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=300)  # bytes: a '\r' stays a '\r'
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:].decode(errors="replace")
    return run_dir, output


def test_without_a_tty_progress_is_plain_lines_every_logging_every_steps(piped_run):
    run_dir, output = piped_run
    assert b"\r" not in output
    found = [PROGRESS.search(line) for line in output.decode().splitlines()]
    lines = [m for m in found if m]
    assert [int(m[1]) for m in lines] == PROGRESS_STEPS == list(range(EVERY, MAX_STEPS, EVERY)) + [
        MAX_STEPS]
    assert len(lines) == math.ceil(MAX_STEPS / EVERY)
    assert {int(m[2]) for m in lines} == {MAX_STEPS}
    assert lines[-1][5] == "0:00:00"  # nothing left at the last step
    logged = {rec["step"]: rec for rec in map(json.loads, (run_dir / "metrics.jsonl").open())
              if rec["kind"] == "train"}
    for m in lines:
        assert float(m[3]) == pytest.approx(logged[int(m[1])]["train/loss"], abs=5e-5)


def test_hparams_hold_the_settings_and_the_final_eval_metrics(piped_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    run_dir, _ = piped_run
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    hparams = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}

    # Every scalar leaf of the resolved config, under its dotted key, and nothing else.
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    expected = {k: v for k, v in flatten(config) if isinstance(v, (bool, int, float, str))}
    assert hparams == expected
    assert hparams["optim.lr"] == 3e-3 and hparams["batch.micro_batch_size"] == 4
    assert hparams["model.segment_size"] == 16 and hparams["deepspeed.zero_stage"] == 0
    assert hparams["deepspeed.precision"] == "fp32" and hparams["run.max_steps"] == MAX_STEPS
    assert {i.name for i in experiment.hparam_infos} == set(expected)

    # The metrics: the eval/* values the run logged last (step 7), as TensorBoard reads them.
    evals = [rec for rec in map(json.loads, (run_dir / "metrics.jsonl").open())
             if rec["kind"] == "eval"]
    assert [rec["step"] for rec in evals] == [3, 6, 7]
    last = evals[-1]
    tags = {m.name.tag for m in experiment.metric_infos}
    assert tags == {k for k in last if k.startswith("eval/")} and "eval/loss" in tags
    for tag in tags:
        final = acc.Scalars(tag)[-1]
        assert final.step == MAX_STEPS
        assert math.isclose(final.value, last[tag], rel_tol=1e-6, abs_tol=1e-7), tag
    assert evals[0]["eval/loss"] != last["eval/loss"]  # the first eval is not what is shown


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty", [True, False])
def test_a_tty_gets_the_bar_anything_else_lines_with_an_eta(tmp_path, monkeypatch, tty):
    stderr = FakeTerminal() if tty else io.StringIO()
    monkeypatch.setattr(monitor_lib.sys, "stderr", stderr)
    clock = iter([0.0, 30.0, 60.0, 70.0])  # started, then at steps 3, 6, 7
    monkeypatch.setattr(monitor_lib.time, "perf_counter", lambda: next(clock))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("training")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        mon = monitor_lib.Monitor(tmp_path, enabled=True, tensorboard=False, progress_bar=True,
                                  start_step=0, max_steps=MAX_STEPS, every=EVERY)
        assert (mon.bar is not None) == tty
        for step in range(1, MAX_STEPS + 1):
            if step in PROGRESS_STEPS or tty:
                mon.progress(step, {"train/loss": 2.5, "train/tokens_per_s": 1000.0,
                                    "train/num_segments": 2})
        mon.close()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    messages = [r.getMessage() for r in records if PROGRESS.search(r.getMessage())]
    if tty:
        assert messages == [] and "\r" in stderr.getvalue()
    else:
        # 10 s per step so far at step 3: 4 steps left = 40 s; at step 6: 1 step = 10 s.
        assert [PROGRESS.search(m)[5] for m in messages] == ["0:00:40", "0:00:10", "0:00:00"]
