"""Data pipeline throughput against the tiny recipe's training-step consumption, in one run.

Measured (tokens per second, steady state after the first batch):
    text     local jsonl built from the Python standard library's own source files (real text
             every machine has offline), 32K byte-level BPE trained by training.tokenizer on it,
             streamed + window-shuffled + tokenised in the background + packed (concat)
    builtin  the built-in memory-task corpus at the tiny recipe's settings
    step     one training step of the tiny recipe's RMT (configs/tiny_cpu.yaml: forward,
             backward, AdamW) on one rank's micro batch, with one torch thread (2 ranks share
             the 2 cores of the reference machine)
Ratios: data tokens/s / step tokens/s (target >= 20) and absolute (target >= 500K tokens/s).

    python bench/data_throughput.py                 # writes bench/out/data/ (corpus, tokenizer)
    python bench/data_throughput.py --seconds 10 --retrain
"""

import argparse
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.data import DataConfig, SourceConfig, build_pipeline, build_tokenizer  # noqa: E402
from training.data.tokenization import train_bpe_tokenizer  # noqa: E402
from training.tokenizer import training_texts  # noqa: E402


def stdlib_corpus(out: Path) -> tuple[Path, int]:
    """One jsonl record per standard-library source file; returns (path, bytes of text)."""
    path = out / "stdlib.jsonl"
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.rglob("*.py") if "site-packages" not in p.parts)
    total = 0
    if not path.exists():
        with open(path, "w") as f:
            for p in files:
                text = p.read_text(encoding="utf-8", errors="replace")
                f.write(json.dumps({"text": text, "path": str(p.relative_to(lib))}) + "\n")
    with open(path) as f:
        for line in f:
            total += len(json.loads(line)["text"].encode())
    return path, total


def pipeline_rate(pipe, num_segments: int, seconds: float) -> float:
    pipe.next_batch(num_segments)  # start-up (first window, first tokenised batch) not timed
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += int(pipe.next_batch(num_segments)["attention_mask"].sum())
    return tokens / (time.perf_counter() - start)


def tokenizer_rate(tok, corpus: Path, seconds: float) -> float:
    """Bare batch encoding of the same documents in the foreground: the pipeline's ceiling."""
    encode = tok.backend_tokenizer.encode_batch_fast
    with open(corpus) as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(2000), f)]
    tokens, start, i = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        batch = texts[i % len(texts):i % len(texts) + 64]
        tokens += sum(len(e.ids) for e in encode(batch, add_special_tokens=False))
        i += 64
    return tokens / (time.perf_counter() - start)


def step_rate(recipe: Path, seconds: float) -> tuple[float, dict]:
    """Tokens/s of the tiny recipe's training step on one rank's micro batch (1 thread)."""
    from model import RMTConfig, RMTForCausalLM
    from training.config import load_config
    from training.data import SegmentCurriculum

    cfg = load_config(recipe, world_size=2)  # the recipe is written for 2 ranks
    torch.manual_seed(0)
    model = RMTForCausalLM(RMTConfig(**cfg.model.rmt_kwargs()))
    if cfg.model.gradient_checkpointing:
        model.activation_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    n_seg = SegmentCurriculum(cfg.curriculum).max_segments()
    pipe = build_pipeline(cfg.data, build_tokenizer(cfg.data), segment_size=cfg.model.segment_size,
                          micro_batch_size=cfg.batch.micro_batch_size, seed=0)
    batch = pipe.next_batch(n_seg)

    def step():
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    elapsed = time.perf_counter() - start
    settings = {"micro_batch_size": cfg.batch.micro_batch_size, "num_segments": n_seg,
                "segment_size": cfg.model.segment_size, "step_s": elapsed / steps}
    return steps * batch["input_ids"].numel() / elapsed, settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "data"))
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--segment-size", type=int, default=512, help="text pipeline")
    parser.add_argument("--num-segments", type=int, default=8, help="text pipeline")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="text pipeline")
    parser.add_argument("--recipe", default=str(REPO / "configs" / "tiny_cpu.yaml"))
    parser.add_argument("--retrain", action="store_true", help="retrain the cached tokenizer")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    corpus, n_bytes = stdlib_corpus(out)
    text_cfg = DataConfig(source="text", sources=[SourceConfig(str(corpus))],
                          tokenizer=str(out / f"bpe{args.vocab_size}"))
    if args.retrain or not (out / f"bpe{args.vocab_size}" / "tokenizer.json").exists():
        start = time.perf_counter()
        train_bpe_tokenizer(training_texts(text_cfg, 10**9, 10**12), args.vocab_size,
                            text_cfg.tokenizer)
        print(f"tokenizer: trained {args.vocab_size} BPE on {n_bytes / 1e6:.1f} MB in "
              f"{time.perf_counter() - start:.1f}s")
    tok = build_tokenizer(text_cfg)
    with build_pipeline(text_cfg, tok, segment_size=args.segment_size,
                        micro_batch_size=args.micro_batch_size, seed=0) as pipe:
        text = pipeline_rate(pipe, args.num_segments, args.seconds)
    bare = tokenizer_rate(tok, corpus, args.seconds)

    from training.config import load_config

    step, settings = step_rate(Path(args.recipe), args.seconds)
    mem_cfg = load_config(args.recipe, world_size=2).data
    with build_pipeline(mem_cfg, build_tokenizer(mem_cfg), segment_size=settings["segment_size"],
                        micro_batch_size=settings["micro_batch_size"], seed=0) as pipe:
        builtin = pipeline_rate(pipe, settings["num_segments"], args.seconds)

    print(f"corpus: {corpus} ({n_bytes / 1e6:.1f} MB of text); text pipeline: B="
          f"{args.micro_batch_size}, N={args.num_segments}, S={args.segment_size}, concat, "
          f"shuffle window {text_cfg.shuffle_buffer}")
    print(f"step (tiny recipe, B={settings['micro_batch_size']}, N={settings['num_segments']}, "
          f"S={settings['segment_size']}, 1 thread): {step:,.0f} tokens/s "
          f"({settings['step_s'] * 1e3:.1f} ms/step)")
    print(f"tokenizer alone (encode_batch_fast, foreground): {bare:,.0f} tokens/s; text pipeline "
          f"/ tokenizer alone = {text / bare:.2f}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'source':<10}{'tokens/s':>14}{'x step':>10}{'>=500K':>8}{'>=20x':>7}")
    for name, rate in (("text", text), ("builtin", builtin)):
        print(f"{name:<10}{rate:>14,.0f}{rate / step:>10.1f}{str(rate >= 5e5):>8}"
              f"{str(rate / step >= 20):>7}")


if __name__ == "__main__":
    main()
