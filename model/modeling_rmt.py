"""Recurrent Memory Transformer (Bulatov et al., 2022) over any Hugging Face causal-LM backbone.

RMT terms:
    m  num_mem_tokens   memory slots; M0 is a learned [m, d] parameter
    S  segment_size     tokens per segment; a sequence of L tokens has N = ceil(L / S) segments
    k  bptt_depth       memory is detached after every k-th segment (-1: full BPTT)
    d  hidden_size      the backbone's hidden size
Shape legend: B batch, L sequence, S segment (T: a segment's actual length, T <= S),
M memory (m), D hidden, V vocab.

Segment t: the backbone sees [M_{t-1} (read, M) ; embed(x_t) (T) ; M_{t-1} (write, M)] and
M_t is its final hidden state (after the final norm) at the write positions. Logits and loss
exist only for the T token positions; the loss of a segment is computed inside its step.
With memory_noise = sigma > 0, training mode hands segment t+1 the memory
M_t + sigma * rms(M_t) * N(0, 1) (rms per slot, not differentiated; with memory_noise_prob = p < 1
only a random fraction p of the samples' hand-overs get it); eval mode hands it M_t.

Padding: segments are cut at fixed offsets of the [B, L] batch; pads are masked and do not
advance positions, so a right-padded row computes exactly what the row alone computes. A
segment that is all padding leaves the memory unchanged. Left-padded prompts in a batch are
cut at the same offsets as the other rows (generation equals the teacher-forced forward over
the same padded batch, not a row generated on its own).
"""

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as hf_init
from transformers.utils import ModelOutput
from torch.utils.checkpoint import checkpoint

from .checkpoint_budget import CheckpointBudget
from .configuration_rmt import RMT_SETTINGS, RMTConfig
from .generation_rmt import RMTDecodingState, decode_tokens
from .memory_noise import perturbed
from .segment_loss import HeadGradient, lm_loss_sum
from .segment_recompute import RecomputedSegment, recompute_rng_setting
from .segment_attention import backbone_mask, segment_step_attention
from .segments import loss_targets, mask_in_use, segment_layout
from .zero_params import PartitionedParameters


@dataclass
class RMTOutput(ModelOutput):
    """Output of RMTForCausalLM.forward (see docs/architecture.md)."""

    loss: torch.Tensor | None = None  # scalar: loss_sum / num_tokens
    logits: torch.Tensor | None = None  # [B, L, V] (or the kept last positions)
    loss_sum: torch.Tensor | None = None  # scalar float32
    num_tokens: torch.Tensor | None = None  # scalar long
    segment_losses: torch.Tensor | None = None  # [N]; nan where a segment has no target
    segment_token_counts: torch.Tensor | None = None  # [N] long
    memory: torch.Tensor | None = None  # [B, M, D]
    cache: RMTDecodingState | None = None  # decoding state, only with use_cache


class RMTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = RMTConfig
    base_model_prefix = "rmt"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: RMTConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        if backbone is None:
            backbone = AutoModelForCausalLM.from_config(config.backbone_config)
        self.backbone = backbone
        self.memory = nn.Parameter(torch.empty(config.num_mem_tokens, config.hidden_size))  # M0 [M, D]
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = None
        self.last_checkpointed_segments = 0  # segments the latest forward checkpointed (telemetry)
        self.generation_config = backbone.generation_config
        self.post_init()

    # ----- construction ---------------------------------------------------------------
    @classmethod
    def from_backbone(cls, backbone, **kwargs) -> "RMTForCausalLM":
        """Add memory to a causal LM (a path/hub name or a loaded model); its weights are kept.

        kwargs named in RMT_SETTINGS (num_mem_tokens and segment_size required) configure the
        memory; any others go to AutoModelForCausalLM.from_pretrained (e.g. torch_dtype)."""
        settings = {k: kwargs.pop(k) for k in RMT_SETTINGS if k in kwargs}
        missing = [k for k in ("num_mem_tokens", "segment_size") if k not in settings]
        if missing:
            raise ValueError(f"from_backbone: {missing} required (RMT settings: {', '.join(RMT_SETTINGS)})")
        if isinstance(backbone, (str, os.PathLike)):
            backbone = AutoModelForCausalLM.from_pretrained(backbone, **kwargs)
        elif kwargs:
            raise ValueError(
                f"from_backbone: {sorted(kwargs)} are neither RMT settings ({', '.join(RMT_SETTINGS)}) nor "
                "from_pretrained arguments (those only apply when backbone is a path or name)"
            )
        return cls(RMTConfig(backbone=backbone.config.to_dict(), **settings), backbone=backbone)

    def _init_weights(self, module):
        # Only M0 belongs to this class; the backbone initialises (or loaded) its own weights.
        # M0 is drawn from the config, never from other weights: under ZeRO-3 those are empty.
        if module is self:
            std = getattr(self.config.backbone_config, "initializer_range", None) or 0.02
            hf_init.normal_(self.memory, mean=0.0, std=std)

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.backbone.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.backbone.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.backbone.set_output_embeddings(value)

    @property
    def decoder(self) -> PreTrainedModel:
        """The backbone without its LM head: returns final-norm hidden states."""
        return self.backbone.base_model

    # ----- segment-level activation checkpointing ---------------------------------------
    def _set_gradient_checkpointing(self, enable=True, gradient_checkpointing_func=None, every_n_layers=1):
        # Checkpointing is per segment step, not per backbone layer: only M_t and the inputs stay
        # alive between forward and backward, so activation memory is flat in the segment count.
        if enable:
            if every_n_layers != 1:
                raise ValueError(
                    f"every_n_layers={every_n_layers}: RMT checkpoints whole segment steps; valid value is 1"
                )
            reentrant = getattr(gradient_checkpointing_func, "keywords", {}).get("use_reentrant", False)
            if reentrant:
                raise ValueError(
                    "use_reentrant=True: reentrant checkpointing breaks under ZeRO-3 when the same blocks run "
                    "once per segment; valid value is use_reentrant=False"
                )
        self.gradient_checkpointing = enable
        self._gradient_checkpointing_func = gradient_checkpointing_func if enable else None

    # ----- forward ----------------------------------------------------------------------
    def segment_hidden(self, memory, seg_ids, seg_embeds, seg_mask):
        """The backbone part of one segment step: (memory_in [B,M,D], tokens [B,T] or embeddings
        [B,T,D], mask [B,T] or None) -> (token hidden states [B,T,D], memory_out [B,M,D]).

        Tensors in and out, no Python state: the step's compile target (training/compile.py). The
        loss stays outside: the fused loss takes its gradients in forward and adds the head's into
        a step-wide buffer (HeadGradient), side effects a captured graph cannot hold."""
        if seg_embeds is None:
            seg_embeds = self.get_input_embeddings()(seg_ids)
        length = seg_embeds.shape[1]
        m = self.config.num_mem_tokens
        positions, attention_mask, real_tokens = segment_layout(m, seg_mask, length, seg_embeds.device)
        memory = memory.to(seg_embeds.dtype)
        hidden = self.decoder(
            inputs_embeds=torch.cat([memory, seg_embeds, memory], dim=1),
            position_ids=positions,
            attention_mask=backbone_mask(self.decoder.config, attention_mask),
            use_cache=False,
        ).last_hidden_state  # [B, M + T + M, D]
        token_hidden = hidden[:, m : m + length]
        # A copy, not a view: a view would keep the whole [B, M+T+M, D] output alive per segment.
        new_memory = hidden[:, m + length :].clone()
        if real_tokens is not None:
            # A segment that is all padding (left-padded prompts) leaves the memory unchanged.
            new_memory = torch.where((real_tokens > 0)[:, None, None], new_memory, memory)
        return token_hidden, new_memory

    def _segment_step(
        self, memory, seg_ids, seg_embeds, seg_targets, seg_mask, logits_from, fuse_loss=False, head_grad=None, position=0
    ):
        """One segment: (memory_in [B,M,D], tokens, targets [B,T] or None, mask [B,T] or None)
        -> (loss_sum, num_tokens, memory_out [B,M,D], logits [B,T-logits_from,V] or None).

        fuse_loss: the loss computes its gradients in forward (segment_loss.FusedLinearCrossEntropy),
        when config.fused_segment_loss allows it. Not in the forward of a checkpointed segment:
        its backward recomputes it (where the fused loss does run), so those products would be
        paid twice. head_grad, position: the step's HeadGradient and this segment's index in it."""
        with segment_step_attention(self.decoder.config):  # transformers' mask builder skipped
            token_hidden, new_memory = self.segment_hidden(memory, seg_ids, seg_embeds, seg_mask)
        lm_head = self.get_output_embeddings()
        if seg_targets is None:
            loss_sum = token_hidden.new_zeros((), dtype=torch.float32)
            num_tokens = torch.zeros((), dtype=torch.long, device=token_hidden.device)
        else:
            loss_sum, num_tokens = lm_loss_sum(
                lm_head, token_hidden, seg_targets, self.config.loss_chunk_size,
                fuse_loss and self.config.fused_segment_loss, head_grad, position,
            )
        logits = lm_head(token_hidden[:, logits_from:]) if logits_from is not None else None
        return loss_sum, num_tokens, new_memory, logits

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        memory: torch.Tensor | None = None,
        return_memory: bool = False,
        return_logits: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: RMTDecodingState | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        attention_mask_padded: bool | None = None,
    ) -> RMTOutput:
        """Process a sequence segment by segment (see module docstring and docs/architecture.md).

        inputs_embeds [B, L, D] may replace input_ids. use_cache/cache run incremental decoding
        (what generate() uses): input_ids are then only the tokens not yet fed to `cache`.
        logits_to_keep=n > 0 returns logits of the last n positions only. attention_mask_padded:
        whether attention_mask hides any position, if known (segments.mask_in_use; decoding,
        which never drops the mask, has nothing to decide with it).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("forward: pass exactly one of input_ids [B, L] or inputs_embeds [B, L, D]")
        if return_dict is False:
            raise ValueError("return_dict=False is not supported: RMTForCausalLM always returns RMTOutput")
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep={logits_to_keep!r}: valid values are integers >= 0 (0 = all)")
        tokens = input_ids if input_ids is not None else inputs_embeds
        if tokens.dim() != (2 if input_ids is not None else 3) or tokens.shape[1] == 0:
            raise ValueError(f"forward: expected a non-empty [B, L] batch, got shape {tuple(tokens.shape)}")
        batch, length = tokens.shape[0], tokens.shape[1]
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, length):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected (B, L) = {(batch, length)}")
        if memory is not None and tuple(memory.shape) != (batch, self.config.num_mem_tokens, self.config.hidden_size):
            raise ValueError(f"memory has shape {tuple(memory.shape)}; expected (B, num_mem_tokens, hidden_size) = "
                             f"{(batch, self.config.num_mem_tokens, self.config.hidden_size)}")

        if use_cache or cache is not None:
            if labels is not None or input_ids is None:
                raise ValueError("incremental decoding (use_cache/cache) takes input_ids and no labels")
            if cache is None:
                cache = RMTDecodingState.start(self, self._initial_memory(batch, memory))
            elif memory is not None:
                raise ValueError("memory: pass it only with the first call; the cache already holds the memory")
            logits = decode_tokens(self, cache, input_ids, attention_mask, logits_to_keep)
            return RMTOutput(logits=logits, memory=cache.memory if return_memory else None, cache=cache)

        if labels is not None and tuple(labels.shape) != (batch, length):
            raise ValueError(f"labels has shape {tuple(labels.shape)}; expected (B, L) = {(batch, length)}")
        if return_logits is None:
            return_logits = labels is None
        return self._forward_segments(
            input_ids, inputs_embeds, mask_in_use(attention_mask, attention_mask_padded), labels,
            self._initial_memory(batch, memory), return_memory, return_logits, logits_to_keep,
        )

    def _checkpointed_step(self):
        """(function running one checkpointed segment on _segment_step's arguments, whether it
        keeps the segment's autograd graph until backward).

        One autograd node per segment (segment_recompute.RecomputedSegment), ZeRO-3-partitioned
        parameters included, unless the checkpoint function set through
        activation_checkpointing_enable() asks for more than it reproduces (e.g. offload): then
        that function (torch.utils.checkpoint), which keeps the segment's graph."""
        params = [p for p in self.backbone.parameters() if p.requires_grad]
        preserve_rng = recompute_rng_setting(self._gradient_checkpointing_func)
        if preserve_rng is None:
            func = self._gradient_checkpointing_func or partial(checkpoint, use_reentrant=False)
            return partial(func, self._segment_step), True
        partitioned = PartitionedParameters(params) or None  # ZeRO-3

        def step(memory, seg_embeds, fuse_loss, **kwargs):
            return self._segment_step(memory, seg_embeds=seg_embeds, fuse_loss=fuse_loss, **kwargs)

        def run(memory, seg_ids, seg_embeds, seg_targets, seg_mask, logits_from):
            kwargs = dict(seg_ids=seg_ids, seg_targets=seg_targets, seg_mask=seg_mask, logits_from=logits_from)
            return RecomputedSegment.apply(step, kwargs, preserve_rng, partitioned, memory, seg_embeds, *params)

        return run, False

    def _checkpoint_budget(self, memory, keeps_graph: bool) -> CheckpointBudget | None:
        budget_mb = self.config.checkpoint_memory_budget_mb
        if budget_mb is None:
            return None
        # A checkpointed segment keeps its memory input and output (the inputs are the caller's),
        # and with torch.utils.checkpoint its autograd graph.
        return CheckpointBudget(
            budget_mb * 2**20, 2 * memory.numel() * memory.element_size(),
            on_host=memory.device.type == "cpu", checkpoint_keeps_graph=keeps_graph,
        )

    def _perturb_memory(self, memory):
        if not (self.training and self.config.memory_noise):
            return memory
        return perturbed(memory, self.config.memory_noise, self.config.memory_noise_prob)

    def _initial_memory(self, batch: int, memory):
        return memory if memory is not None else self.memory.unsqueeze(0).expand(batch, -1, -1)

    def _forward_segments(
        self, input_ids, inputs_embeds, attention_mask, labels, memory, return_memory, return_logits, logits_to_keep
    ) -> RMTOutput:
        tokens = input_ids if input_ids is not None else inputs_embeds
        length = tokens.shape[1]
        seg_size = self.config.segment_size
        num_segments = math.ceil(length / seg_size)
        loss_from = self.config.loss_from_segment  # earlier segments have no targets: their loss is skipped
        targets = loss_targets(labels, attention_mask, seg_size, loss_from) if labels is not None else None
        first_kept = length - logits_to_keep if logits_to_keep else 0
        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled()
        budgeted = self.config.checkpoint_memory_budget_mb is not None and torch.is_grad_enabled()
        run_checkpointed, keeps_graph = self._checkpointed_step() if checkpointed or budgeted else (None, False)
        budget = self._checkpoint_budget(memory, keeps_graph) if budgeted else None
        k = self.config.bptt_depth
        fusing = targets is not None and self.config.fused_segment_loss and torch.is_grad_enabled()
        head_grad = HeadGradient() if fusing else None

        loss_sums, token_counts, logits = [], [], []
        for t in range(num_segments):
            if k > 0 and t > 0 and t % k == 0:
                memory = memory.detach()  # truncated BPTT: no gradient flows into earlier segments
            start, end = t * seg_size, min(length, (t + 1) * seg_size)
            seg_targets = targets[:, start:end] if targets is not None and t >= loss_from else None
            logits_from = max(first_kept - start, 0) if return_logits and end > first_kept else None
            args = (
                memory,
                input_ids[:, start:end] if input_ids is not None else None,
                inputs_embeds[:, start:end] if inputs_embeds is not None else None,
                seg_targets,
                attention_mask[:, start:end] if attention_mask is not None else None,
                logits_from,
            )
            counter = None
            if budget is not None:
                counter = budget.start_segment(num_segments - t)
                checkpointed = budget.checkpoint
            if checkpointed:
                loss_sum, num_tokens, memory, seg_logits = run_checkpointed(*args)
            else:
                with counter.counting() if counter is not None else nullcontext():
                    loss_sum, num_tokens, memory, seg_logits = self._segment_step(
                        *args, fuse_loss=True, head_grad=head_grad, position=t
                    )
            if budget is not None:
                budget.end_segment()
            if t + 1 < num_segments:
                # Outside the (checkpointed) step: the recompute in backward must not redraw it.
                memory = self._perturb_memory(memory)
            loss_sums.append(loss_sum)
            token_counts.append(num_tokens)
            if seg_logits is not None:
                logits.append(seg_logits)

        self.last_checkpointed_segments = (budget.checkpointed_segments if budget is not None
                                           else num_segments if checkpointed else 0)
        segment_loss_sums = head_grad.stack(loss_sums) if head_grad is not None else torch.stack(loss_sums)
        segment_token_counts = torch.stack(token_counts)
        loss_sum = segment_loss_sums.sum()
        num_tokens = segment_token_counts.sum()
        has_loss = labels is not None
        return RMTOutput(
            loss=loss_sum / num_tokens.clamp(min=1) if has_loss else None,
            logits=torch.cat(logits, dim=1) if return_logits else None,
            loss_sum=loss_sum if has_loss else None,
            num_tokens=num_tokens if has_loss else None,
            segment_losses=segment_loss_sums / segment_token_counts if has_loss else None,
            segment_token_counts=segment_token_counts if has_loss else None,
            memory=memory if return_memory else None,
        )

    # ----- generation (GenerationMixin hooks) -------------------------------------------
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The decoding state is RMT-specific (memory + per-segment KV cache): forward creates it.
        return False

    def prepare_inputs_for_generation(
        self,
        input_ids,
        next_sequence_length=None,
        cache=None,
        attention_mask=None,
        inputs_embeds=None,
        is_first_iteration=False,
        use_cache=True,
        memory=None,
        **kwargs,
    ):
        if inputs_embeds is not None:
            raise ValueError("generate: inputs_embeds prompts are not supported by RMT; pass input_ids")
        inputs = {"use_cache": use_cache, **kwargs}
        if not use_cache:
            # Without a decoding state every step re-reads the whole sequence.
            inputs.update(input_ids=input_ids, attention_mask=attention_mask, memory=memory)
            return inputs
        seen = cache.num_tokens if cache is not None else 0
        inputs.update(
            input_ids=input_ids[:, seen:],
            attention_mask=attention_mask[:, seen:] if attention_mask is not None else None,
            cache=cache,
            memory=memory if cache is None else None,
        )
        return inputs
