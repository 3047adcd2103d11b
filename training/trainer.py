"""The DeepSpeed training loop: exact token-weighted loss, non-finite guard, eval, checkpoints.

One optimizer step (`Trainer.train_step`):
  1. fetch the step's micro-batches (the curriculum gives the segment count from the step, so
     every rank runs the same number of segments);
  2. all-reduce the number of valid targets T of the whole global batch, on the device (counted
     on the host from the labels before they are copied; the scale below stays a device tensor);
  3. backward each micro-batch's `loss_sum * accum * world / T`: DeepSpeed divides by `accum`
     and averages over ranks, so the gradient is exactly that of the global token mean. The
     micro-steps never read the device from the host (`_micro_steps`): loss sums, per-segment
     sums, the model's target counts and the non-finite flags accumulate on the device;
  4. all-reduce the step's statistics as one vector (training/step_stats.py) and read it back to
     the host once: loss sums, per-segment sums, non-finite flags (loss; any gradient, seen by
     tensor hooks on every parameter), target counts and a stop-request flag;
  5. set the learning rate, then `engine.step()`; a non-finite step leaves the weights and the
     optimizer state untouched (the optimizer's veto, training/guard.py; fp16 overflows:
     DeepSpeed's loss scaler) and is counted; K in a row abort the run (training/guard.py says
     what counts, per precision). Under ZeRO-Offload the optimizer is DeepSpeed's CPU Adam
     (training/optim.build_optimizer).

Code outside the stack acts on a run only through the hook points of training/hooks.py.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Optional

import torch

from training import checkpoint as ckpt_lib, micro_steps
from training import checkpoint_select, elastic
from training.answer_eval import ANSWER_SOURCES, AnswerEvalSets
from training.config import TrainConfig
from training.distributed import DistInfo, barrier
from training.guard import GradientFlag, classify_step
from training.hooks import Hooks
from training.model_init import build_model
from training.monitor import Monitor, memory_gb, peak_flops_per_device, segment_scalars
from training.optim import build_optimizer, lr_at
from training.run_dir import CLIENT_STATE_FILE, RunDir, newest_complete, read_json
from training.universal import prepare as prepare_universal
from training.scoring import accuracies, answer_totals
from training.signals import stop_signal_received
from training.step_stats import StepStats, StepSums, gradient_norm, step_metrics

log = logging.getLogger("training")
EXIT_NONFINITE = 3


class NonFiniteAbort(RuntimeError):
    """Too many non-finite steps in a row; the last complete checkpoint is left as it was."""


class Trainer:
    def __init__(self, cfg: TrainConfig, dist: DistInfo, hooks: Optional[Hooks] = None):
        self.cfg = cfg
        self.dist = dist
        self.run_dir = cfg.run_dir
        # The sizes this world uses: the recipe's global batch, accumulation derived (config.py).
        self.batch = cfg.batch.for_world(dist.world_size)
        self.hooks = hooks if hooks is not None else Hooks.from_env()
        self.device = None
        self.stop_requested = False
        self.step = 0
        self.tokens_seen = 0
        self.samples_seen = 0
        self.skipped_steps = 0
        self.nonfinite_in_a_row = 0
        self.latest_metrics: dict = {}
        self.pipe = self.eval_pipe = None  # close() works even when setup() failed

    # ---------------------------------------------------------------------------- setup
    def setup(self) -> None:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        from training.data import SegmentCurriculum, build_pipeline, build_tokenizer

        cfg, dist = self.cfg, self.dist
        self.device = torch.device(get_accelerator().device_name(dist.device))
        self.ds_config = cfg.deepspeed.engine_config(self.batch, cfg.optim, dist.world_size)
        self.tokenizer = build_tokenizer(cfg.data)
        if dist.rank == 0:
            self.tokenizer.save_pretrained(str(RunDir(self.run_dir).tokenizer))

        model = build_model(cfg, dist.rank, self.ds_config)
        self.rmt_config = model.config
        if cfg.model.gradient_checkpointing:
            model.activation_checkpointing_enable()
        self.grads_nonfinite = GradientFlag(model, self.device)

        # Where the optimizer state lives: the accelerator, or the CPU under ZeRO-Offload.
        offload = cfg.deepspeed.offload_optimizer
        optimizer = build_optimizer(model, cfg.optim, "cpu" if offload else self.device.type,
                                    offload)
        self.optimizer = optimizer
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                    config=self.ds_config)
        self.curriculum = SegmentCurriculum(cfg.curriculum)
        pipe_args = dict(segment_size=cfg.model.segment_size,
                         micro_batch_size=self.batch.micro_batch_size,
                         rank=dist.rank, world_size=dist.world_size, seed=cfg.run.seed)
        self.pipe = build_pipeline(cfg.data, self.tokenizer, split="train", **pipe_args)
        self.eval_pipe = (build_pipeline(cfg.data, self.tokenizer, split="eval", **pipe_args)
                          if cfg.eval.batches > 0 else None)
        self.eval_pipe_start = self.eval_pipe.state_dict() if self.eval_pipe else None
        self.answer_sets = AnswerEvalSets(cfg, self.tokenizer)
        keep_best = checkpoint_select.best_keeper(self.run_dir, cfg.checkpoint.keep_best,
                                                  cfg.checkpoint.best_mode)
        self.ckpt = ckpt_lib.CheckpointManager(self.run_dir, dist.rank, cfg.checkpoint.keep_last,
                                               barrier, keep_best)
        self.peak_flops = peak_flops_per_device(cfg.logging.peak_tflops)
        self.gpu = self.device.type == "cuda"
        # Last in setup: a fresh run's random draws then depend only on (seed, rank); resume()
        # replaces this state with the checkpoint's.
        ckpt_lib.seed_rng(cfg.run.seed, dist.rank)

    def _loss_scale(self) -> Optional[float]:
        """DeepSpeed's current dynamic loss scale (fp16), else None."""
        if self.cfg.deepspeed.precision != "fp16":
            return None
        return float(self.engine.optimizer.loss_scale)

    # ---------------------------------------------------------------------------- collectives
    def _all_reduce_on_device(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over ranks in place on the device; queued, not read back."""
        import deepspeed.comm as ds_comm

        if self.dist.world_size > 1:
            ds_comm.all_reduce(values)
        return values

    def _all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Host tensor in, its sum over ranks on the host out."""
        return self._all_reduce_on_device(values.to(self.device)).cpu()

    def _all_reduce_stats(self, packed: torch.Tensor) -> StepStats:
        """A step's (or eval pass's) one all-reduce, then its one read back to the host."""
        return StepStats.unpack(self._all_reduce_on_device(packed).cpu())

    # ---------------------------------------------------------------------------- training
    def _prepare(self, batch: dict) -> tuple[dict, int]:
        mc = self.cfg.model
        return micro_steps.prepare(batch, self.device, mc.segment_size, mc.loss_from_segment)

    def _micro_steps(self, batches: list, counts: list, scale: torch.Tensor,
                     n_segments: int) -> StepSums:
        """No host read of the device in here (tests/test_trainer_sync.py counts them)."""
        return micro_steps.run(self.engine, self.hooks, self.step, self.dist.rank, batches,
                               counts, scale, StepSums(n_segments, self.device))

    def train_step(self) -> dict:
        cfg, world = self.cfg, self.dist.world_size
        accum = self.batch.grad_accum_steps
        start = time.perf_counter()
        n_segments = self.curriculum.num_segments(self.step)
        batches, counts = zip(*(self._prepare(self.pipe.next_batch(n_segments))
                                for _ in range(accum)))
        # The exact loss weighting's total, summed over ranks on the device: the scale is a
        # device tensor, so no micro-step waits for this all-reduce.
        local_targets = float(sum(counts))
        total = torch.tensor(local_targets, dtype=torch.float64).to(self.device, non_blocking=True)
        scale = accum * world / self._all_reduce_on_device(total).clamp(min=1)

        self.grads_nonfinite.zero_()
        sums = self._micro_steps(list(batches), list(counts), scale, n_segments)
        stop = self.stop_requested or stop_signal_received()
        stats = self._all_reduce_stats(sums.pack(self.grads_nonfinite.flag, stop, local_targets))
        if stats.target_mismatch:
            raise RuntimeError(f"the model counted the step's targets differently from the trainer "
                               f"(off by {stats.target_mismatch:g} over all micro-batches and "
                               f"ranks): the loss weighting would be wrong")
        total_targets = int(stats.targets)
        self.stop_requested = stats.stop_requested > 0
        loss_scale = self._loss_scale()
        verdict = classify_step(loss_finite=stats.loss_nonfinite == 0,
                                grads_finite=stats.grads_nonfinite == 0,
                                precision=cfg.deepspeed.precision, loss_scale=loss_scale,
                                min_loss_scale=cfg.deepspeed.min_loss_scale)
        nonfinite = verdict.skipped
        if verdict.fatal_before_step:
            raise NonFiniteAbort(
                f"non-finite loss or gradient at step {self.step + 1} with the fp16 loss scale "
                f"already at its minimum ({loss_scale:g}, deepspeed.min_loss_scale): not an "
                f"overflow the scaler can fix; last complete checkpoint: "
                f"{newest_complete(self.ckpt.root)}")

        lr = lr_at(self.step, cfg)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.skip_next_step = nonfinite
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed's micro-step count disagrees with grad_accum_steps")
        # fp32 without ZeRO: the engine's optimizer is ours and DeepSpeed keeps no norm.
        basic = self.engine.optimizer is self.optimizer
        own_norm = gradient_norm(self.engine.module) if basic else None
        self.engine.step()
        self.optimizer.skip_next_step = False
        self.step += 1

        global_samples = self.batch.global_batch_size
        positions = global_samples * n_segments * cfg.model.segment_size
        self.samples_seen += global_samples
        self.tokens_seen += positions
        self._count_skip(verdict, loss_scale)
        step_time = time.perf_counter() - start

        flops = None
        if self.gpu and self.peak_flops:
            # The model's own count, the one bench/step.py reports MFU with (model/flops.py).
            flops = global_samples * self.rmt_config.training_flops(
                n_segments * cfg.model.segment_size)
        return step_metrics(stats, total_targets=total_targets, skipped=nonfinite, lr=lr,
                            grad_norm=(self.engine.get_global_grad_norm() if own_norm is None
                                       else float(own_norm)),
                            skipped_steps=self.skipped_steps, samples_seen=self.samples_seen,
                            positions=positions, step_time=step_time, memory_gb=memory_gb(),
                            loss_scale=loss_scale, flops=flops, world_size=world,
                            peak_flops=self.peak_flops)

    def _count_skip(self, verdict, loss_scale: Optional[float]) -> None:
        """Count a skipped step; a non-finite one (not an fp16 overflow) towards the abort."""
        if verdict.skipped:
            self.skipped_steps += 1
        if verdict.counts_towards_abort:
            self.nonfinite_in_a_row += 1
            log.warning("step %d: non-finite loss or gradient on some rank; step skipped "
                        "(%d in a row, %d total)", self.step, self.nonfinite_in_a_row,
                        self.skipped_steps)
        elif verdict.skipped:  # fp16 overflow: DeepSpeed skipped the update and lowered the scale
            log.info("step %d: fp16 gradient overflow at loss scale %g; step skipped, scale "
                     "lowered (%d skipped in total)", self.step, loss_scale, self.skipped_steps)
        else:
            self.nonfinite_in_a_row = 0

    # ---------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict:
        cfg = self.cfg
        self.engine.eval()
        metrics = {}
        try:
            if self.eval_pipe is not None:
                metrics.update(self._eval_heldout_loss())
            if cfg.data.source in ANSWER_SOURCES:
                for n in cfg.eval.memory_task_segments:
                    metrics.update(self._eval_answers(n))
        finally:
            self.engine.train()
        return metrics

    def _eval_heldout_loss(self) -> dict:
        n_segments = self.curriculum.max_segments()
        self.eval_pipe.load_state_dict(self.eval_pipe_start)  # the same held-out batches each time
        sums = StepSums(n_segments, self.device)
        for _ in range(self.cfg.eval.batches):
            out = self.engine(**self._prepare(self.eval_pipe.next_batch(n_segments))[0])
            sums.add(out, out.loss_sum)
        stats = self._all_reduce_stats(sums.pack())
        loss = (stats.loss_sum / max(stats.segment_counts.sum().item(), 1)
                if not stats.loss_nonfinite else math.nan)
        return {"eval/loss": loss, **segment_scalars("eval", stats.segment_losses().tolist())}

    def _eval_answers(self, n_segments: int) -> dict:
        """Exact match and token accuracy of the answer span by teacher-forced argmax
        (training/scoring.py) on each answer set (training/answer_eval.py), over
        eval.memory_task_samples samples split across the ranks."""
        rank, world, total = self.dist.rank, self.dist.world_size, self.cfg.eval.memory_task_samples
        lo, hi = rank * total // world, (rank + 1) * total // world
        metrics = {}
        for name in self.answer_sets.names():
            totals = torch.zeros(4, dtype=torch.float64)
            if hi > lo:
                batch = self.answer_sets.batch(name, n_segments, lo, hi)
                out = self.engine(input_ids=batch["input_ids"].to(self.device),
                                  attention_mask=batch["attention_mask"].to(self.device),
                                  return_logits=True)
                totals += answer_totals(out.logits.argmax(-1).cpu(), batch["labels"])
            else:
                # ZeRO-3 gathers parameters collectively: a rank without samples still runs one.
                self._forward_dummy(n_segments)
            token_acc, exact = accuracies(self._all_reduce_sum(totals))
            metrics[f"eval/{name}_token_acc_{n_segments}seg"] = token_acc
            metrics[f"eval/{name}_exact_match_{n_segments}seg"] = exact
        return metrics

    def _forward_dummy(self, n_segments: int) -> None:
        ids = torch.zeros(1, n_segments * self.cfg.model.segment_size, dtype=torch.long)
        self.engine(input_ids=ids.to(self.device), return_logits=False)

    # ---------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The trainer's own state, the same on every rank (the checkpoint's client_state.json)."""
        return {"step": self.step, "tokens_seen": self.tokens_seen,
                "samples_seen": self.samples_seen, "skipped_steps": self.skipped_steps,
                "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "world_size": self.dist.world_size, "zero_stage": self.cfg.deepspeed.zero_stage,
                "global_batch_size": self.batch.global_batch_size,
                "curriculum": {**self.curriculum.state_dict(),
                               "num_segments": self.curriculum.num_segments(self.step)},
                "config_digest": self.cfg.digest(), "metrics": self.latest_metrics}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s counters (the curriculum follows from the step)."""
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.samples_seen = int(state["samples_seen"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self.latest_metrics = dict(state.get("metrics", {}))

    def rank_state_dict(self) -> dict:
        """This rank's own state (the checkpoint's rank_XXXXX.json): data position and RNG."""
        return {"rank": self.dist.rank, "data": self.pipe.state_dict(),
                "rng": ckpt_lib.rng_state()}

    def load_rank_state_dict(self, state: dict) -> None:
        self.pipe.load_state_dict(state["data"])
        ckpt_lib.set_rng_state(state["rng"])

    # ---------------------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        def on_phase(phase: str) -> None:
            self.hooks.checkpoint_phase(phase=phase, rank=self.dist.rank, step=self.step)

        path = self.ckpt.save(self.engine, self.step, self.state_dict(), self.rank_state_dict(),
                              self.rmt_config.to_dict(), on_phase=on_phase)
        log.info("saved checkpoint %s", path)
        return path

    def resume(self, path: Path) -> Path:
        """Restore from `path`, a complete checkpoint (pretrain resolves checkpoint.resume with
        training.checkpoint.resolve_resume); returns it. On another world size or ZeRO stage
        (training.elastic): from its universal form, converted once, with the RNG re-derived."""
        saved = read_json(path / CLIENT_STATE_FILE)
        universal = None
        if elastic.resume_mode(saved, self.dist.world_size,
                               self.cfg.deepspeed.zero_stage) == elastic.UNIVERSAL:
            universal = prepare_universal(path, self.dist.rank, self._all_reduce_sum, lambda ph:
                                          self.hooks.checkpoint_phase(phase=ph, rank=self.dist.rank,
                                                                      step=int(saved["step"])))
        client_state, rank_state = self.ckpt.load(self.engine, path, universal)
        if client_state.get("config_digest") != self.cfg.digest():
            log.warning("resuming %s written with another config (digest %s, now %s)", path,
                        client_state.get("config_digest"), self.cfg.digest())
        self.load_rank_state_dict(rank_state)
        self.load_state_dict(client_state)
        if universal is not None:
            ckpt_lib.seed_rng(self.cfg.run.seed, self.dist.rank, self.step)
        log.info("resumed from %s (step %d)%s", path, self.step, "" if universal is None else
                 f" written by {saved['world_size']} rank(s) with ZeRO-{saved.get('zero_stage')}, "
                 f"through {universal}; RNG re-derived from (run.seed, step, rank)")
        self.hooks.after_resume(engine=self.engine, rank=self.dist.rank, step=self.step)
        return path

    # ---------------------------------------------------------------------------- loop
    def train(self, monitor: Monitor) -> str:
        """Run to max_steps; returns 'done', 'preempted'. Raises NonFiniteAbort."""
        cfg = self.cfg
        if self.dist.rank == 0:
            monitor.text("config", "```yaml\n" + cfg.to_yaml() + "\n```")
        saved_at = self.step
        while self.step < cfg.run.max_steps:
            metrics = self.train_step()
            self.latest_metrics.update({k: v for k, v in metrics.items() if math.isfinite(v)})
            if self.step % cfg.logging.every == 0 or self.step == cfg.run.max_steps:
                monitor.scalars(self.step, metrics, "train")
            monitor.progress(self.step, metrics)
            if self.nonfinite_in_a_row >= cfg.guard.max_nonfinite_in_a_row:
                raise NonFiniteAbort(
                    f"{self.nonfinite_in_a_row} non-finite steps in a row (guard."
                    f"max_nonfinite_in_a_row={cfg.guard.max_nonfinite_in_a_row}) at step "
                    f"{self.step}; last complete checkpoint: "
                    f"{newest_complete(self.ckpt.root)}")
            last = self.step == cfg.run.max_steps
            if (cfg.eval.every and self.step % cfg.eval.every == 0) or last:
                eval_metrics = self.evaluate()
                self.latest_metrics.update(eval_metrics)
                monitor.scalars(self.step, eval_metrics, "eval")
                log.info("step %d eval: %s", self.step,
                         ", ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
            if (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or last:
                self.save()
                saved_at = self.step
            if self.stop_requested:
                if saved_at != self.step:
                    self.save()
                return "preempted"
        return "done"

    def close(self) -> None:
        for pipe in (self.pipe, self.eval_pipe):
            if pipe is not None:
                pipe.close()

