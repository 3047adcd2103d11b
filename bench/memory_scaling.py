"""Peak training memory (fwd + bwd) of RMT versus the number of segments.

Each measurement runs in a fresh process and reads that process's peak resident set size, so
nothing from an earlier run is counted. With segment-level checkpointing only the memory
states (B x m x d per segment) and the inputs stay alive between forward and backward, so the
peak should be flat in the number of segments; without it, it grows linearly.

glibc keeps freed large blocks in its heap by default, so the peak then reflects the allocator,
not the model; MALLOC_MMAP_THRESHOLD_=65536 makes large blocks go back to the OS when freed.
Both settings are reported; the ratio that matters is the one with the threshold set.

    python bench/memory_scaling.py                   # 4 vs 64 segments, ratios printed
    python bench/memory_scaling.py --measure 64 --checkpointing   # one measurement (child mode)
"""

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, nargs=2, default=[4, 64], metavar=("FEW", "MANY"))
    parser.add_argument("--segment-size", type=int, default=64)
    parser.add_argument("--num-mem-tokens", type=int, default=16)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--measure", type=int, metavar="SEGMENTS", help="child mode: measure one run and print JSON")
    parser.add_argument("--checkpointing", action="store_true", help="child mode: segment checkpointing on")
    args = parser.parse_args()
    for name in ("segment_size", "num_mem_tokens", "hidden_size", "layers", "vocab_size", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.segments) < 1:
        parser.error("--segments values must be >= 1")
    return args


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(args) -> dict:
    """One fwd+bwd step in this (fresh) process; peak RSS before and after it."""
    import torch

    sys.path.insert(0, str(REPO_ROOT))
    from model import RMTConfig, RMTForCausalLM
    from model.conventions import positions_per_segment

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    heads = max(1, args.hidden_size // 64)
    config = RMTConfig(
        backbone=dict(
            model_type="llama", hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size,
            num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
            vocab_size=args.vocab_size,
            max_position_embeddings=positions_per_segment(args.segment_size, args.num_mem_tokens),
        ),
        num_mem_tokens=args.num_mem_tokens,
        segment_size=args.segment_size,
    )
    model = RMTForCausalLM(config).train()
    if args.checkpointing:
        model.activation_checkpointing_enable()
    ids = torch.randint(0, args.vocab_size, (args.batch_size, args.measure * args.segment_size))
    before = peak_rss_mib()
    model(ids, labels=ids).loss.backward()
    return {"segments": args.measure, "checkpointing": args.checkpointing,
            "peak_before_step_mib": before, "peak_mib": peak_rss_mib()}


def run_child(args, segments: int, checkpointing: bool, extra_env: dict) -> dict:
    command = [sys.executable, __file__, "--measure", str(segments)]
    for name in ("segment_size", "num_mem_tokens", "hidden_size", "layers", "vocab_size", "batch_size", "threads"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if checkpointing:
        command.append("--checkpointing")
    env = {k: v for k, v in os.environ.items() if k not in MMAP_ENV}
    env.update(extra_env)
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    args = parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args)))
        return
    few, many = args.segments
    print(f"RMT llama d={args.hidden_size} layers={args.layers} V={args.vocab_size} S={args.segment_size} "
          f"m={args.num_mem_tokens} B={args.batch_size}; peak RSS of one fwd+bwd step, fresh process each")
    # "step" = peak during the step minus the peak before it (imports, weights): what the step adds.
    print(f"{'allocator':<30} {'ckpt':<5} {few:>3} seg MiB {many:>3} seg MiB ratio {many}/{few}"
          f"  | step {few:>3} seg {many:>3} seg ratio")
    for label, extra_env in (("MALLOC_MMAP_THRESHOLD_=65536", MMAP_ENV), ("glibc default", {})):
        for checkpointing in (True, False):
            a = run_child(args, few, checkpointing, extra_env)
            b = run_child(args, many, checkpointing, extra_env)
            step_a = a["peak_mib"] - a["peak_before_step_mib"]
            step_b = b["peak_mib"] - b["peak_before_step_mib"]
            print(f"{label:<30} {'on' if checkpointing else 'off':<5} {a['peak_mib']:>11.0f} {b['peak_mib']:>11.0f} "
                  f"{b['peak_mib'] / a['peak_mib']:>8.2f}x  | {step_a:>12.0f} {step_b:>7.0f} {step_b / step_a:>6.2f}x")


if __name__ == "__main__":
    main()
