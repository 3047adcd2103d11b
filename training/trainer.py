"""The DeepSpeed training loop: exact token-weighted loss, non-finite guard, eval, checkpoints.

One optimizer step (`Trainer.train_step`):
  1. fetch the step's micro-batches (the curriculum gives the segment count from the step, so
     every rank runs the same number of segments);
  2. all-reduce the number of valid targets T of the whole global batch;
  3. backward each micro-batch's `loss_sum * accum * world / T`: DeepSpeed divides by `accum`
     and averages over ranks, so the gradient is exactly that of the global token mean;
  4. all-reduce one vector holding the loss sums, per-segment sums, non-finite flags (loss; any
     gradient, seen by tensor hooks on every parameter) and a stop-request flag;
  5. set the learning rate, then `engine.step()`; a non-finite step leaves the weights and the
     optimizer state untouched (GuardedAdamW; fp16 overflows: DeepSpeed's loss scaler) and is
     counted; K in a row abort the run (training/guard.py says what counts, per precision).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path
from typing import Optional

import torch

from training import checkpoint as ckpt_lib
from training.config import TrainConfig
from training.distributed import DistInfo, barrier
from training.guard import classify_step
from training.monitor import Monitor, memory_gb, peak_flops_per_device, segment_scalars

log = logging.getLogger("training")
IGNORE_INDEX = -100
EXIT_NONFINITE = 3


class NonFiniteAbort(RuntimeError):
    """Too many non-finite steps in a row; the last complete checkpoint is left as it was."""


class GuardedAdamW(torch.optim.AdamW):
    """AdamW whose next step can be vetoed: the trainer sets `skip_next_step` when any rank saw a
    non-finite loss or gradient. DeepSpeed (every ZeRO stage) calls this `step` for the update,
    so a vetoed step changes neither weights nor moments nor Adam's step count."""

    skip_next_step = False

    def step(self, closure=None):
        if self.skip_next_step:
            return None
        return super().step(closure)


def lr_at(step: int, cfg) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine or flat."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    span = max(1, cfg.run.max_steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def count_targets(labels: torch.Tensor, segment_size: int, loss_from_segment: int) -> int:
    """Valid targets of a batch as the model counts them: position i predicts labels[i+1] and
    belongs to segment i // S; segments < loss_from_segment are dropped."""
    first_position = loss_from_segment * segment_size
    return int((labels[:, first_position + 1:] != IGNORE_INDEX).sum())


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; not norms, biases or the memory M0 (a state, not a projection)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitions are flat
        (decay if ndim >= 2 and name != "memory" else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def model_flops_per_position(model_cfg, n_params: int) -> float:
    """Training FLOPs per backbone position (6N + attention; recompute not counted)."""
    backbone = model_cfg.backbone_config.get_text_config()
    context = model_cfg.segment_size + 2 * model_cfg.num_mem_tokens
    return 6 * n_params + 12 * backbone.num_hidden_layers * backbone.hidden_size * context


def build_model(cfg: TrainConfig, rank: int, ds_config: dict) -> torch.nn.Module:
    """The RMT with the backbone's own (Hugging Face) initialisation or pretrained weights.

    Every rank seeds identically, so all stages start from the same weights. Under ZeRO-3 the
    model is built inside zero.Init (no rank holds it whole) and the weights come from a plain
    copy built on rank 0 only, one gathered parameter at a time: Hugging Face's `_init_weights`
    runs after zero.Init has already partitioned the submodules, so it cannot initialise them.
    """
    import deepspeed

    from model import RMTConfig, RMTForCausalLM

    def plain() -> torch.nn.Module:
        torch.manual_seed(cfg.run.seed)
        if cfg.model.init_from is None:
            return RMTForCausalLM(RMTConfig(**cfg.model.rmt_kwargs()))
        kwargs = cfg.model.rmt_kwargs()
        kwargs.pop("backbone")
        return RMTForCausalLM.from_backbone(cfg.model.init_from, **kwargs)

    if cfg.deepspeed.zero_stage != 3:
        return plain()
    reference = plain() if rank == 0 else None
    rmt_config = RMTConfig(**{**cfg.model.rmt_kwargs(), "backbone": cfg.model.resolved_backbone()})
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = RMTForCausalLM(rmt_config)
    source = dict(reference.named_parameters()) if reference is not None else {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                param.data.copy_(source[name].data)
    return model


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_stop_signals_received: list[int] = []


def install_stop_signal_handlers() -> None:
    """SIGTERM / SIGUSR1 (Slurm preemption, time-limit warning) ask every rank to save at the next
    step boundary and exit 0. Installed first thing in the entry point: a signal that arrives
    during start-up or resume must not kill the rank (SIGUSR1's default action terminates)."""
    def record(signum, frame):
        _stop_signals_received.append(signum)
        log.warning("received %s: saving at the next step boundary, then exiting",
                    signal.Signals(signum).name)

    for sig in _STOP_SIGNALS:
        signal.signal(sig, record)


def stop_signal_received() -> bool:
    return bool(_stop_signals_received)


class Trainer:
    def __init__(self, cfg: TrainConfig, dist: DistInfo):
        self.cfg = cfg
        self.dist = dist
        self.run_dir = cfg.run_dir
        # The sizes this world uses: the recipe's global batch, accumulation derived (config.py).
        self.batch = cfg.batch.for_world(dist.world_size)
        self.device = None
        self.stop_requested = False
        self.step = 0
        self.tokens_seen = 0
        self.samples_seen = 0
        self.skipped_steps = 0
        self.nonfinite_in_a_row = 0
        self.latest_metrics: dict = {}
        self._grad_nonfinite = None
        self._inject_grad_now = False
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
            self.tokenizer.save_pretrained(str(self.run_dir / "tokenizer"))

        model = build_model(cfg, dist.rank, self.ds_config)
        self.rmt_config = model.config
        if cfg.model.gradient_checkpointing:
            model.activation_checkpointing_enable()
        self.n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        self._install_grad_hooks(model)

        optimizer = GuardedAdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                 betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
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
        self.ckpt = ckpt_lib.CheckpointManager(self.run_dir, dist.rank, cfg.checkpoint.keep_last,
                                               barrier)
        self.flops_per_position = model_flops_per_position(self.rmt_config, self.n_params)
        self.peak_flops = peak_flops_per_device(cfg.logging.peak_tflops)
        self.gpu = self.device.type == "cuda"
        # Last in setup: a fresh run's random draws then depend only on (seed, rank); resume()
        # replaces this state with the checkpoint's.
        ckpt_lib.seed_rng(cfg.run.seed, dist.rank)

    def _install_grad_hooks(self, model: torch.nn.Module) -> None:
        """Flag non-finite gradients as they arrive, on every rank, before any reduction."""
        self._grad_nonfinite = torch.zeros((), dtype=torch.bool)
        first = next(p for p in model.parameters() if p.requires_grad)

        def check(grad: torch.Tensor) -> torch.Tensor:
            self._grad_nonfinite |= ~torch.isfinite(grad).all().cpu()
            return grad

        def check_first(grad: torch.Tensor) -> torch.Tensor:
            if self._inject_grad_now:  # test-only switch (guard.inject_nonfinite_*)
                grad = grad * float("nan")
            return check(grad)

        for p in model.parameters():
            if p.requires_grad:
                p.register_hook(check_first if p is first else check)

    def _loss_scale(self) -> Optional[float]:
        """DeepSpeed's current dynamic loss scale (fp16), else None."""
        if self.cfg.deepspeed.precision != "fp16":
            return None
        return float(self.engine.optimizer.loss_scale)

    # ---------------------------------------------------------------------------- collectives
    def _all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        import deepspeed.comm as ds_comm

        if self.dist.world_size == 1:
            return values
        buf = values.to(self.device)
        ds_comm.all_reduce(buf)
        return buf.cpu()

    # ---------------------------------------------------------------------------- training
    def _inject(self, kind: str) -> bool:
        g = self.cfg.guard
        return (g.inject_nonfinite_kind == kind and self.step in g.inject_nonfinite_steps
                and self.dist.rank == g.inject_rank)

    def _forward(self, batch: dict):
        return self.engine(input_ids=batch["input_ids"].to(self.device),
                           attention_mask=batch["attention_mask"].to(self.device),
                           labels=batch["labels"].to(self.device))

    def train_step(self) -> dict:
        cfg, world = self.cfg, self.dist.world_size
        accum = self.batch.grad_accum_steps
        start = time.perf_counter()
        n_segments = self.curriculum.num_segments(self.step)
        batches = [self.pipe.next_batch(n_segments) for _ in range(accum)]
        counts = [count_targets(b["labels"], cfg.model.segment_size, cfg.model.loss_from_segment)
                  for b in batches]
        total_targets = int(self._all_reduce_sum(torch.tensor([float(sum(counts))])).item())
        scale = accum * world / max(total_targets, 1)

        self._grad_nonfinite.zero_()
        self._inject_grad_now = self._inject("grad")
        loss_sum = torch.zeros((), dtype=torch.float64)
        seg_sums = torch.zeros(n_segments, dtype=torch.float64)
        seg_counts = torch.zeros(n_segments, dtype=torch.float64)
        for k, (batch, count) in enumerate(zip(batches, counts)):
            if k:
                self.engine.step()  # DeepSpeed counts micro-steps here; no update before the last
            out = self._forward(batch)
            if int(out.num_tokens) != count:
                raise RuntimeError(f"model counted {int(out.num_tokens)} targets, trainer {count}: "
                                   f"the loss weighting would be wrong")
            loss = out.loss_sum * scale
            if self._inject("loss"):  # test-only switch (guard.inject_nonfinite_*)
                loss = loss * float("nan")
            self.engine.backward(loss)
            loss_sum += float(loss.detach()) / scale  # NaN stays NaN: the guard sees it
            seg_n = out.segment_token_counts.detach().double().cpu()
            seg_sums += torch.nan_to_num(out.segment_losses.detach().double().cpu()) * seg_n
            seg_counts += seg_n
        self._inject_grad_now = False

        loss_bad = not math.isfinite(float(loss_sum))
        grads_bad = bool(self._grad_nonfinite)
        reduced = self._all_reduce_sum(torch.cat([
            torch.tensor([float(loss_sum) if not (loss_bad or grads_bad) else 0.0, float(loss_bad),
                          float(self.stop_requested or stop_signal_received()), float(grads_bad)],
                         dtype=torch.float64),
            seg_sums, seg_counts]))
        self.stop_requested = reduced[2].item() > 0
        loss_scale = self._loss_scale()
        verdict = classify_step(loss_finite=reduced[1].item() == 0,
                                grads_finite=reduced[3].item() == 0,
                                precision=cfg.deepspeed.precision, loss_scale=loss_scale,
                                min_loss_scale=cfg.deepspeed.min_loss_scale)
        nonfinite = verdict.skipped
        if verdict.fatal_before_step:
            raise NonFiniteAbort(
                f"non-finite loss or gradient at step {self.step + 1} with the fp16 loss scale "
                f"already at its minimum ({loss_scale:g}, deepspeed.min_loss_scale): not an "
                f"overflow the scaler can fix; last complete checkpoint: "
                f"{ckpt_lib.newest_complete(self.ckpt.root)}")

        lr = lr_at(self.step, cfg)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.skip_next_step = nonfinite
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed's micro-step count disagrees with grad_accum_steps")
        self.engine.step()
        self.optimizer.skip_next_step = False
        self.step += 1

        global_samples = self.batch.global_batch_size
        positions = global_samples * n_segments * cfg.model.segment_size
        self.samples_seen += global_samples
        self.tokens_seen += positions
        if nonfinite:
            self.skipped_steps += 1
        if verdict.counts_towards_abort:
            self.nonfinite_in_a_row += 1
            log.warning("step %d: non-finite loss or gradient on some rank; step skipped "
                        "(%d in a row, %d total)", self.step, self.nonfinite_in_a_row,
                        self.skipped_steps)
        elif nonfinite:  # fp16 overflow: DeepSpeed skipped the update and lowered the scale
            log.info("step %d: fp16 gradient overflow at loss scale %g; step skipped, scale "
                     "lowered (%d skipped in total)", self.step, loss_scale, self.skipped_steps)
        else:
            self.nonfinite_in_a_row = 0
        step_time = time.perf_counter() - start

        n = reduced[4 + n_segments:]
        seg_losses = (reduced[4:4 + n_segments] / n.clamp(min=1)).masked_fill(n == 0, math.nan)
        loss = reduced[0].item() / max(total_targets, 1) if not nonfinite else math.nan
        grad_norm = self.engine.get_global_grad_norm()
        metrics = {
            "train/loss": loss,
            "train/ppl": math.exp(min(loss, 50.0)) if math.isfinite(loss) else math.nan,
            "train/lr": lr,
            "train/grad_norm": float(grad_norm) if grad_norm is not None and not nonfinite
            else math.nan,
            "train/skipped_steps": float(self.skipped_steps),
            "train/tokens_per_s": positions / step_time,
            "train/samples_seen": float(self.samples_seen),
            "train/num_segments": float(n_segments),
            "train/step_time_s": step_time,
            "system/memory_gb": memory_gb(),
            **segment_scalars("train", seg_losses.tolist()),
        }
        if loss_scale is not None:
            metrics["train/loss_scale"] = float(loss_scale)
        if self.gpu and self.peak_flops:
            backbone_positions = global_samples * n_segments * (
                cfg.model.segment_size + 2 * cfg.model.num_mem_tokens)
            metrics["train/mfu"] = (self.flops_per_position * backbone_positions
                                    / (step_time * world * self.peak_flops))
        return metrics

    # ---------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict:
        cfg = self.cfg
        self.engine.eval()
        metrics = {}
        try:
            if self.eval_pipe is not None:
                metrics.update(self._eval_heldout_loss())
            if cfg.data.source == "memory_tasks":
                for n in cfg.eval.memory_task_segments:
                    metrics.update(self._eval_memory_tasks(n))
        finally:
            self.engine.train()
        return metrics

    def _eval_heldout_loss(self) -> dict:
        n_segments = self.curriculum.max_segments()
        self.eval_pipe.load_state_dict(self.eval_pipe_start)  # the same held-out batches each time
        sums = torch.zeros(1 + 2 * n_segments, dtype=torch.float64)
        for _ in range(self.cfg.eval.batches):
            out = self._forward(self.eval_pipe.next_batch(n_segments))
            seg_n = out.segment_token_counts.double().cpu()
            sums[0] += float(out.loss_sum)
            sums[1:1 + n_segments] += torch.nan_to_num(out.segment_losses.double().cpu()) * seg_n
            sums[1 + n_segments:] += seg_n
        sums = self._all_reduce_sum(sums)
        n = sums[1 + n_segments:]
        seg = (sums[1:1 + n_segments] / n.clamp(min=1)).masked_fill(n == 0, math.nan)
        loss = sums[0].item() / max(n.sum().item(), 1)
        return {"eval/loss": loss, **segment_scalars("eval", seg.tolist())}

    def _eval_memory_tasks(self, n_segments: int) -> dict:
        """Exact match of the answer span by teacher-forced argmax (equal to greedy decoding's
        exact match: while every earlier answer token is right, both see the same prefix)."""
        from training.data.memory_tasks import make_eval_batch

        cfg, rank, world = self.cfg, self.dist.rank, self.dist.world_size
        total = cfg.eval.memory_task_samples
        lo, hi = rank * total // world, (rank + 1) * total // world
        counts = torch.zeros(4, dtype=torch.float64)  # correct tokens, tokens, exact, samples
        if hi > lo:
            batch = make_eval_batch("mixture", n_segments, cfg.model.segment_size, hi - lo,
                                    cfg.run.seed, cfg=cfg.data.memory_tasks, start=lo)
            out = self.engine(input_ids=batch["input_ids"].to(self.device),
                              attention_mask=batch["attention_mask"].to(self.device),
                              return_logits=True)
            predicted = out.logits[:, :-1].argmax(-1).cpu()
            target = batch["labels"][:, 1:]
            mask = target != IGNORE_INDEX
            correct = (predicted == target) & mask
            has_answer = mask.any(1)
            counts += torch.tensor([correct.sum().item(), mask.sum().item(),
                                    ((correct | ~mask).all(1) & has_answer).sum().item(),
                                    has_answer.sum().item()], dtype=torch.float64)
        else:
            # ZeRO-3 gathers parameters collectively: a rank without samples still runs a forward.
            self._forward_dummy(n_segments)
        c = self._all_reduce_sum(counts)
        return {f"eval/memory_token_acc_{n_segments}seg": c[0].item() / max(c[1].item(), 1),
                f"eval/memory_exact_match_{n_segments}seg": c[2].item() / max(c[3].item(), 1)}

    def _forward_dummy(self, n_segments: int) -> None:
        ids = torch.zeros(1, n_segments * self.cfg.model.segment_size, dtype=torch.long)
        self.engine(input_ids=ids.to(self.device), return_logits=False)

    # ---------------------------------------------------------------------------- checkpoints
    def client_state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen,
                "samples_seen": self.samples_seen, "skipped_steps": self.skipped_steps,
                "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "world_size": self.dist.world_size,
                "curriculum": {**self.curriculum.state_dict(),
                               "num_segments": self.curriculum.num_segments(self.step)},
                "config_digest": self.cfg.digest(), "metrics": self.latest_metrics}

    def save(self) -> Path:
        rank_state = {"rank": self.dist.rank, "data": self.pipe.state_dict(),
                      "rng": ckpt_lib.rng_state()}
        path = self.ckpt.save(self.engine, self.step, self.client_state(), rank_state,
                              self.rmt_config.to_dict())
        log.info("saved checkpoint %s", path)
        return path

    def resume(self, path: Optional[Path] = None) -> Optional[Path]:
        """Restore from `path` (a complete checkpoint), or from the one checkpoint.resume names;
        return the folder used, None when there is nothing to resume."""
        path = path or self.ckpt.resolve(self.cfg.checkpoint.resume)
        if path is None:
            return None
        client_state, rank_state = self.ckpt.load(self.engine, path)
        if client_state.get("config_digest") != self.cfg.digest():
            log.warning("resuming %s written with another config (digest %s, now %s)", path,
                        client_state.get("config_digest"), self.cfg.digest())
        self.pipe.load_state_dict(rank_state["data"])
        ckpt_lib.set_rng_state(rank_state["rng"])
        self.step = int(client_state["step"])
        self.tokens_seen = int(client_state["tokens_seen"])
        self.samples_seen = int(client_state["samples_seen"])
        self.skipped_steps = int(client_state.get("skipped_steps", 0))
        self.nonfinite_in_a_row = int(client_state.get("nonfinite_in_a_row", 0))
        self.latest_metrics = dict(client_state.get("metrics", {}))
        log.info("resumed from %s (step %d)", path, self.step)
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
            monitor.advance(1, {"loss": f"{metrics['train/loss']:.4f}",
                                "seg": int(metrics["train/num_segments"])})
            if self.nonfinite_in_a_row >= cfg.guard.max_nonfinite_in_a_row:
                raise NonFiniteAbort(
                    f"{self.nonfinite_in_a_row} non-finite steps in a row (guard."
                    f"max_nonfinite_in_a_row={cfg.guard.max_nonfinite_in_a_row}) at step "
                    f"{self.step}; last complete checkpoint: "
                    f"{ckpt_lib.newest_complete(self.ckpt.root)}")
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

