"""Original bAbI task files (the standard numbered-line format) as stories.

    1 Mary moved to the bathroom.
    2 John went to the hallway.
    3 Where is Mary? \tbathroom\t1
    1 ...                                   (a new story starts where the numbering restarts)

Statement lines are facts; a question line carries the answer and the ids of its supporting
facts after tabs. Every question becomes one story: the story's facts up to that question, the
question, the answer (commas of multi-word answers become spaces).
"""

from __future__ import annotations

import glob
import os
import re

from training.data.babilong import Story
from training.data.errors import DataSourceError


def parse_babi(text: str, where: str = "bAbI text") -> list[Story]:
    stories, facts, line_of = [], [], {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        head, _, rest = line.strip().partition(" ")
        if not head.isdigit() or not rest:
            raise DataSourceError(f"{where}:{number}: {line[:60]!r} is not 'ID text' (bAbI "
                                  f"lines start with a number and a space)")
        if int(head) == 1:
            facts, line_of = [], {}
        if "\t" not in rest:
            line_of[head] = len(facts)
            facts.append(rest.strip())
            continue
        fields = rest.split("\t")
        question, answer = fields[0].strip(), fields[1].strip() if len(fields) > 1 else ""
        ids = fields[2].split() if len(fields) > 2 else []
        if not question or not answer or any(i not in line_of for i in ids):
            raise DataSourceError(f"{where}:{number}: question lines are 'ID question?<TAB>answer"
                                  f"<TAB>supporting ids' with ids of earlier facts of the story; "
                                  f"got {line.strip()[:80]!r}")
        stories.append(Story(tuple(facts), question, answer.replace(",", " "),
                             tuple(line_of[i] for i in ids)))
    return stories


def load_babi(pattern: str, where: str = "data.babilong.babi_path") -> list[Story]:
    """Every question of the files `pattern` names (a file or a glob), in file order."""
    files = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
    if not files:
        raise DataSourceError(f"{where}: {pattern!r} matches no file; give a bAbI task file such "
                              f"as tasks_1-20_v1-2/en/qa1_single-supporting-fact_train.txt")
    stories = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            stories += parse_babi(f.read(), path)
    if not stories:
        raise DataSourceError(f"{where}: {files[:3]} hold no question line")
    return stories


# Sentence-initial words of bAbI lines that are not names.
NOT_NAMES = {"the", "a", "an", "where", "what", "who", "whom", "which", "is", "was", "are", "how",
             "why", "does", "do", "did", "there", "it", "he", "she", "they", "if", "then"}


def story_words(stories: list[Story]) -> tuple[str, ...]:
    """The names in bAbI stories: capitalised words, words after 'the', and the answers."""
    words = set()
    for s in stories:
        for sentence in s.facts + (s.question,):
            tokens = re.findall(r"[A-Za-z]+", sentence)
            words.update(t for t in tokens[1:] if t[0].isupper())
            words.update(b for a, b in zip(tokens, tokens[1:]) if a.lower() == "the")
            if tokens and tokens[0].lower() not in NOT_NAMES:
                words.add(tokens[0])
        words.update(s.answer.split())
    return tuple(sorted(w for w in words if w.lower() not in NOT_NAMES))
