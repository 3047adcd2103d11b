"""Issue 20 item 1: BABILong-style stories, bAbI files, filler, layout, pipeline (no model)."""

from __future__ import annotations

import json
import re
import sysconfig
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from training.data import DataConfig, DataSourceError, SourceConfig, build_pipeline
from training.data.babi_format import load_babi, parse_babi, story_words
from training.data.babilong import OBJECTS, PEOPLE, PLACES, generate_story
from training.data.babilong_samples import BabilongSampler, layout_problems, tokenizer_texts
from training.data.config import BabilongConfig
from training.data.tokenization import train_bpe_tokenizer
from training.tokenizer import training_texts

S = 96
# qa2/qa3 script every object (5 facts each at most): 2 objects keep a story within 2 segments of S.
SIZES = dict(facts=10, people=4, places=6, objects=2)
# Sentences a careless filler would let through: the stories' own names in story-like facts.
PLANTED = ["Mary went to the garden.", "The apple is in the kitchen now.", "John left the office."]


def write_filler(path: Path) -> Path:
    """Real text (standard-library sources, SPEC 2.2) with planted story-like sentences."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    with open(path, "w") as f:
        for i, p in enumerate(sorted(lib.glob("*.py"))[:24]):
            text = p.read_text(encoding="utf-8", errors="replace")
            f.write(json.dumps({"text": f"{text}\n{PLANTED[i % len(PLANTED)]} Done.\n"}) + "\n")
    return path


def babilong_cfg(filler: Path, tokenizer: str = "", **babilong) -> DataConfig:
    settings = {**SIZES, "filler_chars": 300_000, **babilong}
    return DataConfig(source="babilong", sources=[SourceConfig(path_or_name=str(filler))],
                      tokenizer=tokenizer or str(filler.parent / "tok"),
                      babilong=BabilongConfig(**settings))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(filler jsonl, BPE trained on it plus stories like `python -m training.tokenizer` does)."""
    root = tmp_path_factory.mktemp("babilong")
    filler = write_filler(root / "filler.jsonl")
    cfg = babilong_cfg(filler, tasks=["qa1", "qa2", "qa3"])
    texts = list(training_texts(cfg, 10**6, 10**9)) + tokenizer_texts(cfg, 1000)
    tok = train_bpe_tokenizer(texts, 400, str(root / "tok"))
    return filler, tok


@pytest.fixture(scope="module")
def sampler(setup):
    filler, tok = setup
    return BabilongSampler(babilong_cfg(filler, tasks=["qa1", "qa2", "qa3"]), tok, seed=7)


# --------------------------------------------------------------------------- stories

MOVE = re.compile(r"^(\w+) (?:went to|moved to|travelled to|walked into|ran to) the (\w+)\.$")
PICK = re.compile(r"^(\w+) (?:picked up|took|grabbed) the (\w+)\.$")
DROP = re.compile(r"^(\w+) (?:dropped|put down|left) the (\w+)\.$")


def solve(facts, question) -> str:
    """An independent reader: replays the facts and answers the question."""
    at, holder, where, history = {}, {}, {}, defaultdict(list)
    for fact in facts:
        if m := MOVE.match(fact):
            person, place = m.groups()
            assert at.get(person) != place, fact  # every move changes place
            at[person] = place
            for obj in [o for o, h in holder.items() if h == person]:
                where[obj] = place
                history[obj].append(place)
        elif m := PICK.match(fact):
            person, obj = m.groups()
            assert obj not in holder and where.get(obj, at[person]) == at[person], fact
            holder[obj], where[obj] = person, at[person]
            if not history[obj] or history[obj][-1] != at[person]:
                history[obj].append(at[person])
        elif m := DROP.match(fact):
            assert holder.pop(m.group(2)) == m.group(1), fact
        else:
            raise AssertionError(f"unreadable fact {fact!r}")
    if m := re.match(r"^Where is the (\w+)\?$", question):
        return where[m.group(1)]
    if m := re.match(r"^Where is (\w+)\?$", question):
        return at[m.group(1)]
    m = re.match(r"^Where was the (\w+) before the (\w+)\?$", question)
    past = history[m.group(1)]
    last = len(past) - 1 - past[::-1].index(m.group(2))
    return past[last - 1]


@pytest.mark.parametrize("task", ["qa1", "qa2", "qa3"])
def test_stories_are_seeded_consistent_and_answered_by_their_facts(task):
    stories = [generate_story(task, i, 3, 4, **SIZES) for i in range(300)]
    assert stories == [generate_story(task, i, 3, 4, **SIZES) for i in range(300)]
    assert stories != [generate_story(task, i, 5, 4, **SIZES) for i in range(300)]
    for s in stories:
        assert len(s.facts) == SIZES["facts"] and solve(s.facts, s.question) == s.answer
        assert list(s.supporting) == sorted(set(s.supporting))
        assert len(s.supporting) in {"qa1": (1,), "qa2": (2, 3), "qa3": (3, 4)}[task]
        if task == "qa1":  # the one supporting fact alone gives the answer
            assert solve([s.facts[i] for i in s.supporting], s.question) == s.answer
            continue
        # The asked object's pick-up, the moves that took it to the answer (qa3: and then to the
        # place the question names), its drop if it was dropped; every other object picked up.
        obj = s.question.split()[3].rstrip("?")
        support = [s.facts[i] for i in s.supporting]
        assert sum(bool(PICK.match(f)) and f.endswith(f" {obj}.") for f in support) == 1
        places = [m.group(2) for f in support if (m := MOVE.match(f))]
        expected = [s.answer] if task == "qa2" else [s.answer, s.question.split()[-1][:-1]]
        assert places[-len(expected):] == expected
        assert len(support) - 1 - len(expected) == sum(bool(DROP.match(f)) for f in support)
        picked = sorted(m.group(2) for f in s.facts if (m := PICK.match(f)))
        assert picked == sorted(OBJECTS[:SIZES["objects"]])
    counts = Counter(s.answer for s in stories)
    assert set(counts) == set(PLACES[:SIZES["places"]])  # every place answers
    assert max(counts.values()) / len(stories) < 0.3     # near 1/6: balanced


@pytest.mark.parametrize("facts", [4, 6, 8])
def test_qa1_cannot_be_answered_without_reading_the_question(facts):
    """Readers that see every fact but not the question: the last place of whoever moved most,
    or of the last fact. Right person by chance (1/people), else the same place by chance: the
    bound 1/p + (1 - 1/p)/places. The first generator moved the asked person 1-3 times among
    one-move distractors; the most-moves reader scored 0.70 there with 4 facts and 0.52 with 6
    (and a model trained on it found that rule)."""
    people, places, n = 4, 6, 3000
    stories = [generate_story("qa1", i, 1, 2, facts=facts, people=people, places=places,
                              objects=1) for i in range(n)]
    bound = 1 / people + (1 - 1 / people) / places
    most = last = 0
    moved_twice = 0
    for s in stories:
        movers = [f.split()[0] for f in s.facts]
        counts = Counter(movers)
        top = max(counts.values())
        who = max((p for p in counts if counts[p] == top),
                  key=lambda p: max(i for i, m in enumerate(movers) if m == p))
        most += solve(s.facts, f"Where is {who}?") == s.answer
        last += solve(s.facts, f"Where is {movers[-1]}?") == s.answer
        assert set(movers) == set(PEOPLE[:people])  # everybody moves
        moved_twice += movers.count(s.question[len("Where is "):-1]) > 1
    assert most / n <= bound + 0.03 and last / n <= bound + 0.03, (most / n, last / n, bound)
    assert moved_twice / n > {4: -1, 6: 0.35, 8: 0.6}[facts]  # "the last move" matters


def object_answers(facts, task, objects):
    """Each object's answer by the independent replay (None if the facts never place it)."""
    out = {}
    for obj in objects:
        try:
            where = solve(facts, f"Where is the {obj}?")
            out[obj] = where if task == "qa2" else solve(facts, f"Where was the {obj} before "
                                                                f"the {where}?")
        except (KeyError, ValueError, IndexError):  # never picked up (or never moved, qa3)
            out[obj] = None
    return out


def question_blind_scores(generate, task, facts, people=4, places=6, objects=3, n=3000):
    """Scores of readers that see every fact but not the question (they answer about the first
    object picked up, the last one picked up, the one moved most) and the bound a reader with
    no information reaches: the asked object by chance (1/objects), else another object's
    answer that happens to be the same place (measured over the same stories)."""
    scores, same, pairs = Counter(), 0, 0
    names = OBJECTS[:objects]
    for i in range(n):
        s = generate(task, i, 1, 2, facts=facts, people=people, places=places, objects=objects)
        answers = object_answers(s.facts, task, names)
        asked = s.question.split()[3].rstrip("?")
        assert answers[asked] == s.answer
        picked = [m.group(2) for f in s.facts if (m := PICK.match(f))]
        holder, moved = {}, Counter()
        for f in s.facts:
            if m := PICK.match(f):
                holder[m.group(2)] = m.group(1)
            elif m := DROP.match(f):
                del holder[m.group(2)]
            else:
                moved.update(o for o, h in holder.items() if h == MOVE.match(f).group(1))
        readers = {"first picked up": picked[0], "last picked up": picked[-1],
                   "moved most": max(picked, key=lambda o: (moved[o], -picked.index(o)))}
        for name, obj in readers.items():
            scores[name] += answers[obj] == s.answer
        others = [o for o in names if o != asked]
        same += sum(answers[o] == s.answer for o in others)
        pairs += len(others)
    bound = 1 / objects + (1 - 1 / objects) * same / pairs
    return {k: v / n for k, v in scores.items()}, bound


@pytest.mark.parametrize("task,objects,facts", [("qa2", 2, 10), ("qa2", 3, 15), ("qa3", 2, 10),
                                                 ("qa3", 3, 20)])
def test_qa2_qa3_cannot_be_answered_without_reading_the_question(task, objects, facts):
    """The first generator scripted only the asked object among random distractors that rarely
    picked anything up. With 4 people, 6 places, 3 objects and 6 facts the readers (first
    picked up / last picked up / moved most) scored 0.91 / 0.82 / 0.99 on qa2 and
    0.97 / 0.87 / 1.00 on qa3 against bounds of 0.36 and 0.34; at this test's sizes its best
    reader scored 0.76, 0.49, 0.95, 0.56 against bounds of 0.58, 0.43, 0.57, 0.44. Now every
    object gets the same kind of script and its own carrier: within 0.02 of the bound."""
    scores, bound = question_blind_scores(generate_story, task, facts, objects=objects)
    assert max(scores.values()) <= bound + 0.03, (scores, bound)


def test_a_carrier_of_several_objects_moves_them_all():
    """More objects than people: carriers are shared, and the answers (replayed independently
    by `solve`) follow whoever holds what, not the script that picked an object up."""
    shared = 0
    for i in range(200):
        s = generate_story("qa2", i, 1, 2, facts=22, people=2, places=4, objects=4)
        assert solve(s.facts, s.question) == s.answer
        holders = Counter()
        for f in s.facts:
            if m := PICK.match(f):
                holders[m.group(1)] += 1
            elif m := DROP.match(f):
                holders[m.group(1)] -= 1
            elif holders[MOVE.match(f).group(1)] > 1:
                shared += 1
                break
    assert shared > 50


# --------------------------------------------------------------------------- samples


def segments_text(tok, ids, lo, hi):
    return tok.decode(ids[lo:hi])


def test_samples_are_deterministic_by_index_and_seed(setup, sampler):
    filler, tok = setup
    a = sampler.generate([10, 11, 12, 13], 3, S)
    again = BabilongSampler(babilong_cfg(filler, tasks=["qa1", "qa2", "qa3"]), tok, seed=7)
    b = again.generate([12, 13], 3, S)  # another process, another batch split: same samples
    assert np.array_equal(a["input_ids"][2:], b["input_ids"]) and np.array_equal(a["labels"][2:], b["labels"])
    other = BabilongSampler(babilong_cfg(filler, tasks=["qa1", "qa2", "qa3"]), tok, seed=8,
                            pool=sampler.pool)
    assert not np.array_equal(other.generate([10, 11], 3, S)["input_ids"], a["input_ids"][:2])


@pytest.mark.parametrize("num_segments", [1, 2, 4])
def test_layout_facts_before_the_last_segment_answer_labelled_at_the_end(sampler, setup, num_segments):
    _, tok = setup
    S = 160 if num_segments == 1 else globals()["S"]  # one segment holds the question as well
    L = num_segments * S
    arrays = sampler.generate(range(30), num_segments, S)
    for i, (ids, labels, t) in enumerate(zip(arrays["input_ids"], arrays["labels"], arrays["task_ids"])):
        story = sampler.story(sampler.cfg.tasks[t], i)
        assert ids.shape == (L,)
        answer_pos = np.nonzero(labels != -100)[0]
        assert tok.decode(labels[answer_pos]).strip() == story.answer
        assert np.array_equal(ids[answer_pos], labels[answer_pos])
        assert tok.decode(ids[answer_pos[0] - len(sampler.tok(story.question)):answer_pos[0]]).strip() \
            == story.question
        text = tok.decode(ids[:L - S] if num_segments > 1 else ids)
        at = 0
        for f in story.facts:  # every fact, whole, in order (a fact may occur twice)
            at = text.index(f, at) + len(f)
        if num_segments > 1:  # the last segment holds no fact
            last = tok.decode(ids[L - S:])
            assert not any(f in last for f in story.facts)


def test_filler_never_names_what_the_stories_name(sampler, setup):
    _, tok = setup
    names = re.compile(r"\b(" + "|".join(PEOPLE + PLACES + OBJECTS) + r")\b", re.I)
    pool_text = tok.decode(sampler.pool.tokens)
    assert "Done." in pool_text and not names.search(pool_text)  # planted sentences dropped
    arrays = sampler.generate(range(40), 3, S)
    for i, (ids, t) in enumerate(zip(arrays["input_ids"], arrays["task_ids"])):
        story = sampler.story(sampler.cfg.tasks[t], i)
        in_sample = Counter(m.lower() for m in names.findall(tok.decode(ids)))
        in_story = Counter(m.lower() for m in names.findall(story.text()))
        assert in_sample == in_story  # every name in the sample belongs to a fact or the question


def last_segment_context(arrays, L):
    """What the model sees in the last segment before the first answer token."""
    out = []
    for ids, labels in zip(arrays["input_ids"], arrays["labels"]):
        first = int(np.nonzero(labels != -100)[0][0])
        out.append(tuple(ids[L - S:first]))
    return out


@pytest.mark.parametrize("task", ["qa1", "qa2", "qa3"])
def test_last_segment_alone_predicts_no_better_than_the_majority(sampler, task):
    n, N = 600, 2
    L = N * S
    idx = np.arange(n)
    t = sampler.cfg.tasks.index(task)
    arrays = sampler.generate(idx, N, S, task=task)
    assert (arrays["task_ids"] == t).all()
    stories = [sampler.story(task, i) for i in idx]
    answers = [s.answer for s in stories]
    majority = max(Counter(answers).values()) / n
    # Best predictor from the question (the last segment's only story content): fitted on one
    # half, scored on the other.
    fit = defaultdict(Counter)
    for s in stories[: n // 2]:
        fit[s.question][s.answer] += 1
    guess = {q: c.most_common(1)[0][0] for q, c in fit.items()}
    top = Counter(answers[: n // 2]).most_common(1)[0][0]
    held = stories[n // 2:]
    score = sum(guess.get(s.question, top) == s.answer for s in held) / len(held)
    places = SIZES["places"]
    bound = majority if task != "qa3" else 1 / (places - 1)  # qa3's question rules one place out
    assert score <= bound + 0.05, (score, majority)
    if task == "qa3":
        return
    # Structural: another secret seed changes the answers but not one token the model sees in the
    # last segment before them, so nothing there can tell the answer.
    secret = sampler.secret
    try:
        sampler.secret = secret + 1
        other = sampler.generate(idx, N, S, task=task)
        changed = np.mean([sampler.story(task, i).answer != a for i, a in zip(idx, answers)])
    finally:
        sampler.secret = secret
    assert last_segment_context(other, L) == last_segment_context(arrays, L)
    assert changed > 0.7  # 5/6 expected


def test_text_mix_samples_are_plain_text_with_every_token_a_target(setup, sampler):
    filler, tok = setup
    cfg = babilong_cfg(filler, tasks=["qa1"], text_mix=0.5)
    s = BabilongSampler(cfg, tok, seed=1, pool=sampler.pool)
    arrays = s.generate(range(120), 2, S)
    text = arrays["task_ids"] == 1
    assert 0.3 < text.mean() < 0.7
    assert np.array_equal(arrays["labels"][text], arrays["input_ids"][text])
    assert ((arrays["labels"][~text] != -100).sum(1) <= s.answer_room).all()


def test_a_story_that_does_not_fit_is_refused_with_what_to_change(sampler, setup):
    with pytest.raises(ValueError, match="more segments"):
        sampler.generate([0], 1, 40)
    with pytest.raises(ValueError, match="larger model.segment_size"):
        sampler.generate([0], 2, 12)
    filler, tok = setup
    problems = layout_problems(babilong_cfg(filler, tasks=["qa2"]), tok, 16, {1, 2})
    assert len(problems) == 1 and "model.segment_size" in problems[0]
    assert layout_problems(babilong_cfg(filler, tasks=["qa1"]), tok, 128, {1, 4}) == []


# --------------------------------------------------------------------------- bAbI files

BABI = """1 Mary moved to the bathroom.
2 John went to the hallway.
3 Where is Mary? \tbathroom\t1
4 Daniel went back to the hallway.
5 Sandra moved to the garden.
6 Where is Daniel? \thallway\t4
1 Bill picked up the football there.
2 Bill journeyed to the office.
3 Where is the football? \toffice\t1 2
"""


def test_babi_files_parse_into_stories(tmp_path):
    stories = parse_babi(BABI)
    assert [(s.question, s.answer, s.supporting) for s in stories] == [
        ("Where is Mary?", "bathroom", (0,)), ("Where is Daniel?", "hallway", (2,)),
        ("Where is the football?", "office", (0, 1))]
    assert stories[1].facts == ("Mary moved to the bathroom.", "John went to the hallway.",
                                "Daniel went back to the hallway.", "Sandra moved to the garden.")
    assert stories[2].facts == ("Bill picked up the football there.", "Bill journeyed to the office.")
    assert {"Mary", "Bill", "football", "office", "bathroom"} <= set(story_words(stories))
    assert "the" not in story_words(stories)
    (tmp_path / "qa_train.txt").write_text(BABI)
    assert load_babi(str(tmp_path / "qa_*.txt")) == stories
    (tmp_path / "bad.txt").write_text("1 Mary moved.\n2 Where is Mary?\tkitchen\t7\n")
    with pytest.raises(DataSourceError, match=r"bad.txt:2: question lines"):
        load_babi(str(tmp_path / "bad.txt"))
    with pytest.raises(DataSourceError, match="matches no file"):
        load_babi(str(tmp_path / "none_*.txt"))


def test_babi_stories_in_filler_through_the_pipeline(tmp_path, setup):
    filler, tok = setup
    (tmp_path / "qa.txt").write_text(BABI)
    cfg = babilong_cfg(filler, tasks=["file"], babi_path=str(tmp_path / "qa.txt"), filler_chars=30_000)
    pipe = build_pipeline(cfg, tok, segment_size=S, micro_batch_size=6, seed=0)
    batch = pipe.next_batch(2)
    for ids, labels in zip(batch["input_ids"].numpy(), batch["labels"].numpy()):
        answer = tok.decode(labels[labels != -100]).strip()
        assert answer in {"bathroom", "hallway", "office"}
        assert f"? {answer}" in tok.decode(ids)
        assert "Bill" not in tok.decode(ids[:S]) or "football" in tok.decode(ids[:S])


# --------------------------------------------------------------------------- pipeline, config


def test_pipeline_resumes_at_the_exact_sample_with_any_segment_count(setup):
    filler, tok = setup
    cfg = babilong_cfg(filler, tasks=["qa1", "qa2"], text_mix=0.2, filler_chars=30_000)
    args = dict(segment_size=S, micro_batch_size=2, world_size=2, seed=5)
    ranks = [build_pipeline(cfg, tok, rank=r, **args) for r in (0, 1)]
    first = [p.next_batch(2) for p in ranks]
    assert [b["sample_ids"].tolist() for b in first] == [[0, 1], [2, 3]]
    state = ranks[0].state_dict()
    expected = ranks[0].next_batch(3)  # the curriculum moved on: 3 segments
    resumed = build_pipeline(cfg, tok, rank=0, **args)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    got = resumed.next_batch(3)
    assert got["input_ids"].shape == (2, 3 * S)
    for key in ("input_ids", "labels", "sample_ids"):
        assert (got[key] == expected[key]).all()
    assert resumed.stats()["samples"] == 4
    assert sum(v for k, v in resumed.stats().items() if k.startswith("samples_")) == 4
    with pytest.raises(ValueError, match="data.babilong.tasks"):
        build_pipeline(babilong_cfg(filler, tasks=["qa1"], filler_chars=30_000), tok, rank=0,
                       **args).load_state_dict(state)


def test_config_problems_name_the_field(tmp_path):
    filler = tmp_path / "f.jsonl"
    filler.write_text('{"text": "x"}\n')
    bad = babilong_cfg(filler, tasks=["qa4", "qa1"], people=1, text_mix=1.0, facts=3)
    problems = "\n".join(bad.problems())
    for field in ("data.babilong.tasks", "data.babilong.people", "data.babilong.text_mix"):
        assert field in problems
    assert "data.babilong.babi_path" in "\n".join(babilong_cfg(filler, tasks=["file"]).problems())
    assert "data.babilong.facts" in "\n".join(babilong_cfg(filler, tasks=["qa2"], facts=3).problems())
    # qa2/qa3 script every object (5 facts at most each): 3 objects need 15 facts.
    short = babilong_cfg(filler, tasks=["qa1", "qa3"], objects=3, facts=14).problems()
    assert short == ["data.babilong.facts: 14 must be >= 15 for tasks ['qa1', 'qa3'] (qa1: a "
                     "move per person, qa2/qa3: 5 per object; or lower data.babilong.objects)"]
    assert babilong_cfg(filler, tasks=["qa1", "qa3"], objects=3, facts=15).problems() == []
    with pytest.raises(ValueError, match=r"facts 14 \(>= 15\)"):
        generate_story("qa2", 0, 1, 2, facts=14, people=4, places=6, objects=3)
    no_sources = DataConfig(source="babilong", tokenizer=str(tmp_path))
    assert any(p.startswith("data.sources") for p in no_sources.problems())


def test_trainer_scores_the_stories_evaluate_scores(setup):
    """The trainer's answer accuracy (training/answer_eval.py, every configured task, samples
    split by rank) is over the held-out stories `training.evaluate --task babilong-<task>
    --seed <run.seed>` scores (its data section narrowed to that one task)."""
    from types import SimpleNamespace

    from training.answer_eval import AnswerEvalSets
    from training.eval_babilong import babilong_data_config

    filler, tok = setup
    data = babilong_cfg(filler, tasks=["qa1", "qa2"], text_mix=0.3, filler_chars=30_000)
    cfg = SimpleNamespace(data=data, model=SimpleNamespace(segment_size=S),
                          run=SimpleNamespace(seed=11))
    sets = AnswerEvalSets(cfg, tok)
    assert sets.names() == ["babilong_qa1", "babilong_qa2"]
    for task in ("qa1", "qa2"):
        alone = BabilongSampler(babilong_data_config(f"babilong-{task}", data), tok, 11, "eval")
        expected = alone.generate(range(8), 3, S, task)
        halves = [sets.batch(f"babilong_{task}", 3, lo, hi) for lo, hi in ((0, 3), (3, 8))]
        for key in ("input_ids", "labels"):
            got = np.concatenate([h[key].numpy() for h in halves])
            assert (got == expected[key]).all(), (task, key)
