"""BABILong-style samples: stories (training/data/babilong.py or bAbI files) laid out in real
filler text, tokenised with the run's tokenizer.

Layout of one sample of N segments of S tokens (N >= 2):

    segments 0..N-2   filler with the story's facts inserted, in order, at sentence boundaries
    segment N-1       [filler ... question answer <eos>...]   the answer's tokens are the labels

The question starts at the same position whatever the answer (answers shorter than the longest
possible one are followed by EOS), and the last segment's filler is drawn before and apart from
the facts, so the last segment alone says nothing about the answer (only the question, which for
qa1/qa2 is drawn from the public stream). With N = 1 everything shares one segment.

Filler: data.sources read once into a pool of sentences (the same pool on every rank); sentences
that mention any name the stories use are dropped, so names appear only in facts. A sample's
filler is a run of consecutive pool sentences from a start drawn from (seed, sample index); any
sample is reproducible anywhere from its index alone. `text_mix` of the samples are plain text
from the pool with every token a target.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator, Optional

import numpy as np

from model.conventions import IGNORE_INDEX as IGNORE
from training.data import rng
from training.data.babi_format import load_babi, story_words
from training.data.babilong import (PLACES, QA_TASKS, Story, generate_story, possible_sentences,
                                    task_words)
from training.data.config import BABI_FILE, DataConfig
from training.data.errors import DataSourceError
from training.data.sources import DocumentMixture, Holdout, SourceReader

SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
EVAL_STREAM = "babilong-eval"


def eval_seed(seed: int) -> int:
    """Held-out stories come from another seed than training ones."""
    return int(rng.hash64(seed, EVAL_STREAM)[0] >> np.uint64(1))


def split_sentences(text: str) -> list[str]:
    return [" ".join(s.split()) for s in SENTENCE_END.split(text) if s and s.strip()]


def filler_documents(cfg: DataConfig, split: str) -> Iterator[str]:
    """Documents of the filler sources, each read once: the train split's, or the held-out ones
    (data.eval_sources, else data.eval_fraction of data.sources, else data.sources again: held-out
    stories then differ by seed only)."""
    sources, holdout = cfg.sources, Holdout(cfg.eval_fraction, keep_eval=False)
    if split == "eval" and cfg.eval_sources:
        sources, holdout = cfg.eval_sources, Holdout(0.0, keep_eval=True)
    elif split == "eval" and cfg.eval_fraction > 0:
        holdout = Holdout(cfg.eval_fraction, keep_eval=True)
    # Every rank reads the whole sources (rank 0 of 1, no shuffle): one pool everywhere.
    readers = [SourceReader(src, i, 0, 1, 0, 0, holdout) for i, src in enumerate(sources)]
    for text, position in DocumentMixture(readers, [s.weight for s in sources], seed=0, rank=0):
        if all(r.epoch > 0 for r in position.readers):
            return
        yield text


class FillerPool:
    """Tokenised filler sentences back to back: `tokens` and each sentence's start in `starts`."""

    def __init__(self, documents: Iterable[str], tokenizer, banned_words, max_chars: int):
        banned = re.compile(r"\b(" + "|".join(map(re.escape, banned_words)) + r")\b", re.I)
        sentences, chars = [], 0
        for doc in documents:
            for s in split_sentences(doc):
                if not banned.search(s):
                    sentences.append(" " + s)
                    chars += len(s) + 1
            if chars >= max_chars:
                break
        pieces = [ids for ids in tokenizer(sentences, add_special_tokens=False)["input_ids"]
                  if ids] if sentences else []
        if not pieces:
            raise DataSourceError("data.sources: no filler sentence is left once sentences naming "
                                  "the stories' people, places or objects are dropped; give more "
                                  "or other text")
        self.sentences = len(pieces)
        lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.tokens = np.concatenate([np.asarray(p, dtype=np.int64) for p in pieces])

    def run(self, sentence: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """n tokens from the start of `sentence` on (wrapping around) and the sentence
        boundaries within them (offsets in [0, n], 0 and n included)."""
        T = len(self.tokens)
        first = self.starts[sentence]
        ids = self.tokens[(first + np.arange(n)) % T]
        rel = (self.starts - first) % T
        laps = np.arange(n // T + 1)[:, None] * T
        bounds = (rel[None, :] + laps).ravel()
        return ids, np.unique(np.concatenate([[0, n], bounds[bounds <= n]]))


class BabilongSampler:
    """Samples by global index: input_ids, labels (answer tokens only) and task ids."""

    def __init__(self, data_cfg: DataConfig, tokenizer, seed: int, split: str = "train",
                 pool: Optional[FillerPool] = None):
        self.cfg, self.tokenizer = data_cfg.babilong, tokenizer
        self.seed = seed if split == "train" else eval_seed(seed)
        self.secret = int(rng.hash64(self.seed, "babilong-secret")[0])
        self.stories = load_babi(self.cfg.babi_path) if BABI_FILE in self.cfg.tasks else []
        c = self.cfg
        self.sizes = dict(facts=c.facts, people=c.people, places=c.places, objects=c.objects)
        words = task_words(c.people, c.places, c.objects) + story_words(self.stories)
        self.pool = pool or FillerPool(filler_documents(data_cfg, split), tokenizer, words,
                                       c.filler_chars)
        self.eos = tokenizer.eos_token_id
        self._cache: dict[str, list[int]] = {}
        answers = [s.answer for s in self.stories]
        if any(t in QA_TASKS for t in c.tasks):
            answers += list(PLACES[:c.places])
        self.answers = sorted(set(answers))
        self.answer_room = max(len(self.tok(a)) for a in self.answers)

    def tok(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tokenizer(" " + text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def story(self, task: str, index: int) -> Story:
        if task == BABI_FILE:
            pick = np.random.default_rng([self.seed & (2**64 - 1), 4, index])
            return self.stories[int(pick.integers(len(self.stories)))]
        return generate_story(task, index, self.seed, self.secret, **self.sizes)

    def choose(self, index: int) -> int:
        """Task id of sample `index`: an index into cfg.tasks, len(cfg.tasks) for plain text."""
        r = np.random.default_rng([self.seed & (2**64 - 1), 3, index])
        if r.random() < self.cfg.text_mix:
            return len(self.cfg.tasks)
        weights = np.asarray(self.cfg.weights or [1.0] * len(self.cfg.tasks), dtype=np.float64)
        return int(r.choice(len(weights), p=weights / weights.sum()))

    def layout(self, story: Story, index: int, num_segments: int, segment_size: int
               ) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids [L], labels [L]) of one story in filler."""
        L, S = num_segments * segment_size, segment_size
        question, answer = self.tok(story.question), self.tok(story.answer)
        qa = question + answer + [self.eos] * (self.answer_room - len(answer))
        last = S if num_segments > 1 else len(qa)
        if last - len(qa) < 0 or L - last < 0:
            raise ValueError(f"segment_size {S} cannot hold the question and answer "
                             f"({len(qa)} tokens); use a larger model.segment_size")
        facts = [self.tok(f) for f in story.facts]
        room = L - last - sum(map(len, facts))
        if room < 0:
            where = (f"the first {num_segments - 1} segments" if num_segments > 1
                     else "one segment with the question")
            raise ValueError(f"data.babilong: a story of {len(facts)} facts needs "
                             f"{sum(map(len, facts))} tokens but {where} hold {L - last}; use "
                             f"more segments (curriculum), a larger segment_size or fewer facts")
        lay = np.random.default_rng([self.seed & (2**64 - 1), 2, index])
        # The last segment's filler first: it must not depend on the facts' lengths.
        tail, _ = self.pool.run(int(lay.integers(self.pool.sentences)), last - len(qa))
        head, bounds = self.pool.run(int(lay.integers(self.pool.sentences)), room)
        at = np.sort(lay.choice(bounds, size=len(facts)))
        parts, prev = [], 0
        for cut, fact in zip(at, facts):
            parts += [head[prev:cut], np.asarray(fact, dtype=np.int64)]
            prev = cut
        parts += [head[prev:], tail, np.asarray(qa, dtype=np.int64)]
        ids = np.concatenate(parts)
        labels = np.full(L, IGNORE, dtype=np.int64)
        start = L - len(qa) + len(question)
        labels[start:start + len(answer)] = answer
        return ids, labels

    def generate(self, indices, num_segments: int, segment_size: int,
                 task: Optional[str] = None) -> dict:
        """Samples `indices` as numpy arrays: input_ids, labels [B, L], task_ids [B].
        `task` forces one configured task for every sample (no plain-text samples then)."""
        if num_segments < 1:
            raise ValueError(f"num_segments {num_segments} must be >= 1")
        L = num_segments * segment_size
        idx = [int(i) for i in np.asarray(indices).reshape(-1)]
        ids = np.empty((len(idx), L), dtype=np.int64)
        labels = np.empty_like(ids)
        task_ids = np.empty(len(idx), dtype=np.int64)
        for row, i in enumerate(idx):
            t = self.cfg.tasks.index(task) if task is not None else self.choose(i)
            task_ids[row] = t
            if t == len(self.cfg.tasks):
                lay = np.random.default_rng([self.seed & (2**64 - 1), 2, i])
                ids[row], _ = self.pool.run(int(lay.integers(self.pool.sentences)), L)
                labels[row] = ids[row]
                continue
            ids[row], labels[row] = self.layout(self.story(self.cfg.tasks[t], i), i,
                                                num_segments, segment_size)
        return {"input_ids": ids, "labels": labels, "task_ids": task_ids}

    def majority_rate(self, task: str, n: int = 2000) -> float:
        """Share of the most frequent answer among n stories of `task` (the no-memory bound)."""
        answers = [self.story(task, i).answer for i in range(n)]
        return max(answers.count(a) for a in set(answers)) / n


def tokenizer_texts(data_cfg: DataConfig, count: int = 5000) -> list[str]:
    """Story texts that a tokenizer for data.source babilong is trained on besides data.sources,
    so the templates' (or the bAbI files') words get tokens of their own."""
    c = data_cfg.babilong
    texts = [s.text() for s in load_babi(c.babi_path)] if BABI_FILE in c.tasks else []
    generated = [t for t in c.tasks if t in QA_TASKS]
    sizes = dict(facts=c.facts, people=c.people, places=c.places, objects=c.objects)
    return texts + [generate_story(generated[i % len(generated)], i, 0, 1, **sizes).text()
                    for i in range(count if generated else 0)]


def layout_problems(data_cfg: DataConfig, tokenizer, segment_size: int, segment_counts) -> list[str]:
    """Whether every story fits at every segment count (the config gate's check, without reading
    any filler): generated stories at their worst case (every fact as long as the longest one),
    bAbI files story by story."""
    c = data_cfg.babilong
    file_stories = load_babi(c.babi_path) if BABI_FILE in c.tasks else []
    answers = {s.answer for s in file_stories}
    answers |= set(PLACES[:c.places]) if any(t in QA_TASKS for t in c.tasks) else set()
    sentences = {t: possible_sentences(t, c.people, c.places, c.objects) for t in c.tasks
                 if t in QA_TASKS}
    texts = set(answers) | {x for s in file_stories for x in s.facts + (s.question,)}
    texts |= {x for facts, questions in sentences.values() for x in facts + questions}
    texts = sorted(texts)
    lengths = dict(zip(texts, map(len, tokenizer([" " + t for t in texts],
                                                add_special_tokens=False)["input_ids"])))
    room = max(lengths[a] for a in answers)
    for task in c.tasks:
        if task == BABI_FILE:
            qa = max(lengths[s.question] for s in file_stories) + room
            facts = max(sum(lengths[f] for f in s.facts) for s in file_stories)
        else:
            qa = max(lengths[q] for q in sentences[task][1]) + room
            facts = c.facts * max(lengths[f] for f in sentences[task][0])
        for n in sorted(segment_counts):
            head = n * segment_size - (segment_size if n > 1 else qa)
            if qa > segment_size or facts > head:
                return [f"model.segment_size: {segment_size} x {n} segments cannot hold "
                        f"data.babilong {task} stories: up to {facts} tokens of facts before the "
                        f"last segment and {qa} of question and answer in it; start the "
                        f"curriculum at more segments, raise segment_size or lower "
                        f"data.babilong.facts"]
    return []
