"""Kernel rates at the shapes one segment of bench/step.py's CPU profile runs, against a square GEMM.

Answers "could the RMT step go faster than the backbone's own kernels?": the rate of every GEMM
shape of a segment (backbone projections over T + 2m positions, LM head over T) as a ratio to the
2048^2 GEMM measured in the same run, and one layer's causal attention (forward + backward) with
each SDPA backend the CPU has.

    python bench/kernel_rates.py             # CPU profile: d=256, SwiGLU 1024, V=8192, T=512, m=16
    python bench/kernel_rates.py --threads 1

(Not named kernels.py: transformers probes for Hugging Face's `kernels` package by import, and a
bench/kernels.py on sys.path would be found instead.)
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step import best_time, matmul_rate  # noqa: E402  (bench/step.py: the same reference rate as its MFU)
from model.conventions import positions_per_segment  # noqa: E402  (step.py put the repository on sys.path)

CPU = torch.device("cpu")


def gemm_rate(m: int, k: int, n: int, seconds: float) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    return 2 * m * k * n / best_time(lambda: a @ b, CPU, seconds)


def attention_ms(backend, heads: int, length: int, head_dim: int, seconds: float) -> float:
    q, k, v = (torch.randn(1, heads, length, head_dim, requires_grad=True) for _ in range(3))

    def step():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    with sdpa_kernel(backend):
        step()  # first call outside the timing
        return best_time(step, CPU, seconds) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--segment", type=int, default=512)
    parser.add_argument("--mem", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=1.0, help="timing window per kernel (best kept)")
    args = parser.parse_args(argv)
    for name in ("threads", "hidden", "intermediate", "vocab", "heads", "segment"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: must be a positive integer")
    if args.mem < 0:
        parser.error(f"--mem {args.mem}: must be >= 0")
    if args.seconds <= 0:
        parser.error(f"--seconds {args.seconds}: must be > 0")
    if args.hidden % args.heads:
        parser.error(f"--hidden {args.hidden} must be a multiple of --heads {args.heads}")
    d, i, v, t = args.hidden, args.intermediate, args.vocab, args.segment
    n = positions_per_segment(t, args.mem)
    reference = matmul_rate(CPU, torch.float32, args.threads, seconds=2 * args.seconds)  # sets the threads
    print(f"threads {args.threads}; 2048^2 GEMM {reference / 1e9:.1f} GFLOP/s")
    shapes = [
        ("q/k/v/o projection", n, d, d), ("fused q/k/v", n, d, 3 * d), ("gate/up", n, d, i),
        ("fused gate+up", n, d, 2 * i), ("down", n, i, d), ("LM head logits", t, d, v),
        ("LM head d(hidden)", t, v, d), ("LM head d(weight)", v, t, d),
    ]
    for name, m, k, cols in shapes:
        rate = gemm_rate(m, k, cols, args.seconds)
        print(f"  {name:<20} [{m}, {k}] x [{k}, {cols}]  {rate / 1e9:7.1f} GFLOP/s  {rate / reference:5.2f}x")
    head_dim = d // args.heads
    # Causal QK^T and AV forward, 2.5x that in backward (flash recomputes the scores).
    flops = 3.5 * 2 * 2 * args.heads * head_dim * n * (n + 1) / 2
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH)):
        ms = attention_ms(backend, args.heads, n, head_dim, args.seconds)
        print(f"  attention {name:<6} fwd+bwd, {n} positions: {ms:6.2f} ms  "
              f"({flops / ms / 1e6:6.1f} GFLOP/s, {flops / ms * 1e3 / reference:4.2f}x)")


if __name__ == "__main__":
    main()
