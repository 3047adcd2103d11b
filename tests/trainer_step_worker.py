"""One process, one rank: a real Trainer (DeepSpeed engine, tiny model) built in-process, for the
checks of tests/test_trainer_sync.py and tests/test_offload_cpu_adam.py. No tests here.

  python tests/trainer_step_worker.py MODE OUT_JSON RUNS_DIR [OVERRIDE ...]

MODE
  host_reads   ZeRO-3, then ZeRO-2: run 3 steps of 2 micro-steps while recording every host read of a tensor
               (item, cpu, tolist, bool, float, ...) made inside Trainer._micro_steps, with the
               code line that made it.
  cuda_sync    run 3 steps on the GPU with torch.cuda.set_sync_debug_mode around
               Trainer._micro_steps of the last 2: every host synchronisation there, with the
               code line that made it.
  offload      ZeRO-Offload: 5 steps with DeepSpeed's CPU Adam, then a step poisoned through
               tests/faults.py with the weights and Adam state around it; the same 5 steps with
               torch's AdamW (the fallback, forced by making the CPU Adam unavailable).
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# A tiny model; 1 rank, micro-batch 4, global 8: two micro-steps per step, so the micro-step
# boundary (engine.step() between them) is inside what is measured.
TINY = ["run.export=false", "logging.progress_bar=false", "optim.warmup_steps=2",
        "optim.lr=3e-3", "eval.every=0", "eval.batches=0", "curriculum.schedule=[[0,2]]",
        "model.backbone.hidden_size=32", "model.backbone.intermediate_size=64",
        "model.backbone.num_attention_heads=2", "model.backbone.num_key_value_heads=2",
        "batch.micro_batch_size=4", "batch.global_batch_size=8"]

# Tensor methods that read a value on the host: on a GPU each waits for the device.
READ_METHODS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__",
                "__index__", "nonzero")
READ_FUNCTIONS = ("equal", "nonzero", "is_nonzero")


class HostReads:
    """Records host reads of tensors while `active`, each with the innermost code line outside
    torch that made it (training/, model/ or deepspeed/ ...). Patches torch.Tensor's methods:
    a TorchFunctionMode would miss the gradient hooks, which autograd runs without the mode."""

    def __init__(self):
        self.active = False
        self.sites: list[str] = []
        self._saved: list[tuple] = []

    def _site(self) -> str:
        frame = sys._getframe(2)
        torch_dir = str(Path(torch.__file__).parent)
        while frame is not None and (frame.f_code.co_filename.startswith(torch_dir)
                                     or frame.f_code.co_filename == __file__):
            frame = frame.f_back
        if frame is None:
            return "?"
        return f"{self._relative(frame.f_code.co_filename)}:{frame.f_lineno}"

    @staticmethod
    def _relative(name: str) -> str:
        """training/..., model/... for this repository; deepspeed/..., transformers/... else."""
        return os.path.relpath(name, REPO) if name.startswith(str(REPO)) else \
            name.split("site-packages/")[-1]

    def _wrap(self, owner, name: str) -> None:
        original = getattr(owner, name)
        had_own = name in vars(owner)

        def recorded(*args, **kwargs):
            if self.active:
                self.sites.append(f"{name} at {self._site()}")
            return original(*args, **kwargs)

        self._saved.append((owner, name, original, had_own))
        setattr(owner, name, recorded)

    def install(self) -> "HostReads":
        for name in READ_METHODS:
            self._wrap(torch.Tensor, name)
        for name in READ_FUNCTIONS:
            self._wrap(torch, name)
        return self

    def uninstall(self) -> None:
        for owner, name, original, had_own in reversed(self._saved):
            if had_own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
        self._saved.clear()


@contextmanager
def recorded_host_reads():
    """The host reads made inside the block (a list of "method at file:line"), patched out after."""
    reads = HostReads().install()
    reads.active = True
    try:
        yield reads.sites
    finally:
        reads.active = False
        reads.uninstall()


def build_trainer(runs: Path, name: str, overrides: list[str]):
    from training.config import load_config
    from training.trainer import Trainer

    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml",
                      [f"run.runs_dir={runs}", f"run.name={name}", *TINY, *overrides],
                      world_size=1)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, DIST)
    trainer.setup()
    return trainer


def host_reads(runs: Path, overrides: list[str]) -> dict:
    """Per ZeRO stage (3, then 2; one process for both, to pay the start-up once): per step, the
    host reads inside its micro-steps."""
    reads = HostReads().install()
    result = {}
    for stage in (3, 2):
        trainer = build_trainer(runs, f"host_reads_z{stage}",
                                [*overrides, f"deepspeed.zero_stage={stage}"])
        inner = trainer._micro_steps

        def measured(*args, inner=inner):
            reads.active = True
            try:
                return inner(*args)
            finally:
                reads.active = False

        trainer._micro_steps = measured
        per_step, losses = [], []
        for _ in range(3):
            losses.append(trainer.train_step()["train/loss"])
            per_step.append(reads.sites)
            reads.sites = []
        result[str(stage)] = {"sites": per_step, "losses": losses}
        trainer.close()
    return result


def cuda_sync(runs: Path, overrides: list[str]) -> dict:
    """torch's sync debug mode over the micro-steps of steps 2 and 3 (step 1 warms up: ZeRO-3
    records its prefetch trace there), and the host reads recorded as in host_reads. Mode "warn",
    not "error": every synchronisation is kept with the code line that made it, so the test
    tells the trainer's own from the libraries' instead of stopping at the first. A warning from
    a gradient hook surfaces at the end of backward (autograd's threads hand their warnings to
    the caller), so the hooks' reads are caught by HostReads, which records them where they are."""
    import traceback
    import warnings

    reads = HostReads().install()
    trainer = build_trainer(runs, "cuda_sync", overrides)
    assert trainer.device.type == "cuda", trainer.device
    inner, syncs = trainer._micro_steps, []
    torch_dir = str(Path(torch.__file__).parent)

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frame = next((f for f in reversed(traceback.extract_stack()[:-1])
                      if not (f.filename.startswith(torch_dir) or f.filename == __file__
                              or f.filename.endswith("warnings.py"))), None)
        syncs.append(f"sync at {HostReads._relative(frame.filename)}:{frame.lineno}"
                     if frame else "sync at ?")

    def measured(*args):
        torch.cuda.synchronize()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            reads.active = True
            try:
                return inner(*args)
            finally:
                reads.active = False
                torch.cuda.set_sync_debug_mode("default")

    losses = [trainer.train_step()["train/loss"]]
    trainer._micro_steps = measured
    losses += [trainer.train_step()["train/loss"] for _ in range(2)]
    return {"syncs": syncs, "reads": reads.sites, "losses": losses}


def _adam_state(trainer) -> dict:
    """The host copy of every fp32 master partition and its Adam state under ZeRO-Offload."""
    zero = trainer.engine.optimizer
    basic = zero.optimizer
    out = {}
    for i, flat in enumerate(zero.fp32_partitioned_groups_flat):
        out[f"master_{i}"] = flat.detach().clone()
        for key, value in basic.state.get(flat, {}).items():
            out[f"{key}_{i}"] = value.detach().clone() if torch.is_tensor(value) \
                else torch.tensor(float(value))
    for j, p in enumerate(trainer.engine.module.parameters()):
        out[f"param_{j}"] = p.ds_tensor.detach().clone()  # this rank's partition of the weight
    return out


def _kernel_differences() -> dict:
    """Largest weight difference after 5 updates of the same parameters and gradients (two
    groups, with and without weight decay) between torch's AdamW and: DeepSpeed's CPU Adam as the
    trainer builds it, and DeepSpeed's CPU Adam in Adam-with-L2 mode (a real algorithmic
    difference, for scale)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from training.cpu_adam import GuardedCPUAdam
    from training.guard import GuardedAdamW

    def weights_after(make):
        torch.manual_seed(0)
        decayed, plain = torch.nn.Parameter(torch.randn(1000)), torch.nn.Parameter(torch.randn(10))
        opt = make([{"params": [decayed], "weight_decay": 0.1},
                    {"params": [plain], "weight_decay": 0.0}], lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            decayed.grad = torch.randn(1000, generator=gen) * 1e-3
            plain.grad = torch.randn(10, generator=gen)
            opt.step()
        return torch.cat([decayed.detach(), plain.detach()])

    reference = weights_after(GuardedAdamW)
    return {"cpu_adam": (weights_after(GuardedCPUAdam) - reference).abs().max().item(),
            "adam_l2": (weights_after(lambda groups, **kw: DeepSpeedCPUAdam(
                groups, adamw_mode=False, **kw)) - reference).abs().max().item()}


def offload(runs: Path, overrides: list[str]) -> dict:
    """5 steps with DeepSpeed's CPU Adam, then step index 5 poisoned on this rank through
    tests/faults.py (a NaN loss, so every gradient is NaN), step 6 vetoed with finite gradients,
    step 7 normal, with the weights and Adam state around each; and the same 5 steps with torch's AdamW, the fallback, forced by
    making the CPU Adam unavailable as on a machine where its op cannot be built."""
    import training.cpu_adam
    from tests import faults

    os.environ.update(faults.env(nonfinite="loss:0:5"))
    trainer = build_trainer(runs, "cpu_adam", overrides)
    result = {"cpu_adam_optimizer": type(trainer.engine.optimizer.optimizer).__name__,
              "cpu_adam": [trainer.train_step()["train/loss"] for _ in range(5)]}
    # Step 5: the NaN loss. DeepSpeed's ZeRO-3 also checks the gradients and skips such a step
    # itself, so step 6 isolates the veto: finite loss and gradients, but the guard's verdict is
    # forced to "non-finite", as when another rank's loss alone was NaN; only the optimizer's
    # veto keeps the update out. Step 7 is a normal step: the snapshot does see an update.
    import training.trainer as trainer_lib
    from training.guard import NONFINITE, StepVerdict

    real_classify = trainer_lib.classify_step
    trainer_lib.classify_step = lambda **kw: (StepVerdict(NONFINITE, False) if trainer.step == 6
                                             else real_classify(**kw))
    states, metrics = [_adam_state(trainer)], []
    for _ in range(3):
        metrics.append(trainer.train_step())
        states.append(_adam_state(trainer))
    trainer_lib.classify_step = real_classify

    def changed(a, b):
        return sorted(k for k in a if not torch.equal(a[k], b[k]))

    result["veto"] = {
        "keys": sorted(states[0]), "skipped_steps": trainer.skipped_steps,
        "losses": [m["train/loss"] for m in metrics],
        "changed": [changed(a, b) for a, b in zip(states, states[1:])],
        "state_steps": [[float(st[k]) for k in sorted(st) if k.startswith("step_")]
                        for st in states],
    }

    result["kernel"] = _kernel_differences()

    def unavailable(*args, **kwargs):
        raise RuntimeError("cpu_adam op disabled by the test")

    training.cpu_adam.GuardedCPUAdam = unavailable
    trainer = build_trainer(runs, "torch_adamw", overrides)
    result["torch_optimizer"] = type(trainer.engine.optimizer.optimizer).__name__
    result["torch_adamw"] = [trainer.train_step()["train/loss"] for _ in range(5)]
    return result


if __name__ == "__main__":
    mode, out_json, runs_dir, *extra = sys.argv[1:]
    from training.distributed import init_distributed

    DIST = init_distributed(set_threads=False)
    torch.set_num_threads(1)  # 2 cores shared with the rest of the suite
    result = {"host_reads": host_reads, "cuda_sync": cuda_sync,
              "offload": offload}[mode](Path(runs_dir), extra)
    Path(out_json).write_text(json.dumps(result))
    # Leave without interpreter teardown: gloo/DeepSpeed thread teardown has aborted finished
    # helpers before (tests/test_export.py); the result is written.
    os._exit(0)
