"""bench/babilong_plain_transformer.py (docs/results.md 5.2): trains a plain GPT on a recipe's own
stories in one window and reports held-out exact match beside the majority answer and the
question-blind reader, both recomputed here from the generator; bad input exits 2 by name."""

import re
import subprocess
import sys
from collections import Counter

import yaml

from tests.test_babilong_run import shrunk_recipe
from training.data import rng
from training.data.babilong import generate_story
from training.data.babilong_samples import eval_seed
from training.tokenizer import main as tokenizer_main

SCRIPT = "bench/babilong_plain_transformer.py"


def run_script(repo_root, *args):
    return subprocess.run([sys.executable, str(repo_root / SCRIPT), *map(str, args)],
                          cwd=repo_root, capture_output=True, text=True, timeout=300)


def test_trains_and_reports_beside_the_reference_rates(repo_root, tmp_path):
    recipe = shrunk_recipe(tmp_path, "babilong_qa1_cpu.yaml")
    assert tokenizer_main(["--config", str(recipe), "--vocab-size", "400", "--out",
                           str(tmp_path / "tok")]) == 0
    proc = run_script(repo_root, "--config", recipe, "--steps", 4, "--eval-every", 2,
                      "--batch", 8, "--eval-samples", 40, "--width", 32, "--heads", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = yaml.safe_load(recipe.read_text())
    seed = eval_seed(cfg["run"]["seed"])
    secret = int(rng.hash64(seed, "babilong-secret")[0])
    stories = [generate_story("qa1", i, seed, secret, facts=4, people=4, places=6, objects=3)
               for i in range(40)]
    majority = max(Counter(s.answer for s in stories).values()) / 40
    blind = sum(s.facts[-1].split()[-1] == s.answer + "." for s in stories) / 40
    assert f"majority answer {majority:.3f}, question-blind reader {blind:.3f}" in proc.stdout
    rows = re.findall(r"step +(\d+) +train loss ([\d.]+) +held-out exact match ([\d.]+)", proc.stdout)
    assert [int(r[0]) for r in rows] == [2, 4]
    assert all(0.0 <= float(r[2]) <= 1.0 for r in rows)


def test_stages_train_on_smaller_stories_first(repo_root, tmp_path):
    recipe = shrunk_recipe(tmp_path, "babilong_qa1_cpu.yaml")
    assert tokenizer_main(["--config", str(recipe), "--vocab-size", "400", "--out",
                           str(tmp_path / "tok")]) == 0
    proc = run_script(repo_root, "--config", recipe, "--steps", 4, "--eval-every", 4, "--batch", 4,
                      "--eval-samples", 8, "--width", 32, "--heads", 2,
                      "--stages", "0:2:2:20,3:4:4:48")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.findall(r"step +(\d+) +training stories: (\d) people, (\d) facts in (\d+) tokens",
                      proc.stdout) == [("1", "2", "2", "20"), ("3", "4", "4", "48")]
    proc = run_script(repo_root, "--config", recipe, "--stages", "0:6:6:20,2:2:2:12")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--stages 0:6:6:20: at most the recipe's 4 people" in proc.stderr
    assert "--stages 2:2:2:12: 12 x 1 segments cannot hold" in proc.stderr
    proc = run_script(repo_root, "--config", recipe, "--stages", "5:2:2:20")
    assert proc.returncode == 2 and "steps [5] must start at 0" in proc.stderr


def test_bad_input_is_refused_by_name(repo_root, tmp_path):
    proc = run_script(repo_root, "--config", repo_root / "configs" / "tiny_cpu.yaml",
                      "--width", 65, "--steps", 0)
    assert proc.returncode == 2
    for name in ("--steps 0", "--width 65 must be a multiple of --heads 4", "data.source babilong"):
        assert name in proc.stderr
    recipe = shrunk_recipe(tmp_path, "babilong_qa1_cpu.yaml")
    assert tokenizer_main(["--config", str(recipe), "--vocab-size", "400", "--out",
                           str(tmp_path / "tok")]) == 0
    proc = run_script(repo_root, "--config", recipe, "--tokens", 12)
    assert proc.returncode == 2 and "--tokens 12: 12 x 1 segments cannot hold" in proc.stderr
    assert "Traceback" not in proc.stderr
