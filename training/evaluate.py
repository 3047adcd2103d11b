"""Evaluate an RMT (exported folder or training run) against its no-memory controls.

    python -m training.evaluate --model DIR_OR_RUN --task copy|reverse|assoc|text|babilong-qa1
                                [--segments 1,2,4,8,16,32] [--data CONFIG_OR_TEXT] [--out DIR]
                                [--device auto|cpu|cuda|cuda:N] [--dtype auto|fp32|bf16|fp16] [--step N|best]
                                [--baseline DIR_OR_RUN]  (text: a full-attention model beside them)
                                [--shifted-windows]      (text: every chunk at every segment index)

Every number comes with its controls, computed on the same samples with the same weights:
  rmt           the model as trained: memory carried from segment to segment
  no_memory     the backbone alone reading each segment (no memory tokens at all)
  memory_reset  the RMT reading each segment alone, every segment starting from M0

Memory tasks: exact match of the whole answer per sample (teacher-forced argmax over the answer
span, which equals greedy generation's exact match; a few samples are re-checked with real
`generate`) and token accuracy, by number of segments. Text: loss and perplexity by number of
segments and by segment index. babilong-*: see training/eval_babilong.py. Prints a table, writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from model import IGNORE_INDEX
from training import checkpoint_select, eval_babilong, eval_text, run_dir, scoring
from training.monitor import quiet_hub_progress_bars
from training.compute import ComputeError, add_compute_args, resolve_compute
from training.eval_report import format_table, plot
from training.run_dir import ModelSource, load_model

CONDITIONS = ("rmt", "no_memory", "memory_reset")
TASKS = {"copy": "copy", "reverse": "reverse", "assoc": "associative_retrieval", "text": "text",
         **eval_babilong.BABILONG_TASKS}


class EvalError(Exception):
    """Bad input, reported before any model is run."""


@dataclass
class EvalSettings:
    model: Path
    task: str  # CLI name: copy | reverse | assoc | text
    segments: list[int]
    data: str | None = None
    out: Path | None = None
    samples: int = 256  # memory tasks: samples per number of segments
    text_batches: int = 8  # text: batches per number of segments
    batch_size: int = 32
    generate_checks: int = 4  # memory tasks: samples re-checked with generate() per segment count
    step: checkpoint_select.Selector | None = None  # runs: which checkpoint (default: the newest)
    baseline: Path | None = None  # text: a full-attention model beside the conditions (eval_text.py)
    shifted_windows: bool = False  # text: every chunk at every segment index (eval_text.py)
    seed: int = 0
    device: str = "auto"  # training/compute.py
    dtype: str = "auto"

    def validate(self) -> None:
        if self.task not in TASKS:
            raise EvalError(f"--task {self.task!r}: valid values are {', '.join(TASKS)}")
        if not self.segments or any(n < 1 for n in self.segments):
            raise EvalError(f"--segments {self.segments}: give a comma-separated list of integers >= 1")
        for name in ("samples", "text_batches", "batch_size"):
            if getattr(self, name) < 1:
                raise EvalError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.generate_checks < 0:
            raise EvalError(f"--generate-checks {self.generate_checks}: must be >= 0")
        if not self.model.is_dir():
            raise EvalError(f"--model {self.model}: no such directory (an exported folder or runs/NAME)")
        if self.baseline is not None and self.task != "text":
            raise EvalError(f"--baseline {self.baseline}: only --task text compares with a full-attention model")
        if self.shifted_windows and self.task != "text":
            raise EvalError("--shifted-windows: only --task text reads windows of a text stream")


# --------------------------------------------------------------------------- loading


def find_model(path: Path, step: checkpoint_select.Selector | None = None) -> ModelSource:
    """An exported folder or a run (its newest checkpoint, or `step`'s), found without loading weights."""
    try:
        return checkpoint_select.find_model(path, step)
    except run_dir.RunDirError as exc:
        raise EvalError(f"--model {path}: {exc}") from None


def find_baseline(settings: EvalSettings, source: ModelSource) -> ModelSource | None:
    """The --baseline model, checked to read the longest sample at once (eval_text.py)."""
    if settings.baseline is None:
        return None
    try:
        baseline = checkpoint_select.find_model(settings.baseline, None)
    except run_dir.RunDirError as exc:
        raise EvalError(f"--baseline {settings.baseline}: {exc}") from None
    why = eval_text.baseline_problem(baseline.segment_size, source.segment_size, settings.segments)
    if why:
        raise EvalError(f"--baseline {settings.baseline}: {why}")
    return baseline


def data_section(path: Path):
    """The `data` section of a recipe or a run's resolved config.yaml, type- and range-checked.

    Only this section is range-checked: the batch arithmetic of a 2-rank recipe is no concern of
    a 1-process evaluation.
    """
    from training.config import ConfigError, load_saved_config

    if not path.is_file():
        raise EvalError(f"--data {path}: no such file (a recipe YAML or runs/NAME/config.yaml)")
    try:
        cfg = load_saved_config(path).data
    except ConfigError as exc:  # each problem names the file
        raise EvalError("--data: " + "; ".join(exc.problems)) from None
    problems = cfg.problems()
    if problems:
        raise EvalError(f"--data {path}: " + "; ".join(problems))
    return cfg


def load_data_config(settings: EvalSettings, source_model: ModelSource):
    """DataConfig from --data (a recipe/config YAML, or for text a file/glob), else the run's config."""
    from training.data.config import DataConfig, SourceConfig

    source = settings.data
    if source is None and source_model.run_config_path is not None:
        source = str(source_model.run_config_path)
    if source is None:
        if settings.task == "text":
            raise EvalError("--data: required for --task text with an exported folder (a config YAML or text files)")
        return DataConfig()
    if source.endswith((".yaml", ".yml")):
        return data_section(Path(source))
    if settings.task != "text":
        raise EvalError(f"--data {source}: memory tasks take a config YAML (its data.memory_tasks section)")
    # Everything in the given files is evaluation text: it is the eval split, read in order.
    text = [SourceConfig(path_or_name=source)]
    cfg = DataConfig(source="text", sources=text, eval_sources=text, tokenizer=str(settings.model))
    problems = [p for p in cfg.problems() if "tokenizer" not in p]
    if problems:
        raise EvalError(f"--data {source}: " + "; ".join(problems))
    return cfg


# --------------------------------------------------------------------------- conditions


def _backbone_segment_logits(model, input_ids, attention_mask) -> torch.Tensor:
    # Same position rule as the RMT (positions count real tokens), minus the memory offset.
    positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    return model.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits


def segment_logits(model, condition: str, input_ids, attention_mask) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, end, logits [B, end-start, V]) per segment under one of CONDITIONS."""
    segment_size = model.config.segment_size
    input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
    memory = None
    for start in range(0, input_ids.shape[1], segment_size):
        end = min(start + segment_size, input_ids.shape[1])
        ids, mask = input_ids[:, start:end], attention_mask[:, start:end]
        if condition == "no_memory":
            yield start, end, _backbone_segment_logits(model, ids, mask)
            continue
        out = model(input_ids=ids, attention_mask=mask, memory=memory, return_memory=True, return_logits=True)
        if condition == "rmt":
            memory = out.memory
        yield start, end, out.logits


def predictions(model, condition: str, input_ids, attention_mask) -> torch.Tensor:
    """Greedy next-token prediction at every position [B, L], on the CPU (where the labels are)."""
    return torch.cat([lg.argmax(-1) for _, _, lg in segment_logits(model, condition, input_ids, attention_mask)],
                     1).cpu()


# --------------------------------------------------------------------------- memory tasks


def answer_scores(predicted: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: (exact match bool [B], correct answer tokens [B], answer tokens [B])
    (training/scoring.py); every sample must have an answer."""
    exact, correct, count = scoring.answer_scores(predicted, labels)
    if not bool((count > 0).all()):
        raise ValueError("answer_scores: a sample has no answer token (labels are all -100)")
    return exact, correct, count


def answer_runs(answer_positions: list[int]) -> list[tuple[int, int]]:
    """Contiguous [start, end) runs of answer positions (associative retrieval alternates key, value)."""
    runs = []
    for p in answer_positions:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


def generated_exact_match(model, input_ids: torch.Tensor, labels: torch.Tensor, pad_token_id: int) -> list[bool]:
    """Exact match by real greedy decoding: each answer run is generated from the true prefix.

    Tokens between runs (associative retrieval's query keys) are given, as in teacher forcing.
    """
    matches = []
    for row in range(input_ids.shape[0]):
        positions = (labels[row] != IGNORE_INDEX).nonzero().flatten().tolist()
        ok = True
        for start, end in answer_runs(positions):
            prompt = input_ids[row : row + 1, :start].to(model.device)
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=end - start,
                                 do_sample=False, pad_token_id=pad_token_id)
            generated = out[0, start:].cpu()
            ok = ok and generated.shape[0] == end - start and torch.equal(generated, labels[row, start:end])
        matches.append(ok)
    return matches


def evaluate_memory_task(model, tokenizer, settings: EvalSettings, task_cfg, batches=None) -> dict:
    from training.data.memory_tasks import make_eval_batch

    task = TASKS[settings.task]
    rows = []
    checks = {"samples": 0, "agree": 0}
    for n_seg in settings.segments:
        batch = (batches or make_eval_batch)(task, n_seg, model.config.segment_size, settings.samples, settings.seed, task_cfg)
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        totals = {c: torch.zeros(3, dtype=torch.long) for c in CONDITIONS}  # exact, correct, answer tokens
        rmt_exact = []
        for lo in range(0, ids.shape[0], settings.batch_size):
            sl = slice(lo, lo + settings.batch_size)
            for condition in CONDITIONS:
                exact, correct, count = answer_scores(predictions(model, condition, ids[sl], mask[sl]), labels[sl])
                totals[condition] += torch.stack([exact.sum(), correct.sum(), count.sum()])
                if condition == "rmt":
                    rmt_exact.append(exact)
        k = min(settings.generate_checks, ids.shape[0])
        if k:
            generated = generated_exact_match(model, ids[:k], labels[:k], tokenizer.pad_token_id)
            teacher_forced = torch.cat(rmt_exact)[:k].tolist()
            checks["samples"] += k
            checks["agree"] += sum(g == t for g, t in zip(generated, teacher_forced))
        rows.append({
            "num_segments": n_seg,
            "tokens": int(ids.shape[1]),
            "samples": int(ids.shape[0]),
            **{c: {"exact_match": t[0].item() / ids.shape[0], "token_accuracy": t[1].item() / t[2].item()}
               for c, t in totals.items()},
        })
    return {"metric": "exact_match", "results": rows, "generate_check": checks}


# --------------------------------------------------------------------------- text


def segment_token_losses(model, condition: str, input_ids, attention_mask, labels):
    """(loss sum [N], target count [N]) per segment index under `condition` (eval_text.py)."""
    return eval_text.segment_token_losses(model, condition, input_ids, attention_mask, labels,
                                          segment_logits)


# --------------------------------------------------------------------------- report


def default_out_dir(source: ModelSource) -> Path:
    # Never inside an exported folder: its file list is what a hub user downloads.
    return source.path / "eval" if source.kind == "run" else source.path.parent / f"{source.path.name}_eval"


def single_task_config(data_cfg, task: str, segments: list[int], segment_size: int):
    """The run's memory-task settings restricted to `task`, checked at every segment count."""
    from training.data.config import MemoryTaskConfig
    from training.data.memory_tasks import check_layout

    task_cfg = MemoryTaskConfig(**{**data_cfg.memory_tasks.__dict__, "tasks": [task], "weights": None})
    for n_seg in segments:
        try:
            check_layout(task_cfg, n_seg, segment_size)
        except ValueError as exc:
            raise EvalError(f"--segments {n_seg}: {exc}") from None
    return task_cfg


def evaluate(settings: EvalSettings) -> tuple[dict, Path, Path]:
    """Run the evaluation; returns (report, json path, png path). Inputs are checked before loading."""
    settings.validate()
    compute = resolve_compute(settings.device, settings.dtype)  # ComputeError: bad input, too
    source = find_model(settings.model, settings.step)
    data_cfg = load_data_config(settings, source)
    data_cfg = eval_babilong.babilong_data_config(settings.task, data_cfg)  # babilong-*: narrowed, checked
    if settings.shifted_windows and data_cfg.packing != "concat":
        raise EvalError(f"--shifted-windows: the held-out text is packed {data_cfg.packing!r}, so its "
                        f"samples are not one stream; give --data a text file (read with concat "
                        f"packing) or a config with data.packing concat")
    if settings.task != "text" and settings.task not in eval_babilong.BABILONG_TASKS:
        task_cfg = single_task_config(data_cfg, TASKS[settings.task], settings.segments, source.segment_size)
    baseline = find_baseline(settings, source)
    out_dir = settings.out or default_out_dir(source)
    quiet_hub_progress_bars()
    loaded = load_model(source, compute.device, compute.dtype)
    model = loaded.model
    if baseline is not None:
        baseline = load_model(baseline, compute.device, compute.dtype)
        if baseline.tokenizer.get_vocab() != loaded.tokenizer.get_vocab():
            raise EvalError(f"--baseline {settings.baseline}: its tokenizer is not the model's")
    out_dir.mkdir(parents=True, exist_ok=True)

    with torch.no_grad():
        if settings.task == "text":
            body = eval_text.evaluate_text(model, loaded.tokenizer, settings, data_cfg, CONDITIONS, segment_logits,
                                           baseline and baseline.model)
        elif settings.task in eval_babilong.BABILONG_TASKS:
            body = eval_babilong.evaluate_babilong(model, loaded.tokenizer, settings, data_cfg, evaluate_memory_task)
        else:
            body = evaluate_memory_task(model, loaded.tokenizer, settings, task_cfg)
    report = {
        "task": settings.task,
        "model": loaded.description,
        "segment_size": model.config.segment_size,
        "num_mem_tokens": model.config.num_mem_tokens,
        "seed": settings.seed,
        **compute.describe(),
        "conditions": {
            "rmt": "memory carried across segments",
            "no_memory": "backbone alone on each segment, no memory tokens",
            "memory_reset": "RMT on each segment alone, memory reset to M0",
            **({eval_text.FULL_ATTENTION: f"{baseline.description['model']} (--baseline) reading the whole sample at once"}
               if baseline is not None else {}),
        },
        **body,
    }
    json_path, png_path = out_dir / f"{settings.task}.json", out_dir / f"{settings.task}.png"
    json_path.write_text(json.dumps(report, indent=2))
    plot(report, png_path)
    return report, json_path, png_path


def parse_segments(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated list of integers, e.g. 1,2,4,8")


def parse_args(argv=None) -> EvalSettings:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="exported folder or runs/NAME")
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--segments", type=parse_segments, default=[1, 2, 4, 8, 16, 32],
                        help="comma-separated numbers of segments (default 1,2,4,8,16,32)")
    parser.add_argument("--data", default=None,
                        help="config YAML whose data section describes the tasks/text (default: the run's "
                             "config.yaml; for an exported folder, the built-in task defaults), or for "
                             "--task text a text file/glob")
    parser.add_argument("--out", type=Path, default=None, help="output directory for TASK.json and TASK.png")
    parser.add_argument("--samples", type=int, default=256, help="memory tasks: samples per segment count")
    parser.add_argument("--text-batches", type=int, default=8, help="text: batches per segment count")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--generate-checks", type=int, default=4,
                        help="memory tasks: samples per segment count re-checked with generate()")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out samples / eval stream")
    parser.add_argument("--step", type=checkpoint_select.selector_arg, help=checkpoint_select.SELECTOR_HELP)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="text: a model that reads the whole sample at once (an RMT run or export with "
                             "segment size >= the longest sample), reported as full_attention")
    parser.add_argument("--shifted-windows", action="store_true",
                        help="text: also cut the held-out stream 1..N-1 segments later, so every "
                             "segment-sized chunk is scored once at every segment index and the "
                             "losses by index differ by context only, not by content (concat packing)")
    add_compute_args(parser)
    args = parser.parse_args(argv)
    return EvalSettings(**vars(args))


def main(argv=None) -> int:
    settings = parse_args(argv)
    try:
        report, json_path, png_path = evaluate(settings)
    except (EvalError, ComputeError, eval_babilong.BabilongInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(report))
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
