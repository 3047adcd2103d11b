"""Segment curriculum and the `python -m training.tokenizer` command."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.data import CurriculumConfig, SegmentCurriculum

REPO = Path(__file__).resolve().parents[1]


def test_curriculum_is_a_step_function_of_the_schedule():
    cur = SegmentCurriculum([[0, 1], [100, 2], [250, 4]])
    expected = {0: 1, 99: 1, 100: 2, 249: 2, 250: 4, 10**6: 4}
    assert {s: cur(s) for s in expected} == expected
    assert cur.max_segments() == 4 and cur.state_dict() == {"schedule": [[0, 1], [100, 2], [250, 4]]}


@pytest.mark.parametrize("schedule,message", [
    ([], "non-empty list"), ([[0, 1, 2]], "integer pairs"), ([[3, 1]], "start at step 0"),
    ([[0, 1], [0, 2]], "strictly increasing"), ([[0, 0]], "must be >= 1")])
def test_bad_schedules_are_named(schedule, message):
    problems = CurriculumConfig(schedule).problems()
    assert problems and all(p.startswith("curriculum.schedule: ") for p in problems)
    assert message in " ".join(problems)
    with pytest.raises(ValueError, match=message):
        SegmentCurriculum(schedule)


def test_tokenizer_command_trains_a_loadable_byte_level_bpe(tmp_path):
    from transformers import AutoTokenizer

    lib = Path(json.__file__).parent  # real text every machine has: the standard library
    with open(tmp_path / "src.jsonl", "w") as f:
        for path in sorted(lib.glob("*.py"))[:20]:
            f.write(json.dumps({"text": path.read_text(errors="replace")}) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data:\n  source: text\n  sources:\n    - path_or_name: {tmp_path}/src.jsonl\n")
    out = tmp_path / "tok"
    run = subprocess.run([sys.executable, "-m", "training.tokenizer", "--config", str(recipe),
                          "--vocab-size", "600", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 600
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == ("<|eos|>", "<|bos|>", "<|pad|>")
    text = "def f(x):\n    return x  # ünïcödé ✓\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < len(text.encode())  # lossless and compressing


def test_tokenizer_command_refuses_a_memory_task_recipe(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data:\n  source: memory_tasks\n")
    run = subprocess.run([sys.executable, "-m", "training.tokenizer", "--config", str(recipe),
                          "--vocab-size", "600", "--out", str(tmp_path / "tok")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "memory_tasks" in run.stderr


def test_tokenizer_command_applies_no_training_only_checks_to_the_default_recipe(tmp_path):
    """The default recipe fixes a global batch of 32 that a tokenizer has nothing to do with: its
    world-size arithmetic is not checked (issue 17). Given a text source, it trains."""
    lib = Path(json.__file__).parent
    with open(tmp_path / "src.jsonl", "w") as f:
        for path in sorted(lib.glob("*.py"))[:5]:
            f.write(json.dumps({"text": path.read_text(errors="replace")}) + "\n")
    base = [sys.executable, "-m", "training.tokenizer", "--config", "configs/tiny_cpu.yaml",
            "--vocab-size", "300", "--out", str(tmp_path / "tok")]
    as_shipped = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert as_shipped.returncode == 2 and "batch" not in as_shipped.stderr, as_shipped.stderr
    assert "memory_tasks" in as_shipped.stderr  # the one real problem: no text to train on
    with_text = subprocess.run([*base, "data.source=text",
                                f"data.sources=[{{path_or_name: {tmp_path}/src.jsonl}}]"],
                               cwd=REPO, capture_output=True, text=True, timeout=300)
    assert with_text.returncode == 0, with_text.stderr
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
