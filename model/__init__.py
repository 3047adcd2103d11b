"""Recurrent Memory Transformer over a Hugging Face causal-LM backbone.

Lazy (PEP 562): `import model.conventions` loads neither torch nor transformers, so the data
pipeline and config checks can import the model's conventions cheaply. Every name below reached
through the package (`from model import RMTConfig`, `model.IGNORE_INDEX`, ...) loads the whole
model first and registers it with the Auto classes, as importing this package always did.
"""

import importlib

# public name -> submodule that defines it
_EXPORTS = {
    "RMTConfig": "configuration_rmt",
    "RMTForCausalLM": "modeling_rmt",
    "RMTOutput": "modeling_rmt",
    "IGNORE_INDEX": "conventions",
    "positions_per_segment": "conventions",
    "count_targets": "segments",
}
__all__ = list(_EXPORTS)


def register_auto_classes() -> None:
    """Import the model and register it: in-repo loading through the Auto classes, and auto_map +
    copied model files on save_pretrained, so that saved folders load elsewhere with
    trust_remote_code=True."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .configuration_rmt import RMTConfig
    from .modeling_rmt import RMTForCausalLM

    AutoConfig.register(RMTConfig.model_type, RMTConfig, exist_ok=True)
    AutoModelForCausalLM.register(RMTConfig, RMTForCausalLM, exist_ok=True)
    RMTConfig.register_for_auto_class()
    RMTForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    register_auto_classes()
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value
