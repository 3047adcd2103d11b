"""`python -m training.evaluate --task babilong-qa1|qa2|qa3|file`: BABILong-style accuracy.

Held-out stories (their own seed) in filler from the run's data.sources (its held-out part when
the run has one), at every --segments count, scored like the memory tasks: exact match of the
answer's tokens under the rmt, no_memory and memory_reset conditions. Beside them the report
lists `majority_answer`: always answering the most frequent answer of these samples, which is
the best any predictor that does not see the facts can do on qa1/qa2 (qa3's question names a
place the answer is not, so there the bound is a little higher: training/data/babilong.py).

The data section may be a babilong run's or a text run's (its sources then give the filler);
`babilong-file` reads the bAbI stories of data.babilong.babi_path.
"""

from __future__ import annotations

from dataclasses import replace

from training.data.babilong import QA_TASKS
from training.data.config import BABI_FILE, BABILONG

BABILONG_TASKS = {f"babilong-{t}": t for t in QA_TASKS + (BABI_FILE,)}
MAJORITY = "majority_answer"
CONDITIONS = {"rmt": "memory carried across segments",  # as in training/evaluate.py
              "no_memory": "backbone alone on each segment, no memory tokens",
              "memory_reset": "RMT on each segment alone, memory reset to M0"}


class BabilongInputError(ValueError):
    """Bad input for a babilong evaluation, reported before any sample is scored."""


def babilong_data_config(task_name: str, data_cfg):
    """For babilong-* the data section narrowed to one story kind without plain-text samples;
    for other tasks `data_cfg` itself."""
    if task_name not in BABILONG_TASKS:
        return data_cfg
    task = BABILONG_TASKS[task_name]
    if not data_cfg.sources:
        raise BabilongInputError(f"--task {task_name}: the data section (--data or the run's "
                                 f"config.yaml) has no data.sources to draw filler text from; "
                                 f"give --data a babilong or text recipe")
    settings = replace(data_cfg.babilong, tasks=[task], weights=None, text_mix=0.0)
    cfg = replace(data_cfg, source=BABILONG, babilong=settings)
    problems = [p for p in cfg.problems() if not p.startswith("data.tokenizer")]
    if problems:
        raise BabilongInputError(f"--task {task_name}: " + "; ".join(problems))
    return cfg


def evaluate_babilong(model, tokenizer, settings, data_cfg, score) -> dict:
    """`score(model, tokenizer, settings, None, batches)` is evaluate.evaluate_memory_task,
    passed in so that this module does not import evaluate back."""
    from training.data.babilong_samples import BabilongSampler, layout_problems
    from training.data.memory_tasks import to_batch
    from model.conventions import IGNORE_INDEX

    task = data_cfg.babilong.tasks[0]
    segment_size = model.config.segment_size
    try:
        problems = layout_problems(data_cfg, tokenizer, segment_size, settings.segments)
        sampler = None if problems else BabilongSampler(data_cfg, tokenizer, settings.seed, "eval")
    except ValueError as exc:  # DataSourceError is one
        problems = [str(exc)]
    if problems:  # every layout must fit before anything is scored
        raise BabilongInputError(f"--task {settings.task} --segments {settings.segments}: "
                                 + "; ".join(problems))
    indices = list(range(settings.samples))

    def make_batch(_task, n_seg: int, *_unused) -> dict:  # make_eval_batch's signature
        batch = to_batch(sampler.generate(indices, n_seg, segment_size, task), indices)
        batch["answer_mask"] = batch["labels"] != IGNORE_INDEX
        return batch

    body = score(model, tokenizer, settings, None, make_batch)
    answers = [sampler.story(task, i).answer for i in indices]
    majority = max(answers.count(a) for a in set(answers)) / len(answers)
    for row in body["results"]:
        row[MAJORITY] = {"exact_match": majority, "token_accuracy": None}
    body["answers"] = sampler.answers
    body["filler_sentences"] = sampler.pool.sentences
    # Replaces the report's conditions, so the baseline is in the table and the plot too.
    body["conditions"] = {**CONDITIONS, MAJORITY: "no model: always the most frequent answer of "
                          "these samples (the bound for a predictor that does not see the facts)"}
    return body
