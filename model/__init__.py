"""Recurrent Memory Transformer over a Hugging Face causal-LM backbone."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_rmt import RMTConfig
from .modeling_rmt import RMTForCausalLM, RMTOutput

# In-repo loading through the Auto classes, and auto_map + copied model files on save_pretrained
# so that saved folders load elsewhere with trust_remote_code=True.
AutoConfig.register(RMTConfig.model_type, RMTConfig, exist_ok=True)
AutoModelForCausalLM.register(RMTConfig, RMTForCausalLM, exist_ok=True)
RMTConfig.register_for_auto_class()
RMTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["RMTConfig", "RMTForCausalLM", "RMTOutput"]
