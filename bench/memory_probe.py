"""Standalone training probes of the built-in memory tasks (docs/results.md, "what was tried").

One process, no DeepSpeed, plain AdamW: quick answers to "does this recipe / memory update learn the
task, and does it hold at more segments than it was trained on?" before spending a full trainer
run on it. The memory-update variants exist only here, as experiments; the shipped model is
`base`:

    base          memory = the write tokens' final hidden state (after the backbone's final norm)
    prenorm       the hidden state before the final norm, RMS-normalised without a learned scale
    prenorm_raw   the hidden state before the final norm, as is
    gated         M_t = g * H_t + (1 - g) * M_{t-1}, g = sigmoid(w . H_t + b) per memory slot
    noise         base with the model's memory_noise = --noise (Gaussian noise of that times the
                  memory's RMS between segments, training only), optionally off until --noise-from
                  and ramped up linearly over --noise-ramp steps

    python bench/memory_probe.py --task copy --schedule 0=2,300=3,600=4 --steps 900 \\
        --eval-segments 4,8,16,64 --variant prenorm_raw
    python bench/memory_probe.py --task associative_retrieval --span 4 --segment-size 24 \\
        --batch 128 --lr 2e-3 --beta2 0.999 --schedule 0=1,300=2 --steps 900 --eval-segments 2
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import RMTConfig, RMTForCausalLM  # noqa: E402
from training.data import memory_tasks as mt  # noqa: E402
from training.data.config import MemoryTaskConfig  # noqa: E402

VARIANTS = ("base", "prenorm", "prenorm_raw", "gated", "noise")


def parse_schedule(text: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(v) for v in item.split("=")) for item in text.split(",")]
    except ValueError:
        pairs = []
    if not pairs or pairs[0][0] != 0 or any(len(p) != 2 or p[1] < 1 for p in pairs):
        raise SystemExit(f"--schedule {text!r}: expected STEP=SEGMENTS,... starting at step 0, e.g. 0=2,300=3")
    return pairs


def build_model(args) -> RMTForCausalLM:
    torch.manual_seed(args.seed)
    config = RMTConfig(
        backbone=dict(model_type="llama", vocab_size=64, hidden_size=args.hidden,  # as configs/tiny_cpu.yaml
                      intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False),
        num_mem_tokens=args.mem, segment_size=args.segment_size)
    model = RMTForCausalLM(config)
    if args.variant not in ("base", "noise"):
        patch_memory_update(model, args.variant)
    return model


def patch_memory_update(model: RMTForCausalLM, variant: str) -> None:
    """Replace how the next memory is formed, on this instance only."""
    m = model.config.num_mem_tokens
    norm = model.decoder.norm
    captured = {}
    norm.register_forward_hook(lambda module, inputs, output: captured.__setitem__("pre", inputs[0]))
    if variant == "gated":
        model.gate = torch.nn.Linear(model.config.hidden_size, 1)
        torch.nn.init.zeros_(model.gate.weight)
        torch.nn.init.zeros_(model.gate.bias)
    step = model._segment_step

    def segment_step(memory, *args, **kwargs):
        loss_sum, num_tokens, new_memory, logits = step(memory, *args, **kwargs)
        pre = captured["pre"][:, -m:]
        if variant == "prenorm":
            new_memory = pre * torch.rsqrt(pre.pow(2).mean(-1, keepdim=True) + 1e-6)
        elif variant == "prenorm_raw":
            new_memory = pre
        else:
            gate = torch.sigmoid(model.gate(new_memory))  # [B, M, 1]
            new_memory = gate * new_memory + (1 - gate) * memory.to(new_memory.dtype)
        return loss_sum, num_tokens, new_memory, logits

    model._segment_step = segment_step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["copy", "reverse", "associative_retrieval"], default="copy")
    p.add_argument("--variant", choices=VARIANTS, default="base")
    p.add_argument("--noise", type=float, default=0.3, help="variant noise: relative noise level")
    p.add_argument("--noise-from", type=int, default=0, help="variant noise: no noise before this step")
    p.add_argument("--noise-ramp", type=int, default=0, help="variant noise: steps to ramp up to --noise")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--mem", type=int, default=8)
    p.add_argument("--segment-size", type=int, default=16)
    p.add_argument("--span", type=int, default=6)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--schedule", default="0=2,300=3,600=4", help="STEP=SEGMENTS,... (curriculum)")
    p.add_argument("--eval-segments", default="4,8,16,64")
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: only at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    schedule = parse_schedule(args.schedule)
    eval_segments = [int(v) for v in args.eval_segments.split(",")]
    torch.set_num_threads(args.threads)

    model = build_model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, args.beta2))
    tasks = MemoryTaskConfig(tasks=[args.task], span_length=args.span)

    def evaluate(step):
        scores = []
        model.eval()
        with torch.no_grad():
            for n in eval_segments:
                batch = mt.make_eval_batch(args.task, n, args.segment_size, 128, seed=0, cfg=tasks)
                logits = model(batch["input_ids"], labels=batch["labels"], return_logits=True).logits
                scores.append(f"{n}: {mt.answer_accuracy(logits, batch['labels'])[1]:.3f}")
        model.train()
        print(f"step {step}: exact match by segments {{{', '.join(scores)}}} ({time.time() - start:.0f} s)",
              flush=True)

    start = time.time()
    for step in range(args.steps):
        n_segments = [n for s, n in schedule if step >= s][-1]
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 50)
        if args.variant == "noise":
            ramp = 1.0 if step >= args.noise_from + args.noise_ramp else (step - args.noise_from + 1) / (args.noise_ramp + 1)
            model.config.memory_noise = args.noise * max(0.0, ramp)
        arrays = mt.generate(np.arange(step * args.batch, (step + 1) * args.batch), n_segments,
                             args.segment_size, tasks, seed=1)
        out = model(torch.from_numpy(arrays["input_ids"]), labels=torch.from_numpy(arrays["labels"]))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            evaluate(step + 1)
    evaluate(args.steps)


if __name__ == "__main__":
    main()
