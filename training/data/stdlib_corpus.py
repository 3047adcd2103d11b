"""A real-text corpus every machine has offline: this interpreter's standard-library source files
(SPEC 2.2), written as jsonl for `data.sources` / `data.eval_sources`.

    python -m training.data.stdlib_corpus --out runs/stdlib_text
        -> runs/stdlib_text/train.jsonl, runs/stdlib_text/eval.jsonl  ({"text": ...} per file)

Files are taken in sorted order of their path under the standard library, test suites and
site-packages left out; every `--eval-every`-th file goes to eval.jsonl, so the two are disjoint
and the split is the same on every machine with the same Python version. The recipes that read
it (configs/tiny_cpu_text*.yaml, configs/babilong_*_cpu.yaml) name these two paths.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
from pathlib import Path

SPLIT_FILES = ("train.jsonl", "eval.jsonl")


def stdlib_files() -> list[Path]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "dist-packages", "idle_test"}
    return sorted((p for p in lib.rglob("*.py") if not skip & set(p.relative_to(lib).parts)),
                  key=lambda p: p.relative_to(lib).as_posix())


def write_corpus(out: Path, eval_every: int) -> dict:
    """Both files written next to their final names and renamed last: never half a corpus."""
    out.mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(SPLIT_FILES, 0)
    handles = {name: open(out / f".{name}.partial", "w", encoding="utf-8") for name in SPLIT_FILES}
    try:
        for i, path in enumerate(stdlib_files()):
            text = path.read_text(encoding="utf-8", errors="replace")
            if not text.strip():
                continue
            name = SPLIT_FILES[1] if i % eval_every == eval_every - 1 else SPLIT_FILES[0]
            handles[name].write(json.dumps({"text": text}) + "\n")
            counts[name] += 1
    finally:
        for h in handles.values():
            h.close()
    for name in SPLIT_FILES:
        os.replace(out / f".{name}.partial", out / name)
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for train.jsonl and eval.jsonl")
    parser.add_argument("--eval-every", type=int, default=10,
                        help="every k-th file goes to eval.jsonl (default 10)")
    args = parser.parse_args(argv)
    if args.eval_every < 2:
        print(f"error: --eval-every {args.eval_every} must be >= 2", file=sys.stderr)
        return 2
    if args.out.exists() and not args.out.is_dir():
        print(f"error: --out {args.out} exists and is not a folder", file=sys.stderr)
        return 2
    counts = write_corpus(args.out, args.eval_every)
    print(f"{args.out}: {counts[SPLIT_FILES[0]]} train and {counts[SPLIT_FILES[1]]} eval documents "
          f"from {sysconfig.get_paths()['stdlib']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
