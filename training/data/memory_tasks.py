"""Built-in corpus: the RMT paper's synthetic memory tasks (copy, reverse, associative retrieval).

Layout of one sample of N segments of S tokens (N >= 2):

    segment 0        [<task> x1 .. xK <sep> f f f ...]          what must be remembered
    segments 1..N-2  [f f f ...]                                 distractors
    segment N-1      [f f ... <ans> y1 .. yK <eos>]              answer span, y = task(x)

With N = 1 both blocks share the segment (a warm-up the model can solve without memory).
Distractors f are filler tokens of their own (`distractors: fillers`) or random symbols of the
content's alphabet (`distractors: symbols`: only the position after the task marker tells what
must be remembered).
Labels are -100 except on the answer tokens y, so the loss and the exact-match accuracy are
taken on K supervised tokens per sample (dense supervision: SPEC 3 shows a sparse answer is
not learned). Associative retrieval stores K key-value pairs and asks for every key once in a
random order: `<ans> k v k v ...`, with only the values supervised.

Randomness comes in two independent streams, both counter-based on (seed, sample index):
public (task choice, fillers, keys, query order) and secret (the remembered symbols and
values). The final segment's non-answer tokens are drawn only from the public stream and the
answers only from the secret one, so nothing in the final segment but the answers themselves
carries information about them; tests check this by regenerating with another secret seed.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from model.conventions import IGNORE_INDEX as IGNORE  # torch- and transformers-free
from training.data import rng
from training.data.config import TASK_NAMES, MemoryTaskConfig
from training.data.memory_vocab import MARKERS, VOCAB
from training.scoring import accuracies, answer_totals

IDS = {tok: i for i, tok in enumerate(VOCAB)}
PAD, BOS, EOS, SEP, ANS = (IDS[t] for t in ("<pad>", "<bos>", "<eos>", "<sep>", "<ans>"))
SYMBOL0, FILLER0 = IDS["s0"], IDS["f0"]


def block_length(task: str, span_length: int) -> int:
    """Tokens of the source block, which equals that of the answer block."""
    per_item = 2 if task == "associative_retrieval" else 1
    return per_item * span_length + 2


def required_segment_size(cfg: MemoryTaskConfig, num_segments: int) -> int:
    """Smallest segment size that holds the layout of every configured task."""
    need = max(block_length(t, cfg.span_length) for t in cfg.tasks)
    return 2 * need if num_segments == 1 else need


def check_layout(cfg: MemoryTaskConfig, num_segments: int, segment_size: int) -> None:
    if num_segments < 1:
        raise ValueError(f"num_segments {num_segments} must be >= 1")
    need = required_segment_size(cfg, num_segments)
    if segment_size < need:
        raise ValueError(
            f"memory tasks {cfg.tasks} with span_length {cfg.span_length} need segment_size >= "
            f"{need} at num_segments={num_segments} (got {segment_size}); lower "
            f"data.memory_tasks.span_length or start the curriculum at more segments")


def _task_ids(cfg: MemoryTaskConfig, seed: int, idx: np.ndarray) -> np.ndarray:
    weights = cfg.weights or [1.0] * len(cfg.tasks)
    return rng.weighted_choice(weights, seed, "task", idx)


def generate(indices, num_segments: int, segment_size: int, cfg: MemoryTaskConfig, seed: int,
             secret_seed: Optional[int] = None, task: Optional[str] = None) -> dict:
    """Samples `indices` as numpy arrays: input_ids, labels, task_ids [B] (index into cfg.tasks).

    `task` forces one task for every sample (it must be in cfg.tasks); default: cfg's mixture.
    `secret_seed` (default: derived from seed) draws the remembered content only.
    """
    check_layout(cfg, num_segments, segment_size)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    secret = int(rng.hash64(seed, "secret")[0]) if secret_seed is None else secret_seed
    B, L, K = len(idx), num_segments * segment_size, cfg.span_length
    col = idx[:, None]

    # Distractors come from the public stream either way, so they say nothing about the answers.
    first, size = ((SYMBOL0, cfg.alphabet_size) if cfg.distractors == "symbols"
                   else (FILLER0, cfg.filler_size))
    ids = (first + rng.randint(size, seed, "filler", col, np.arange(L))).astype(np.int64)
    labels = np.full((B, L), IGNORE, dtype=np.int64)
    if task is None:
        task_ids = _task_ids(cfg, seed, idx)
    else:
        if task not in cfg.tasks:
            raise ValueError(f"task {task!r} is not among the configured tasks {cfg.tasks}")
        task_ids = np.full(B, cfg.tasks.index(task))

    for t, name in enumerate(cfg.tasks):
        rows = np.nonzero(task_ids == t)[0]
        if len(rows) == 0:
            continue
        r = idx[rows][:, None]
        # Each answer value comes from the secret stream; everything else from the public one.
        values = SYMBOL0 + rng.randint(cfg.alphabet_size, secret, "value", r, np.arange(K))
        n = block_length(name, K)
        src = np.empty((len(rows), n), dtype=np.int64)
        ans = np.empty((len(rows), n), dtype=np.int64)
        supervised = np.zeros(n, dtype=bool)
        src[:, 0], src[:, -1], ans[:, 0], ans[:, -1] = IDS[MARKERS[name]], SEP, ANS, EOS
        if name == "associative_retrieval":
            keys = SYMBOL0 + np.argsort(rng.permutation_keys(
                seed, "keys", r, np.arange(cfg.alphabet_size)), axis=1)[:, :K]
            order = np.argsort(rng.permutation_keys(seed, "query", r, np.arange(K)), axis=1)
            src[:, 1:-1:2], src[:, 2:-1:2] = keys, values
            ans[:, 1:-1:2] = np.take_along_axis(keys, order, axis=1)
            ans[:, 2:-1:2] = np.take_along_axis(values, order, axis=1)
            supervised[2:-1:2] = True
        else:
            src[:, 1:-1] = values
            ans[:, 1:-1] = values if name == "copy" else values[:, ::-1]
            supervised[1:-1] = True
        block_ids = ids[rows]
        block_ids[:, :n] = src
        block_ids[:, L - n:] = ans
        ids[rows] = block_ids
        answer_cols = np.arange(L - n, L)[supervised]
        labels[np.ix_(rows, answer_cols)] = ans[:, supervised]
    return {"input_ids": ids, "labels": labels, "task_ids": task_ids.astype(np.int64)}


def to_batch(arrays: dict, sample_ids) -> dict:
    """Contract batch dict (CPU tensors) from generate()'s arrays."""
    input_ids = torch.from_numpy(arrays["input_ids"])
    return {"input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "labels": torch.from_numpy(arrays["labels"]),
            "sample_ids": torch.as_tensor(np.asarray(sample_ids, dtype=np.int64))}


EVAL_STREAM_OFFSET = 0x5EED_E7A1  # eval samples come from another seed than training ones


def eval_seed(seed: int) -> int:
    return int(rng.hash64(seed ^ EVAL_STREAM_OFFSET, "eval")[0] >> np.uint64(1))


def make_eval_batch(task: str, num_segments: int, segment_size: int, n: int, seed: int,
                    cfg: Optional[MemoryTaskConfig] = None, start: int = 0) -> dict:
    """`n` held-out samples (indices start..start+n) of `task` ("mixture" = cfg's mixture).

    Returns the contract batch plus answer_mask [n, L] bool (True on supervised answer tokens)
    and task_ids [n]. The same (task, seed) gives the same answers at every num_segments, only
    the distance between source and answer changes.
    """
    cfg = cfg or MemoryTaskConfig(tasks=list(TASK_NAMES))
    if task != "mixture" and task not in cfg.tasks:
        cfg = MemoryTaskConfig(**{**cfg.__dict__, "tasks": [task], "weights": None})
    arrays = generate(np.arange(start, start + n), num_segments, segment_size, cfg,
                      eval_seed(seed), task=None if task == "mixture" else task)
    batch = to_batch(arrays, np.arange(start, start + n))
    batch["answer_mask"] = batch["labels"] != IGNORE
    batch["task_ids"] = torch.from_numpy(arrays["task_ids"])
    return batch


def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(token accuracy, exact-match accuracy per sample) of the answers in `labels`.

    logits [B, L, V] come from a causal LM: position i predicts token i+1.
    """
    return accuracies(answer_totals(logits.argmax(-1), labels))


def build_tokenizer():
    """The built-in corpus' word-level tokenizer as a PreTrainedTokenizerFast (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=dict(IDS), unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   model_max_length=10**9)
