"""Data settings: one dataclass per concern, every semantic problem reported by `problems()`.

The trainer's loader (training/config.py) builds these from YAML by dataclass introspection
(unknown keys and wrong types are rejected there); `problems()` adds the checks that need the
values: ranges, mixtures, and cheap file-system checks (missing files, globs matching nothing),
so a bad recipe fails before any model is built.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from training.data.babilong import OBJECTS, PEOPLE, PLACES, QA_TASKS, min_facts
from training.data.errors import DataSourceError
from training.data.memory_vocab import MAX_ALPHABET, MAX_FILLER, VOCAB

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
BUILTIN = "builtin"
MEMORY_TASKS = "memory_tasks"
TASK_NAMES = ("copy", "reverse", "associative_retrieval")
BABILONG = "babilong"
BABI_FILE = "file"  # data.babilong.tasks entry: the stories of data.babilong.babi_path


def described(default=None, text: str = "", *, factory=None):
    """A dataclass field carrying its one-line reference documentation (read by the trainer)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


def is_local_pattern(path_or_name: str) -> bool:
    """A local file or glob (known extension, or an existing file) rather than a hub name. A
    directory is not one: `datasets` loads it like a hub dataset repository (its README.md
    configs or data/ layout), so it is resolved like one (training.data.rank0_first)."""
    if os.path.isdir(os.path.expanduser(path_or_name)):
        return False
    return (os.path.splitext(path_or_name)[1].lower() in LOCAL_FORMATS
            or os.path.exists(path_or_name) or any(c in path_or_name for c in "*?["))


# What `datasets` finds in a dataset folder (a directory given as path_or_name): its README.md
# configs header, or data files (optionally compressed) anywhere below it.
FOLDER_DATA_EXTENSIONS = (".jsonl", ".json", ".parquet", ".txt", ".csv", ".tsv", ".arrow")
COMPRESSIONS = ("", ".gz", ".bz2", ".xz", ".zst", ".lz4")


def dataset_folder_problem(path: str, where: str) -> Optional[str]:
    """Why a directory is no dataset folder (None when it is one): no README.md and no data file
    anywhere below it. Stops at the first data file, so a large folder costs little."""
    if os.path.isfile(os.path.join(path, "README.md")):
        return None
    suffixes = tuple(ext + c for ext in FOLDER_DATA_EXTENSIONS for c in COMPRESSIONS)
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(f.lower().endswith(suffixes) for f in files if not f.startswith(".")):
            return None
    return (f"{where}: {path!r} is a directory whose tree matches no file `datasets` could load "
            f"(a dataset folder has a README.md or data files such as data/train-*.jsonl); give a "
            f"dataset folder, a file, or a glob such as {os.path.join(path, '*.jsonl')}")


def resolve_local_files(pattern: str, where: str) -> list[str]:
    """Sorted files a local pattern names; DataSourceError when none or an unknown format."""
    files = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(p))
    if not files:
        raise DataSourceError(f"{where}: {pattern!r} matches no file; give an existing file or a "
                              f"glob such as data/*.jsonl")
    formats = {LOCAL_FORMATS.get(os.path.splitext(f)[1].lower()) for f in files}
    if None in formats or len(formats) != 1:
        raise DataSourceError(f"{where}: {pattern!r} matches {files[:3]}...; all files of one "
                              f"source must share one of the formats {sorted(LOCAL_FORMATS)}")
    if all(os.path.getsize(f) == 0 for f in files):
        raise DataSourceError(f"{where}: {pattern!r} matches only empty files ({files[:3]})")
    return files


@dataclass
class SourceConfig:
    path_or_name: str = described("", "local file/glob (jsonl, json, parquet, txt), dataset "
                                      "folder or hub name")
    weight: float = described(1.0, "mixture weight (normalised over the sources)")
    text_field: str = described("text", "record field holding the document text")
    split: str = described("train", "dataset split (hub datasets)")
    config_name: Optional[str] = described(None, "dataset config name (hub datasets)")
    sample_by: Literal["document", "line", "paragraph"] = described(
        "document", "txt files: one document per file, line or blank-line paragraph")

    def problems(self, where: str) -> list[str]:
        out = []
        if not self.path_or_name:
            out.append(f"{where}.path_or_name: empty; give a local file/glob or a hub dataset name")
        elif is_local_pattern(self.path_or_name):
            try:
                resolve_local_files(self.path_or_name, f"{where}.path_or_name")
            except DataSourceError as e:
                out.append(str(e))
        elif os.path.isdir(os.path.expanduser(self.path_or_name)):
            problem = dataset_folder_problem(os.path.expanduser(self.path_or_name),
                                             f"{where}.path_or_name")
            out += [problem] if problem else []
        if not self.weight > 0:
            out.append(f"{where}.weight: {self.weight} must be > 0")
        if not self.text_field:
            out.append(f"{where}.text_field: empty; give the record field that holds the text")
        return out


@dataclass
class MemoryTaskConfig:
    tasks: list[str] = described(text="built-in tasks to mix: copy, reverse, associative_retrieval",
                                 factory=lambda: list(TASK_NAMES))
    weights: Optional[list[float]] = described(None, "mixture weights of `tasks` (null = equal)")
    span_length: int = described(6, "symbols to remember (copy/reverse) or key-value pairs "
                                    "(associative retrieval); every one is a supervised answer")
    alphabet_size: int = described(8, "distinct symbols the remembered content is drawn from")
    filler_size: int = described(16, "distinct distractor tokens that fill the other positions")
    distractors: Literal["fillers", "symbols"] = described(
        "fillers", "what fills the other positions: fillers (filler_size tokens of their own) or "
                   "symbols (random symbols of the content's alphabet, so only position tells "
                   "content from noise)")

    def problems(self, where: str) -> list[str]:
        out = []
        unknown = [t for t in self.tasks if t not in TASK_NAMES]
        if not self.tasks or unknown:
            out.append(f"{where}.tasks: {self.tasks} must be a non-empty list of {list(TASK_NAMES)}")
        if len(set(self.tasks)) != len(self.tasks):
            out.append(f"{where}.tasks: {self.tasks} lists a task twice")
        if self.weights is not None and (len(self.weights) != len(self.tasks)
                                         or any(not w > 0 for w in self.weights)):
            out.append(f"{where}.weights: {self.weights} must be null or one positive weight per "
                       f"task ({len(self.tasks)})")
        if self.span_length < 1:
            out.append(f"{where}.span_length: {self.span_length} must be >= 1")
        if not 2 <= self.alphabet_size <= MAX_ALPHABET:
            out.append(f"{where}.alphabet_size: {self.alphabet_size} must be in [2, {MAX_ALPHABET}]")
        elif "associative_retrieval" in self.tasks and self.span_length > self.alphabet_size:
            out.append(f"{where}.span_length: {self.span_length} key-value pairs need as many "
                       f"distinct keys; alphabet_size is {self.alphabet_size}")
        if self.distractors not in ("fillers", "symbols"):
            out.append(f"{where}.distractors: {self.distractors!r} must be fillers or symbols")
        if not 1 <= self.filler_size <= MAX_FILLER:
            out.append(f"{where}.filler_size: {self.filler_size} must be in [1, {MAX_FILLER}]")
        return out


@dataclass
class BabilongConfig:
    tasks: list[str] = described(
        text="story kinds to mix: qa1 (where is a person), qa2 (where is an object), qa3 (where "
             "was an object before a place), file (the bAbI stories of babi_path)",
        factory=lambda: ["qa1"])
    weights: Optional[list[float]] = described(None, "mixture weights of `tasks` (null = equal)")
    babi_path: Optional[str] = described(None, "original bAbI task file or glob (numbered-line "
                                               "format), read when tasks lists file")
    facts: int = described(6, "facts per generated story (qa1 needs >= people, qa2 and "
                                 "qa3 >= 5 x objects)")
    people: int = described(4, f"people the generated stories name (2..{len(PEOPLE)})")
    places: int = described(6, f"places, the possible answers (3..{len(PLACES)})")
    objects: int = described(3, f"objects carried in qa2/qa3 stories (1..{len(OBJECTS)})")
    text_mix: float = described(0.0, "fraction of samples that are plain text from the filler "
                                     "pool, with loss on every token, instead of a story")
    filler_chars: int = described(2_000_000, "characters of data.sources read once (the same "
                                             "on every rank) into the filler pool")

    def problems(self, where: str) -> list[str]:
        out = []
        valid = list(QA_TASKS) + [BABI_FILE]
        if not self.tasks or any(t not in valid for t in self.tasks) or (
                len(set(self.tasks)) != len(self.tasks)):
            out.append(f"{where}.tasks: {self.tasks} must be a non-empty list of distinct "
                       f"{valid}")
        if self.weights is not None and (len(self.weights) != len(self.tasks)
                                         or any(not w > 0 for w in self.weights)):
            out.append(f"{where}.weights: {self.weights} must be null or one positive weight per "
                       f"task ({len(self.tasks)})")
        if (BABI_FILE in self.tasks) != bool(self.babi_path):
            out.append(f"{where}.babi_path: {self.babi_path!r}; give a bAbI file exactly when "
                       f"tasks lists {BABI_FILE!r} (tasks: {self.tasks})")
        elif self.babi_path and not glob.glob(os.path.expanduser(self.babi_path)):
            out.append(f"{where}.babi_path: {self.babi_path!r} matches no file")
        need = max([min_facts(t, self.people, self.objects) for t in self.tasks
                    if t in QA_TASKS], default=1)
        if self.facts < need:
            carry = {"qa2", "qa3"} & set(self.tasks)
            out.append(f"{where}.facts: {self.facts} must be >= {need} for tasks {self.tasks} "
                       f"(qa1: a move per person" + (f", qa2/qa3: 5 per object; or lower "
                                                     f"{where}.objects)" if carry else ")"))
        for name, low, names in (("people", 2, PEOPLE), ("places", 3, PLACES),
                                 ("objects", 1, OBJECTS)):
            if not low <= getattr(self, name) <= len(names):
                out.append(f"{where}.{name}: {getattr(self, name)} must be in [{low}, "
                           f"{len(names)}]")
        if not 0.0 <= self.text_mix < 1.0:
            out.append(f"{where}.text_mix: {self.text_mix} must be in [0, 1)")
        if self.filler_chars < 1000:
            out.append(f"{where}.filler_chars: {self.filler_chars} must be >= 1000")
        return out


@dataclass
class DataConfig:
    source: Literal["memory_tasks", "text", "babilong"] = described(
        MEMORY_TASKS, "memory_tasks (built-in synthetic corpus), text (the `sources` mixture) or "
                      "babilong (bAbI-like stories in filler text from `sources`)")
    sources: list[SourceConfig] = described(text="text sources mixed by weight", factory=list)
    eval_sources: list[SourceConfig] = described(
        text="held-out text sources for eval (empty: use eval_fraction of `sources`)", factory=list)
    eval_fraction: float = described(0.0, "fraction of documents (by content hash) held out of "
                                          "`sources` for eval when eval_sources is empty")
    tokenizer: str = described(BUILTIN, "builtin (memory-task tokenizer), a tokenizer folder "
                                        "(e.g. from python -m training.tokenizer) or a hub name")
    packing: Literal["concat", "document"] = described(
        "concat", "concat: documents joined with EOS; document: every sample starts a document")
    short_documents: Literal["drop", "pad"] = described(
        "drop", "document packing: drop (and count) documents shorter than a sample, or pad them")
    shuffle_buffer: int = described(1000, "documents shuffled together per window; 0 = stream order")
    prefetch_documents: int = described(4096, "tokenised documents kept ready ahead of the model")
    memory_tasks: MemoryTaskConfig = described(text="built-in corpus settings",
                                               factory=MemoryTaskConfig)
    babilong: BabilongConfig = described(text="BABILong-style stories (data.source babilong)",
                                         factory=BabilongConfig)
    elastic_shards: int = described(
        0, "text: data shards the sources are read as, dealt to the ranks (0 = the world size "
           "of the run's first start); fixed for the run, so a resume on any world size up to it "
           "continues every document exactly once (docs/reliability.md 9)")
    reshard: bool = described(False, "allow resuming a data state where it cannot continue "
                                     "exactly: text on more ranks than data.elastic_shards "
                                     "restarts every source at its next epoch (memory tasks and "
                                     "babilong continue exactly when the global batch is kept)")

    def problems(self) -> list[str]:
        out = []
        if self.source == MEMORY_TASKS:
            out += self.memory_tasks.problems("data.memory_tasks")
            if self.tokenizer != BUILTIN:
                out.append(f"data.tokenizer: {self.tokenizer!r}; the memory_tasks corpus is "
                           f"written in its own vocabulary, use tokenizer: {BUILTIN}")
            if self.sources or self.eval_sources:
                out.append("data.sources: set, but data.source is memory_tasks; set "
                           "data.source: text to train on them")
        else:
            if self.source == BABILONG:
                out += self.babilong.problems("data.babilong")
            if not self.sources:
                out.append(f"data.sources: empty; data.source {self.source} needs at least one "
                           f"text source (path_or_name: a local file/glob or a hub dataset name)")
            if self.tokenizer == BUILTIN:
                out.append(f"data.tokenizer: {BUILTIN} only covers the memory tasks; give a "
                           f"tokenizer folder (python -m training.tokenizer) or a hub name")
            elif is_local_pattern(self.tokenizer) and not os.path.isdir(self.tokenizer):
                out.append(f"data.tokenizer: {self.tokenizer!r} is not a directory; train one "
                           f"with python -m training.tokenizer --out DIR or give a hub name")
        for name in ("sources", "eval_sources"):
            for i, src in enumerate(getattr(self, name)):
                out += src.problems(f"data.{name}[{i}]")
        if not 0.0 <= self.eval_fraction < 1.0:
            out.append(f"data.eval_fraction: {self.eval_fraction} must be in [0, 1)")
        if self.shuffle_buffer < 0:
            out.append(f"data.shuffle_buffer: {self.shuffle_buffer} must be >= 0")
        if self.elastic_shards < 0:
            out.append(f"data.elastic_shards: {self.elastic_shards} must be >= 0 (0 = the world "
                       f"size of the first start)")
        if self.prefetch_documents < 1:
            out.append(f"data.prefetch_documents: {self.prefetch_documents} must be >= 1")
        return out

    def required_vocab_size(self) -> Optional[int]:
        """Vocabulary the model needs when it is known without loading files (builtin only)."""
        if self.tokenizer == BUILTIN:
            return len(VOCAB)
        return None
