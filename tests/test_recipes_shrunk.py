"""Issue 17: every recipe starts. Each configs/*.yaml, shrunk to a few-second model but otherwise
as shipped (model family, ZeRO stage, precision, data source and packing, BPTT, gradient
checkpointing, curriculum, accumulation), trains 3 steps on 2 CPU ranks through the users'
launcher; and a text recipe without eval data is refused before any rank starts.

The shrink walks the recipe: backbone sizes under whichever names the family uses, segment and
memory sizes, the curriculum and eval segment counts (at most 2), batch and step counts. Text
recipes never touch the Hugging Face hub: the test writes local jsonl from the Python standard
library's own source files (real text every machine has, SPEC 2.2), trains a byte-level BPE on it
with `python -m training.tokenizer`, and points the recipe's sources and tokenizer at them.
"""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cluster.env import clean_launch_env
from tests.cluster.runs import complete_steps
from tests.test_data_text import write_jsonl
from tests.test_reliability_helpers import train_losses

REPO = Path(__file__).resolve().parents[1]
# BABILong recipes need segments long enough for a story: tests/test_babilong_run.py shrinks and
# runs them with their own sizes.
RECIPES = sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("babilong"))
TEXT_RECIPES = [r for r in RECIPES
                if (yaml.safe_load(r.read_text()).get("data") or {}).get("source") == "text"]
LAUNCHER = "launch/pretrain.sh"
RANKS = 2
STEPS = 3
TEXT_VOCAB = 320  # 256 bytes + 3 specials + merges
SEGMENT, MEM = 16, 4
# Backbone sizes by the names the model families use (Llama, GPT-2, OPT/...): small, never larger.
SMALL_BACKBONE = {"hidden_size": 32, "n_embd": 32, "d_model": 32,
                  "intermediate_size": 64, "n_inner": 64, "ffn_dim": 64,
                  "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2,
                  "num_attention_heads": 2, "n_head": 2,
                  "max_position_embeddings": 64, "n_positions": 64}
HEADS = ("num_attention_heads", "n_head")


def shrink_schedule(schedule: list, last_step: int) -> list:
    """At most 2 segments; a recipe that changes its segment count still changes it (at step 2)."""
    counts = []
    for _, n in schedule:
        if not counts or min(n, 2) != counts[-1]:
            counts.append(min(n, 2))
    return [[0 if i == 0 else last_step, n] for i, n in enumerate(counts)]


def shrink_backbone(backbone: dict) -> dict:
    out = {k: min(v, SMALL_BACKBONE[k]) if k in SMALL_BACKBONE and isinstance(v, int) else v
           for k, v in backbone.items()}
    head_key = next((k for k in HEADS if k in backbone), None)
    if head_key and "num_key_value_heads" in backbone:  # keep grouped-query attention grouped
        ratio = backbone[head_key] // backbone["num_key_value_heads"]
        out["num_key_value_heads"] = max(1, out[head_key] // ratio)
    return out


def precision_on_this_machine(precision: str) -> str:
    """DeepSpeed's CPU accelerator trains fp32 and bf16 but has no fp16 (the trainer refuses it,
    exit 2): an fp16 recipe is shrunk to fp32 where the accelerator lacks it."""
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    ok = {"fp32": True, "bf16": accel.is_bf16_supported(), "fp16": accel.is_fp16_supported()}
    return precision if ok[precision] else "fp32"


def shrink(recipe: dict, name: str, data_files: dict | None, tokenizer: Path | None) -> dict:
    """A copy of `recipe` small enough to train 3 steps in seconds; every other setting kept."""
    r = copy.deepcopy(recipe)
    r["run"] = {**r.get("run", {}), "name": name, "max_steps": STEPS}
    model = r.setdefault("model", {})
    model["backbone"] = shrink_backbone(model.get("backbone", {}))
    model["segment_size"] = min(model.get("segment_size", SEGMENT), SEGMENT)
    model["num_mem_tokens"] = min(model.get("num_mem_tokens", MEM), MEM)
    schedule = shrink_schedule(r.get("curriculum", {}).get("schedule", [[0, 1]]), STEPS - 1)
    r["curriculum"] = {**r.get("curriculum", {}), "schedule": schedule}
    if model.get("max_sequence_length") is not None:
        model["max_sequence_length"] = model["segment_size"] * max(n for _, n in schedule)
    batch = r.setdefault("batch", {})
    micro = batch["micro_batch_size"] = min(batch.get("micro_batch_size", 16), 2)
    if batch.get("global_batch_size") is not None:  # the global batch decides the accumulation
        batch["global_batch_size"] = micro * RANKS * 2
        if batch.get("grad_accum_steps") is not None:
            batch["grad_accum_steps"] = 2
    elif batch.get("grad_accum_steps") is not None:
        batch["grad_accum_steps"] = min(batch["grad_accum_steps"], 2)
    ds = r.setdefault("deepspeed", {})
    ds["precision"] = precision_on_this_machine(ds.get("precision", "fp32"))
    ev = r["eval"] = {**r.get("eval", {}), "every": 0,
                      "batches": min(r.get("eval", {}).get("batches", 4), 1),
                      "memory_task_samples": 8}
    ev["memory_task_segments"] = sorted({min(n, 2) for n in ev.get("memory_task_segments", [2])})
    ck = r["checkpoint"] = {**r.get("checkpoint", {}), "every": STEPS}
    if ck.get("keep_best"):  # still kept by its metric, at a segment count the shrunk run scores
        ev["every"] = STEPS
        ck["keep_best"] = re.sub(r"_\d+seg$", f"_{max(ev['memory_task_segments'])}seg",
                                 ck["keep_best"])
    r["logging"] = {**r.get("logging", {}), "every": 1, "progress_bar": False}
    r["optim"] = {**r.get("optim", {}), "warmup_steps": 1}
    data = r.setdefault("data", {})
    if data.get("source") == "text":
        model["backbone"]["vocab_size"] = TEXT_VOCAB
        data["tokenizer"] = str(tokenizer)
        for key in ("sources", "eval_sources"):  # hub datasets -> local files, weights kept
            data[key] = [{"path_or_name": str(data_files[key][i % len(data_files[key])]),
                          "weight": src.get("weight", 1.0)}
                         for i, src in enumerate(data.get(key, []))]
        if data.get("eval_fraction", 0) > 0:  # enough held-out documents on every rank
            data["eval_fraction"] = max(data["eval_fraction"], 0.2)
    return r


@pytest.fixture(scope="module")
def stdlib_text(tmp_path_factory) -> dict:
    """Two train and one eval jsonl file of standard-library source files (disjoint)."""
    root = tmp_path_factory.mktemp("stdlib_text")
    lib = Path(json.__file__).parent.parent
    texts = [p.read_text(encoding="utf-8", errors="replace")
             for p in sorted(lib.glob("*.py"))[:150]]
    files = {"sources": [root / "train_a.jsonl", root / "train_b.jsonl"],
             "eval_sources": [root / "eval.jsonl"]}
    write_jsonl(files["sources"][0], texts[0:120:2])
    write_jsonl(files["sources"][1], texts[1:120:2])
    write_jsonl(files["eval_sources"][0], texts[120:])
    return files


def launch_env() -> dict:
    # No hub at test time: every source and tokenizer is local, and offline mode makes sure.
    return clean_launch_env(RMT_NPROC=str(RANKS), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
                            HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def train_tokenizer(recipe_yaml: Path, out: Path) -> None:
    """The project's own command, on the shrunk recipe's (local) sources."""
    proc = subprocess.run([sys.executable, "-m", "training.tokenizer", "--config", str(recipe_yaml),
                           "--vocab-size", str(TEXT_VOCAB), "--out", str(out)], cwd=REPO,
                          env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_every_recipe_is_covered():
    assert {r.name for r in RECIPES} >= {"tiny_cpu.yaml", "gpt2_small_rmt.yaml",
                                         "llama_1b_rmt.yaml"}
    assert TEXT_RECIPES, "no text recipe: the eval-data checks below would test nothing"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_shrunk_recipe_trains_three_steps_on_two_ranks(recipe, tmp_path, stdlib_text):
    raw = yaml.safe_load(recipe.read_text())
    text = (raw.get("data") or {}).get("source") == "text"
    shrunk = shrink(raw, recipe.stem, stdlib_text if text else None, tmp_path / "tok")
    path = tmp_path / f"{recipe.stem}.yaml"
    path.write_text(yaml.safe_dump(shrunk, sort_keys=False))
    if text:
        train_tokenizer(path, tmp_path / "tok")
    runs = tmp_path / "runs"
    proc = subprocess.run(["bash", LAUNCHER, "--config", str(path), f"run.runs_dir={runs}"],
                          cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    run_dir = runs / recipe.stem
    assert complete_steps(run_dir)[-1] == STEPS, output[-4000:]
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1)), losses
    assert all(math.isfinite(v) for v in losses.values()), losses
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["deepspeed"]["zero_stage"] == raw.get("deepspeed", {}).get("zero_stage", 3)
    assert resolved["data"]["source"] == raw.get("data", {}).get("source", "memory_tasks")
    assert resolved["model"]["backbone"]["model_type"] == raw["model"]["backbone"]["model_type"]
    if shrunk["run"].get("export", True):
        assert (run_dir / "export" / "config.json").is_file()


# -------------------------------------------------------------------- text recipe without eval data

def without_eval_data(recipe: Path, tmp_path: Path) -> Path:
    """The state gpt2_small_rmt/llama_1b_rmt shipped in: eval batches but no held-out text."""
    raw = yaml.safe_load(recipe.read_text())
    raw["data"].pop("eval_sources", None)
    raw["data"]["eval_fraction"] = 0.0
    assert raw.get("eval", {}).get("batches", 4) > 0
    path = tmp_path / recipe.name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


EVAL_FRAGMENTS = ["eval.batches", "data.eval_sources", "data.eval_fraction > 0", "eval.batches=0"]


@pytest.mark.parametrize("recipe", TEXT_RECIPES, ids=lambda p: p.stem)
def test_text_recipe_without_eval_data_is_refused_by_the_config_check(recipe, tmp_path):
    path = without_eval_data(recipe, tmp_path)
    before = sorted(tmp_path.iterdir())
    proc = subprocess.run([sys.executable, "-m", "training.config", "--check", str(path)],
                          cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("invalid configuration") == 1
    for fragment in EVAL_FRAGMENTS:
        assert fragment in proc.stderr, (fragment, proc.stderr)
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("recipe", TEXT_RECIPES, ids=lambda p: p.stem)
def test_text_recipe_without_eval_data_is_refused_by_the_launcher(recipe, tmp_path):
    path = without_eval_data(recipe, tmp_path)
    runs = tmp_path / "runs"
    proc = subprocess.run(["bash", LAUNCHER, "--config", str(path), f"run.runs_dir={runs}"],
                          cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    # One report from the pre-flight, before torchrun starts any rank.
    assert proc.stderr.count("invalid configuration") == 1, proc.stderr[-4000:]
    assert "torch.distributed.run" not in proc.stderr and "OMP_NUM_THREADS" not in proc.stderr
    for fragment in EVAL_FRAGMENTS:
        assert fragment in proc.stderr, (fragment, proc.stderr)
    assert not runs.exists()
