"""RMTConfig: the backbone's config plus the memory settings, validated in one place."""

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .conventions import positions_per_segment
from .flops import training_flops

# Config attributes that cap absolute positions (GPT-2 calls it n_positions; most others
# max_position_embeddings). RoPE models also declare a maximum: respect it as well.
_POSITION_LIMIT_ATTRS = ("n_positions", "max_position_embeddings")

# RMTConfig's own settings (everything but the backbone), as RMTForCausalLM.from_backbone takes them.
RMT_SETTINGS = (
    "num_mem_tokens", "segment_size", "bptt_depth", "loss_from_segment", "loss_chunk_size",
    "checkpoint_memory_budget_mb", "fused_segment_loss", "memory_noise", "memory_noise_prob",
)


class RMTConfig(PretrainedConfig):
    """Recurrent Memory Transformer settings.

    backbone: dict of the backbone's Hugging Face config, including `model_type`.
    num_mem_tokens (m): memory slots; each segment sees them read (start) and write (end).
    segment_size (S): tokens per segment; the backbone sees S + 2m positions per step.
    bptt_depth (k): memory is detached after every k-th segment; -1 = full BPTT.
    loss_from_segment (j): only targets in segments >= j count towards the loss.
    loss_chunk_size: segment positions whose [B, chunk, V] logits exist at once in the loss.
    checkpoint_memory_budget_mb: None, or MiB of activations a training step may keep alive between
        forward and backward. When set, training steps use segment checkpointing for only as many
        segments as needed to fit the budget (the first segment runs un-checkpointed to measure its
        activations; later ones stay un-checkpointed while they fit). None: checkpointing is all or
        nothing, as set by activation_checkpointing_enable().
    fused_segment_loss: True (default) or False. True: in training, each segment's LM-head loss
        computes its gradients in forward (a checkpointed segment: in its recompute), chunk by
        chunk, and keeps only those for backward; the un-checkpointed segments of a step add their
        LM-head gradient into one step-wide sum (see segment_loss.FusedLinearCrossEntropy and
        segment_loss.HeadGradient; ZeRO-3-partitioned or non-Linear heads fall back).
        False: F.cross_entropy on each chunk's logits, recomputed in backward when chunked.
    memory_noise: 0.0 (default: off) or sigma > 0. In training mode only, the memory handed from one
        segment to the next gets Gaussian noise of sigma times its own RMS (per slot, not
        differentiated). Trained at <= 4 segments, a memory code must then survive perturbation,
        which is what kept it readable at 4x-16x the trained number of segments in
        docs/results.md, section 4. Evaluation and generation (eval mode) never add noise.
    memory_noise_prob: 1.0 (default) or p in (0, 1): the chance that a sample's hand-over gets
        the noise (drawn per sample and hand-over); the others pass the memory clean, so the
        clean memory that evaluation sees is also seen in training (docs/results.md, section 4:
        trained with noise on every hand-over, one model solved a task with noise and failed it
        without).
    """

    model_type = "rmt"

    def __init__(
        self,
        backbone=None,
        num_mem_tokens=16,
        segment_size=512,
        bptt_depth=-1,
        loss_from_segment=0,
        loss_chunk_size=1024,
        checkpoint_memory_budget_mb=None,
        fused_segment_loss=True,
        memory_noise=0.0,
        memory_noise_prob=1.0,
        **kwargs,
    ):
        self.backbone = dict(backbone) if backbone is not None else {"model_type": "llama"}
        self.num_mem_tokens = num_mem_tokens
        self.segment_size = segment_size
        self.bptt_depth = bptt_depth
        self.loss_from_segment = loss_from_segment
        self.loss_chunk_size = loss_chunk_size
        self.checkpoint_memory_budget_mb = checkpoint_memory_budget_mb
        self.fused_segment_loss = fused_segment_loss
        self.memory_noise = memory_noise
        self.memory_noise_prob = memory_noise_prob
        # Before the base init: its own validators already read vocab_size from the backbone.
        self.validate_rmt()
        super().__init__(**kwargs)

    @property
    def backbone_config(self) -> PretrainedConfig:
        """The backbone's PretrainedConfig, built from the `backbone` dict."""
        settings = dict(self.backbone)
        model_type = settings.pop("model_type")
        return AutoConfig.for_model(model_type, **settings)

    @property
    def hidden_size(self) -> int:
        return self.backbone_config.get_text_config().hidden_size

    @property
    def vocab_size(self) -> int:
        return self.backbone_config.get_text_config().vocab_size

    @property
    def positions_per_segment(self) -> int:
        """Backbone positions of one full segment step: segment_size + 2 * num_mem_tokens."""
        return positions_per_segment(self.segment_size, self.num_mem_tokens)

    def training_flops(self, length: int, num_mem_tokens: int | None = None) -> float:
        """Model FLOPs of training on one sequence of `length` tokens (forward + backward, no
        recompute; the formula is in model/flops.py); num_mem_tokens=0: without memory."""
        return training_flops(self, length, num_mem_tokens)

    def validate_rmt(self) -> None:
        """Raise ValueError naming the field and its valid range for any invalid setting."""
        _require_int("num_mem_tokens", self.num_mem_tokens, minimum=1)
        _require_int("segment_size", self.segment_size, minimum=1)
        _require_int("loss_from_segment", self.loss_from_segment, minimum=0)
        _require_int("loss_chunk_size", self.loss_chunk_size, minimum=1)
        budget = self.checkpoint_memory_budget_mb
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0):
            raise ValueError(
                f"checkpoint_memory_budget_mb={budget!r} is invalid: valid values are None (no budget: "
                "checkpoint all segments or none) or a number of MiB > 0"
            )
        if not isinstance(self.fused_segment_loss, bool):
            raise ValueError(
                f"fused_segment_loss={self.fused_segment_loss!r} is invalid: valid values are False or True"
            )
        noise = self.memory_noise
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise < float("inf"):
            raise ValueError(
                f"memory_noise={noise!r} is invalid: valid values are 0 (off) or a finite number > 0 "
                "(noise std relative to the memory's RMS, e.g. 1.0)"
            )
        prob = self.memory_noise_prob
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0 < prob <= 1:
            raise ValueError(
                f"memory_noise_prob={prob!r} is invalid: valid values are numbers in (0, 1] (the chance "
                "that a hand-over gets memory_noise; 1 = every one)"
            )
        if _not_int(self.bptt_depth) or not (self.bptt_depth == -1 or self.bptt_depth >= 1):
            raise ValueError(
                f"bptt_depth={self.bptt_depth!r} is invalid: valid values are -1 (full BPTT) "
                "or an integer >= 1 (detach memory after every k-th segment)"
            )
        backbone_config = _validate_backbone(self.backbone)
        positions = self.positions_per_segment
        for attr in _POSITION_LIMIT_ATTRS:
            limit = getattr(backbone_config, attr, None)
            if isinstance(limit, int) and positions > limit:
                raise ValueError(
                    f"segment_size + 2 * num_mem_tokens = {self.segment_size} + 2 * {self.num_mem_tokens} "
                    f"= {positions} exceeds the backbone's {attr} = {limit}; valid range: "
                    f"segment_size + 2 * num_mem_tokens <= {limit}"
                )


def _not_int(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


def _require_int(name: str, value, minimum: int) -> None:
    if _not_int(value) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: valid range is an integer >= {minimum}")


def _validate_backbone(backbone) -> PretrainedConfig:
    if not isinstance(backbone, dict) or not isinstance(backbone.get("model_type"), str):
        raise ValueError(
            "backbone must be a dict of a Hugging Face config including 'model_type' "
            f"(e.g. {{'model_type': 'llama', 'hidden_size': 64}}), got {backbone!r}"
        )
    model_type = backbone["model_type"]
    causal_types = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ValueError(
            f"backbone['model_type']={model_type!r} is unknown to transformers; valid values are "
            f"causal-LM model types such as 'llama', 'gpt2', 'mistral', 'qwen2' (any of {len(causal_types)})"
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"backbone['model_type']={model_type!r} has no causal-LM head in transformers; valid values "
            "are decoder-only causal LMs such as 'llama', 'gpt2', 'mistral', 'qwen2'"
        )
    settings = {k: v for k, v in backbone.items() if k != "model_type"}
    try:
        config = AutoConfig.for_model(model_type, **settings)
    except Exception as err:  # transformers' strict dataclass errors are not ValueErrors
        raise ValueError(f"backbone: cannot build a {model_type!r} config from {settings!r}: {err}") from err
    # Encoder models with an optional decoder mode (BERT, RoBERTa, ...) and encoder-decoder
    # models are not decoder-only: their attention is bidirectional or needs an encoder.
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", True) is False:
        raise ValueError(
            f"backbone['model_type']={model_type!r} is not a decoder-only causal LM (it is an encoder or "
            "encoder-decoder model); valid backbones are causal decoders such as 'llama', 'gpt2', 'mistral'"
        )
    return config
