"""Parameters without training (Chatelain et al. 2021): frozen random FFN units and structured linears."""

import pytest
import torch

from models import HashMoEForCausalLM
from models.structured import MonarchLinear
from tests.conftest import tiny_config


def build(**extra):
    torch.manual_seed(0)
    return HashMoEForCausalLM(tiny_config(**extra))


def test_frozen_units_never_train_and_stay_out_of_the_optimizer():
    model = build(frozen_ffn_size=48).train()
    mlp = model.model.layers[0].mlp  # layer 0 is dense, layer 1 MoE
    before = (mlp.frozen_up.clone(), mlp.frozen_down.clone())
    assert not any(name.split(".")[-1].startswith("frozen_") for name, _ in model.named_parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trained_before = mlp.up_proj.weight.clone()
    for _ in range(3):
        ids = torch.randint(0, 64, (2, 12))
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(mlp.frozen_up, before[0]) and torch.equal(mlp.frozen_down, before[1])
    assert mlp.frozen_up.grad is None and not mlp.frozen_up.requires_grad
    assert not torch.equal(mlp.up_proj.weight, trained_before)  # the trainable units did train


def test_frozen_units_change_the_function_and_are_seeded():
    plain, doped, again = build(), build(frozen_ffn_size=48), build(frozen_ffn_size=48)
    ids = torch.randint(0, 64, (2, 9))
    assert not torch.allclose(plain(ids).logits, doped(ids).logits)
    torch.testing.assert_close(doped(ids).logits, again(ids).logits, rtol=0, atol=0)
    other_seed = build(frozen_ffn_size=48, frozen_seed=1)
    assert not torch.equal(other_seed.model.layers[0].mlp.frozen_up, doped.model.layers[0].mlp.frozen_up)


def test_parameter_accounting_separates_trainable_and_frozen():
    config = dict(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=8, moe_layers=[], frozen_ffn_size=6)
    counts = build(**config).parameter_counts()
    plain = build(**{**config, "frozen_ffn_size": 0}).parameter_counts()
    frozen = 2 * (6 * 4 + 4 * 6)  # two dense layers, up and down
    assert counts["frozen"] == frozen and counts["trainable"] == plain["trainable"]
    assert counts["total"] == plain["total"] + frozen
    assert counts["active"] == plain["active"] + frozen  # every token computes through them


def test_frozen_units_round_trip_through_save_and_load(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build(frozen_ffn_size=48, ffn_linear="monarch", monarch_blocks=4).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert (tmp_path / "structured.py").exists()


def dense_matrix(layer: MonarchLinear) -> torch.Tensor:
    return layer(torch.eye(layer.in_features)).t()  # column j = image of e_j


@pytest.mark.parametrize("shape", [(8, 12, 4), (16, 16, 4), (6, 3, 3)])
def test_monarch_is_a_linear_map_with_the_stated_parameter_count(shape):
    in_f, out_f, blocks = shape
    layer = MonarchLinear(in_f, out_f, blocks)
    layer.reset_parameters(0.5)
    x = torch.randn(5, 2, in_f)
    torch.testing.assert_close(layer(x), x @ dense_matrix(layer).t())
    assert sum(p.numel() for p in layer.parameters()) == in_f * out_f // blocks + out_f * blocks
    assert (dense_matrix(layer) != 0).all()  # every output depends on every input


def test_monarch_ffn_trains_with_fewer_parameters():
    dense, monarch = build(moe_layers=[]), build(moe_layers=[], ffn_linear="monarch", monarch_blocks=4)
    assert monarch.parameter_counts()["trainable"] < dense.parameter_counts()["trainable"]
    ids = torch.randint(0, 64, (2, 12))
    monarch(ids, labels=ids).loss.backward()
    assert monarch.model.layers[0].mlp.up_proj.blocks_left.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs,field", [(dict(frozen_ffn_size=-1), "frozen_ffn_size"),
                                          (dict(ffn_linear="butterfly"), "ffn_linear"),
                                          (dict(ffn_linear="monarch", monarch_blocks=5), "monarch_blocks")])
def test_bad_doping_fields_are_named(kwargs, field):
    with pytest.raises(ValueError, match=rf"HashMoEConfig\.{field}:"):
        tiny_config(**kwargs)
