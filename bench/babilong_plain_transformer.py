"""Can a plain causal transformer learn a BABILong task in context at a given budget?
(docs/results.md section 5.2)

An independent check on the RMT runs, not built from `model/`: a standard pre-LN GPT (learned
positions, written here in a few lines) is trained on the recipe's own stories, laid out by the
recipe's own sampler in ONE window of `--tokens` tokens (every fact in front of it, no memory
needed), with the loss on the answer only, as the recipe has it. It prints held-out exact match
every `--eval-every` steps beside the majority answer and, for qa1, the question-blind reader
(the last fact's place: what a model that does not read the question can score).
If this model also stays at the question-blind rate, an RMT stuck there at the same budget is
limited by the task and the budget, not by its memory.

    python bench/babilong_plain_transformer.py --config configs/babilong_qa1_cpu.yaml --steps 1500
    python bench/babilong_plain_transformer.py --config configs/babilong_qa1_cpu.yaml --tokens 20 \\
        data.babilong.people=2 data.babilong.facts=2
    python bench/babilong_plain_transformer.py --config configs/babilong_qa1_cpu.yaml \\
        --stages 0:2:2:20,2500:3:3:26,3500:4:4:32,4500:4:6:48

`--stages` trains on smaller stories first (a story-size curriculum): from each STEP on, stories of
PEOPLE people and FACTS facts in windows of TOKENS tokens; the held-out stories stay the recipe's.

Trailing `key=value` arguments override the recipe as on the launcher's command line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.config import ConfigError, load_config  # noqa: E402
from training.data.babilong import QA_TASKS, last_fact_place  # noqa: E402
from training.data.babilong_samples import BabilongSampler, layout_problems  # noqa: E402
from training.data.errors import DataSourceError  # noqa: E402
from training.data.tokenization import build_tokenizer  # noqa: E402


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class PlainGPT(nn.Module):
    def __init__(self, vocab: int, positions: int, width: int, layers: int, heads: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(positions, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        causal = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
        x = self.tok(ids) + self.pos(torch.arange(T))
        for block in self.blocks:
            x = block(x, causal)
        return self.head(self.norm(x))


def exact_match(model: PlainGPT, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples whose every answer token is the argmax (labels are the input's own
    tokens at the answer positions, -100 elsewhere: position t predicts labels[t + 1])."""
    with torch.no_grad():
        pred = model(ids[:, :-1]).argmax(-1)
    target, scored = labels[:, 1:], labels[:, 1:] >= 0
    return ((pred == target) | ~scored).all(1).float().mean().item()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a recipe with data.source babilong")
    p.add_argument("--task", help="one of the recipe's data.babilong.tasks (default: the first)")
    p.add_argument("--tokens", type=int, help="window length (default: the recipe's segment_size)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stages", help="STEP:PEOPLE:FACTS:TOKENS,...: from each step on, train on "
                                    "stories of that size in windows of that length")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    return p.parse_args(argv)


def argument_problems(args) -> list[str]:
    problems = [f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1"
                for name in ("steps", "batch", "width", "layers", "heads", "eval_every",
                             "eval_samples", "threads") if getattr(args, name) < 1]
    if args.lr <= 0:
        problems.append(f"--lr {args.lr}: must be > 0")
    if args.heads >= 1 and args.width % args.heads:
        problems.append(f"--width {args.width} must be a multiple of --heads {args.heads}")
    if args.tokens is not None and args.tokens < 2:
        problems.append(f"--tokens {args.tokens}: must be >= 2")
    if args.stages is not None:
        problems += stage_problems(args.stages)
    return problems


def parse_stages(text: str) -> list[tuple[int, int, int, int]]:
    return [tuple(int(v) for v in part.split(":")) for part in text.split(",")]


def stage_problems(text: str) -> list[str]:
    try:
        stages = parse_stages(text)
    except ValueError:
        stages = []
    if not stages or any(len(s) != 4 for s in stages):
        return [f"--stages {text!r}: give STEP:PEOPLE:FACTS:TOKENS entries separated by commas, "
                f"e.g. 0:2:2:20,2000:4:6:48"]
    steps = [s[0] for s in stages]
    out = []
    if steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:])):
        out.append(f"--stages {text!r}: steps {steps} must start at 0 and increase")
    if any(s[3] < 2 for s in stages):
        out.append(f"--stages {text!r}: every TOKENS must be >= 2")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    problems = argument_problems(args)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        problems += e.problems
        cfg = None
    if cfg is not None:
        tasks = [t for t in cfg.data.babilong.tasks if t in QA_TASKS]
        if cfg.data.source != "babilong" or not tasks:
            problems.append(f"{args.config}: data.source is {cfg.data.source!r}; give a recipe with "
                            f"data.source babilong and a generated task ({', '.join(QA_TASKS)})")
        elif args.task is not None and args.task not in tasks:
            problems.append(f"--task {args.task}: valid tasks of this recipe are {', '.join(tasks)}")
    if problems:
        print("error: " + "\n  ".join(problems), file=sys.stderr)
        return 2
    task = args.task or tasks[0]
    tokens = args.tokens or cfg.model.segment_size
    try:
        tokenizer = build_tokenizer(cfg.data, local_files_only=True)
    except DataSourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fit = layout_problems(cfg.data, tokenizer, tokens, [1])
    if fit:
        why = fit[0].split(": ", 1)[1].split("; ")[0]
        print(f"error: --tokens {tokens}: {why}; raise --tokens or lower data.babilong.facts",
              file=sys.stderr)
        return 2
    torch.manual_seed(cfg.run.seed)
    torch.set_num_threads(args.threads)
    # Training stories are the recipe's (run.seed); held-out ones are the stories the trainer and
    # `training.evaluate --seed <run.seed>` score.
    train = BabilongSampler(cfg.data, tokenizer, cfg.run.seed, "train")
    stages = [(0, train, tokens)]
    if args.stages is not None:
        stages, problems = [], []
        for step, people, facts, window in parse_stages(args.stages):
            where = f"--stages {step}:{people}:{facts}:{window}"
            if people > cfg.data.babilong.people:
                problems.append(f"{where}: at most the recipe's {cfg.data.babilong.people} people "
                                f"(the filler pool drops their names only)")
            try:
                stage_cfg = load_config(args.config, args.overrides + [
                    f"data.babilong.people={people}", f"data.babilong.facts={facts}"])
            except ConfigError as e:
                problems += [f"{where}: {p}" for p in e.problems]
                continue
            fit = layout_problems(stage_cfg.data, tokenizer, window, [1])
            if fit:
                problems.append(f"{where}: {fit[0].split(': ', 1)[1].split('; ')[0]}")
            # The filler pool is the recipe's, read once.
            stages.append((step, BabilongSampler(stage_cfg.data, tokenizer, cfg.run.seed, "train",
                                                 pool=train.pool), window))
        if problems:
            print("error: " + "\n  ".join(problems), file=sys.stderr)
            return 2
    held_out = BabilongSampler(cfg.data, tokenizer, cfg.run.seed, "eval")
    ev = held_out.generate(range(args.eval_samples), 1, tokens, task)
    ev_ids, ev_labels = torch.tensor(ev["input_ids"]), torch.tensor(ev["labels"])
    stories = [held_out.story(task, i) for i in range(args.eval_samples)]
    answers = [s.answer for s in stories]
    majority = max(answers.count(a) for a in set(answers)) / len(answers)
    reference = f"majority answer {majority:.3f}"
    if task == "qa1":
        blind = sum(last_fact_place(s) == s.answer for s in stories) / len(stories)
        reference += f", question-blind reader {blind:.3f}"
    model = PlainGPT(len(tokenizer), max(tokens, *(w for _, _, w in stages)), args.width,
                     args.layers, args.heads)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    print(f"{task}, {args.eval_samples} held-out stories in {tokens} tokens; {reference}; plain GPT "
          f"width {args.width}, {args.layers} layers, {args.heads} heads, batch {args.batch}, "
          f"lr {args.lr}", flush=True)
    start = time.time()
    for step in range(1, args.steps + 1):
        first, sampler, window = [s for s in stages if s[0] <= step][-1]
        if args.stages is not None and step == max(first, 1):
            c = sampler.cfg
            print(f"step {step:>6}  training stories: {c.people} people, {c.facts} facts in "
                  f"{window} tokens", flush=True)
        batch = sampler.generate(range(step * args.batch, (step + 1) * args.batch), 1, window, task)
        ids, labels = torch.tensor(batch["input_ids"]), torch.tensor(batch["labels"])
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            print(f"step {step:>6}  train loss {loss.item():.3f}  held-out exact match "
                  f"{exact_match(model, ev_ids, ev_labels):.3f}  ({time.time() - start:.0f} s)",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
