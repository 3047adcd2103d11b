"""What a run reports besides its scalars: the HParams tab (read back with TensorBoard's own
reader), progress that suits a log file (plain lines, no '\\r') when stderr is no terminal, and
Weights & Biases (an offline run's .wandb file read back with wandb's own protobuf records)."""

import io
import json
import logging
import math
import os
import re
import struct
import subprocess
from pathlib import Path

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
WANDB_PROJECT = "rmt-tests"


def wandb_offline(env: dict, root) -> dict:
    """`env` with W&B offline and its settings and cache in `root`; no other WANDB_* variable
    (WANDB_DIR unset: the run's local files go where the trainer puts them, runs/NAME/wandb)."""
    env = {k: v for k, v in env.items() if not k.startswith("WANDB_")}
    return {**env, "WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(root / "wandb-config"),
            "WANDB_CACHE_DIR": str(root / "wandb-cache")}


def wandb_records(run_file) -> list:
    """Every record of a .wandb file, as wandb's own protobuf `Record`s. The file is W&B's
    header (':W&B', magic, version: 7 bytes) then LevelDB's log format: 32 KiB blocks of chunks,
    each with a 7-byte header (CRC, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, parts, out = 7, [], []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            out.append(record)
            parts = []
        else:
            assert kind in (2, 3), f"chunk type {kind} at byte {pos}"
    return out


def wandb_history(records) -> dict[int, dict]:
    """step -> the scalars (no W&B '_' keys) of each history row."""
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                     for i in r.history.item}
            rows[r.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return rows


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
        "eval.every=3", "logging.wandb=true", f"logging.wandb_project={WANDB_PROJECT}"])
    env = wandb_offline(env, root)
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


def test_wandb_logs_the_tensorboard_scalars_and_the_config(piped_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = piped_run
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_id == (run_dir / "wandb_run_id").read_text().strip()
    assert (run.display_name, run.project) == ("piped", WANDB_PROJECT)
    # The run's W&B service process ended with it (it inherited the run's WANDB_CONFIG_DIR).
    config_dir = f"WANDB_CONFIG_DIR={run_dir.parent / 'wandb-config'}".encode()
    assert not [pid for pid, (_, env) in wandb_core_processes().items()
                if config_dir in env.split(b"\0")]

    # The config: the resolved config.yaml, section by section.
    updates = list(run.config.update) + [u for r in records if r.WhichOneof("record_type") ==
                                         "config" for u in r.config.update]
    config = {u.key: json.loads(u.value_json) for u in updates if u.key != "_wandb"}
    assert config == yaml.safe_load((run_dir / "config.yaml").read_text())

    # The scalars: exactly metrics.jsonl's, step by step (train and eval rows of a step merged).
    expected: dict[int, dict] = {}
    for rec in map(json.loads, (run_dir / "metrics.jsonl").open()):
        expected.setdefault(rec.pop("step"), {}).update(
            {k: v for k, v in rec.items() if k != "kind"})
    history = wandb_history(records)
    assert history == expected and sorted(history) == PROGRESS_STEPS  # every EVERY-th, last
    assert "train/loss" in history[EVERY] and "eval/loss" in history[MAX_STEPS]

    # ... and TensorBoard's, under the same tags at the same steps (float32 there).
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert set(tags) == {k for row in history.values() for k in row}
    for tag in tags:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [s for s in sorted(history) if tag in history[s]]
        for e in events:
            logged = history[e.step][tag]
            assert (math.isnan(e.value) and math.isnan(logged)) or math.isclose(
                e.value, logged, rel_tol=1e-6, abs_tol=1e-7), (tag, e.step)


def test_a_resumed_run_continues_its_wandb_run_a_fresh_one_starts_a_new_one(tmp_path,
                                                                           monkeypatch):
    import wandb

    from training.config.sections import TrainConfig
    from training.wandb_sink import WandbSink, run_id

    for var in [v for v in os.environ if v.startswith("WANDB_")]:
        monkeypatch.delenv(var)
    for var, value in wandb_offline({}, tmp_path).items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("WANDB_MODE")  # offline through the config field here
    cfg = TrainConfig()
    cfg.run.name, cfg.logging.wandb, cfg.logging.wandb_run_name = "r", True, "shown-name"
    cfg.logging.wandb_mode = "offline"
    ids = []
    try:
        for step, resumed in ((1, False), (2, True)):
            sink = WandbSink(tmp_path, cfg, resumed=resumed)
            sink.log(step, {"train/loss": float(step)})
            sink.close()
            ids.append((tmp_path / "wandb_run_id").read_text().strip())
    finally:
        wandb.teardown()  # the W&B service process of this test's process
    runs = {}
    for run_file in (tmp_path / "wandb").glob("offline-run-*/run-*.wandb"):
        records = wandb_records(run_file)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert run.display_name == "shown-name"
        runs.setdefault(run.run_id, []).extend(sorted(wandb_history(records).items()))
    assert ids[0] == ids[1] and list(runs) == [ids[0]]
    assert sorted(runs[ids[0]]) == [(1, {"train/loss": 1.0}), (2, {"train/loss": 2.0})]
    # A fresh start (no checkpoint) in the same run folder gets a new W&B run, and keeps its id.
    fresh = run_id(tmp_path, resumed=False)
    assert fresh != ids[0] and run_id(tmp_path, resumed=True) == fresh


def test_wandb_settings_are_checked_before_any_work(monkeypatch):
    import importlib.util

    from training.config.sections import LoggingConfig

    # (A wandb_mode other than online/offline/null is refused by the loader's type check.)
    assert LoggingConfig(wandb_project=" ", wandb_entity="", wandb_run_name="x").problems() == [
        "logging.wandb_project: empty; give a name or null",
        "logging.wandb_entity: empty; give a name or null"]
    assert LoggingConfig(wandb=True, wandb_mode="offline").problems() == []
    assert not LoggingConfig().wandb  # off by default
    # Without the package (find_spec answers None for it, as for any missing package).
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    assert LoggingConfig(wandb=True).problems() == [
        "logging.wandb: true, but the wandb package is not installed; pip install -r "
        "requirements.txt, or set logging.wandb=false"]


def wandb_core_processes() -> dict[int, tuple[int, bytes]]:
    """pid -> (parent pid, environment) of every wandb-core service process (from /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if b"wandb-core" in (stat.parent / "cmdline").read_bytes():
                found[int(stat.parent.name)] = (ppid, (stat.parent / "environ").read_bytes())
        except (OSError, IndexError, ValueError):
            continue
    return found


def test_a_lost_wandb_service_stops_wandb_not_training(tmp_path, monkeypatch):
    """Slurm's SIGTERM at preemption reaches wandb-core too; the step's scalars and the W&B
    finish must then neither raise (the checkpoint comes after them) nor hang."""
    import signal
    import time

    import wandb

    from training.config.sections import TrainConfig
    from training.wandb_sink import WandbSink

    for var in [v for v in os.environ if v.startswith("WANDB_")]:
        monkeypatch.delenv(var)
    for var, value in wandb_offline({}, tmp_path).items():
        monkeypatch.setenv(var, value)
    cfg = TrainConfig()
    cfg.logging.wandb = True
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("training").addHandler(handler)
    try:
        sink = WandbSink(tmp_path, cfg, resumed=False)
        sink.log(1, {"train/loss": 1.0})
        (core,) = [pid for pid, (ppid, _) in wandb_core_processes().items()
                   if ppid == os.getpid()]
        os.kill(core, signal.SIGTERM)
        os.waitpid(core, 0)
        started = time.monotonic()
        sink.log(2, {"train/loss": 2.0})
        sink.log(3, {"train/loss": 3.0})
        sink.close()
        assert time.monotonic() - started < 10
    finally:
        logging.getLogger("training").removeHandler(handler)
        wandb.teardown()
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("W&B log failed (") and (
        "TensorBoard and metrics.jsonl keep every scalar" in warnings[0]), warnings


def test_wandb_that_cannot_start_is_bad_input_before_the_model(tmp_path, monkeypatch):
    """Online mode without credentials: open_wandb (called before the model is built) raises the
    message training.pretrain prints with exit code 2; with logging.wandb off it does nothing."""
    from training.config.sections import TrainConfig
    from training.wandb_sink import WandbError, open_wandb

    for var in [v for v in os.environ if v.startswith("WANDB_")]:
        monkeypatch.delenv(var)
    for var, value in wandb_offline({}, tmp_path).items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = TrainConfig()
    cfg.run.runs_dir, cfg.logging.wandb, cfg.logging.wandb_mode = str(tmp_path), True, "online"
    cfg.run_dir.mkdir()
    assert open_wandb(TrainConfig(), 0, resumed=False) is None
    with pytest.raises(WandbError, match=r"^logging.wandb: cannot start the W&B run \(UsageError: "
                       r"No API key configured.*\); log in \(WANDB_API_KEY or `wandb login`\), "
                       r"set logging.wandb_mode=offline, or logging.wandb=false$"):
        open_wandb(cfg, 0, resumed=False)
