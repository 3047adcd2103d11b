"""`python -m training.data.stdlib_corpus`: the offline real-text corpus the CPU text and
BABILong recipes read (SPEC 2.2) — every standard-library source file once, train and eval
disjoint, bad arguments refused with exit 2 before anything is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from training.data import stdlib_corpus

REPO = Path(__file__).resolve().parents[1]


def test_every_file_once_train_and_eval_disjoint(tmp_path):
    counts = stdlib_corpus.write_corpus(tmp_path, eval_every=5)
    texts = {name: [json.loads(line)["text"] for line in (tmp_path / name).read_text().splitlines()]
             for name in stdlib_corpus.SPLIT_FILES}
    train, held = texts["train.jsonl"], texts["eval.jsonl"]
    assert counts == {"train.jsonl": len(train), "eval.jsonl": len(held)}
    # Independently: the non-empty files, read here, are exactly the two splits together (each
    # file in one of them once: the multisets agree).
    files = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_corpus.stdlib_files()]
    expected = [t for t in files if t.strip()]
    assert sorted(train + held) == sorted(expected)
    assert 0.15 < len(held) / len(expected) < 0.25  # every 5th file
    assert not any("site-packages" in str(p) or "/test/" in str(p) for p in stdlib_corpus.stdlib_files())
    assert not list(tmp_path.glob(".*partial"))  # written whole, renamed last


def test_bad_arguments_exit_2_before_writing(tmp_path):
    target = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "training.data.stdlib_corpus", "--out", str(target),
                           "--eval-every", "1"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "--eval-every 1 must be >= 2" in proc.stderr
    assert "Traceback" not in proc.stderr and not target.exists()
    afile = tmp_path / "file"
    afile.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "training.data.stdlib_corpus", "--out", str(afile)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "is not a folder" in proc.stderr
