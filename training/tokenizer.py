"""Train a byte-level BPE tokenizer on a recipe's text sources.

    python -m training.tokenizer --config configs/RECIPE.yaml --vocab-size 32000 --out DIR

Reads data.sources of the recipe (the train split: eval-held-out documents are excluded) once,
or up to --max-documents / --max-chars, and saves a Hugging Face tokenizer folder with
<|bos|>, <|eos|>, <|pad|>: `AutoTokenizer.from_pretrained(DIR)` loads it; point data.tokenizer
at DIR to train with it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from typing import Iterator, Optional

from training.data.config import DataConfig
from training.data.sources import DocumentMixture, Holdout, SourceReader


def training_texts(cfg: DataConfig, max_documents: int, max_chars: int) -> Iterator[str]:
    """The sources' train documents in stream order, until every source was read once."""
    readers = [SourceReader(src, i, 0, 1, 0, 0, Holdout(cfg.eval_fraction, keep_eval=False))
               for i, src in enumerate(cfg.sources)]
    mixture = DocumentMixture(readers, [s.weight for s in cfg.sources], seed=0, rank=0)
    chars = 0
    for n, (text, position) in enumerate(mixture):
        if n >= max_documents or chars >= max_chars or all(r.epoch > 0 for r in position.readers):
            return
        chars += len(text)
        yield text


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training recipe (YAML)")
    parser.add_argument("--vocab-size", type=int, required=True, help="e.g. 32000")
    parser.add_argument("--out", required=True, help="output tokenizer folder")
    parser.add_argument("--max-documents", type=int, default=1_000_000)
    parser.add_argument("--max-chars", type=int, default=1_000_000_000)
    parser.add_argument("overrides", nargs="*", help="key.path=value recipe overrides")
    args = parser.parse_args(argv)

    from training.config import ConfigError, load_config
    from training.data.errors import DataSourceError
    from training.data.tokenization import train_bpe_tokenizer

    try:
        # The recipe is validated as it will be used: with the tokenizer about to be written (an
        # empty stand-in folder while --out does not exist yet, since a missing one is refused),
        # and without held-out eval batches (whether a training run has eval data is not ours).
        with tempfile.TemporaryDirectory() as stand_in:
            out = args.out if os.path.exists(args.out) else stand_in
            data = load_config(args.config, [f"data.tokenizer={out}", "eval.batches=0",
                                             *args.overrides]).data
    except ConfigError as e:
        print(e.report(), file=sys.stderr)
        return 2
    if data.source not in ("text", "babilong") or not data.sources:
        print(f"{args.config}: data.source is {data.source!r}; a tokenizer is trained on "
              f"data.sources of a text or babilong recipe (the memory tasks use the builtin one)",
              file=sys.stderr)
        return 2
    start = time.time()
    try:
        texts = training_texts(data, args.max_documents, args.max_chars)
        if data.source == "babilong":  # the stories' words too, not only the filler's
            from training.data.babilong_samples import tokenizer_texts

            texts = itertools.chain(texts, tokenizer_texts(data))
        tok = train_bpe_tokenizer(texts, args.vocab_size, args.out)
    except (DataSourceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"trained a byte-level BPE of {len(tok)} tokens in {time.time() - start:.1f}s; "
          f"saved to {args.out} (set data.tokenizer: {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
