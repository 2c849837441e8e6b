import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


# Qwen3-MoE's block at test size: RoPE, RMSNorm, SwiGLU, GQA (2 key/value heads for 4 query heads), a head width
# apart from hidden_size / heads, per-head QK-norm, untied embeddings.
MODERN_BLOCK = dict(position_embedding_type="rope", norm_type="rmsnorm", gated_ffn=True, hidden_act="silu",
                    num_key_value_heads=2, head_dim=16, qk_norm=True, tie_word_embeddings=False)
# DeepSeek-V4's layout: hash (k whole experts under a sqrtsoftplus gate) below, learned top-k above, a shared expert.
V4_LAYOUT = dict(moe_layers=[0, 1], router=["hash", "topk"], hash_function="random", hash_experts_per_tok=2,
                 hash_gate="sqrtsoftplus", scoring_func="sqrtsoftplus", routed_scaling_factor=1.5,
                 num_shared_experts=1, capacity_factor=None)


def tiny_config(**overrides):
    from models import HashMoEConfig

    values = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, moe_layers=[1], num_experts=4)
    values.update(overrides)
    return HashMoEConfig(**values)


@pytest.fixture
def make_config():
    return tiny_config

# transformers' test-tree stand-ins are imported by tests/models/hf_suite.py, not collected.
collect_ignore_glob = ["models/hf_upstream/*"]
