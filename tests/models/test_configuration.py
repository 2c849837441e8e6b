import pytest

from models import HashMoEConfig
from tests.conftest import tiny_config


@pytest.mark.parametrize("kwargs,field", [
    (dict(num_experts=0), "num_experts"),
    (dict(router="sinkhorn"), "router"),
    (dict(hash_function="md5"), "hash_function"),
    (dict(moe_layers=[0, 4]), "moe_layers"),
    (dict(moe_layers=[1, 1]), "moe_layers"),
    (dict(hash_heads=3, hash_function="random"), "hash_heads"),  # 3 does not divide 1024
    (dict(hash_heads=2, hash_function="balanced"), "hash_heads"),
    (dict(hidden_size=30, num_attention_heads=4), "num_attention_heads"),
    (dict(router="topk", num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(hidden_act="tanhh"), "hidden_act"),
    (dict(router_jitter=1.5), "router_jitter"),
    (dict(hash_gate="softmax"), "hash_gate"),
    (dict(router="switch", hash_gate="sqrtsoftplus"), "hash_gate"),
    (dict(router="switch", router_bias_update_rate=-1e-3), "router_bias_update_rate"),
    (dict(router="hash", router_bias_update_rate=1e-3), "router_bias_update_rate"),
])
def test_invalid_fields_are_named_in_the_error(kwargs, field):
    with pytest.raises(ValueError, match=rf"HashMoEConfig\.{field}:"):
        HashMoEConfig(moe_layers=kwargs.pop("moe_layers", [1]), **kwargs)


def test_defaults_and_round_trip(tmp_path):
    config = HashMoEConfig(moe_layers=[3, 1], capacity_factor=None)
    assert config.moe_layers == [1, 3] and config.expert_intermediate_size == config.intermediate_size
    config.save_pretrained(tmp_path)
    loaded = HashMoEConfig.from_pretrained(tmp_path)
    assert loaded.moe_layers == [1, 3] and loaded.capacity_factor is None and loaded.router == "hash"


def test_residual_init_counts_layers_or_passes():
    """The depth of GPT-2's output init (the weights themselves: tests/models/test_ladder.py)."""
    ladder = dict(num_hidden_layers=2, recurrence={"kind": "ladder", "steps": 4}, moe_layers=[])
    assert tiny_config(**ladder).residual_depth == 2
    assert tiny_config(**ladder, residual_init="passes").residual_depth == 8
    with pytest.raises(ValueError, match="residual_init"):
        tiny_config(residual_init="blocks")
