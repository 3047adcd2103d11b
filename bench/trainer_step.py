"""The real trainer's optimizer step against bench/step.py's variant (b), same model and batch.

bench/step.py (b) times forward + backward + AdamW of the bare model. Training runs more per
step: the data pipeline's next batch, the target count and its all-reduce, DeepSpeed's engine
(ZeRO-2 gradient buckets, or ZeRO-3 parameter gathers and partitioned gradients), the guard's
non-finite checks, the fp32 master weights of a bf16 run, the step's statistics. This script
builds `training.trainer.Trainer` on one rank (one GPU, or the CPU) with ZeRO-2 and ZeRO-3 on
bench/step.py's profile (same backbone, segment, memory, dtype; no checkpointing, fused loss, as
in (b)), one fixed curriculum of length / segment_size segments, and times `train_step()` after
warm-up, each stage and (b) in a fresh process (--in-process: all in this one), so the gap
between the benchmark and training is one number: trainer tokens/s / (b) tokens/s, measured in
the same run.

tokens/s counts micro batch x length per step. MFU: model FLOPs of the step
(`RMTConfig.training_flops` through bench/step.py's step_flops, the function the trainer's
train/mfu uses too) / step time / the GEMM rate bench/step.py measures at the start of the run.
Step time: the fastest of --steps timed steps in both (bench/step.py's statistic).
The trainer's data are the built-in memory tasks (its own synthetic corpus): a step's cost does
not depend on token values, but the pipeline's time is the trainer's and is counted.

    python bench/trainer_step.py --profile tiny --length 512 --steps 3      # CPU, seconds
    python bench/trainer_step.py --profile cpu --length 4096
    python bench/trainer_step.py --profile gpu-350m --device cuda --length 16384   # micro batch 8
    python bench/trainer_step.py --profile gpu-350m --device cuda --compile --zero-stages 2   # model.compile
    python bench/trainer_step.py --profile gpu-350m --device cuda --compile reduce-overhead --zero-stages 2
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import step as bench_step  # noqa: E402  (bench/step.py, beside this file)

PRECISION = {"float32": "fp32", "bfloat16": "bf16"}


def trainer_overrides(profile_name: str, length: int, micro_batch: int, zero_stage: int, compile_mode,
                      runs_dir: str) -> list:
    """The recipe overrides of the timed run: bench/step.py's model, (b)'s settings, one rank."""
    profile = bench_step.PROFILES[profile_name]
    backbone = bench_step.build_config(profile, length).backbone_config.to_dict()
    keep = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings")
    backbone = {k: backbone[k] for k in keep}
    segments = length // profile.segment_size
    return [
        f"run.runs_dir={runs_dir}", f"run.name=zero{zero_stage}", "run.max_steps=1000000", "run.export=false",
        f"model.backbone={json.dumps(backbone)}", f"model.segment_size={profile.segment_size}",
        f"model.num_mem_tokens={profile.num_mem_tokens}", "model.gradient_checkpointing=false",
        f"model.compile={'true' if compile_mode else 'false'}",
        f"model.compile_mode={compile_mode if compile_mode not in (None, 'default') else 'null'}",
        "data.source=memory_tasks", f"curriculum.schedule=[[0,{segments}]]",
        f"eval.memory_task_segments=[{segments}]", "eval.batches=0", "eval.every=0",
        f"batch.micro_batch_size={micro_batch}", "batch.global_batch_size=null", "batch.grad_accum_steps=1",
        f"deepspeed.zero_stage={zero_stage}", f"deepspeed.precision={PRECISION[profile.dtype]}",
        "optim.warmup_steps=0", "logging.progress_bar=false", "checkpoint.every=0",
    ]


def time_trainer(args) -> dict:
    """In this process: the Trainer on one rank, `--warmup` steps, then `--steps` timed steps. The
    process group is made here and left standing (a later call in the same process reuses it:
    DeepSpeed keeps references to the first one)."""
    import torch

    from training.config import load_config
    from training.distributed import init_distributed
    from training.trainer import Trainer

    runs_dir = tempfile.mkdtemp(prefix="trainer_step_")
    cfg = load_config(None, trainer_overrides(args.profile, args.length, args.micro_batch, args.zero_stage,
                                              args.compile, runs_dir), world_size=1)
    import torch.distributed

    dist = init_distributed() if not torch.distributed.is_initialized() else None
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if dist is None:
        from training.distributed import DistInfo

        dist = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1,
                        backend=torch.distributed.get_backend(), device=0 if args.device == "cuda" else None)
    trainer = Trainer(cfg, dist)
    try:
        trainer.setup()
        device = trainer.device
        warmup_start = time.perf_counter()
        for _ in range(args.warmup):
            metrics = trainer.train_step()
        warmup_s = time.perf_counter() - warmup_start
        times = []
        for _ in range(args.steps):
            bench_step.sync(device)
            start = time.perf_counter()
            metrics = trainer.train_step()
            bench_step.sync(device)
            times.append(time.perf_counter() - start)
        row = dict(variant=f"trainer ZeRO-{args.zero_stage}", profile=args.profile, length=args.length,
                   micro_batch=args.micro_batch, compile=args.compile, step_s=min(times),
                   step_times_s=[round(t, 4) for t in times], warmup_s=warmup_s, loss=metrics["train/loss"],
                   segments=int(metrics["train/num_segments"]))
        if device.type == "cuda":
            row["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return row
    finally:
        trainer.close()


def point_process(args, zero_stage: int):
    cmd = [sys.executable, os.path.abspath(__file__), "--point", "--zero-stage", str(zero_stage),
           "--profile", args.profile, "--length", str(args.length), "--micro-batch", str(args.micro_batch),
           "--device", args.device, "--threads", str(args.threads), "--steps", str(args.steps),
           "--warmup", str(args.warmup)] + (["--compile", args.compile] if args.compile else [])
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"trainer ZeRO-{zero_stage}: failed (rc {proc.returncode}): {proc.stderr.strip()[-1500:]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_b(args):
    """bench/step.py's (b) on the same profile, length and micro batch, in its own process (or
    in this one with --in-process)."""
    argv = ["--profile", args.profile, "--device", args.device, "--threads", str(args.threads),
            "--steps", str(args.steps), "--micro-batch", str(args.micro_batch), "--no-live-peak",
            "--lengths", str(args.length)] + (["--compile", args.compile] if args.compile else [])
    if args.in_process:
        return bench_step.run_point(bench_step.parse_args(argv + ["--point", "--variant", "b", "--length",
                                                                  str(args.length)]))
    return bench_step.run_point_process(bench_step.parse_args(argv), "b", args.length, dict(os.environ))


def trainer_point(args, zero_stage: int):
    if not args.in_process:
        return point_process(args, zero_stage)
    return time_trainer(argparse.Namespace(**{**vars(args), "zero_stage": zero_stage}))


def rated_rows(base, trainer_rows, profile, rate: float) -> list:
    """(b)'s row and the trainer's (None: a point that failed) with tokens/s, MFU and, when (b)
    ran, `vs_bench_b` = tokens/s over (b)'s."""
    rows = [row for row in [base, *trainer_rows] if row is not None]
    for row in rows:
        bench_step.add_rates(row, profile, rate)  # (b)'s FLOPs: the trainer runs the same model
        if base is not None:
            row["vs_bench_b"] = row["tokens_per_s"] / base["tokens_per_s"]
    return rows


def run_driver(args) -> list:
    import torch

    profile = bench_step.PROFILES[args.profile]
    device = torch.device(args.device)
    rate = bench_step.matmul_rate(device, getattr(torch, profile.dtype), args.threads)
    print(f"profile {args.profile} {profile}; length {args.length}; micro batch {args.micro_batch}; "
          f"compile {args.compile}; threads {args.threads}; load average {os.getloadavg()[0]:.1f}; "
          f"matmul rate {rate / 1e9:.1f} GFLOP/s", flush=True)
    base = bench_b(args)
    rows = rated_rows(base, [trainer_point(args, stage) for stage in args.zero_stages], profile, rate)
    print(f"\n{'variant':<22} {'tokens/s':>10} {'MFU':>6} {'step s':>8} {'vs (b)':>7}")
    for row in rows:
        ratio = f"{row['vs_bench_b']:6.3f}x" if "vs_bench_b" in row else "     - "
        name = "bench/step.py (b)" if row["variant"] == "b" else row["variant"]
        print(f"{name:<22} {row['tokens_per_s']:10.0f} {row['mfu'] * 100:5.1f}% {row['step_s']:8.3f} {ratio}")
    print(f"(MFU against a measured matmul rate of {rate / 1e9:.1f} GFLOP/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(profile=args.profile, device=args.device, length=args.length,
                           micro_batch=args.micro_batch, compile=args.compile, matmul_flops=rate, rows=rows),
                      f, indent=1)
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(bench_step.PROFILES), default="cpu")
    parser.add_argument("--length", type=int, default=4096, help="tokens per sample (a multiple of the segment)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="sequences per step (default: 8 on gpu-* profiles, 1 on CPU ones, as bench/step.py)")
    parser.add_argument("--zero-stages", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1), help="CPU threads (torch)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the fastest is kept)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (with --compile: the compile)")
    parser.add_argument("--compile", nargs="?", const="default", default=None, choices=bench_step.COMPILE_MODES,
                        help="model.compile (model.compile_mode: this mode) in the trainer and --compile MODE in (b) "
                        "(ZeRO-2 only: refused under ZeRO-3)")
    parser.add_argument("--in-process", action="store_true",
                        help="run (b) and every stage in this process instead of one fresh process each (faster "
                        "to start; the peak device memory is then the process's, all runs together)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--zero-stage", type=int, choices=[2, 3], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.micro_batch is None:
        args.micro_batch = bench_step.default_micro_batch(args.profile)
    segment = bench_step.PROFILES[args.profile].segment_size
    if args.length < segment or args.length % segment:
        parser.error(f"--length {args.length}: must be a positive multiple of the profile's segment size {segment} "
                     f"(the trainer's batches are whole segments)")
    if min(args.steps, args.threads, args.micro_batch) < 1 or args.warmup < 0:
        parser.error(f"--steps {args.steps}, --threads {args.threads}, --micro-batch {args.micro_batch} must be "
                     f">= 1 and --warmup {args.warmup} >= 0")
    if args.compile in ("reduce-overhead", "max-autotune") and not args.device.startswith("cuda"):
        parser.error(f"--compile {args.compile}: adds CUDA graphs, which need --device cuda; valid on "
                     f"{args.device}: default, max-autotune-no-cudagraphs")
    if args.compile and 3 in args.zero_stages:
        parser.error("--compile: model.compile is refused under ZeRO-3; pass --zero-stages 2")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: no CUDA device is available here; valid: cpu")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.point:
        print(json.dumps(time_trainer(arguments)))
    else:
        run_driver(arguments)
