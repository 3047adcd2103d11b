"""Which checkpoint of a run to use: the newest, a given step, or the best by an eval metric.

A model can score perfectly on the lengths it trains on while what it does beyond them comes and
goes from one evaluation to the next (docs/results.md, section 4.1): the newest checkpoint is then
not the one to keep. `checkpoint.keep_best: METRIC` (with `checkpoint.best_mode: max|min`) keeps
the checkpoint with the best value of METRIC out of keep_last pruning and records it in
runs/NAME/best_checkpoint.json; `--step best` of training.evaluate and training.export uses it.

The selection is a function of two things every run already has, so it is re-derived from them
whenever it is needed, for runs trained without the option too (`--step best:METRIC[:max|min]`):
  metrics.jsonl   the trainer's eval records, {"kind": "eval", "step": S, METRIC: value, ...}
  checkpoints/    the complete checkpoints present
Candidates are the complete checkpoints with an eval record at exactly their own step (a
checkpoint written between evaluations has no score of its own) and a finite value. The best
value wins; among equal values the latest step, the most-trained model with that score. Because
the trainer never prunes the best checkpoint, the best among those present is the best among all
that were ever written.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from training.answer_eval import ANSWER_SOURCES
from training.data.config import MEMORY_TASKS
from training.run_dir import (ModelSource, RunDir, RunDirError, complete_checkpoints,
                              read_run_config, resolve_checkpoint)
from training.run_dir import find_model as find_run_or_export

BEST_FILE = "best_checkpoint.json"
MODES = ("max", "min")
SELECTOR_HELP = ("N (that step), newest (the default), best (by the run's checkpoint.keep_best) "
                 "or best:METRIC[:max|min] (e.g. best:eval/memory_exact_match_64seg)")


@dataclass(frozen=True)
class Selector:
    """A parsed --step: `step` set = that step; `best` = by `metric`/`mode` (None: the run's
    checkpoint.keep_best / best_mode); neither = the newest complete checkpoint."""

    step: Optional[int] = None
    best: bool = False
    metric: Optional[str] = None
    mode: Optional[str] = None


def parse_selector(text: str) -> Selector:
    """N | newest | best | best:METRIC | best:METRIC:max|min; ValueError says what is valid."""
    text = text.strip()
    if text == "newest":
        return Selector()
    if text.isdigit():
        return Selector(step=int(text))
    if text == "best":
        return Selector(best=True)
    if text.startswith("best:"):
        metric, _, mode = text[len("best:"):].partition(":")
        if not metric.startswith("eval/"):
            raise ValueError(f"{text!r}: the metric after 'best:' must be an eval metric "
                             f"(eval/...), e.g. best:eval/memory_exact_match_64seg")
        if mode and mode not in MODES:
            raise ValueError(f"{text!r}: the mode after the metric must be one of {', '.join(MODES)}")
        return Selector(best=True, metric=metric, mode=mode or "max")
    raise ValueError(f"{text!r}: valid values are {SELECTOR_HELP}")


def selector_arg(text: str) -> Selector:
    """argparse `type=` for --step: a bad value exits 2 with the message."""
    try:
        return parse_selector(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --------------------------------------------------------------------------- selection


def eval_scores(metrics_path: Path, metric: str) -> dict[int, float]:
    """step -> METRIC of the eval records of metrics.jsonl; the last record of a step wins (a
    resumed run re-evaluates the steps it replays, and it is the replay's checkpoint that stays).
    A torn last line (a crash mid-write) is skipped; a bad line elsewhere is an error."""
    if not metrics_path.is_file():
        raise RunDirError(f"{metrics_path}: missing (training.pretrain writes its evaluations "
                          f"there); the best checkpoint cannot be chosen without it")
    lines = metrics_path.read_text().splitlines()
    scores: dict[int, float] = {}
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                break
            raise RunDirError(f"{metrics_path}:{number}: not a JSON line") from None
        if record.get("kind") == "eval" and metric in record:
            scores[int(record["step"])] = float(record[metric])
    return scores


def best_step(scores: dict[int, float], steps: set[int], mode: str) -> Optional[int]:
    """The step of `steps` with the best finite score (ties: the latest); None if none has one."""
    sign = 1.0 if mode == "max" else -1.0
    scored = [(sign * scores[s], s) for s in steps if s in scores and math.isfinite(scores[s])]
    return max(scored)[1] if scored else None


def select_best(run_dir: Path, metric: str, mode: str) -> tuple[int, float, dict[int, float]]:
    """(step, value, every candidate's value) of the best complete checkpoint of `run_dir`."""
    run = RunDir(run_dir)
    available = set(complete_checkpoints(run.checkpoints))
    scores = eval_scores(run.metrics, metric)
    step = best_step(scores, available, mode)
    if step is None:
        raise RunDirError(f"{run.path}: no complete checkpoint has a finite {metric} evaluated at "
                          f"its own step (checkpoints at {sorted(available)}, {metric} at "
                          f"{sorted(scores)}); give a step instead, or another eval metric")
    candidates = {s: scores[s] for s in sorted(available) if s in scores}
    return step, scores[step], candidates


def run_best_settings(run_dir: Path) -> tuple[str, str]:
    """(metric, mode) of the run's own checkpoint.keep_best, from its resolved config.yaml."""
    section = read_run_config(run_dir).get("checkpoint") or {}
    metric = section.get("keep_best") or ""
    if not metric:
        raise RunDirError(f"--step best: {run_dir} was trained without checkpoint.keep_best; "
                          f"name the metric: --step best:METRIC[:max|min], e.g. "
                          f"best:eval/memory_exact_match_64seg")
    return metric, section.get("best_mode", "max")


def resolve(run_dir: Path, selector: Optional[Selector]) -> Path:
    """The complete checkpoint folder `selector` names (None: the newest)."""
    if selector is None or not selector.best:
        return resolve_checkpoint(run_dir, None if selector is None else selector.step)
    if not RunDir(run_dir).path.is_dir():
        raise RunDirError(f"{run_dir}: no such directory (expected runs/NAME written by "
                          f"training.pretrain)")
    metric, mode = ((selector.metric, selector.mode) if selector.metric
                    else run_best_settings(run_dir))
    step, _, _ = select_best(run_dir, metric, mode)
    return complete_checkpoints(RunDir(run_dir).checkpoints)[step]


def find_model(path: Path, selector: Optional[Selector] = None) -> ModelSource:
    """training.run_dir.find_model, with a run's checkpoint chosen by `selector`."""
    source = find_run_or_export(path)
    if selector is None or selector == Selector():
        return source
    if source.kind != "run":
        raise RunDirError("--step chooses among a run's checkpoints; an exported folder holds "
                          "one model (give runs/NAME, or leave --step out)")
    return replace(source, checkpoint=resolve(path, selector))


# --------------------------------------------------------------------------- training side


def best_keeper(run_dir: Path, metric: str, mode: str) -> Callable[[], set[int]]:
    """What the checkpoint manager calls after each save, before pruning (rank 0): the best
    checkpoint so far, recorded in runs/NAME/best_checkpoint.json and returned so that pruning
    keeps it. An empty metric (keep_best off) keeps nothing extra."""
    if not metric:
        return set

    def keep() -> set[int]:
        from training.checkpoint import write_json_atomic  # training.checkpoint imports run_dir only

        try:
            step, value, candidates = select_best(run_dir, metric, mode)
        except RunDirError:
            return set()  # no scored checkpoint yet (e.g. a save between evaluations)
        write_json_atomic(Path(run_dir) / BEST_FILE, {
            "metric": metric, "mode": mode, "step": step, "value": value,
            "checkpoint": str(complete_checkpoints(RunDir(run_dir).checkpoints)[step]),
            "candidates": {str(s): v for s, v in candidates.items()}})
        return {step}

    return keep


# --------------------------------------------------------------------------- config gate


def eval_metric_names(cfg) -> list[str]:
    """The metrics the trainer's evaluation reports for `cfg` (training/trainer.py, evaluate)."""
    names = ["eval/loss"] if cfg.eval.batches > 0 else []
    if cfg.data.source in ANSWER_SOURCES:
        sets = (["memory"] if cfg.data.source == MEMORY_TASKS
                else [f"babilong_{t}" for t in cfg.data.babilong.tasks])
        names += [f"eval/{s}_{kind}_{n}seg" for s in sets for n in cfg.eval.memory_task_segments
                  for kind in ("exact_match", "token_acc")]
    return names


def config_problems(cfg) -> list[str]:
    """checkpoint.keep_best against the eval and checkpoint schedules and the metrics the run's
    evaluation will report (the checkpoint section checks its own values)."""
    ck, ev = cfg.checkpoint, cfg.eval
    if not ck.keep_best:
        return []
    if not (ev.every > 0 and ck.every > 0 and ck.every % ev.every == 0):
        return [f"checkpoint.keep_best: every checkpoint must be evaluated to be compared: needs "
                f"eval.every > 0 and checkpoint.every a multiple of it (got eval.every={ev.every}, "
                f"checkpoint.every={ck.every})"]
    valid = eval_metric_names(cfg)
    if ck.keep_best not in valid:
        return [f"checkpoint.keep_best: {ck.keep_best!r} is not a metric this run's evaluation "
                f"reports; valid: {', '.join(valid) or 'none (eval.batches is 0 and the data has no answers)'}"]
    return []
