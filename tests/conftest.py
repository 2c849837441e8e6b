import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


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
