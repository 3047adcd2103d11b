"""Does a model trained with memory noise need the noise? (docs/results.md, section 4)

Exact match on the built-in memory tasks, on the held-out samples `training.evaluate` uses, with
the memory handed from segment to segment clean (eval mode: what evaluation and generation do)
and with the model's training noise (train mode: memory_noise on the hand-overs, at the model's
memory_noise_prob; the model has no dropout in these recipes, so the noise is the only difference).
A model whose clean score is far below its noisy one learned a read-out that only works on
noisy memory: the train/eval mismatch that model.memory_noise_prob < 1 removes.

    python bench/noise_dependence.py --model runs/NAME --task reverse --segments 4,16
    python bench/noise_dependence.py --model runs/NAME --task copy --segments 4 --noise 0.5   # other level
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training import evaluate as ev  # noqa: E402
from training.data.memory_tasks import make_eval_batch  # noqa: E402


def exact_match(model, batch, batch_size: int) -> tuple[float, float]:
    """(exact match, mean loss) over the batch, one forward over each whole sample."""
    exact, loss_sum, tokens = 0, 0.0, 0
    ids, labels = batch["input_ids"], batch["labels"]
    for lo in range(0, ids.shape[0], batch_size):
        out = model(ids[lo : lo + batch_size], labels=labels[lo : lo + batch_size], return_logits=True)
        hits, _, _ = ev.answer_scores(out.logits.argmax(-1), labels[lo : lo + batch_size])
        exact += int(hits.sum())
        loss_sum += float(out.loss_sum)
        tokens += int(out.num_tokens)
    return exact / ids.shape[0], loss_sum / tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="exported folder or runs/NAME")
    p.add_argument("--task", choices=["copy", "reverse", "assoc"], required=True)
    p.add_argument("--segments", type=ev.parse_segments, default=[4], help="comma-separated numbers of segments")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--noise", type=float, help="noise level for the noisy column (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="held-out sample seed, as training.evaluate --seed")
    args = p.parse_args()

    try:
        source = ev.find_model(args.model)
    except ev.EvalError as exc:
        raise SystemExit(f"error: {exc}")
    model = ev.load_model(source).model
    config = model.config
    if args.noise is not None:
        config.memory_noise = args.noise
    if not config.memory_noise:
        raise SystemExit(f"error: --model {args.model} was trained without memory_noise; give --noise")
    print(f"{args.model} ({source.kind}), task {args.task}, memory_noise {config.memory_noise} "
          f"on a share {config.memory_noise_prob} of hand-overs, {args.samples} held-out samples")
    print(f"{'segments':>8} {'clean exact':>12} {'clean loss':>11} {'noisy exact':>12} {'noisy loss':>11}")
    torch.manual_seed(0)
    with torch.no_grad():
        for n_seg in args.segments:
            batch = make_eval_batch(ev.TASKS[args.task], n_seg, config.segment_size, args.samples, args.seed)
            clean = exact_match(model.eval(), batch, args.batch_size)
            noisy = exact_match(model.train(), batch, args.batch_size)
            print(f"{n_seg:>8} {clean[0]:>12.3f} {clean[1]:>11.4f} {noisy[0]:>12.3f} {noisy[1]:>11.4f}")


if __name__ == "__main__":
    main()
