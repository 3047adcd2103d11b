"""Issue 20 item 1, end to end: the babilong recipe, shrunk, trains a few steps on 2 CPU ranks
with standard-library filler and a BPE trained by `python -m training.tokenizer` (its main, in
this process) on it, stories included; `python -m training.evaluate --task babilong-qa1` then reports the RMT beside its
no-memory, memory-reset and majority-answer controls in JSON and in the PNG."""

from __future__ import annotations

import json
import math
import subprocess
from collections import Counter
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import yaml

from tests.test_data_babilong import write_filler
from tests.test_recipes_shrunk import LAUNCHER, launch_env, shrink
from tests.test_reliability_helpers import train_losses
from training import evaluate
from training.tokenizer import main as tokenizer_main
from training.data.babilong import generate_story
from training.data.babilong_samples import eval_seed
from training.data import rng

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
SEGMENT = 48  # n_positions 64 >= segment + 2 x 4 memory tokens (GPT-2)
MATPLOTLIB_COLORS = {"rmt": (0x1F, 0x77, 0xB4), "no_memory": (0xFF, 0x7F, 0x0E),
                     "memory_reset": (0x2C, 0xA0, 0x2C), "majority_answer": (0xD6, 0x27, 0x28)}


# Every BABILong recipe (tests/test_recipes_shrunk.py leaves them to this file); the CPU one runs
# for about an hour as shipped, so this is its smoke version too.
RECIPES = sorted(p.name for p in (REPO / "configs").glob("babilong*.yaml"))


def shrunk_recipe(tmp_path: Path, recipe: str) -> Path:
    raw = yaml.safe_load((REPO / "configs" / recipe).read_text())
    r = shrink(raw, "babilong_qa1", None, None)
    r["run"].update(max_steps=STEPS, export=False)  # evaluated from its checkpoint
    r["model"]["segment_size"] = SEGMENT
    r["model"]["max_sequence_length"] = SEGMENT * max(n for _, n in r["curriculum"]["schedule"])
    r["model"]["backbone"]["vocab_size"] = 400
    r["data"]["sources"] = [{"path_or_name": str(write_filler(tmp_path / "filler.jsonl"))}]
    r["data"].pop("eval_sources", None)  # held out of the one filler file instead
    r["data"]["tokenizer"] = str(tmp_path / "tok")
    r["data"]["eval_fraction"] = 0.2
    r["data"]["babilong"].update(facts=4, filler_chars=100_000)  # qa1: a move per person
    r["eval"]["batches"] = 1  # the held-out babilong loss runs too
    r["eval"].update(memory_task_segments=[2], memory_task_samples=8)
    path = tmp_path / "babilong_qa1.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


@pytest.mark.parametrize("recipe_name", RECIPES)
def test_babilong_recipe_trains_and_evaluates_with_its_controls(recipe_name, tmp_path, capsys):
    recipe = shrunk_recipe(tmp_path, recipe_name)
    code = tokenizer_main(["--config", str(recipe), "--vocab-size", "400", "--out",
                           str(tmp_path / "tok")])
    assert code == 0, capsys.readouterr().err[-3000:]
    vocab = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["model"]["vocab"]
    assert "Ġkitchen" in vocab and "ĠMary" in vocab  # the stories' words have tokens of their own

    runs = tmp_path / "runs"
    proc = subprocess.run(["bash", LAUNCHER, "--config", str(recipe), f"run.runs_dir={runs}"],
                          cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    run = runs / "babilong_qa1"
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(map(math.isfinite, losses.values()))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/loss" in m for m in metrics)
    # The trainer scores answers during training too (its held-out stories are evaluate's:
    # tests/test_data_babilong.py::test_trainer_scores_the_stories_evaluate_scores).
    final = {k: v for m in metrics for k, v in m.items()}
    for tag in ("exact_match", "token_acc"):
        assert 0.0 <= final[f"eval/babilong_qa1_{tag}_2seg"] <= 1.0

    out = tmp_path / "eval"
    code = evaluate.main(["--model", str(run), "--task", "babilong-qa1", "--segments", "1,2",
                          "--samples", "24", "--generate-checks", "2", "--out", str(out)])
    assert code == 0
    assert "majority_answer" in capsys.readouterr().out
    report = json.loads((out / "babilong-qa1.json").read_text())
    assert list(report["conditions"]) == list(MATPLOTLIB_COLORS)
    # The majority rate, recomputed from the held-out stories themselves (seed 0's eval stream).
    seed = eval_seed(0)
    secret = int(rng.hash64(seed, "babilong-secret")[0])
    answers = [generate_story("qa1", i, seed, secret, facts=4, people=4, places=6, objects=3).answer
               for i in range(24)]
    for row, n in zip(report["results"], (1, 2)):
        assert row["num_segments"] == n and row["tokens"] == n * SEGMENT and row["samples"] == 24
        for condition in ("rmt", "no_memory", "memory_reset"):
            assert 0.0 <= row[condition]["exact_match"] <= row[condition]["token_accuracy"] <= 1.0
        assert row["majority_answer"]["exact_match"] == max(Counter(answers).values()) / 24
    assert report["generate_check"]["samples"] == 4
    png = out / "babilong-qa1.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = (matplotlib.image.imread(str(png))[..., :3] * 255).round().astype(int).reshape(-1, 3)
    for condition, color in MATPLOTLIB_COLORS.items():  # one line (and legend entry) each
        assert (np.abs(pixels - color).max(1) <= 8).sum() > 50, condition

    # Stories that cannot fit are refused before any sample is scored, naming what to change.
    longer = yaml.safe_load(recipe.read_text())
    longer["data"]["babilong"]["facts"] = 20  # >= 4 tokens each: more than 48 - question
    (tmp_path / "longer.yaml").write_text(yaml.safe_dump(longer))
    code = evaluate.main(["--model", str(run), "--task", "babilong-qa1", "--segments", "1,2",
                          "--data", str(tmp_path / "longer.yaml"), "--out", str(out)])
    assert code == 2
    assert "48 x 1 segments cannot hold data.babilong qa1" in capsys.readouterr().err
    # A data section without filler text is refused before the model is loaded.
    code = evaluate.main(["--model", str(run), "--task", "babilong-qa2", "--segments", "2",
                          "--data", str(REPO / "configs" / "tiny_cpu.yaml")])
    assert code == 2
    assert "no data.sources" in capsys.readouterr().err
