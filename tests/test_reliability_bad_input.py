"""Issue 5, promise 6: the bad-input catalogue.

Every case starts from a valid baseline (checked by test_baselines_are_valid) and breaks one
input: a config key, a command-line override, a data file, a tokenizer, a checkpoint folder or
an export target. Each must end with exit code 2, one message naming the input and what would be
valid, no traceback, and no file written, changed or deleted anywhere under the test's folder or
in the repository's top level (snapshot before and after).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_reliability_helpers import REPO, TINY, _env

TEXT_VOCAB = 300
ASSET_RUN = [*TINY, "deepspeed.zero_stage=0", "batch.micro_batch_size=2"]  # valid on 1 rank


# -------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Read-only inputs the cases copy from: a tokenizer, a data file, a finished 1-rank run."""
    root = tmp_path_factory.mktemp("assets")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}: " + "lorem ipsum " * 20})
                              + "\n" for i in range(50)))
    from training.data.tokenization import train_bpe_tokenizer

    train_bpe_tokenizer([json.loads(l)["text"] for l in corpus.read_text().splitlines()],
                        TEXT_VOCAB, str(root / "tok"))
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>").save_pretrained(
        str(root / "tok_no_eos"))

    run_dir = root / "runs" / "done"
    proc = subprocess.run([sys.executable, "-m", "training.pretrain", f"run.runs_dir={run_dir.parent}",
                           f"run.name={run_dir.name}", *ASSET_RUN, "run.max_steps=2",
                           "checkpoint.every=1",
                           "checkpoint.keep_last=2"], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def text_overrides(assets: Path, data_file: str | Path) -> list[str]:
    return ["data.source=text", f"data.tokenizer={assets / 'tok'}",
            f"data.sources=[{{path_or_name: '{data_file}'}}]", "model.backbone.vocab_size=512",
            "data.eval_fraction=0.2"]  # ASSET_RUN's eval.batches=1 needs held-out text


def copy_run(assets: Path, work: Path) -> Path:
    dst = work / "runs" / "done"
    shutil.copytree(assets / "runs" / "done", dst)
    return dst


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


# -------------------------------------------------------------------------------- entry points

def pretrain(work: Path, *args: str) -> list:
    from training import pretrain as entry

    return [entry.main, ["--config", "configs/tiny_cpu.yaml", f"run.runs_dir={work / 'runs'}",
                         "run.name=done", *ASSET_RUN, *args]]


def export(*args) -> list:
    from training import export as entry

    return [entry.main, [str(a) for a in args]]


def tokenizer(*args) -> list:
    from training import tokenizer as entry

    return [entry.main, [str(a) for a in args]]


# -------------------------------------------------------------------------------- the catalogue
# name -> (setup(assets, work) -> [main, argv], fragments the one message must contain: the input
# it names and what would be valid).

def _truncate(run_dir: Path) -> None:
    states = sorted(ckpt(run_dir, 2).glob("*model_states.pt"))
    data = states[0].read_bytes()
    states[0].write_bytes(data[: len(data) // 2])


def _world_two(run_dir: Path) -> None:
    state = ckpt(run_dir, 2) / "client_state.json"
    text = state.read_text()
    assert '"world_size": 1' in text
    state.write_text(text.replace('"world_size": 1', '"world_size": 2'))  # same size: manifest ok


def _backbone_folder(work: Path, config_json: str) -> Path:
    """A model.init_from folder holding only this config.json (no weights)."""
    (work / "backbone").mkdir()
    (work / "backbone" / "config.json").write_text(config_json)
    return work / "backbone"


def _damaged(work, assets, damage):
    run_dir = copy_run(assets, work)
    damage(run_dir)
    return pretrain(work)


CASES = {
    # --- configs and command-line overrides
    "negative_lr": (lambda a, w: pretrain(w, "optim.lr=-0.1"), ["optim.lr", "must be > 0"]),
    "segment_size_zero": (lambda a, w: pretrain(w, "model.segment_size=0"),
                          ["segment_size", ">="]),
    "memory_exceeds_positions": (lambda a, w: pretrain(w, "model.num_mem_tokens=30"),
                                 ["max_position_embeddings"]),
    "unknown_override_key": (lambda a, w: pretrain(w, "optim.learning_rate=1e-3"),
                             ["optim.learning_rate", "unknown key"]),
    "override_below_a_value": (lambda a, w: pretrain(w, "optim.lr.peak=1e-3"),
                               ["optim.lr.peak", "unknown key"]),
    "override_without_value": (lambda a, w: pretrain(w, "optim.lr"),
                               ["optim.lr", "expected key.path=value"]),
    "wrong_type": (lambda a, w: pretrain(w, "run.max_steps=ten"),
                   ["run.max_steps", "expected int"]),
    "init_from_without_weights": (lambda a, w: _backbone_folder(w, '{"model_type": "llama"}') and
                                  pretrain(w, f"model.init_from={w / 'backbone'}"),
                                  ["model.init_from", "holds no weights", "model.safetensors"]),
    "init_from_config_not_json": (lambda a, w: _backbone_folder(w, '{"model_type": ') and
                                  pretrain(w, f"model.init_from={w / 'backbone'}"),
                                  ["model.init_from", "cannot read", "config.json as JSON"]),
    "config_is_a_directory": (lambda a, w: [pretrain(w)[0], ["--config", str(w)]],
                              ["--config", "is not a file", "configs/tiny_cpu.yaml"]),
    "config_not_a_mapping": (lambda a, w: (w / "r.yaml").write_text("- a\n- b\n") and
                             [pretrain(w)[0], ["--config", str(w / "r.yaml")]],
                             ["--config", "must hold a mapping"]),
    "config_not_yaml": (lambda a, w: (w / "r.yaml").write_text("optim: {lr: [1e-3\n") and
                        [pretrain(w)[0], ["--config", str(w / "r.yaml")]],
                        ["--config", "not valid YAML"]),
    "run_name_escapes_runs_dir": (lambda a, w: pretrain(w, "run.name=../outside"),
                                  ["run.name", "folder name without '/'"]),
    "ds_template_is_a_directory": (lambda a, w: pretrain(w, f"deepspeed.template={w}"),
                                   ["deepspeed.template", "zero3.json"]),
    "ds_extra_sets_recipe_key": (lambda a, w: pretrain(w, "deepspeed.extra.train_batch_size=8"),
                                 ["deepspeed.extra.train_batch_size", "set by the recipe"]),
    "batch_does_not_multiply": (lambda a, w: pretrain(w, "batch.global_batch_size=33"),
                                ["batch.global_batch_size: 33", "micro_batch_size"]),
    "fp16_on_cpu": (lambda a, w: pretrain(w, "deepspeed.precision=fp16"),
                    ["deepspeed.precision: fp16", "valid here: fp32, bf16"]),
    # --- data files
    "data_not_json_lines": (lambda a, w: (w / "d.jsonl").write_text("this is not json\n") and
                            pretrain(w, *text_overrides(a, w / "d.jsonl")),
                            ["data.sources[0]", "d.jsonl", "as json"]),
    "data_missing_text_field": (lambda a, w: (w / "d.jsonl").write_text('{"body": "x"}\n') and
                                pretrain(w, *text_overrides(a, w / "d.jsonl")),
                                ["data.sources[0].text_field", "fields: ['body']"]),
    "data_is_a_directory": (lambda a, w: pretrain(w, *text_overrides(a, w)),
                            ["data.sources[0].path_or_name", "matches no file"]),
    "data_file_missing": (lambda a, w: pretrain(w, *text_overrides(a, w / "nope.jsonl")),
                          ["data.sources[0].path_or_name", "nope.jsonl", "existing file"]),
    "text_without_eval_data": (lambda a, w: pretrain(w, *text_overrides(a, a / "corpus.jsonl"),
                                                     "data.eval_fraction=0"),
                               ["eval.batches: 1", "data.eval_sources", "data.eval_fraction > 0",
                                "eval.batches=0"]),
    "data_file_empty": (lambda a, w: (w / "d.jsonl").touch() or
                        pretrain(w, *text_overrides(a, w / "d.jsonl")),
                        ["data.sources[0].path_or_name", "only empty files"]),
    # --- tokenizers
    "tokenizer_without_eos": (lambda a, w: pretrain(w, *text_overrides(a, a / "corpus.jsonl"),
                                                    f"data.tokenizer={a / 'tok_no_eos'}"),
                              ["data.tokenizer", "no EOS token", "eos_token"]),
    "tokenizer_is_a_file": (lambda a, w: pretrain(w, *text_overrides(a, a / "corpus.jsonl"),
                                                  f"data.tokenizer={a / 'corpus.jsonl'}"),
                            ["data.tokenizer", "is not a directory"]),
    "tokenizer_larger_than_model_vocab": (
        lambda a, w: pretrain(w, *text_overrides(a, a / "corpus.jsonl"),
                              "model.backbone.vocab_size=64"),
        ["model.backbone.vocab_size: 64", f"set it >= {TEXT_VOCAB}"]),
    "tokenizer_folder_broken": (lambda a, w: (w / "t").mkdir() or
                                (w / "t" / "tokenizer_config.json").write_text("{oops") and
                                pretrain(w, *text_overrides(a, a / "corpus.jsonl"),
                                         f"data.tokenizer={w / 't'}"),
                                ["data.tokenizer", "cannot load"]),
    "tokenizer_folder_missing": (lambda a, w: pretrain(w, *text_overrides(a, a / "corpus.jsonl"),
                                                       f"data.tokenizer={w / 'no_such_tok'}"),
                                 ["data.tokenizer", "no_such_tok", "no such directory",
                                  "python -m training.tokenizer"]),
    "memory_tasks_with_text_tokenizer": (lambda a, w: pretrain(w, f"data.tokenizer={a / 'tok'}"),
                                         ["data.tokenizer", "memory_tasks corpus",
                                          "tokenizer: builtin"]),
    "tokenizer_cli_vocab_too_small": (
        lambda a, w: tokenizer("--config", "configs/tiny_cpu.yaml", "--vocab-size", "10",
                               "--out", w / "newtok", "data.source=text", "batch.global_batch_size=null",
                               f"data.sources=[{{path_or_name: '{a / 'corpus.jsonl'}'}}]"),
        ["--vocab-size 10", "must exceed"]),
    # --- checkpoint folders
    "checkpoint_truncated": (lambda a, w: _damaged(w, a, _truncate),
                             ["model_states.pt", "truncated", "checkpoint.resume=PATH"]),
    "checkpoint_file_missing": (
        lambda a, w: _damaged(w, a, lambda r: (ckpt(r, 2) / "rank_00000.json").unlink()),
        ["rank_00000.json", "missing", "checkpoint.resume=PATH"]),
    "checkpoint_marker_not_a_manifest": (
        lambda a, w: _damaged(w, a, lambda r: (ckpt(r, 2) / "COMPLETE").write_text("2\n")),
        ["COMPLETE", "not a checkpoint manifest"]),
    "checkpoint_other_world_size": (lambda a, w: _damaged(w, a, _world_two),
                                    ["written by 2 rank(s)", "launch 2 rank(s)"]),
    "resume_partial_checkpoint": (
        lambda a, w: (copy_run(a, w) and (ckpt(w / "runs" / "done", 2) / "COMPLETE").unlink()
                      or pretrain(w, f"checkpoint.resume={ckpt(w / 'runs' / 'done', 2)}")),
        ["checkpoint.resume", "complete checkpoint folder"]),
    "resume_is_a_file": (lambda a, w: pretrain(w, f"checkpoint.resume={a / 'corpus.jsonl'}"),
                         ["checkpoint.resume", "complete checkpoint folder"]),
    # --- export targets
    "export_out_not_empty": (lambda a, w: (w / "out").mkdir() or (w / "out" / "x").touch() or
                             export("--run", a / "runs" / "done", "--out", w / "out"),
                             ["--out", "not an empty directory", "new path"]),
    "export_out_is_a_file": (lambda a, w: (w / "out").touch() or
                             export("--run", a / "runs" / "done", "--out", w / "out"),
                             ["--out", "not a directory"]),
    "export_run_missing": (lambda a, w: export("--run", w / "nope", "--out", w / "out"),
                           ["--run", "no such directory"]),
    "export_step_incomplete": (lambda a, w: export("--run", a / "runs" / "done", "--step", "7",
                                                   "--out", w / "out"),
                               ["--step 7", "complete steps are [1, 2]"]),
}


def snapshot(*roots: Path) -> dict:
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                out[str(p)] = (st.st_size, st.st_mtime_ns, p.is_dir())
    return out


def repo_top_level() -> set:
    return {p.name for p in REPO.iterdir()}


@pytest.fixture
def clean_process_env(monkeypatch):
    """The entry points set launcher variables in os.environ (one process = one job)."""
    saved = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(REPO)
    yield
    os.environ.clear()
    os.environ.update(saved)


def run_entry(main, argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err


def test_catalogue_is_big_enough():
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_clear_message_and_touches_nothing(
        case, assets, tmp_path, capsys, clean_process_env):
    setup, fragments = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    main, argv = setup(assets, work)
    before, top = snapshot(tmp_path, assets), repo_top_level()
    code, err = run_entry(main, argv, capsys)
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert snapshot(tmp_path, assets) == before, "files were written, changed or deleted"
    assert repo_top_level() == top


def test_baselines_are_valid(assets, tmp_path, capsys, clean_process_env):
    """The cases fail for their one broken input: the inputs they start from are fine."""
    from training.config import load_config

    load_config("configs/tiny_cpu.yaml", [*ASSET_RUN, *text_overrides(assets, assets / "corpus.jsonl")])
    load_config("configs/tiny_cpu.yaml", ASSET_RUN)
    from training.checkpoint import verify_checkpoint

    verify_checkpoint(ckpt(assets / "runs" / "done", 2), 1, False)


def test_one_case_end_to_end_in_a_fresh_process(tmp_path):
    """The in-process calls above match what a user sees from the shell."""
    proc = subprocess.run([sys.executable, "-m", "training.pretrain", "optim.lr=-0.1",
                           f"run.runs_dir={tmp_path}"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "optim.lr: -0.1 must be > 0" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_hub_tokenizer_in_the_local_cache_is_checked_before_any_rank_starts(assets, tmp_path):
    """A hub name (not a folder) is loaded from the local Hugging Face cache, never the network:
    a cached tokenizer larger than the model's vocabulary fails validation like a folder does; a
    name that is not cached is left to the ranks, which download it."""
    repo = tmp_path / "hub" / "models--rmt-test--tok"
    snapshot_dir = repo / "snapshots" / ("0" * 40)
    shutil.copytree(assets / "tok", snapshot_dir)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    # The cache's record that the repository has no model config (a tokenizer-only repository).
    (repo / ".no_exist" / ("0" * 40)).mkdir(parents=True)
    (repo / ".no_exist" / ("0" * 40) / "config.json").touch()
    env = _env(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    base = [*ASSET_RUN, *text_overrides(assets, assets / "corpus.jsonl")]

    def check(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "training.config", "--check",
                               "configs/tiny_cpu.yaml", *base, *overrides], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)

    assert check("data.tokenizer=rmt-test/tok").returncode == 0
    assert check("data.tokenizer=rmt-test/not-cached").returncode == 0
    partial = tmp_path / "hub" / "models--rmt-test--partial"  # tokenizer.json not cached yet
    shutil.copytree(repo, partial)
    (partial / "snapshots" / ("0" * 40) / "tokenizer.json").unlink()
    assert check("data.tokenizer=rmt-test/partial").returncode == 0
    runs = tmp_path / "runs"
    before = snapshot(tmp_path, assets)
    proc = subprocess.run([sys.executable, "-m", "training.pretrain", f"run.runs_dir={runs}",
                           *base, "data.tokenizer=rmt-test/tok", "model.backbone.vocab_size=64"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert (f"model.backbone.vocab_size: 64 is smaller than data.tokenizer 'rmt-test/tok' "
            f"({TEXT_VOCAB} tokens)") in proc.stderr, proc.stderr
    assert snapshot(tmp_path, assets) == before and not runs.exists()


def test_a_resume_refused_by_the_data_state_leaves_the_run_config_as_it_was(assets, tmp_path):
    """A mismatch only the data pipeline sees (another run.seed: another sample stream) is found
    after set-up, when the rank states load: exit 2 with the reason, and config.yaml, which
    export and evaluate read as the description of the run's checkpoints, keeps the config that
    wrote them (it was overwritten before the resume was tried). In a fresh process: the trainer
    builds a DeepSpeed engine, and DeepSpeed keeps process groups of earlier tests' engines."""
    run_dir = copy_run(assets, tmp_path / "work")
    config = run_dir / "config.yaml"
    before = config.read_bytes()
    _, argv = pretrain(tmp_path / "work", "run.seed=999")
    proc = subprocess.run([sys.executable, "-m", "training.pretrain", *argv], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300)
    err = proc.stderr
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert "cannot resume" in err and "seed=1234" in err and "seed=999" in err, err[-3000:]
    assert config.read_bytes() == before
