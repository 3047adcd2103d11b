"""Which GPUs this node's ranks use, as pure functions of the environment (no torch import).

`python -m training.devices` prints the number of GPUs visible to processes started here (what
launch/pretrain.sh counts to decide how many local ranks to start, or CPU processes when 0).

Rules (SPEC 2.6 "Devices"):

- The visible GPUs follow CUDA's reading of CUDA_VISIBLE_DEVICES (CUDA C Programming Guide,
  "CUDA Environment Variables"; torch.cuda._parse_visible_devices implements the same):
  unset: every GPU of the node; a comma-separated list of indices or of GPU-/MIG- UUIDs: those,
  in that order, up to the first invalid entry (so "", "-1", "NoDevFiles" and "0,2,-1,1" give 0,
  0, 0 and 2 GPUs); an index is read like C's strtoul ("1gpu" is 1) and one that is not a GPU of
  this node (>= the physical count) is invalid; a repeated entry makes CUDA see no GPU at all.
- A rank uses device `local_rank % device_count` of the GPUs it sees: with one GPU per task
  (Slurm `--gpus-per-task=1`, `--gpu-bind`, or a launcher that sets CUDA_VISIBLE_DEVICES per
  rank) that is device 0 whatever the local rank; with every GPU visible it is the local rank.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Mapping, Optional

UUID_PREFIXES = ("GPU-", "MIG-")
NVIDIA_SMI_TIMEOUT_S = 60.0


class DeviceError(RuntimeError):
    """No usable device mapping; the message says what to change."""


def _leading_int(entry: str) -> int:
    """C strtoul-like: the integer the entry starts with ('1gpu' -> 1), -1 when it has none."""
    s = entry.strip()
    end = 1 if s[:1] in ("+", "-") else 0
    while end < len(s) and s[end].isdigit():
        end += 1
    digits = s[:end]
    return int(digits) if digits.lstrip("+-") else -1


def visible_devices(env: Mapping[str, str], physical_count: Optional[int] = None) -> Optional[list[str]]:
    """The CUDA_VISIBLE_DEVICES entries CUDA would use, in order; None when the variable is unset
    (every GPU). `physical_count`, when known, makes indices past the node's GPUs invalid."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    entries = value.split(",")
    seen: list[str] = []
    prefix = next((p for p in UUID_PREFIXES if entries[0].strip().startswith(p)), None)
    for raw in entries:
        entry = raw.strip()
        if prefix is not None:
            if not entry.startswith(prefix):
                break
            key = entry
        else:
            index = _leading_int(entry)
            if index < 0 or (physical_count is not None and index >= physical_count):
                break
            key = str(index)
        if key in seen:
            return []  # CUDA: a repeated device makes the whole list invalid
        seen.append(key)
    return seen


def visible_gpu_count(env: Mapping[str, str], physical_count: Optional[int]) -> int:
    """GPUs a process started with `env` sees, on a node with `physical_count` GPUs (None: unknown,
    allowed only when CUDA_VISIBLE_DEVICES is set; then nothing is capped)."""
    devices = visible_devices(env, physical_count)
    if devices is None:
        if physical_count is None:
            raise ValueError("CUDA_VISIBLE_DEVICES is unset: the physical GPU count is needed")
        return physical_count
    count = len(devices)
    # GPU UUIDs cannot be checked against the node without its UUID list; more of them than the node
    # has GPUs cannot all be valid. MIG UUIDs name instances, several per GPU: not capped.
    if devices and devices[0].startswith("GPU-") and physical_count is not None:
        count = min(count, physical_count)
    return count


def physical_gpu_count(timeout_s: float = NVIDIA_SMI_TIMEOUT_S) -> int:
    """NVIDIA GPUs on this node per `nvidia-smi --list-gpus` (MIG instances are not counted): 0 when
    nvidia-smi is absent or finds no GPU / no driver. A hung driver is an error, not 'no GPU':
    training on CPU on a broken GPU node would be silently wrong."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        proc = subprocess.run([exe, "--list-gpus"], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise DeviceError(f"`nvidia-smi --list-gpus` did not answer within {timeout_s:.0f}s: the GPU "
                          "driver of this node is not responding") from None
    except OSError:
        return 0
    if proc.returncode != 0:
        return 0  # e.g. "No devices were found", or no driver loaded
    return sum(1 for line in proc.stdout.splitlines() if line.startswith("GPU "))


def local_gpu_count(env: Optional[Mapping[str, str]] = None) -> int:
    """GPUs visible to processes started from this environment on this node."""
    env = os.environ if env is None else env
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is not None and not visible_devices(env):
        return 0  # hidden: no need to ask the driver
    return visible_gpu_count(env, physical_gpu_count())


def device_index(local_rank: int, device_count: int) -> int:
    """The device a rank uses among the `device_count` it sees: local_rank % device_count."""
    if device_count < 1:
        raise DeviceError(f"local rank {local_rank} sees {device_count} GPU(s): check CUDA_VISIBLE_DEVICES "
                          f"({os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}) and the job's GPU request, or "
                          "run on CPU")
    if local_rank < 0:
        raise DeviceError(f"local rank {local_rank} must be >= 0")
    return local_rank % device_count


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m training.devices", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    try:
        print(local_gpu_count())
    except DeviceError as e:
        print(f"training.devices: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
