"""Tokenizers: the built-in memory-task one, any Hugging Face one, or a byte-level BPE we train."""

from __future__ import annotations

import os
from typing import Iterable

from training.data.config import BUILTIN, DataConfig
from training.data.errors import DataSourceError

BPE_SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}


def build_tokenizer(cfg: DataConfig, local_files_only: bool = False):
    """The run's tokenizer with eos, bos and pad set (bos/pad fall back to eos when absent).
    `local_files_only`: a hub name is read from the local Hugging Face cache, never the network."""
    if cfg.tokenizer == BUILTIN:
        from training.data.memory_tasks import build_tokenizer as builtin

        return builtin()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.tokenizer, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise DataSourceError(f"data.tokenizer: cannot load {cfg.tokenizer!r} ({e}); give a tokenizer "
                         f"folder (python -m training.tokenizer --out DIR) or a hub name") from e
    if tok.eos_token_id is None:
        raise DataSourceError(f"data.tokenizer: {cfg.tokenizer!r} has no EOS token, which packing "
                         f"needs between documents; use a tokenizer that defines eos_token")
    # Documents are joined with EOS; a tokenizer without BOS/PAD reuses it (GPT-2 does the same).
    if tok.bos_token_id is None:
        tok.bos_token = tok.eos_token
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str):
    """Train a byte-level BPE on `texts`, save it as a Hugging Face tokenizer folder, return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(BPE_SPECIAL_TOKENS.values())
    if vocab_size < 256 + len(specials) + 1:
        raise ValueError(f"--vocab-size {vocab_size} must exceed the 256 byte symbols plus "
                         f"{len(specials)} special tokens")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=10**9,
                                  **BPE_SPECIAL_TOKENS)
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(out_dir)
    return tok
