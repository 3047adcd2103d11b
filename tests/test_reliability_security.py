"""Issue 5, promise 8: nothing unpickles data it did not write itself, and config paths cannot
point a run's writes outside its run directory.

Scanned: the project's own code (model/, training/, bench/, launch/). DeepSpeed's own loading of
the checkpoints a job wrote itself is outside this promise (see docs/reliability.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from training.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CODE = sorted(p for d in ("model", "training", "bench", "launch") for p in (REPO / d).rglob("*.py"))


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def dotted(func: ast.AST) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def test_scan_covers_the_code():
    names = {p.name for p in CODE}
    assert {"checkpoint.py", "export.py", "modeling_rmt.py", "pretrain.py"} <= names


@pytest.mark.parametrize("path", CODE, ids=lambda p: str(p.relative_to(REPO)))
def test_no_unpickling(path):
    tree = ast.parse(path.read_text(), str(path))
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any(m.split(".")[0] in ("pickle", "cPickle", "dill", "joblib") for m in mods):
                problems.append(f"line {node.lineno}: imports a pickle module")
    for call in calls(tree):
        name = dotted(call.func)
        if name.endswith("torch.load") and keyword(call, "weights_only") is not True:
            problems.append(f"line {call.lineno}: torch.load without weights_only=True")
        if name.endswith(("np.load", "numpy.load")) and keyword(call, "allow_pickle") not in (
                None, False):
            problems.append(f"line {call.lineno}: np.load with allow_pickle")
        if name.endswith("save_pretrained") and keyword(call, "safe_serialization") is False:
            problems.append(f"line {call.lineno}: save_pretrained without safetensors")
    assert not problems, f"{path.relative_to(REPO)}: " + "; ".join(problems)


@pytest.mark.parametrize("name", ["..", ".", "", "../sibling", "a/b", "/abs"])
def test_run_name_cannot_leave_runs_dir(name):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"run.name={name!r}" if name else "run.name=''"])
    assert any(p.startswith("run.name") for p in e.value.problems)


def test_every_write_path_of_a_run_is_under_its_run_dir(tmp_path):
    """The run writes only run_dir/...: config, tokenizer, checkpoints, TensorBoard, log,
    metrics, export. Every one of these is derived from run_dir (checked on the resolved
    config's own report of them), and run_dir is runs_dir/name with name a plain folder name."""
    from training.pretrain import where

    cfg = load_config(None, [f"run.runs_dir={tmp_path}", "run.name=r"])
    reported = [line.split(":", 1)[1].strip().split()[-1] if "tensorboard" in line
                else line.split(":", 1)[1].strip().split()[0] for line in where(cfg).splitlines()]
    run_dir = (tmp_path / "r").resolve()
    for path in reported:
        assert Path(path).resolve() == run_dir or run_dir in Path(path).resolve().parents, path
