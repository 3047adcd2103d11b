"""Reload an exported model folder the way a hub user would, and record what it computes.

The export runs this file with `python -I` from a scratch directory, so it sees transformers
but not this repository: the model class must come from the folder's own remote code. It
imports only the standard library, torch, safetensors and transformers for that reason.

Writes one safetensors file with the probe logits and a greedy continuation, plus a JSON
sidecar saying which module the model class was loaded from.
"""

import argparse
import importlib.util
import json
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

REPOSITORY_PACKAGES = ("model", "training")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="exported folder")
    parser.add_argument("--probe", required=True, help="safetensors: input_ids, attention_mask, prompt_ids")
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--out", required=True, help="safetensors file to write")
    parser.add_argument("--device", default="cpu", help="torch device to run on (cpu, cuda:0, ...)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype to load the weights in")
    args = parser.parse_args(argv)

    importable = [name for name in REPOSITORY_PACKAGES if importlib.util.find_spec(name) is not None]
    if importable:
        print(f"reload check is not isolated: {importable} importable from {sys.path}", file=sys.stderr)
        return 3

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=DTYPES[args.dtype])
    model.to(args.device).eval()
    probe = {k: v.to(args.device) for k, v in load_file(args.probe).items()}
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        generated = model.generate(
            probe["prompt_ids"],
            attention_mask=torch.ones_like(probe["prompt_ids"]),
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.max_new_tokens,
            do_sample=False,
        )
    save_file({"logits": logits.float().cpu().contiguous(), "generated": generated.cpu().contiguous()}, args.out)
    sample_text = "Recurrent memory."
    report = {
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "tokenizer_class": type(tokenizer).__name__,
        "tokenizer_round_trip": tokenizer.decode(tokenizer(sample_text)["input_ids"], skip_special_tokens=True),
        "sample_text": sample_text,
    }
    with open(args.out + ".json", "w") as f:
        json.dump(report, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
