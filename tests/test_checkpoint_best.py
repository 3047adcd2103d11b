"""checkpoint.keep_best and --step best (training/checkpoint_select.py): which checkpoint is the
best, that pruning keeps it, that bad input is refused with the field named, and one real run."""

import json
import subprocess
from pathlib import Path

import pytest

from test_trainer_runs import pretrain_command
from training import checkpoint_select as cs
from training import evaluate, export
from training.checkpoint import CheckpointManager
from training.config import ConfigError, load_config
from training.run_dir import RunDirError, step_dirs

EXACT64 = "eval/memory_exact_match_64seg"


def fake_run(root: Path, complete: list[int], records: list[dict], partial=(), keep_best=""):
    """A run folder with empty complete checkpoints at `complete`, metrics.jsonl of `records`
    and a config.yaml whose checkpoint section names `keep_best`."""
    for step in complete:
        folder = root / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / "COMPLETE").write_text("{}")
    for step in partial:
        (root / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "config.yaml").write_text(f"checkpoint:\n  keep_best: '{keep_best}'\n  best_mode: max\n")
    return root


def ev(step, value, metric=EXACT64):
    return {"kind": "eval", "step": step, metric: value}


# --------------------------------------------------------------------------- pure selection


@pytest.mark.parametrize("text, expected", [
    ("newest", cs.Selector()),
    ("1500", cs.Selector(step=1500)),
    ("best", cs.Selector(best=True)),
    ("best:" + EXACT64, cs.Selector(best=True, metric=EXACT64, mode="max")),
    ("best:eval/loss:min", cs.Selector(best=True, metric="eval/loss", mode="min")),
])
def test_selector_syntax(text, expected):
    assert cs.parse_selector(text) == expected


@pytest.mark.parametrize("text, message", [
    ("-1", "valid values are N"), ("latest", "valid values are N"),
    ("best:train/loss", "must be an eval metric"), ("best:eval/loss:lowest", "one of max, min"),
])
def test_selector_errors_say_what_is_valid(text, message):
    with pytest.raises(ValueError, match=message):
        cs.parse_selector(text)


def test_best_step_by_hand():
    scores = {500: 0.5, 1000: 1.0, 1500: 1.0, 2000: 0.4, 2500: float("nan"), 3000: 1.0}
    # 3000 is as good as 1000/1500 but has no checkpoint: not a candidate. Ties: the latest.
    assert cs.best_step(scores, {500, 1000, 1500, 2000, 2500}, "max") == 1500
    assert cs.best_step(scores, {500, 1000, 1500, 2000, 2500}, "min") == 2000
    assert cs.best_step(scores, {2500, 4000}, "max") is None  # NaN is no score


def test_eval_scores_last_record_of_a_step_wins_and_a_torn_tail_is_skipped(tmp_path):
    run = fake_run(tmp_path, [], [{"kind": "train", "step": 1000, EXACT64: 0.0}, ev(500, 0.2),
                                  ev(1000, 0.3), {"kind": "eval", "step": 1500, "eval/loss": 1.0},
                                  ev(1000, 0.9)])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "eval", "step": 20')  # a crash mid-write
    assert cs.eval_scores(run / "metrics.jsonl", EXACT64) == {500: 0.2, 1000: 0.9}
    (run / "metrics.jsonl").write_text("not json\n" + json.dumps(ev(500, 0.2)) + "\n")
    with pytest.raises(RunDirError, match=r"metrics.jsonl:1: not a JSON line"):
        cs.eval_scores(run / "metrics.jsonl", EXACT64)


def test_resolve_by_metric_or_the_runs_own_setting(tmp_path):
    run = fake_run(tmp_path / "a", [1000, 2000, 3000], [ev(1000, 1.0), ev(2000, 1.0), ev(3000, 0.47),
                                                        ev(1000, 0.1, "eval/loss"),
                                                        ev(3000, 0.05, "eval/loss")],
                   keep_best="")
    assert cs.resolve(run, cs.parse_selector("best:" + EXACT64)).name == "step_00002000"
    assert cs.resolve(run, cs.parse_selector("best:eval/loss:min")).name == "step_00003000"
    assert cs.resolve(run, cs.parse_selector("1000")).name == "step_00001000"
    assert cs.resolve(run, None).name == "step_00003000"
    with pytest.raises(RunDirError, match="trained without checkpoint.keep_best; name the metric"):
        cs.resolve(run, cs.parse_selector("best"))
    with pytest.raises(RunDirError, match=r"checkpoints at \[1000, 2000, 3000\], eval/x at \[\]"):
        cs.resolve(run, cs.parse_selector("best:eval/x"))
    own = fake_run(tmp_path / "b", [1000, 2000], [ev(1000, 0.9), ev(2000, 0.8)], keep_best=EXACT64)
    assert cs.resolve(own, cs.parse_selector("best")).name == "step_00001000"


# --------------------------------------------------------------------------- pruning


def test_pruning_keeps_the_best_and_the_newest_and_records_the_best(tmp_path):
    # Scores as the seed-2 run of docs/results.md 4.1: perfect early, lost later.
    records = [ev(1000, 1.0), ev(2000, 0.95), ev(3000, 1.0), ev(4000, 0.41), ev(5000, 0.44)]
    run = fake_run(tmp_path, [1000, 2000, 3000, 4000, 5000], records, partial=[4500])
    manager = CheckpointManager(run, 0, keep_last=2, barrier=lambda: None,
                                protect=cs.best_keeper(run, EXACT64, "max"))
    manager.prune()
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert left == ["step_00003000", "step_00004000", "step_00005000"]
    record = json.loads((run / cs.BEST_FILE).read_text())
    assert (record["step"], record["value"], record["metric"], record["mode"]) == (3000, 1.0, EXACT64, "max")
    assert record["candidates"] == {"1000": 1.0, "2000": 0.95, "3000": 1.0, "4000": 0.41, "5000": 0.44}
    # A later, better checkpoint takes over; the old best becomes an ordinary one and goes.
    (run / "checkpoints" / "step_00006000").mkdir()
    (run / "checkpoints" / "step_00006000" / "COMPLETE").write_text("{}")
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(ev(6000, 1.0)) + "\n")
    manager.prune()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00005000", "step_00006000"]
    assert json.loads((run / cs.BEST_FILE).read_text())["step"] == 6000


def test_without_keep_best_pruning_is_unchanged(tmp_path):
    run = fake_run(tmp_path, [1000, 2000, 3000], [ev(1000, 1.0)])
    CheckpointManager(run, 0, keep_last=1, barrier=lambda: None,
                      protect=cs.best_keeper(run, "", "max")).prune()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00003000"]
    assert not (run / cs.BEST_FILE).exists()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("overrides, message", [
    (["checkpoint.keep_best=eval/memory_exact_match_8seg"],
     "checkpoint.keep_best: 'eval/memory_exact_match_8seg' is not a metric this run's evaluation "
     "reports; valid: eval/loss, eval/memory_exact_match_2seg, eval/memory_token_acc_2seg, "
     "eval/memory_exact_match_4seg"),
    (["checkpoint.keep_best=eval/loss", "checkpoint.every=300", "eval.every=250"],
     "checkpoint.every a multiple of it (got eval.every=250, checkpoint.every=300)"),
    (["checkpoint.best_mode=median"], "checkpoint.best_mode"),
])
def test_config_refuses_what_cannot_be_selected(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in info.value.report()


@pytest.mark.parametrize("main, args", [
    (evaluate.main, ["--model", "x", "--task", "copy", "--step", "latest"]),
    (export.main, ["--run", "x", "--out", "y", "--step", "best:eval/loss:lowest"]),
])
def test_cli_refuses_a_bad_step_with_exit_2(main, args, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert "--step" in capsys.readouterr().err


# --------------------------------------------------------------------------- a real run


def test_real_run_keeps_its_best_checkpoint_and_evaluate_loads_it(tmp_path, capsys):
    """1 rank, eval and checkpoint every 2 steps, keep_last 1, best by the highest eval/loss (an
    early step: a selection that differs from the newest, so pruning must spare it)."""
    run = tmp_path / "best"
    cmd, env = pretrain_command(run, 1, [
        "run.max_steps=6", "eval.every=2", "checkpoint.every=2", "checkpoint.keep_last=1",
        "checkpoint.keep_best=eval/loss", "checkpoint.best_mode=max", "batch.micro_batch_size=8"])
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = {r["step"]: r["eval/loss"] for r in map(json.loads, (run / "metrics.jsonl")
                                                     .read_text().splitlines()) if r["kind"] == "eval"}
    assert sorted(losses) == [2, 4, 6]
    expected = max(losses, key=lambda s: (losses[s], s))
    assert expected != 6, losses  # the loss fell: the best by this metric is not the newest
    left = sorted(step_dirs(run / "checkpoints"))
    assert left == sorted({expected, 6})
    assert json.loads((run / cs.BEST_FILE).read_text())["step"] == expected
    out = tmp_path / "eval"
    assert evaluate.main(["--model", str(run), "--task", "copy", "--segments", "2", "--samples", "4",
                          "--generate-checks", "0", "--step", "best", "--out", str(out)]) == 0
    assert json.loads((out / "copy.json").read_text())["model"]["step"] == expected
