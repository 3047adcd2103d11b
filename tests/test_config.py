"""Run config: every shipped recipe/template validates; bad configs fail as one clear message."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from training import pretrain
from training.config import (ConfigError, DeepSpeedConfig, config_reference_markdown,
                             load_config, template_problems)

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs").glob("*.yaml"))
STDLIB_CORPUS = "runs/stdlib_text"
TEMPLATES = sorted((REPO / "ds_configs").glob("*.json"))


def fitting_world_size(recipe: Path) -> int:
    batch = (yaml.safe_load(recipe.read_text()) or {}).get("batch", {})
    if batch.get("global_batch_size") is None:
        return 1
    return batch["global_batch_size"] // (batch.get("micro_batch_size", 16)
                                          * batch.get("grad_accum_steps", 1))


def test_recipes_exist():
    assert {p.name for p in RECIPES} >= {"tiny_cpu.yaml", "gpt2_small_rmt.yaml",
                                         "llama_1b_rmt.yaml"}
    assert {p.name for p in TEMPLATES} >= {"zero1.json", "zero2.json", "zero3.json",
                                           "zero3_offload.json"}


def assert_subset(given, resolved, where):
    if isinstance(given, dict):
        for key, value in given.items():
            assert_subset(value, resolved[key], f"{where}.{key}")
    elif isinstance(given, list) and given and isinstance(given[0], dict):
        assert len(given) == len(resolved), where
        for i, (g, r) in enumerate(zip(given, resolved)):
            assert_subset(g, r, f"{where}[{i}]")
    else:
        assert given == resolved, where


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory) -> Path:
    """A folder holding runs/stdlib_text as `python -m training.data.stdlib_corpus` writes it: the
    CPU text and BABILong recipes name that corpus relative to where they run, and a fresh clone
    has none until the user writes it (their header says how)."""
    from training.data import stdlib_corpus
    from training.tokenizer import main as train_tokenizer

    root = tmp_path_factory.mktemp("corpus_root")
    stdlib_corpus.write_corpus(root / STDLIB_CORPUS, eval_every=10)
    cwd = os.getcwd()
    os.chdir(root)
    try:  # each recipe's tokenizer folder, trained on a little of the corpus (seconds)
        for recipe in RECIPES:
            tokenizer = (yaml.safe_load(recipe.read_text()).get("data") or {}).get("tokenizer", "")
            if tokenizer.startswith(f"{STDLIB_CORPUS}/") and not Path(tokenizer).exists():
                assert train_tokenizer(["--config", str(recipe), "--vocab-size", "512",
                                        "--max-documents", "40", "--out", tokenizer]) == 0
    finally:
        os.chdir(cwd)
    return root


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_validates(recipe, corpus_root, monkeypatch):
    if f"{STDLIB_CORPUS}/" in recipe.read_text():
        monkeypatch.chdir(corpus_root)
    world = fitting_world_size(recipe)
    cfg = load_config(recipe, [], world_size=world)
    raw = yaml.safe_load(recipe.read_text())
    # What the file says is what the resolved config holds (no key silently dropped).
    assert_subset(raw, cfg.to_dict(), recipe.name)
    ds = cfg.deepspeed.engine_config(cfg.batch, cfg.optim, world)
    used = cfg.batch.for_world(world)
    assert ds["train_batch_size"] == used.micro_batch_size * used.grad_accum_steps * world
    assert ds["gradient_accumulation_steps"] == used.grad_accum_steps
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage
    assert ds["bf16"]["enabled"] == (cfg.deepspeed.precision == "bf16")


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_ds_template_validates(template):
    raw = json.loads(template.read_text())
    assert template_problems(raw, template.name) == []
    zero = raw["zero_optimization"]
    section = DeepSpeedConfig(
        zero_stage=zero["stage"], template=str(template),
        offload_optimizer="offload_optimizer" in zero, offload_param="offload_param" in zero)
    assert section.problems() == []


def test_template_owning_a_recipe_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": 64}))
    problems = DeepSpeedConfig(template=str(bad)).problems()
    assert any("train_batch_size" in p and "recipe owns" in p for p in problems)


def test_precedence_defaults_recipe_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim: {lr: 2.0e-3, warmup_steps: 7}\n")
    cfg = load_config(recipe, ["optim.lr=5e-4"])
    assert cfg.optim.lr == 5e-4            # override beats recipe
    assert cfg.optim.warmup_steps == 7      # recipe beats default
    assert cfg.optim.eps == 1e-8            # default


# Each case: (recipe YAML text, overrides, env, fragments that must each appear in the message).
BAD_CASES = {
    "batch_arithmetic": ("", ["batch.micro_batch_size=4", "batch.global_batch_size=33"], {},
                         ["batch.global_batch_size: 33"]),
    "unknown_override_key": ("", ["optim.learning_rate=1e-3"], {},
                             ["override optim.learning_rate: unknown key"]),
    "unknown_yaml_key": ("optim: {lr: 1.0e-3, momentum: 0.9}\n", [], {},
                         ["optim.momentum: unknown key"]),
    "unknown_section": ("optimiser: {lr: 1.0e-3}\n", [], {}, ["optimiser: unknown key"]),
    "wrong_type": ("", ["run.max_steps=ten", "model.gradient_checkpointing=3"], {},
                   ["run.max_steps: expected int", "model.gradient_checkpointing: expected bool"]),
    "missing_data_file": ("", ["data.source=text", "data.tokenizer=gpt2",
                               "data.sources=[{path_or_name: /nonexistent/corpus.jsonl}]"], {},
                          ["/nonexistent/corpus.jsonl"]),
    "sequence_not_multiple_of_segment": ("", ["model.max_sequence_length=50"], {},
                                         ["model.max_sequence_length: 50"]),
    "segment_too_small_for_tasks": ("", ["model.segment_size=8"], {}, ["segment_size >= 14"]),
    "world_size_does_not_fit": ("", ["batch.micro_batch_size=16", "batch.global_batch_size=32"],
                                {"WORLD_SIZE": "3"}, ["world size 3"]),
    "model_rejects": ("", ["model.num_mem_tokens=0"], {}, ["num_mem_tokens"]),
    "negative_memory_noise": ("", ["model.memory_noise=-0.5"], {}, ["memory_noise=-0.5 is invalid"]),
    "positions_exceed_backbone": ("", ["model.segment_size=60"], {}, ["max_position_embeddings"]),
    "negative_lr_and_bad_stage": ("", ["optim.lr=-1", "deepspeed.zero_stage=5"], {},
                                  ["optim.lr: -1.0 must be > 0", "deepspeed.zero_stage: 5"]),
    "template_disagrees": ("", ["deepspeed.template=ds_configs/zero1.json"], {},
                           ["disagrees with"]),
    "bad_override_syntax": ("", ["optim.lr"], {}, ["expected key.path=value"]),
    "resume_not_a_checkpoint": ("", ["checkpoint.resume=/nonexistent/step_00000010"], {},
                                ["checkpoint.resume"]),
    "curriculum": ("curriculum: {schedule: [[5, 2], [3, 4]]}\n", [], {},
                   ["curriculum.schedule"]),
    "many_at_once": ("optim: {lr: -2.0}\nbogus: 1\n", ["run.seed=x", "batch.grad_accum_steps=0"],
                     {}, ["optim.lr", "bogus: unknown key", "run.seed: expected int",
                          "batch.grad_accum_steps: 0"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_config_exits_2_with_every_problem(case, tmp_path, monkeypatch, capsys):
    text, overrides, env, fragments = BAD_CASES[case]
    for var in ("WORLD_SIZE", "RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(REPO)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    runs = tmp_path / "runs"
    code = pretrain.main(["--config", str(recipe), f"run.runs_dir={runs}", *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("invalid configuration"), err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} missing from:\n{err}"
    assert "Traceback" not in err
    assert not runs.exists()


def test_missing_recipe_file(tmp_path, capsys):
    code = pretrain.main(["--config", str(tmp_path / "nope.yaml")])
    assert code == 2 and "nope.yaml is not a file" in capsys.readouterr().err


def test_cli_bad_config_no_traceback_no_run_dir(tmp_path):
    """The real command line: exit status 2, one message, nothing created."""
    runs = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "training.pretrain", f"run.runs_dir={runs}", "optim.lr=-1",
         "batch.micro_batch_size=4", "batch.global_batch_size=7", "nonsense.key=1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in ("optim.lr", "batch.global_batch_size: 7", "nonsense.key: unknown key"):
        assert fragment in proc.stderr
    assert not runs.exists()


def test_config_reference_lists_every_key():
    text = config_reference_markdown()
    cfg = load_config(None)
    for section, values in cfg.to_dict().items():
        for key in values:
            assert f"| `{section}.{key}" in text
    assert "| `optim.lr` | float | `0.001` |" in text
    assert "| `data.memory_tasks.span_length` | int | `6` |" in text
    assert "| `data.sources[].path_or_name` | str |" in text


def test_readme_config_reference_is_current():
    readme = (REPO / "README.md").read_text()
    start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
    assert start in readme and end in readme, "README lacks the config-reference markers"
    block = readme.split(start, 1)[1].split(end, 1)[0]
    assert block.strip() == config_reference_markdown().strip(), (
        "README config reference is stale: paste `python -m training.config --reference`")


def test_reference_cli_prints_it():
    proc = subprocess.run([sys.executable, "-m", "training.config", "--reference"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert proc.stdout == config_reference_markdown()


def test_config_error_lists_problems():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.lr=0", "optim.eps=0"])
    assert len(e.value.problems) == 2


# (micro, accum, global, world) -> (micro, accum) a run uses; DeepSpeed's rule, worked by hand.
BATCH_SPLITS = [
    ((16, None, 32, 1), (16, 2)),    # the default recipe on one rank: accumulate
    ((16, None, 32, 2), (16, 1)),
    ((16, None, 32, 4), (8, 1)),     # world too large for micro 16: it shrinks, never grows
    ((16, None, 32, 32), (1, 1)),
    ((8, None, 256, 8), (8, 4)),     # the GPT-2 recipe on 8 GPUs
    ((4, None, 96, 3), (4, 8)),
    ((16, 2, 32, 1), (16, 2)),       # all three given and consistent
    ((16, None, None, 4), (16, 1)),  # no global batch: per rank, grows with the world
    ((8, 4, None, 2), (8, 4)),
]


@pytest.mark.parametrize("given,used", BATCH_SPLITS, ids=str)
def test_batch_split_for_any_world_size(given, used):
    from training.config import BatchConfig

    micro, accum, total, world = given
    out = BatchConfig(micro, accum, total).for_world(world)
    assert (out.micro_batch_size, out.grad_accum_steps) == used
    assert out.global_batch_size == (total or used[0] * used[1] * world)
    assert out.micro_batch_size * out.grad_accum_steps * world == out.global_batch_size


@pytest.mark.parametrize("given,fragment", [
    ((16, None, 32, 3), "world sizes that work: 1, 2, 4, 8, 16, 32"),
    ((5, None, 32, 2), "micro_batch_size that work: 1, 2, 4"),
    ((16, 1, 32, 1), "needs grad_accum_steps 2, not 1"),
])
def test_impossible_batch_split_names_values_that_work(given, fragment):
    from training.config import BatchConfig

    micro, accum, total, world = given
    with pytest.raises(ConfigError) as e:
        BatchConfig(micro, accum, total).for_world(world)
    assert fragment in str(e.value)


def test_every_model_setting_is_settable_from_a_recipe():
    """ModelConfig hands RMTConfig every setting the model names (RMT_SETTINGS), with its default."""
    import dataclasses
    import inspect

    from model import RMTConfig
    from model.configuration_rmt import RMT_SETTINGS
    from training.config import ModelConfig

    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    assert set(RMT_SETTINGS) <= set(fields), set(RMT_SETTINGS) - set(fields)
    kwargs = ModelConfig().rmt_kwargs()
    assert set(kwargs) == {"backbone", *RMT_SETTINGS}
    model_defaults = inspect.signature(RMTConfig.__init__).parameters
    # The recipe's tiny defaults differ on purpose for the sizes; the behaviour switches agree.
    for name in ("bptt_depth", "loss_from_segment", "loss_chunk_size", "fused_segment_loss",
                 "memory_noise", "memory_noise_prob", "checkpoint_memory_budget_mb"):
        assert kwargs[name] == model_defaults[name].default, name
    assert ModelConfig(fused_segment_loss=False).rmt_kwargs()["fused_segment_loss"] is False
