"""BABILong-style stories (SPEC 2.9): the project's own bAbI-like templates, torch-free.

A story is a few facts in order, a question and a one-word answer:

    qa1 (one supporting fact)    people move between places; "Where is Mary?" -> her last place
    qa2 (two supporting facts)   someone picks up an object and moves (maybe drops it and moves
                                 on); "Where is the violin?" -> where its carrier took it
    qa3 (three supporting facts) the carrier moves twice with the object; "Where was the violin
                                 before the cellar?" -> the place it was in before the cellar

Randomness comes from two numpy Generators seeded by (seed, sample index): a public one for the
question's subject (qa1's person, qa2/qa3's object) and a secret one for everything the answer
depends on (who moves where, templates, where the script's facts sit among the distractors).
So for qa1 and qa2 the question says nothing about the answer (tests regenerate with another
secret seed); qa3's question names the last place, which the answer never is, so its best
question-only guess is 1/(places-1) rather than 1/places.

Distractor facts (other people moving, other objects picked up and dropped) are simulated so that
every story is consistent: nobody picks up an object in another room or one somebody holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QA_TASKS = ("qa1", "qa2", "qa3")
PEOPLE = ("Mary", "John", "Sandra", "Daniel", "Fiona", "Oscar", "Nadia", "Hugo")
PLACES = ("kitchen", "garden", "hallway", "bathroom", "bedroom", "office", "cellar", "balcony")
OBJECTS = ("apple", "football", "milk", "umbrella", "violin", "lantern")
MOVE = ("{p} went to the {l}.", "{p} moved to the {l}.", "{p} travelled to the {l}.",
        "{p} walked into the {l}.", "{p} ran to the {l}.")
PICK = ("{p} picked up the {o}.", "{p} took the {o}.", "{p} grabbed the {o}.")
DROP = ("{p} dropped the {o}.", "{p} put down the {o}.", "{p} left the {o}.")
QUESTIONS = {"qa1": "Where is {p}?", "qa2": "Where is the {o}?",
             "qa3": "Where was the {o} before the {l}?"}
# Longest script (qa2/qa3 with their optional drop) plus one distractor.
MIN_FACTS = {"qa1": 1, "qa2": 6, "qa3": 6}


@dataclass(frozen=True)
class Story:
    facts: tuple[str, ...]
    question: str
    answer: str
    supporting: tuple[int, ...]  # indices into facts

    def text(self) -> str:
        return " ".join(self.facts + (self.question, self.answer))


def task_words(people: int, places: int, objects: int) -> tuple[str, ...]:
    """The names a story can use: filler that mentions any of them is never used."""
    return PEOPLE[:people] + PLACES[:places] + OBJECTS[:objects]


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed & (2**64 - 1), stream, int(index)])


def _other(rng: np.random.Generator, n: int, not_this: int) -> int:
    """Uniform in range(n) without `not_this` (uniform over all when it is -1)."""
    if not_this < 0:
        return int(rng.integers(n))
    k = int(rng.integers(n - 1))
    return k + (k >= not_this)


class _World:
    """Where everybody is and who holds what, so facts stay consistent."""

    def __init__(self, people: int, objects: int):
        self.at = [-1] * people        # place of each person (-1: not seen yet)
        self.holder = [-1] * objects   # person holding each object
        self.obj_at = [-1] * objects   # place of each object

    def move(self, p: int, place: int) -> tuple:
        self.at[p] = place
        for o, h in enumerate(self.holder):
            if h == p:
                self.obj_at[o] = place
        return ("move", p, place)

    def pick(self, p: int, o: int) -> tuple:
        self.holder[o], self.obj_at[o] = p, self.at[p]
        return ("pick", p, o)

    def drop(self, p: int, o: int) -> tuple:
        self.holder[o] = -1
        return ("drop", p, o)


def _distractor(world: _World, rng, actors: list[int], objects: list[int], places: int) -> tuple:
    """One random consistent event of people and objects the question is not about."""
    drops = [(p, o) for o in objects if (p := world.holder[o]) >= 0]
    picks = [(p, o) for p in actors for o in objects
             if world.at[p] >= 0 and world.holder[o] < 0 and world.obj_at[o] in (-1, world.at[p])]
    kind = rng.random()
    if drops and kind < 0.2:
        return world.drop(*drops[int(rng.integers(len(drops)))])
    if picks and kind < 0.4:
        return world.pick(*picks[int(rng.integers(len(picks)))])
    p = actors[int(rng.integers(len(actors)))]
    return world.move(p, _other(rng, places, world.at[p]))


def _script(task: str, rng, subject: int, world: _World, places: int) -> tuple[list, int, list]:
    """The facts the answer depends on: (events, answer place, indices of supporting events)."""
    if task == "qa1":
        p, events = subject, []
        for _ in range(int(rng.integers(1, 4))):  # earlier moves make "the last one" matter
            events.append(("move", p, _other(rng, places, events[-1][2] if events else -1)))
        return events, events[-1][2], [len(events) - 1]
    o, h = subject, int(rng.integers(len(world.at)))
    a = int(rng.integers(places))
    b = _other(rng, places, a)
    events = [("move", h, a), ("pick", h, o), ("move", h, b)]
    if task == "qa3":
        events.append(("move", h, _other(rng, places, b)))
        support = [1, 2, 3]
    else:
        support = [1, 2]
    if rng.random() < 0.5:  # dropped where it is now; the carrier walks on without it
        events.append(("drop", h, o))
        if task == "qa2":
            events.append(("move", h, _other(rng, places, b)))
            support = [1, 2, 3]
    return events, b, support


def _render(event: tuple, rng) -> str:
    kind, p, x = event
    if kind == "move":
        return MOVE[int(rng.integers(len(MOVE)))].format(p=PEOPLE[p], l=PLACES[x])
    templates = PICK if kind == "pick" else DROP
    return templates[int(rng.integers(len(templates)))].format(p=PEOPLE[p], o=OBJECTS[x])


def generate_story(task: str, index: int, seed: int, secret_seed: int, *, facts: int,
                   people: int, places: int, objects: int) -> Story:
    """Story `index` of `task` (qa1|qa2|qa3); the same arguments give the same story anywhere."""
    if task not in QA_TASKS:
        raise ValueError(f"task {task!r}: valid tasks are {', '.join(QA_TASKS)}")
    if facts < MIN_FACTS[task] or people < 2 or places < 3 or (task != "qa1" and objects < 1):
        raise ValueError(f"{task}: facts {facts} (>= {MIN_FACTS[task]}), people {people} (>= 2), "
                         f"places {places} (>= 3), objects {objects} (>= 1) too small")
    public, secret = _rng(seed, 0, index), _rng(secret_seed, 1, index)
    subject = int(public.integers(people if task == "qa1" else objects))
    world = _World(people, objects)
    script, answer, support = _script(task, secret, subject, world, places)
    if task == "qa1":  # fewer facts than earlier moves: keep the answer's move last
        script = script[-facts:]
        support = [len(script) - 1]
    carrier = subject if task == "qa1" else script[0][1]
    actors = [p for p in range(people) if p != carrier]
    others = [] if task == "qa1" else [o for o in range(objects) if o != subject]
    slots = np.sort(secret.choice(facts, size=len(script), replace=False))
    events, k = [], 0
    for i in range(facts):
        if k < len(script) and i == slots[k]:
            kind, p, x = script[k]
            events.append(getattr(world, kind)(p, x))
            k += 1
        else:
            events.append(_distractor(world, secret, actors, others, places))
    text = tuple(_render(e, secret) for e in events)
    # qa3 asks about the object's last arrival: its carrier's last move while holding it.
    last = [e for e in script if e[0] == "move"][-1][2]
    names = {"p": PEOPLE[subject]} if task == "qa1" else {"o": OBJECTS[subject]}
    question = QUESTIONS[task].format(l=PLACES[last], **names)
    return Story(text, question, PLACES[answer], tuple(int(slots[j]) for j in support))


def story_texts(task_list, count: int, seed: int, **sizes) -> list[str]:
    """`count` stories as plain text, for training a tokenizer that knows the templates' words."""
    return [generate_story(task_list[i % len(task_list)], i, seed, seed + 1, **sizes).text()
            for i in range(count)]


def possible_sentences(task: str, people: int, places: int, objects: int
                       ) -> tuple[list[str], list[str]]:
    """Every fact and every question a `task` story can contain (for worst-case layout checks)."""
    names, rooms, things = PEOPLE[:people], PLACES[:places], OBJECTS[:objects]
    facts = [t.format(p=p, l=x) for t in MOVE for p in names for x in rooms]
    if task != "qa1":
        facts += [t.format(p=p, o=o) for t in PICK + DROP for p in names for o in things]
    questions = ([QUESTIONS[task].format(p=p) for p in names] if task == "qa1" else
                 [QUESTIONS[task].format(o=o, l=x) for o in things for x in rooms])
    return facts, questions
