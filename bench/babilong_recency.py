"""Does a BABILong qa1 model find the person's LAST move, or any move of theirs? (docs/results.md
section 5)

A qa1 story moves every person at least once, the person asked about once or more; the answer is
that person's last place. A model that has learned which facts are about the person but not
which of them is the latest picks among that person's places: it is right on every 1-move story,
on about half of the 2-move ones, and so on; one that ignores the question does no better on
1-move stories than on others (and on the first generator, which moved the asked person more
than anyone, it did better the more that person moved: docs/results.md section 5.1). This script scores the held-out stories `training.evaluate --task
babilong-qa1` scores (same seed, same samples) and splits exact match by the number of the
person's moves, beside two scores computed from the stories alone, not from the model:
`any_move`, a reader that picks one of the person's moves uniformly at random, and
`question_blind`, a reader that ignores the question and answers with the last fact's place.

    python bench/babilong_recency.py --model runs/NAME --step best --segments 1,4
"""

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training import checkpoint_select, eval_babilong  # noqa: E402
from training import evaluate as ev  # noqa: E402
from training.data.babilong import PEOPLE, PLACES, last_fact_place  # noqa: E402
from training.data.babilong_samples import BabilongSampler  # noqa: E402
from training.data.memory_tasks import to_batch  # noqa: E402


def moves_of(story) -> list[str]:
    """The places the asked person went to, in order (qa1: the question names the person)."""
    person = next(p for p in PEOPLE if f" {p}?" in f" {story.question}")
    return [next(pl for pl in PLACES if f" {pl}." in fact) for fact in story.facts
            if fact.split()[0] == person]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="exported folder or runs/NAME")
    p.add_argument("--step", type=checkpoint_select.selector_arg, help=checkpoint_select.SELECTOR_HELP)
    p.add_argument("--segments", type=ev.parse_segments, default=[4])
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="held-out story seed, as training.evaluate --seed")
    args = p.parse_args()
    try:
        source = ev.find_model(args.model, args.step)
        settings = ev.EvalSettings(model=args.model, task="babilong-qa1", segments=args.segments)
        data_cfg = eval_babilong.babilong_data_config("babilong-qa1", ev.load_data_config(settings, source))
    except (ev.EvalError, eval_babilong.BabilongInputError) as exc:
        raise SystemExit(f"error: {exc}")
    loaded = ev.load_model(source)
    model = loaded.model.eval()
    sampler = BabilongSampler(data_cfg, loaded.tokenizer, args.seed, "eval")
    stories = [sampler.story("qa1", i) for i in range(args.samples)]
    moves = [moves_of(s) for s in stories]
    assert all(m and m[-1] == s.answer for m, s in zip(moves, stories)), "story parse disagrees with answers"
    any_move = sum(m.count(s.answer) / len(m) for m, s in zip(moves, stories)) / len(stories)
    print(f"{args.model} ({loaded.description.get('checkpoint', source.kind)}), {args.samples} held-out qa1 stories")
    blind = sum(last_fact_place(s) == s.answer for s in stories) / len(stories)
    print(f"any_move (a random one of the person's moves): {any_move:.3f}; question_blind (the last "
          f"fact's place): {blind:.3f}")
    for n_seg in args.segments:
        indices = list(range(args.samples))  # the samples evaluate_babilong scores
        batch = to_batch(sampler.generate(indices, n_seg, model.config.segment_size, "qa1"), indices)
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        hits = []
        with torch.no_grad():
            for lo in range(0, len(ids), args.batch_size):
                sl = slice(lo, lo + args.batch_size)
                hits += ev.answer_scores(ev.predictions(model, "rmt", ids[sl], mask[sl]), labels[sl])[0].tolist()
        by = defaultdict(list)
        for h, m in zip(hits, moves):
            by[len(m)].append(h)
        split = ", ".join(f"{k} move(s): {sum(v) / len(v):.3f} of {len(v)}" for k, v in sorted(by.items()))
        print(f"{n_seg:>3} segments: exact match {sum(hits) / len(hits):.3f}  ({split})")


if __name__ == "__main__":
    main()
