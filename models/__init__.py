"""hashmoe models: HF-compatible causal LMs with dense, Hash, Switch, BASE and top-k MoE FFN sublayers.

Importable with torch + transformers alone (no DeepSpeed)."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_hashmoe import HashMoEConfig
from .modeling_hashmoe import HashMoECausalLMOutput, HashMoEForCausalLM, HashMoEModel

AutoConfig.register(HashMoEConfig.model_type, HashMoEConfig, exist_ok=True)
AutoModel.register(HashMoEConfig, HashMoEModel, exist_ok=True)
AutoModelForCausalLM.register(HashMoEConfig, HashMoEForCausalLM, exist_ok=True)

__all__ = ["HashMoEConfig", "HashMoEForCausalLM", "HashMoEModel", "HashMoECausalLMOutput"]
