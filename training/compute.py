"""Where and in which precision `training.evaluate` and `training.export` run: `--device`/`--dtype`.

    --device auto | cpu | cuda | cuda:N     auto: cuda (the current GPU) when one is visible, else cpu
    --dtype  auto | fp32 | bf16 | fp16      auto: bf16 on a GPU that supports it, else fp32

Both flags are resolved and checked before anything is loaded, so a bad value (or a GPU that is
not there) is reported at once and the command exits with status 2.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DEVICE_FORMS = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


class ComputeError(ValueError):
    """A --device/--dtype value that cannot be used here; the message names the flag."""


@dataclass(frozen=True)
class Compute:
    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    def describe(self) -> dict:
        return {"device": str(self.device), "dtype": self.dtype_name}


def resolve_compute(device: str = "auto", dtype: str = "auto") -> Compute:
    """The torch device and dtype `device`/`dtype` name on this machine (see module doc)."""
    match = _DEVICE.match(device.strip().lower())
    if match is None or (match.group(1) != "cuda" and match.group(2) is not None):
        raise ComputeError(f"--device {device!r}: valid values are {DEVICE_FORMS}")
    kind, index = match.group(1), match.group(2)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "auto":
        kind = "cuda" if gpus else "cpu"
    if kind == "cuda":
        if gpus == 0:
            raise ComputeError(f"--device {device}: no CUDA GPU is visible here "
                               f"(torch.cuda.is_available() is false); use --device cpu")
        if index is not None and int(index) >= gpus:
            raise ComputeError(f"--device {device}: only {gpus} GPU(s) visible (cuda:0 to cuda:{gpus - 1})")
        resolved = torch.device("cuda", int(index) if index is not None else torch.cuda.current_device())
    else:
        resolved = torch.device("cpu")

    name = dtype.strip().lower()
    if name != "auto" and name not in DTYPES:
        raise ComputeError(f"--dtype {dtype!r}: valid values are auto, {', '.join(DTYPES)}")
    bf16_ok = resolved.type == "cpu" or torch.cuda.is_bf16_supported()
    if name == "auto":
        # bf16 halves memory and time on a GPU; on a CPU fp32 keeps results as they always were.
        name = "bf16" if resolved.type == "cuda" and bf16_ok else "fp32"
    if name == "bf16" and not bf16_ok:
        raise ComputeError(f"--dtype bf16: {torch.cuda.get_device_name(resolved)} does not support bfloat16; "
                           f"use --dtype fp16 or fp32")
    if name == "fp16" and resolved.type == "cpu":
        # Half precision on a CPU is emulated (slow) and several CPU kernels lack it.
        raise ComputeError("--dtype fp16: not supported on the CPU; use fp32 or bf16 there, fp16 on a GPU")
    return Compute(resolved, DTYPES[name])


def add_compute_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help=f"{DEVICE_FORMS} (default auto: the GPU when one is visible, else the CPU)")
    parser.add_argument("--dtype", default="auto",
                        help="auto, fp32, bf16 or fp16 (default auto: bf16 on a GPU, fp32 on the CPU)")
