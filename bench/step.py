"""One full training step (forward, backward, AdamW) of RMT against its baselines, side by side.

Variants (same backbone config, same tokens, same optimizer):
    a  RMT with segment checkpointing          (model.activation_checkpointing_enable(): one autograd
                                                node per segment, model/segment_recompute.py)
    t  RMT with segment checkpointing through torch.utils.checkpoint (what ZeRO-3 runs; it keeps
                                                every segment's autograd graph until backward)
    b  RMT without checkpointing
    u  RMT without checkpointing, unfused loss  (fused_segment_loss=False: F.cross_entropy per chunk)
    m  RMT with a checkpoint memory budget      (--budget-mb; only if given)
    c  the bare backbone on the same segments, no memory, a plain loop (the naive baseline)
    d  the bare backbone with full attention over the whole length

Every (variant, length) point runs in a fresh subprocess, so its peak RSS (getrusage) is its own.
The step is warmed up on two segments, then timed at full length. The live-tensor peak comes from
an extra profiled step (torch.profiler allocation events), so profiler overhead never enters the
timing. Ratios are tokens/s against variant (c) at the same length, measured in the same run.
With --interleave, all variants of a length share one process instead and their timed steps
alternate (run_interleaved): the mode for speed ratios; memory is measured per process.

Model FLOPs of one step (fwd + bwd = 3x fwd; recompute of checkpointing NOT counted; model/flops.py),
per backbone call over n positions of which s produce logits:
    dense      6 * n * layers * (2*d*(d + d_kv) + 3*d*I)      q,o: d*d; k,v: d*d_kv; SwiGLU: 3*d*I
    attention  6 * layers * n * n * d / 2 ... counted as 6 * layers * d * n*(n+1)/2 (causal: QK^T and AV)
    lm head    6 * s * d * V
RMT calls the backbone once per segment with n = T + 2m (memory tokens included), s = T;
(c) uses n = s = T per segment; (d) one call with n = s = L.
MFU = model FLOPs / step time / matmul rate, the matmul rate measured in this run (fp32 GEMM on the
same threads, or bf16 on the GPU).

--micro-batch B (default 8 on the gpu-* profiles, 1 on the CPU ones) feeds every variant the same
[B, L] batch: B copies of one sequence, so the per-sample loss does not depend on B (a step's cost
does not depend on the token values). tokens/s counts B * L tokens per step; the MFU numerator is
B times the FLOPs of one sequence.

    python bench/step.py                              # CPU profile, 4K and 16K tokens
    python bench/step.py --lengths 4096 65536 1048576 --variants a c
    python bench/step.py --profile gpu-350m --device cuda --lengths 16384     # micro batch 8
    python bench/step.py --profile gpu-1b --device cuda --lengths 65536 --micro-batch 2
    python bench/step.py --variants b c --lengths 4096 --op-profile     # where a step's time goes
    python bench/step.py --variants b c --lengths 4096 --compile        # RMT variants: model.compile's step
    python bench/step.py --profile gpu-350m --device cuda --variants b --compile reduce-overhead  # + CUDA graphs
    python bench/step.py --variants a b m c --budget-mb 1700 --lengths 16384 --steps 9 --interleave
                                                      # speed ratios: variants alternated in one process

--compile [MODE] compiles the RMT variants' segment step as the trainer's model.compile does
(training/compile.py: RMTForCausalLM.segment_hidden, dynamic=False, fullgraph; MODE: torch.compile's
mode, default "default"; reduce-overhead adds CUDA graphs); the baselines (c, d) stay eager. The
compile happens in the warm-up, whose time is reported as warmup_s, apart from the timed step.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import RMTConfig, RMTForCausalLM  # noqa: E402
from model.conventions import positions_per_segment  # noqa: E402
from model.flops import backbone_training_flops, model_flops_utilization  # noqa: E402
import allocator  # noqa: E402  (bench/allocator.py, beside this file)


@dataclass(frozen=True)
class Profile:
    hidden_size: int
    layers: int
    heads: int
    intermediate_size: int
    vocab_size: int
    segment_size: int
    num_mem_tokens: int
    dtype: str


PROFILES = {
    "cpu": Profile(256, 4, 4, 1024, 8192, 512, 16, "float32"),
    "tiny": Profile(64, 2, 2, 128, 512, 128, 4, "float32"),  # tests and bench/gpu_report.sh --dry-run
    "gpu-125m": Profile(768, 12, 12, 2048, 32000, 1024, 16, "bfloat16"),
    "gpu-350m": Profile(1024, 24, 16, 2816, 32000, 1024, 16, "bfloat16"),
    "gpu-1b": Profile(2048, 16, 32, 5632, 32000, 1024, 16, "bfloat16"),
}
# torch.compile modes (training/config: model.compile_mode; "default" = torch's default).
COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
VARIANTS = {
    "a": "RMT, segment checkpointing",
    "t": "RMT, torch.utils.checkpoint per segment",
    "b": "RMT, no checkpointing",
    "u": "RMT, no checkpointing, unfused loss",
    "m": "RMT, checkpoint memory budget",
    "c": "backbone, segment loop, no memory",
    "d": "backbone, full attention",
}


def build_config(profile: Profile, length: int, **rmt_settings) -> RMTConfig:
    backbone = dict(
        model_type="llama", hidden_size=profile.hidden_size, num_hidden_layers=profile.layers,
        num_attention_heads=profile.heads, num_key_value_heads=profile.heads,
        intermediate_size=profile.intermediate_size, vocab_size=profile.vocab_size,
        max_position_embeddings=max(length, positions_per_segment(profile.segment_size, profile.num_mem_tokens)),
        tie_word_embeddings=False,
    )
    return RMTConfig(
        backbone=backbone, num_mem_tokens=profile.num_mem_tokens, segment_size=profile.segment_size, **rmt_settings
    )


def default_micro_batch(profile_name: str) -> int:
    """8 sequences per step on the GPU profiles, 1 (the CPU benchmark's batch) on the others."""
    return 8 if profile_name.startswith("gpu-") else 1


def step_flops(profile: Profile, variant: str, length: int, micro_batch: int = 1) -> float:
    """Model FLOPs of one training step on `micro_batch` sequences (formula in the module docstring)."""
    config = build_config(profile, length)
    if variant == "d":
        return micro_batch * backbone_training_flops(config.backbone_config, length, length)
    return micro_batch * config.training_flops(length, num_mem_tokens=0 if variant == "c" else None)


def add_rates(row: dict, profile: Profile, rate: float) -> None:
    """tokens/s and MFU of a measured row, both counting its micro batch."""
    micro_batch = row.get("micro_batch", 1)
    row["tokens_per_step"] = micro_batch * row["length"]
    row["tokens_per_s"] = row["tokens_per_step"] / row["step_s"]
    row["mfu"] = model_flops_utilization(step_flops(profile, row["variant"], row["length"], micro_batch),
                                         row["step_s"], rate)


# ----- one point, in its own process ------------------------------------------------------
def make_step(variant: str, profile: Profile, length: int, device, dtype, budget_mb, compile_rmt=False):
    """Returns (step(input_ids), parameters) for one variant."""
    settings = {"checkpoint_memory_budget_mb": budget_mb} if variant == "m" else {}
    if variant == "u":
        settings["fused_segment_loss"] = False
    config = build_config(profile, length, **settings)
    torch.manual_seed(0)
    rmt = RMTForCausalLM(config).to(device=device, dtype=dtype)
    if variant == "a":
        rmt.activation_checkpointing_enable()
    if variant == "t":
        # An option the one-node recompute does not reproduce selects torch.utils.checkpoint.
        rmt.activation_checkpointing_enable({"use_reentrant": False, "determinism_check": "default"})
        assert rmt._checkpointed_step()[1]
    if compile_rmt and variant in "abmtu":
        # What the trainer's model.compile runs (one owner of the compile target and settings).
        from training.compile import compile_segment_step

        compile_segment_step(rmt, None if compile_rmt == "default" else compile_rmt)
    if variant in "abmtu":
        model = rmt

        def forward_loss(ids):
            return model(ids, labels=ids).loss
    else:
        model = rmt.backbone
        seg = profile.segment_size

        def forward_loss(ids):
            if variant == "d":
                return model(input_ids=ids, labels=ids).loss
            # The naive loop: each segment on its own, one backward over all of them.
            losses = [model(input_ids=ids[:, s : s + seg], labels=ids[:, s : s + seg]).loss
                      for s in range(0, ids.shape[1], seg)]
            return torch.stack(losses).mean()

    model.train()
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)

    def step(ids):
        start = time.perf_counter()
        loss = forward_loss(ids)
        sync(device)
        forward_done = time.perf_counter()
        loss.backward()
        sync(device)
        backward_done = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        step.phases = (forward_done - start, backward_done - forward_done, time.perf_counter() - backward_done)
        return loss.detach()

    step.rmt = rmt if variant in "abmtu" else None  # for its last_checkpointed_segments
    return step, list(model.parameters())


def live_peak_bytes(step, ids) -> int:
    """Peak bytes of tensors allocated during one step, above those alive before it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(ids)
    current = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()  # negative for a free
        peak = max(peak, current)
    return peak


def run_point(args) -> dict:
    profile = PROFILES[args.profile]
    device = torch.device(args.device)
    dtype = getattr(torch, profile.dtype)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    step, params = make_step(args.variant, profile, args.length, device, dtype, args.budget_mb, args.compile)
    ids = point_tokens(profile, args.length, device, args.micro_batch)
    warmup_start = time.perf_counter()
    warm_up(step, ids, profile)
    warmup_s = time.perf_counter() - warmup_start
    rss_before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = []
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(args.steps):
        sync(device)
        start = clock()
        loss = step(ids)
        sync(device)
        times.append(clock() - start)
    # Minor page faults: memory the allocator handed back to the OS and the step touched again
    # (the kernel zero-fills each 4 KiB page), allocator churn that does not depend on load.
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / args.steps
    rmt = getattr(step, "rmt", None)
    result = dict(
        variant=args.variant, profile=args.profile, length=args.length, micro_batch=args.micro_batch, step_s=min(times), step_times_s=[round(t, 3) for t in times], warmup_s=warmup_s, loss=float(loss),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rss_before_step_mb=rss_before_mb,
        param_mb=sum(p.numel() * p.element_size() for p in params) / 2**20,
        checkpointed_segments=rmt.last_checkpointed_segments if rmt is not None else None,
        minor_faults_per_step=faults,
    )
    if device.type == "cuda":
        result["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
    elif args.live_peak:
        result["live_step_peak_mb"] = live_peak_bytes(step, ids) / 2**20
    return result


def run_interleaved(args) -> list:
    """Every variant of one length in this process, their timed steps alternated (b, c, b, c, ...).

    Load on a shared machine drifts over seconds to minutes; alternating step by step exposes every
    variant to the same drift, so the ratios move far less than between separate processes. Each
    variant gets one full-length step first, so the timed steps reuse memory the allocator already
    holds (steady state, as in training) instead of faulting in fresh pages. Peak RSS is the
    process's, shared by all variants, so it is not reported per variant.
    """
    profile = PROFILES[args.profile]
    device = torch.device(args.device)
    dtype = getattr(torch, profile.dtype)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    ids = point_tokens(profile, args.length, device, args.micro_batch)
    steps, warmup_s = {}, {}
    for variant in args.interleave_variants:
        steps[variant], _ = make_step(variant, profile, args.length, device, dtype, args.budget_mb, args.compile)
        warmup_start = time.perf_counter()
        warm_up(steps[variant], ids, profile)
        steps[variant](ids)
        warmup_s[variant] = time.perf_counter() - warmup_start  # with --compile: the compile too
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = {variant: [] for variant in steps}
    phases = {variant: [] for variant in steps}
    losses = {}
    for _ in range(args.steps):
        for variant, step in steps.items():
            sync(device)
            start = clock()
            losses[variant] = step(ids)
            sync(device)
            times[variant].append(clock() - start)
            phases[variant].append(step.phases)
    rows = []
    for variant, step in steps.items():
        rmt = getattr(step, "rmt", None)
        rows.append(dict(
            variant=variant, profile=args.profile, length=args.length, micro_batch=args.micro_batch,
            step_s=median(times[variant]),
            step_times_s=[round(t, 3) for t in times[variant]], warmup_s=warmup_s[variant], loss=float(losses[variant]),
            # Wall-clock medians of forward (with the loss), backward and optimizer step.
            phases_s=[round(median(list(p)), 3) for p in zip(*phases[variant])],
            checkpointed_segments=rmt.last_checkpointed_segments if rmt is not None else None,
        ))
        if device.type == "cuda":
            rows[-1]["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20  # the process's, all variants
    return rows


def median(values):
    return sorted(values)[len(values) // 2]


def point_tokens(profile: Profile, length: int, device, micro_batch: int = 1) -> torch.Tensor:
    """[micro_batch, length]: copies of one random sequence (the per-sample loss does not depend on B)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, profile.vocab_size, (1, length), generator=generator)
    return ids.repeat(micro_batch, 1).to(device)


def warm_up(step, ids, profile: Profile):
    warm = ids[:, : min(ids.shape[1], 2 * profile.segment_size)]
    step(warm)
    step(warm)
    if ids.shape[1] % profile.segment_size:
        step(ids[:, -(ids.shape[1] % profile.segment_size):])  # the short last segment's shape too


def op_profile(args, rows: int = 18):
    """One profiled step per variant, in this process: the ops with the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    prof_cfg = PROFILES[args.profile]
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    for length in args.lengths:
        for variant in args.variants:
            step, _ = make_step(variant, prof_cfg, length, device, getattr(torch, prof_cfg.dtype), args.budget_mb,
                                args.compile)
            ids = point_tokens(prof_cfg, length, device, args.micro_batch)
            warm_up(step, ids, prof_cfg)
            # One full-length step first: otherwise the profiled step is the first to reach full
            # length and its element-wise ops pay the kernel's zero-fill of every fresh page.
            step(ids)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(ids)
            events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
            total = sum(e.self_cpu_time_total for e in events)
            print(f"\nvariant {variant} L={length}: self CPU time {total / 1e6:.2f} s (profiled step; "
                  f"load average {os.getloadavg()[0]:.1f})")
            print(f"{'self ms':>9} {'share':>6} {'calls':>6}  op")
            for event in events[:rows]:
                print(f"{event.self_cpu_time_total / 1e3:9.1f} {event.self_cpu_time_total / total:6.1%} "
                      f"{event.count:6d}  {event.key[:70]}")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device, seconds: float) -> float:
    """Fastest of repeated calls of fn() within `seconds` (at least one call)."""
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while best == float("inf") or time.perf_counter() < deadline:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_rate(device, dtype, threads: int, size: int = 2048, seconds: float = 2.0) -> float:
    """FLOP/s of a square GEMM (the best of repeated timings) on the benchmark's threads."""
    if device.type == "cpu":
        torch.set_num_threads(threads)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size**3 / best_time(lambda: a @ b, device, seconds)


# ----- the driver -------------------------------------------------------------------------
def run_driver(args):
    profile = PROFILES[args.profile]
    device = torch.device(args.device)
    rate = matmul_rate(device, getattr(torch, profile.dtype), args.threads)
    try:
        env = allocator.process_env(args.allocator, args.malloc_conf)
    except ValueError as error:
        raise SystemExit(f"--allocator {args.allocator}: {error}")
    chosen = {k: v for k, v in env.items() if allocator.ALLOCATOR_VARIABLE.match(k)}
    print(f"profile {args.profile} {profile}; micro batch {args.micro_batch}; allocator {args.allocator} {chosen or '(glibc defaults)'}; threads {args.threads}; clock {args.clock}; "
          f"load average {os.getloadavg()[0]:.1f}; matmul rate {rate / 1e9:.1f} GFLOP/s", flush=True)
    rows = []
    for length in args.lengths:
        variants = [v for v in args.variants if not (v == "d" and length > args.max_full_attention)]
        if args.interleave:
            rows += interleaved_rows(args, variants, length, env, profile, rate)
            continue
        best = {}
        # Round-robin repeats, fastest kept: on a shared machine load comes and goes, and
        # alternating variants gives each the same chance of a quiet moment.
        for _ in range(args.repeats):
            for variant in variants:
                row = run_point_process(args, variant, length, env)
                if row is not None:
                    print(f"  point {variant} L={length}: {row['step_s']:.2f} s, peak RSS {row['peak_rss_mb']:.0f} MiB, "
                          f"{row['minor_faults_per_step']:.0f} minor page faults per step", flush=True)
                if row is not None and (variant not in best or row["step_s"] < best[variant]["step_s"]):
                    best[variant] = row
        for variant in variants:
            if variant in best:
                row = best[variant]
                add_rates(row, profile, rate)
                rows.append(row)
                print(format_row(row, None), flush=True)
    print_table(rows, rate)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(profile=args.profile, device=args.device, micro_batch=args.micro_batch, compile=args.compile,
                           allocator=args.allocator, matmul_flops=rate, rows=rows), f, indent=1)


def interleaved_rows(args, variants, length: int, env: dict, profile: Profile, rate: float) -> list:
    points = run_point_process(args, ",".join(variants), length, env)
    if points is None:
        return []
    times = {p["variant"]: p["step_times_s"] for p in points}
    for row in points:
        add_rates(row, profile, rate)
        # Paired per round: the steps of one round ran seconds apart, under the same load.
        for base in ("c", "b"):
            if base in times:
                row[f"paired_vs_{base}"] = median([t / v for t, v in zip(times[base], row["step_times_s"])])
        forward, backward, optimizer = row["phases_s"]
        vs_b = f"; {row['paired_vs_b']:.3f}x (b), paired" if "paired_vs_b" in row else ""
        print(f"  {row['variant']} L={length}: step times {row['step_times_s']} s; median forward {forward} s, "
              f"backward {backward} s, optimizer {optimizer} s{vs_b}", flush=True)
        print(format_row(row, None), flush=True)
    return points


def run_point_process(args, variant: str, length: int, env: dict):
    """One point in a fresh process; `variant` may be a comma-separated list with --interleave."""
    cmd = [sys.executable, os.path.abspath(__file__), "--point", "--variant", variant, "--length", str(length),
           "--profile", args.profile, "--device", args.device, "--threads", str(args.threads), "--steps", str(args.steps),
           "--micro-batch", str(args.micro_batch)]
    if args.interleave:
        cmd.append("--interleave")
    if args.budget_mb is not None:
        cmd += ["--budget-mb", str(args.budget_mb)]
    if not args.live_peak:
        cmd.append("--no-live-peak")
    if args.compile:
        cmd += ["--compile", args.compile]
    cmd += ["--clock", args.clock]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"{variant} L={length}: failed (rc {proc.returncode}): {proc.stderr.strip()[-400:]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_row(row, baseline) -> str:
    if "paired_vs_c" in row:
        ratio = f"{row['paired_vs_c']:5.2f}x"  # interleaved: the median of per-round ratios
    else:
        ratio = f"{row['tokens_per_s'] / baseline:5.2f}x" if baseline else "   - "
    live = f"{row['live_step_peak_mb']:8.0f}" if "live_step_peak_mb" in row else "       -"
    rss = f"{row['peak_rss_mb']:9.0f}" if "peak_rss_mb" in row else "        -"
    ckpt = row.get("checkpointed_segments")
    ckpt = f"{ckpt}/{-(-row['length'] // PROFILES[row['profile']].segment_size)}" if ckpt is not None else "-"
    return (f"{row['length']:>8} {row['variant']:>2} {row['tokens_per_s']:9.0f} {ratio:>6} {row['mfu'] * 100:5.1f}% "
            f"{rss} {live} {ckpt:>9} {row['loss']:.4f} {row.get('warmup_s', float('nan')):8.1f}")


def print_table(rows, rate):
    print(f"\n{'length':>8} {'v':>2} {'tokens/s':>9} {'vs c':>6} {'MFU':>6} {'RSS MiB':>9} {'live MiB':>8} {'ckpt segs':>9} loss   warmup_s")
    for row in rows:
        base = [r for r in rows if r["length"] == row["length"] and r["variant"] == "c"]
        print(format_row(row, base[0]["tokens_per_s"] if base else None))
    print(f"(MFU against a measured matmul rate of {rate / 1e9:.1f} GFLOP/s; variants: "
          + "; ".join(f"{k} = {v}" for k, v in VARIANTS.items()) + ")")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["a", "b", "c", "d"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="sequences per step, every variant alike (default: 8 on gpu-* profiles, 1 on CPU ones)")
    parser.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1), help="CPU threads (torch)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per point (the fastest is kept)")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per point, round-robin (fastest kept)")
    parser.add_argument("--budget-mb", type=float, default=None, help="checkpoint_memory_budget_mb of variant m")
    parser.add_argument("--max-full-attention", type=int, default=65536,
                        help="skip variant d above this length (its cost is quadratic)")
    parser.add_argument("--allocator", choices=list(allocator.CHOICES), default="launcher",
                        help="the allocator launch/pretrain.sh configures for CPU runs, glibc's defaults, or jemalloc")
    parser.add_argument("--malloc-conf", default=None, help="with --allocator jemalloc: its MALLOC_CONF")
    parser.add_argument("--no-live-peak", dest="live_peak", action="store_false",
                        help="skip the extra profiled step that measures the live-tensor peak")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="step time as wall time, or as the process's CPU time (with --threads 1 this "
                        "barely depends on other load; tokens/s are then per CPU-second)")
    parser.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                        help="RMT variants run their segment step through torch.compile as model.compile does, "
                        "in this mode (default: 'default'); compile time: warmup_s")
    parser.add_argument("--op-profile", action="store_true",
                        help="instead of timing, print each variant's ops by self CPU time (one profiled step)")
    parser.add_argument("--interleave", action="store_true",
                        help="run all variants of a length in one process, their --steps timed steps alternated "
                        "(after one full-length step each); step time = median, ratios vs c (and b) = medians of "
                        "per-round ratios; no per-variant RSS or live peak")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.point:
        args.interleave_variants = (args.variant or "").split(",")
        if not set(args.interleave_variants) <= set(VARIANTS) or (len(args.interleave_variants) > 1 and not args.interleave):
            parser.error(f"--variant {args.variant}: valid: one of {', '.join(sorted(VARIANTS))} "
                         f"(a comma-separated list with --interleave)")
    if any(length < 1 for length in args.lengths):
        parser.error(f"--lengths {args.lengths}: every length must be a positive integer")
    if args.micro_batch is None:
        args.micro_batch = default_micro_batch(args.profile)
    if min(args.steps, args.threads, args.repeats, args.micro_batch) < 1:
        parser.error(f"--steps {args.steps}, --threads {args.threads}, --repeats {args.repeats}, "
                     f"--micro-batch {args.micro_batch}: each must be >= 1")
    if "m" in args.variants and args.budget_mb is None:
        parser.error("variant m needs --budget-mb (the checkpoint memory budget in MiB)")
    if args.compile in ("reduce-overhead", "max-autotune") and not args.device.startswith("cuda"):
        parser.error(f"--compile {args.compile}: adds CUDA graphs, which need --device cuda; valid on "
                     f"{args.device}: default, max-autotune-no-cudagraphs")
    if args.clock == "cpu" and args.device != "cpu":
        parser.error(f"--clock cpu measures host CPU time; with --device {args.device} use --clock wall")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available here; valid: cpu")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.point and arguments.interleave:
        print(json.dumps(run_interleaved(arguments)))
    elif arguments.point:
        print(json.dumps(run_point(arguments)))
    elif arguments.op_profile:
        op_profile(arguments)
    else:
        run_driver(arguments)
