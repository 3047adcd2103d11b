"""Collectives and step time of the real trainer under ZeRO-2 and ZeRO-3 on 2 CPU ranks (issue 6).

Under ZeRO-3 the same backbone blocks run once per segment. This measures whether DeepSpeed's
parameter coordinator keeps them gathered across segments or fetches them again for each use,
and whether its prefetch trace stays valid from step to step.

Each (model, segments, stage) point is one run of `python -m training.pretrain` on 2 ranks
(torch.distributed.run), through this file's worker mode, which before anything else wraps
torch.distributed's collectives with counters and, once DeepSpeed is imported, counts the ZeRO-3
coordinator's parameter gathers and trace invalidations. Nothing in training/ knows about it.
Per training step (`Trainer.train_step`, forward + backward + optimizer step) it records:

    all_gather      calls and MB of all_gather / all_gather_into_tensor / _single / _base
    reduce_scatter  calls and MB of reduce_scatter / reduce_scatter_tensor / _single / _base
    all_reduce      calls and MB of all_reduce (the trainer issues 2 tiny ones per step itself;
                    ZeRO-2 reduces gradients with it here)
    param_gathers   ZeRO-3 only: parameters the coordinator gathered (one all-gather call can
                    carry many parameters: a module's own plus its prefetch bucket)
    invalidations   ZeRO-3 only: prefetch-trace invalidations (DeepSpeed's "Invalidate trace
                    cache" message is also enabled and counted in the ranks' output)

What the recurrence needs: a partitioned (non-persistent) parameter is used N times in forward
and N times in backward per step (N segments; 3N with segment checkpointing, which recomputes the
forward in backward). Kept resident between uses it needs 1 gather per step; released after each
use, up to 2N (3N). Parameters below stage3_param_persistence_threshold are "persistent": never
released, re-gathered after each optimizer update (DeepSpeed 0.19 issues one all-gather per
persistent tensor there). The table prints the partitioned parameters P and param_gathers / P
("gathers/param": 1 = resident across all segments).

The first --warmup steps (trace: step 1 none, step 2 recorded, from step 3 prefetching) are
excluded; counts are means over the remaining steps (rank 0), step time is the median of
train/step_time_s from the run's metrics.jsonl.

    python bench/zero_gathers.py                                   # tiny + mid models, N = 4, 8
    python bench/zero_gathers.py --models mid --segments 8 --steps 12
    python bench/zero_gathers.py --models mid --variants z3 z3:stage3_max_reuse_distance=0
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import allocator  # noqa: E402  (bench/allocator.py)
OUT_DIR = REPO_ROOT / "bench" / "out" / "zero_gathers"

# torch.distributed entry points -> the kind reported. Inner calls made by an outer wrapped one
# (e.g. all_gather_into_tensor -> all_gather_single in torch 2.13) are not counted twice.
COLLECTIVE_KINDS = {
    "all_gather": "all_gather", "all_gather_into_tensor": "all_gather",
    "all_gather_single": "all_gather", "_all_gather_base": "all_gather",
    "all_gather_coalesced": "all_gather",
    "reduce_scatter": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_single": "reduce_scatter", "_reduce_scatter_base": "reduce_scatter",
    "all_reduce": "all_reduce", "all_reduce_coalesced": "all_reduce",
    "broadcast": "broadcast", "reduce": "reduce",
    "all_to_all": "all_to_all", "all_to_all_single": "all_to_all",
}

MODELS = {
    # configs/tiny_cpu.yaml as is: every matrix is below the persistence threshold (100K).
    "tiny": [],
    # MLP matrices (256 x 1024 = 262K) are partitioned, attention (65K) stays persistent.
    "mid": ["model.backbone.hidden_size=256", "model.backbone.intermediate_size=1024",
            "model.backbone.num_hidden_layers=4", "model.backbone.num_attention_heads=4",
            "model.backbone.num_key_value_heads=4"],
}


# ------------------------------------------------------------------------------- counting hooks
class CollectiveCounter:
    """Calls and bytes per collective kind, counted at the torch.distributed API."""

    def __init__(self):
        self.calls: Counter = Counter()
        self.bytes: Counter = Counter()
        self._depth = threading.local()

    def snapshot(self) -> dict:
        return {"calls": dict(self.calls), "bytes": dict(self.bytes)}


def _tensor_bytes(value) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def install_collective_counter(counter: CollectiveCounter) -> list:
    """Wrap the collectives of torch.distributed (and distributed_c10d, which DeepSpeed also
    calls directly) so each outermost call adds 1 call and the bytes of its largest tensor
    argument (the gathered output, the reduce-scatter input). Must run before DeepSpeed is
    imported: its comm backend keeps references to the functions it finds at start-up.
    Returns (module, name, replaced function) triples for `uninstall_collective_counter`."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    modules = [dist, c10d]
    originals = {}
    installed = []
    for name, kind in COLLECTIVE_KINDS.items():
        for mod in modules:
            fn = getattr(mod, name, None)
            if fn is None:
                continue
            original = originals.setdefault(name, getattr(fn, "__wrapped_collective__", fn))
            wrapper = _counting_wrapper(counter, kind, original)
            installed.append((mod, name, fn))
            setattr(mod, name, wrapper)
    return installed


def uninstall_collective_counter(installed: list) -> None:
    for mod, name, fn in reversed(installed):
        setattr(mod, name, fn)


def _counting_wrapper(counter: CollectiveCounter, kind: str, original):
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        depth = getattr(counter._depth, "value", 0)
        if depth == 0:
            counter.calls[kind] += 1
            counter.bytes[kind] += max([_tensor_bytes(a) for a in (*args, *kwargs.values())] + [0])
        counter._depth.value = depth + 1
        try:
            return original(*args, **kwargs)
        finally:
            counter._depth.value = depth

    wrapper.__wrapped_collective__ = original
    return wrapper


class Zero3Counter:
    """Parameters the ZeRO-3 coordinator gathers, and its trace invalidations."""

    def __init__(self):
        self.param_gathers = 0
        self.param_gather_numel = 0
        self.invalidations = 0

    def install(self) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        from deepspeed.runtime.zero.partitioned_param_coordinator import \
            PartitionedParameterCoordinator as Coordinator

        gather_name = "_PartitionedParameterCoordinator__all_gather_params_"
        gather, invalidate = getattr(Coordinator, gather_name), Coordinator._invalidate_trace

        def counted_gather(coordinator, params, *args, **kwargs):
            todo = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
            self.param_gathers += len(todo)
            self.param_gather_numel += sum(p.ds_numel for p in todo)
            return gather(coordinator, params, *args, **kwargs)

        def counted_invalidate(coordinator, *args, **kwargs):
            self.invalidations += 1
            return invalidate(coordinator, *args, **kwargs)

        setattr(Coordinator, gather_name, counted_gather)
        Coordinator._invalidate_trace = counted_invalidate

    def snapshot(self) -> dict:
        return {"param_gathers": self.param_gathers, "param_gather_numel": self.param_gather_numel,
                "invalidations": self.invalidations}


def _delta(after: dict, before: dict) -> dict:
    out = {}
    for key, value in after.items():
        if isinstance(value, dict):
            out[key] = _delta(value, before.get(key, {}))
        else:
            out[key] = value - before.get(key, 0)
    return out


# ------------------------------------------------------------------------------- worker (one rank)
def worker(out_path: Path, pretrain_args: list[str]) -> int:
    collectives = CollectiveCounter()
    install_collective_counter(collectives)
    zero3 = Zero3Counter()
    zero3.install()
    from training import pretrain, trainer as trainer_lib

    steps: list[dict] = []
    model_info: dict = {}
    train_step, setup = trainer_lib.Trainer.train_step, trainer_lib.Trainer.setup

    def counted_step(self):
        before = {"collectives": collectives.snapshot(), "zero3": zero3.snapshot()}
        metrics = train_step(self)
        steps.append(_delta({"collectives": collectives.snapshot(), "zero3": zero3.snapshot()},
                            before))
        return metrics

    def described_setup(self):
        setup(self)
        params = list(self.engine.module.parameters())
        partitioned = [p for p in params if hasattr(p, "ds_persist") and not p.ds_persist]
        model_info.update(n_params=len(params),
                          numel=sum(getattr(p, "ds_numel", p.numel()) for p in params),
                          partitioned=len(partitioned),
                          partitioned_numel=sum(p.ds_numel for p in partitioned),
                          zero_config=self.ds_config.get("zero_optimization", {}))

    trainer_lib.Trainer.train_step = counted_step
    trainer_lib.Trainer.setup = described_setup
    status = pretrain.main(pretrain_args)
    rank = int(os.environ.get("RANK", "0"))
    out_path.with_name(f"{out_path.name}.rank{rank}").write_text(
        json.dumps({"status": status, "model": model_info, "steps": steps}))
    return status


# ------------------------------------------------------------------------------- driver
def parse_variant(spec: str) -> tuple[int, list[str]]:
    """'z2' | 'z3' | 'z3:key=value,key=value' (zero_optimization keys) -> (stage, extras)."""
    name, _, extras = spec.partition(":")
    if name not in ("z2", "z3") or (extras and name != "z3"):
        raise ValueError(f"variant {spec!r}: valid values are z2, z3 or z3:KEY=VALUE[,KEY=VALUE]")
    pairs = [kv for kv in extras.split(",") if kv]
    for kv in pairs:
        if "=" not in kv:
            raise ValueError(f"variant {spec!r}: {kv!r} is not KEY=VALUE")
    return int(name[1]), pairs


def run_point(model: str, segments: int, variant: str, steps: int, model_extra: list[str],
              keep_output: bool) -> dict:
    stage, zero_extra = parse_variant(variant)
    label = f"{model}_n{segments}_{re.sub(r'[^A-Za-z0-9]+', '_', variant)}"
    run_dir = OUT_DIR / label
    shutil.rmtree(run_dir, ignore_errors=True)
    result_path = OUT_DIR / f"{label}.json"
    overrides = [
        f"run.runs_dir={OUT_DIR}", f"run.name={label}", f"run.max_steps={steps}",
        "run.export=false", f"curriculum.schedule=[[0,{segments}]]",
        f"deepspeed.zero_stage={stage}", "eval.every=0", "eval.batches=0",
        "eval.memory_task_samples=2", f"eval.memory_task_segments=[{segments}]",
        "checkpoint.every=0", "checkpoint.resume=never", "logging.every=1",
        "logging.tensorboard=false", "logging.progress_bar=false", *MODELS[model], *model_extra,
    ]
    if stage == 3:
        overrides.append("deepspeed.extra.zero_optimization.log_trace_cache_warnings=true")
        overrides += [f"deepspeed.extra.zero_optimization.{kv}" for kv in zero_extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), "--worker", str(result_path), "--",
           "--config", "configs/tiny_cpu.yaml", *overrides]
    # The ranks run on the allocator launch/pretrain.sh gives CPU runs, as a user's would.
    env = allocator.process_env("launcher", base=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT)))
    started = time.time()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.stderr.write(output[-6000:])
        raise SystemExit(f"{label}: the run failed (exit {proc.returncode})")
    ranks = [json.loads(Path(f"{result_path}.rank{r}").read_text()) for r in range(2)]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_times = {int(m["step"]): m["train/step_time_s"] for m in metrics
                  if "train/step_time_s" in m}
    losses = {int(m["step"]): m["train/loss"] for m in metrics if "train/loss" in m}
    if not keep_output:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"label": label, "model": model, "segments": segments, "stage": stage,
            "variant": variant, "ranks": ranks, "step_times": step_times, "losses": losses,
            "wall_s": time.time() - started, "invalidate_messages": invalidate_messages(output)}


def invalidate_messages(output: str) -> list[int]:
    """DeepSpeed's own invalidation messages in the ranks' output (their module-step ids)."""
    return [int(m) for m in re.findall(r"Invalidate trace cache @ step (\d+)", output)]


def summarize(point: dict, warmup: int) -> dict:
    rank0 = point["ranks"][0]
    measured = rank0["steps"][warmup:]
    if not measured:
        raise SystemExit(f"{point['label']}: no step after the {warmup} warm-up steps "
                         f"(--steps must be > --warmup)")

    def mean(get):
        return statistics.fmean(get(s) for s in measured)

    calls = lambda kind: mean(lambda s: s["collectives"]["calls"].get(kind, 0))  # noqa: E731
    mbytes = lambda kind: mean(lambda s: s["collectives"]["bytes"].get(kind, 0)) / 2**20  # noqa: E731
    times = [t for step, t in point["step_times"].items() if step > warmup]
    model = rank0["model"]
    param_gathers = mean(lambda s: s["zero3"]["param_gathers"])
    warm_invalidations = [s["zero3"]["invalidations"] for s in rank0["steps"][:warmup]]
    return {
        "label": point["label"], "model": point["model"], "segments": point["segments"],
        "stage": point["stage"], "variant": point["variant"], "steps_measured": len(measured),
        "all_gather_calls": calls("all_gather"), "all_gather_mb": mbytes("all_gather"),
        "reduce_scatter_calls": calls("reduce_scatter"),
        "reduce_scatter_mb": mbytes("reduce_scatter"),
        "all_reduce_calls": calls("all_reduce"), "all_reduce_mb": mbytes("all_reduce"),
        "other_calls": mean(lambda s: sum(v for k, v in s["collectives"]["calls"].items()
                                          if k not in ("all_gather", "reduce_scatter", "all_reduce"))),
        "param_gathers": param_gathers,
        "partitioned_params": model.get("partitioned", 0), "n_params": model["n_params"],
        "numel": model["numel"], "partitioned_numel": model.get("partitioned_numel", 0),
        "gathers_per_param": param_gathers / model["partitioned"] if model.get("partitioned")
        else 0.0,
        "invalidations_warmup": sum(warm_invalidations),
        "invalidations_after": sum(s["zero3"]["invalidations"] for s in measured),
        "invalidate_messages": len(point["invalidate_messages"]),
        "median_step_s": statistics.median(times),
        "counts_constant": all(s == measured[0] for s in measured),
        "ranks_agree": all(r["steps"][warmup:] == measured for r in point["ranks"]),
        "losses": point["losses"],
    }


def print_table(rows: list[dict]) -> None:
    header = ("| model | N | variant | AG calls/step | AG MB/step | RS calls/step | RS MB/step | "
              "AR calls/step | AR MB/step | params gathered/step | partitioned P | gathers/param [2N] | "
              "invalidations (warm-up / after) | max rel. loss diff vs z2 | median step s | Z3/Z2 |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    base = {(r["model"], r["segments"]): r for r in rows if r["variant"] == "z2"}
    for r in rows:
        ref = base.get((r["model"], r["segments"]))
        z2 = ref["median_step_s"] if ref else None
        loss_diff = (f"{max_relative_loss_diff(r['losses'], ref['losses']):.1e} | "
                     if ref and r is not ref else " | ")
        ratio = f"{r['median_step_s'] / z2:.2f}" if r["stage"] == 3 and z2 else ""
        z3 = r["stage"] == 3
        print(f"| {r['model']} | {r['segments']} | {r['variant']} | {r['all_gather_calls']:.1f} | "
              f"{r['all_gather_mb']:.2f} | {r['reduce_scatter_calls']:.1f} | "
              f"{r['reduce_scatter_mb']:.2f} | {r['all_reduce_calls']:.1f} | {r['all_reduce_mb']:.2f} | "
              f"{r['param_gathers']:.1f} | {r['partitioned_params'] if z3 else ''} | "
              + (f"{r['gathers_per_param']:.2f} [{2 * r['segments']}] | " if z3 else " | ")
              + (f"{r['invalidations_warmup']} / {r['invalidations_after']} | " if z3 else " | ")
              + loss_diff + f"{r['median_step_s'] * 1000:.0f} ms | {ratio} |")


def max_relative_loss_diff(losses: dict, reference: dict) -> float:
    """Same recipe and seed: every stage must train the same trajectory (fp32, up to reduction
    order), so a variant that changes the maths shows here, not only in its speed."""
    steps = sorted(set(losses) & set(reference))
    if not steps:
        return math.nan
    return max(abs(losses[s] - reference[s]) / abs(reference[s]) for s in steps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "mid"], choices=sorted(MODELS))
    parser.add_argument("--segments", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--variants", nargs="+", default=["z2", "z3"],
                        help="z2, z3, or z3:KEY=VALUE[,KEY=VALUE] with zero_optimization keys, "
                             "e.g. z3:stage3_param_persistence_threshold=0")
    parser.add_argument("--model-extra", nargs="*", default=[], metavar="KEY=VALUE",
                        help="recipe overrides for every run, e.g. model.gradient_checkpointing=true")
    parser.add_argument("--steps", type=int, default=14, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=4, help="first steps left out of the numbers")
    parser.add_argument("--keep-output", action="store_true", help="keep the run folders")
    parser.add_argument("--json", type=Path, help="also write the summary rows here")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} must be > --warmup {args.warmup}")
    if any(n < 1 for n in args.segments):
        parser.error(f"--segments {args.segments}: each must be >= 1")
    for spec in args.variants:
        try:
            parse_variant(spec)
        except ValueError as e:
            parser.error(str(e))

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models:
        for segments in args.segments:
            for variant in args.variants:  # interleaved: load drifts hit every variant alike
                point = run_point(model, segments, variant, args.steps, args.model_extra,
                                  args.keep_output)
                row = summarize(point, args.warmup)
                rows.append(row)
                print(f"# {row['label']}: {row['steps_measured']} steps measured, "
                      f"{row['numel'] / 1e6:.2f}M params ({row['n_params']} tensors, "
                      f"{row['partitioned_params']} partitioned = "
                      f"{row['partitioned_numel'] / 1e6:.2f}M), other collectives/step: "
                      f"{row['other_calls']:.1f}, counts constant per step: "
                      f"{row['counts_constant']}, same on both ranks: {row['ranks_agree']}, DeepSpeed 'Invalidate trace cache' messages: "
                      f"{row['invalidate_messages']}, run {point['wall_s']:.0f} s", flush=True)
    print(f"# load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(REPO_ROOT))
        rest = sys.argv[3:]
        sys.exit(worker(Path(sys.argv[2]), rest[1:] if rest[:1] == ["--"] else rest))
    sys.exit(main())
