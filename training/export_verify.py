"""Verify an exported folder: reload it the way a hub user would and compare with the checkpoint.

The folder is reloaded by training/hub_reload_check.py in `python -I` from a scratch directory
(the repository is not importable there, so the model class comes from the folder's own remote
code); its logits on a probe must match the checkpoint model's within RELOAD_ATOL and its greedy
continuation (across a segment boundary) must be the same tokens. Both sides run on the device
and in the dtype of the model being exported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# Max |logit difference| allowed, by the exported dtype. The two sides run the same code with the
# same weights on the same device, so any difference comes from the two ways of building the model
# (kernel choice, buffers): within a few fp32 roundings, and within a couple of units in the last
# place of a logit of size ~10 in bf16 (8 bits of mantissa: 1/16 there) or fp16 (11 bits: 1/128).
RELOAD_ATOL = {"fp32": 1e-5, "bf16": 1.25e-1, "fp16": 1.6e-2}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
PROBE_SEED = 1234
RELOAD_CHECK_SCRIPT = Path(__file__).with_name("hub_reload_check.py")


class ExportVerificationError(Exception):
    """The exported folder does not reproduce the checkpoint: the export was discarded."""


def make_probe(config, generator_seed: int = PROBE_SEED) -> dict[str, torch.Tensor]:
    """Two and a half segments (memory is carried twice, the last segment is short), one row padded."""
    gen = torch.Generator().manual_seed(generator_seed)
    vocab = config.vocab_size if hasattr(config, "vocab_size") and config.vocab_size else config.backbone["vocab_size"]
    length = 2 * config.segment_size + config.segment_size // 2
    input_ids = torch.randint(0, vocab, (2, length), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    prompt_ids = input_ids[:1, : config.segment_size + 3].clone()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "prompt_ids": prompt_ids}


def verify_in_fresh_process(model, folder: Path) -> tuple[float, str]:
    """Reload `folder` in `python -I` (no repository on sys.path) on the model's device in its
    dtype; compare logits and greedy tokens."""
    from safetensors.torch import load_file, save_file

    probe = make_probe(model.config)
    device, dtype = model.device, DTYPE_NAMES[next(model.parameters()).dtype]
    atol = RELOAD_ATOL[dtype]
    max_new_tokens = model.config.segment_size + 2  # crosses one segment boundary while decoding
    with torch.no_grad():
        reference = model(input_ids=probe["input_ids"].to(device),
                          attention_mask=probe["attention_mask"].to(device)).logits.float().cpu()
        prompt = probe["prompt_ids"].to(device)
        reference_gen = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
        ).cpu()
    with tempfile.TemporaryDirectory(prefix="rmt-reload-") as scratch:
        probe_path = Path(scratch) / "probe.safetensors"
        result_path = Path(scratch) / "reloaded.safetensors"
        save_file({k: v.contiguous() for k, v in probe.items()}, str(probe_path))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["HF_HUB_OFFLINE"] = "1"
        cmd = [sys.executable, "-I", str(RELOAD_CHECK_SCRIPT), "--model", str(folder.resolve()),
               "--probe", str(probe_path), "--max-new-tokens", str(max_new_tokens), "--out", str(result_path),
               "--device", str(device), "--dtype", dtype]
        proc = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ExportVerificationError(f"reloading {folder} with transformers failed:\n{proc.stderr[-4000:]}")
        reloaded = load_file(str(result_path))
        with open(str(result_path) + ".json") as f:
            report = json.load(f)
    if reloaded["logits"].shape != reference.shape:
        raise ExportVerificationError(f"reloaded logits shape {tuple(reloaded['logits'].shape)} != {tuple(reference.shape)}")
    # Padded positions have no defined logits; compare the real tokens only.
    valid = probe["attention_mask"].bool()
    diff = (reloaded["logits"] - reference)[valid].abs().max().item()
    if not diff <= atol:
        raise ExportVerificationError(f"reloaded logits differ from the checkpoint's by {diff:.3e} > {atol} ({dtype})")
    if not torch.equal(reloaded["generated"], reference_gen):
        raise ExportVerificationError(
            f"reloaded greedy generation {reloaded['generated'].tolist()} != checkpoint's {reference_gen.tolist()}"
        )
    if not report["model_class"].startswith("transformers_modules."):
        raise ExportVerificationError(f"reloaded class {report['model_class']} did not come from the folder's code")
    return diff, report["model_class"]
