"""What a checkpointed segment leaves alive between forward and backward, besides tensors.

PyTorch's non-reentrant checkpoint keeps each segment's autograd graph - every node, with a small
holder in place of each saved tensor - until backward. That costs a fixed amount per segment,
independent of the hidden size, and made a checkpointed step's resident memory grow with the
number of segments (docs/benchmarks.md, "1M tokens"). The model now recomputes segments from one
autograd node each (model/segment_recompute.py) and uses torch.utils.checkpoint only where a
checkpoint option the node does not reproduce asks for it. This script
counts the retained nodes and the resident memory added per segment by one checkpointed forward,
at two segment counts, for a given backbone size, with either recompute. Backward is not run: the
point is what stays alive at its start.

    python bench/segment_graph.py                              # d=64 and d=256, 200 and 2000 segments
    python bench/segment_graph.py --hidden 256 --segments 100 1000 --allocator glibc --recompute torch
    python bench/segment_graph.py --hidden 256 --zero3         # inside a 1-rank DeepSpeed ZeRO-3 engine

Children run under the launcher's CPU allocator by default (as bench/step.py): under glibc's
defaults the figure also holds heap fragmentation, which grows with the hidden size.
"""

import argparse
import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# activation_checkpointing_enable() kwargs per recompute: any option beyond use_reentrant and
# preserve_rng_state (here determinism_check at its default value) selects torch.utils.checkpoint.
RECOMPUTE_KWARGS = {
    "node": {"use_reentrant": False},
    "torch": {"use_reentrant": False, "determinism_check": "default"},
}


def zero3_engine(config, recompute: str):
    """A 1-rank DeepSpeed ZeRO-3 engine (gloo, CPU) around the model, every parameter partitioned."""
    import deepspeed
    from model import RMTForCausalLM

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = RMTForCausalLM(config)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=RECOMPUTE_KWARGS[recompute])
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, model_parameters=model.parameters())
    return engine


def measure(hidden: int, segments: int, layers: int, segment_size: int, mem: int, recompute: str,
            zero3: bool) -> dict:
    import torch

    sys.path.insert(0, REPO_ROOT)
    from model import RMTConfig, RMTForCausalLM
    from model.checkpoint_budget import SavedBytesCounter
    from model.conventions import positions_per_segment
    from model.segments import shifted_targets

    torch.set_num_threads(1)
    config = RMTConfig(
        backbone=dict(model_type="llama", vocab_size=64, hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=positions_per_segment(segment_size, mem)),
        num_mem_tokens=mem, segment_size=segment_size)
    if zero3:
        model = zero3_engine(config, recompute)
        rmt = model.module
    else:
        model = rmt = RMTForCausalLM(config).train()
        rmt.activation_checkpointing_enable(activation_checkpointing_kwargs=RECOMPUTE_KWARGS[recompute])
    assert rmt._checkpointed_step()[1] == (recompute == "torch")
    ids = torch.randint(0, 64, (1, segment_size * segments))
    counter = SavedBytesCounter()  # tensors one segment saves for backward (what the budget counts)
    with counter.counting():
        one = ids[:, :segment_size]
        # A fresh memory: under ZeRO-3 rmt.memory is gathered only inside the model's forward.
        rmt._segment_step(torch.zeros(1, mem, hidden), one, None, shifted_targets(one, None), None, None)
    before = resident_mib()
    loss = model(ids, labels=ids).loss
    after = resident_mib()
    result = {"nodes": graph_nodes(loss), "added_mib": after - before, "saved_tensors": counter.saved_tensors}
    return result, loss


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def graph_nodes(tensor) -> int:
    """Autograd nodes reachable from tensor.grad_fn: what stays alive until backward."""
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 256])
    p.add_argument("--segments", type=int, nargs=2, default=[200, 2000], metavar=("FEW", "MANY"))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--segment-size", type=int, default=16)
    p.add_argument("--mem", type=int, default=4)
    p.add_argument("--allocator", choices=["glibc", "launcher"], default="launcher")
    p.add_argument("--recompute", choices=["node", "torch", "both"], default="both",
                   help="node: the model's one-node recompute; torch: torch.utils.checkpoint (the path before it)")
    p.add_argument("--zero3", action="store_true",
                   help="run the model in a 1-rank DeepSpeed ZeRO-3 engine, every parameter partitioned")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        hidden, segments, recompute = int(args.child[0]), int(args.child[1]), args.child[2]
        result, graph = measure(hidden, segments, args.layers, args.segment_size, args.mem, recompute, args.zero3)
        print(json.dumps(result), flush=True)
        # Freeing a graph of thousands of checkpointed segments without running backward
        # overflows the stack (a crash, not a result): leave with the graph still alive.
        os._exit(0)
    import allocator  # bench/allocator.py: the launcher's allocator settings

    env = allocator.process_env(args.allocator)
    if args.zero3:
        env["DS_ACCELERATOR"] = "cpu"
    where = " in a 1-rank ZeRO-3 engine" if args.zero3 else ""
    print(f"checkpointed forward{where}, {args.layers} layers, segment {args.segment_size}, {args.mem} memory "
          f"tokens, allocator {args.allocator}, each point in a fresh process")
    print(f"{'recompute':>9} {'d':>5} {'segments':>9} {'graph nodes':>12} {'per segment':>12} {'saved tensors':>14} "
          f"{'RSS added MiB':>14}  KiB per extra segment (per saved tensor)")
    for recompute in ("node", "torch") if args.recompute == "both" else (args.recompute,):
        for hidden in args.hidden:
            points = []
            for n in args.segments:
                if args.zero3:
                    env["MASTER_PORT"] = str(free_port())
                out = subprocess.run([sys.executable, __file__, "--child", str(hidden), str(n), recompute,
                                      "--layers", str(args.layers), "--segment-size", str(args.segment_size),
                                      "--mem", str(args.mem)] + (["--zero3"] if args.zero3 else []),
                                     check=True, capture_output=True, text=True, env=env).stdout
                points.append((n, json.loads(out.strip().splitlines()[-1])))
            (n0, p0), (n1, p1) = points
            slope = (p1["added_mib"] - p0["added_mib"]) * 1024 / (n1 - n0)
            for n, pt in points:
                print(f"{recompute:>9} {hidden:>5} {n:>9} {pt['nodes']:>12} {pt['nodes'] / n:>12.1f} "
                      f"{pt['saved_tensors']:>14} {pt['added_mib']:>14.0f}  "
                      + (f"{slope:.0f} ({slope / pt['saved_tensors']:.2f})" if n == n1 else ""))

if __name__ == "__main__":
    main()
