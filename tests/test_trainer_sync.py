"""Issue 19: no host synchronisation inside a micro-step. On a GPU every host read of a device
tensor (.item(), .cpu(), bool(), float(), ...) waits for all the work queued before it; one per
gradient hook and three per micro-batch held a one-GPU step at 3.8 steps/s. The trainer keeps the
non-finite flags, loss and per-segment sums and the target-count check on the device until the
step's one all-reduce (training/micro_steps.py, training/step_stats.StepSums).

On CPU the "device" is the host, so the test pins the structure: every host read made inside
Trainer._micro_steps of a real one-rank DeepSpeed step (ZeRO-3 and ZeRO-2) is recorded with its
code line. Once warm there is none at all, from the trainer, the model, transformers (whose mask
builder read once per segment forward until the segment step brought its own masks:
model/segment_attention.py) or DeepSpeed; on the first step, only DeepSpeed ZeRO-3's check of its
prefetch trace.
Where a GPU is present, the same runs under torch.cuda.set_sync_debug_mode.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_step_worker import recorded_host_reads

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "trainer_step_worker.py"
OURS = ("training/", "tests/", "model/", "transformers/")  # the trainer, the model, the backbone's code
ZERO3_TRACE_CHECK = "deepspeed/runtime/zero/utils.py"


def tiny_rmt():
    from model import RMTConfig, RMTForCausalLM
    from test_model_common import BACKBONES

    torch.manual_seed(0)
    return RMTForCausalLM(RMTConfig(backbone=BACKBONES["llama"], num_mem_tokens=3, segment_size=5,
                                    loss_from_segment=1)).train()


def host_batch(mask_rows: list[list[int]]) -> dict:
    """A batch as the pipeline hands it over (host tensors, labels -100 where padded)."""
    from test_model_common import random_tokens

    mask = torch.tensor(mask_rows)
    ids = random_tokens(*mask.shape).masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize("rows", [
    [[1] * 13, [1] * 13],                          # all real: the unmasked path
    [[1] * 13, [1] * 9 + [0] * 4],                 # right padding, as document packing pads
    [[1] * 13, [0] * 6 + [1] * 7],                 # left padding: a pad (in segment 1) predicting a real token
], ids=["all_real", "right_padded", "left_padded"])
def test_prepare_reads_the_host_batch_so_the_model_reads_nothing(rows):
    """The trainer's micro-batch arguments (training/micro_steps.prepare): what the model would
    read back from the device, whether the mask hides anything and the target count, is read from
    the host batch. With them, a forward and backward makes no host read in the model or
    transformers, and the model counts the targets the trainer counted (the trainer's check of
    that sits on the device until the step's all-reduce, so a miscount here would stop the run)."""
    from training.micro_steps import prepare

    batch = host_batch(rows)
    args, count = prepare(batch, torch.device("cpu"), segment_size=5, loss_from_segment=1)
    assert args["attention_mask_padded"] == (min(map(min, rows)) == 0)
    model = tiny_rmt()
    with recorded_host_reads() as sites:
        out = model(**args)
        out.loss.backward()
    assert [site for site in sites if _file(site).startswith(("model/", "transformers/"))] == [], sites
    assert int(out.num_tokens) == count


def run_worker(mode: str, tmp_path: Path, *overrides: str) -> dict:
    out = tmp_path / f"{mode}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RMT_PLUGINS"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, str(WORKER), mode, str(out), str(tmp_path / "runs"),
                           *overrides], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and out.exists(), (proc.stdout + proc.stderr)[-4000:]
    return {**json.loads(out.read_text()), "console": proc.stdout + proc.stderr}


def _file(site: str) -> str:
    return site.split(" at ", 1)[1]


@pytest.fixture(scope="module")
def host_reads(tmp_path_factory):
    return run_worker("host_reads", tmp_path_factory.mktemp("host_reads"))


@pytest.mark.parametrize("stage", [3, 2])
def test_a_micro_step_reads_nothing_back_from_the_device(stage, host_reads):
    result = host_reads[str(stage)]
    steps = result["sites"]  # per step: the host reads inside its micro-steps
    assert len(steps) == 3 and all(map(lambda v: 2 < v < 6, result["losses"])), result["losses"]
    # None from the model either: under ZeRO-2 the fused LM-head loss's backward used to compare
    # its incoming gradients on the host once per backward (model/segment_loss.py _may_differ).
    ours = [site for step in steps for site in step if _file(site).startswith(OURS)]
    assert ours == [], ours
    assert steps[1] == steps[2] == [], steps[1:]  # steady state: nothing at all
    # The first step: ZeRO-3 also checks its prefetch trace.
    assert [s for s in steps[0] if not _file(s).startswith(ZERO3_TRACE_CHECK)] == [], sorted(set(steps[0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_micro_step_does_not_synchronise_the_gpu(tmp_path):
    """One rank on the GPU, ZeRO-0 and ZeRO-3, bf16: the micro-steps of steps 2-3 under
    torch.cuda.set_sync_debug_mode, and the host reads as above; none may come from the trainer,
    the model or transformers. DeepSpeed's, which its CUDA code paths may make where the CPU ones
    do not, are printed."""
    for stage in (0, 3):
        result = run_worker("cuda_sync", tmp_path / f"z{stage}", f"deepspeed.zero_stage={stage}",
                            "deepspeed.precision=bf16")
        assert all(math.isfinite(v) for v in result["losses"]), result["losses"]
        found = result["syncs"] + result["reads"]
        assert [s for s in found if _file(s).startswith(OURS)] == [], found
        print(f"ZeRO-{stage}: by libraries inside the micro-steps:", sorted(set(found)))
