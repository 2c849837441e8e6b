"""Ladder (Ju et al. 2021): the layer stack applied K times with shared weights, one KV cache per step."""

import pytest
import torch

from models import HashMoEForCausalLM
from models.modeling_hashmoe import HashMoEBlock
from tests.conftest import tiny_config

LADDER = {"kind": "ladder", "steps": 3}


def build(**extra):
    torch.manual_seed(0)
    return HashMoEForCausalLM(tiny_config(**extra)).eval()


@pytest.mark.parametrize("router", [dict(router="hash", hash_function="bigram"), dict(router="switch"),
                                    dict(router="base"), dict(moe_layers=[])])
def test_ladder_generation_with_cache_equals_without(router):
    model = build(recurrence=LADDER, **router)
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, use_cache=True, **kwargs), model.generate(prompt, use_cache=False, **kwargs))


def test_a_cache_shared_across_ladder_steps_would_be_caught(monkeypatch):
    """The bug the paper's reference code appears to have: every step writing to layer i's cache slot."""
    model = build(recurrence=LADDER, router="hash", hash_function="random")
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    correct = model(ids, use_cache=False).logits[:, -1]
    original = HashMoEBlock.forward
    num_layers = model.config.num_hidden_layers
    monkeypatch.setattr(HashMoEBlock, "forward", lambda self, x, layout, routing, past_key_values=None,
                        cache_index=0: original(self, x, layout=layout, routing=routing,
                                                past_key_values=past_key_values, cache_index=cache_index % num_layers))
    first = model(ids[:, :5], use_cache=True)
    shared = model(ids[:, 5:], past_key_values=first.past_key_values, prev_token_ids=ids[:, 4:5]).logits[:, -1]
    assert (shared - correct).abs().max() > 1e-3


def test_one_step_ladder_is_the_plain_model_and_more_steps_reuse_the_same_weights():
    plain, one, three = build(), build(recurrence={"kind": "ladder", "steps": 1}), build(recurrence=LADDER)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(one(ids).logits, plain(ids).logits, rtol=0, atol=0)
    assert not torch.allclose(three(ids).logits, plain(ids).logits)
    assert three.parameter_counts() == plain.parameter_counts()  # computation without parameters
    out = three(ids, output_router_logits=True)
    assert len(out.expert_indices) == 3  # one routing per pass through the MoE layer
    assert int(out.expert_load[0].sum()) == 3 * ids.numel()


@pytest.mark.parametrize("ffn", [{}, {"ffn_linear": "monarch", "monarch_blocks": 4}])
def test_residual_projections_are_scaled_for_the_layers_or_every_pass(ffn):
    # GPT-2's 1/sqrt(2D): D = the layers by default (residual_init="layers"); with residual_init="passes" the
    # K x L branches a K-step ladder adds to the residual.
    torch.manual_seed(0)
    wide = dict(hidden_size=256, intermediate_size=512, moe_layers=[1], num_hidden_layers=2, **ffn)
    ladder = dict(recurrence={"kind": "ladder", "steps": 4})
    plain = HashMoEForCausalLM(tiny_config(**wide))
    by_layers = HashMoEForCausalLM(tiny_config(**wide, **ladder))
    by_passes = HashMoEForCausalLM(tiny_config(**wide, **ladder, residual_init="passes"))
    r = plain.config.initializer_range
    for model, depth in ((plain, 2), (by_layers, 2), (by_passes, 8)):
        out_std = r / (2 * depth) ** 0.5
        dense, moe = model.model.layers
        assert dense.self_attn.o_proj.weight.std().item() == pytest.approx(out_std, rel=0.05)
        assert dense.self_attn.qkv_proj.weight.std().item() == pytest.approx(r, rel=0.05)
        # Monarch factors differ from a dense weight; their product has the output scale of one
        x = torch.randn(2048, 512)
        with torch.no_grad():
            assert dense.mlp.down_proj(x).std().item() == pytest.approx(out_std * 512 ** 0.5, rel=0.1)
            assert dense.mlp.up_proj(x[:, :256]).std().item() == pytest.approx(r * 256 ** 0.5, rel=0.1)
        assert moe.mlp.experts.w2.std().item() == pytest.approx(out_std, rel=0.05)


def test_manual_ladder_reference():
    """Three passes through the shared blocks, by hand, give the model's logits."""
    model = build(recurrence=LADDER, router="hash", hash_function="random")
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(3))
    inner = model.model
    from models.modeling_hashmoe import attention_layout, routing_inputs

    positions = torch.arange(7)[None]
    routing = routing_inputs(ids, positions, 64)
    x = inner.embed_tokens(ids) + inner.embed_positions(positions)
    for _ in range(3):
        for block in inner.layers:
            x, _, _ = block(x, layout=attention_layout(None, 1, 7, 0, x.device), routing=routing)
    torch.testing.assert_close(model(ids, use_cache=False).logits, model.lm_head(inner.norm(x)), rtol=0, atol=0)


def test_ladder_round_trips_through_save_and_load(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build(recurrence=LADDER)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.recurrence == LADDER
    ids = torch.randint(0, 64, (2, 6))
    # Equal weights and buffers, but the loaded ones sit in the file's memory map, where CPU kernels may pick
    # another vector path for unaligned rows: measured 4e-8 apart, and 0 once the loaded tensors are copied.
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), name
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("recurrence", [{"kind": "spiral", "steps": 2}, {"kind": "ladder", "steps": 0},
                                        {"kind": "ladder"}, {"kind": "ladder", "steps": 2, "width": 3}, "ladder"])
def test_bad_recurrence_is_named(recurrence):
    with pytest.raises(ValueError, match=r"HashMoEConfig\.recurrence:"):
        tiny_config(recurrence=recurrence)
