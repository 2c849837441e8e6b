import pytest
import torch
from transformers import AutoModelForCausalLM

from models import HashMoEForCausalLM
from tests.conftest import MODERN_BLOCK, V4_LAYOUT, tiny_config

ROUTER_CONFIGS = {
    "dense": dict(moe_layers=[]),
    "hash-balanced": dict(router="hash", hash_function="balanced"),
    "hash-bigram": dict(router="hash", hash_function="bigram"),
    "hash-prev": dict(router="hash", hash_function="prev_token"),
    "hash-position": dict(router="hash", hash_function="position"),
    "hash-multi": dict(router="hash", hash_function="random", hash_heads=4),
    "hash-v4-gate": dict(router="hash", hash_function="random", hash_gate="sqrtsoftplus"),
    "switch": dict(router="switch", router_z_loss_coef=1e-3),
    "switch-bias": dict(router="switch", router_bias_update_rate=1e-2, router_aux_loss_coef=0.0),
    "base": dict(router="base"),
    "topk": dict(router="topk"),
    "modern-topk-shared": dict(router="topk", num_shared_experts=1, **MODERN_BLOCK),
    "modern-hash": dict(router="hash", hash_function="random", **MODERN_BLOCK),
    "modern-v4": dict(**V4_LAYOUT, **MODERN_BLOCK),
    "modern-dense": dict(moe_layers=[], **MODERN_BLOCK),
}


def build(name, **extra):
    torch.manual_seed(0)
    return HashMoEForCausalLM(tiny_config(**ROUTER_CONFIGS[name], **extra))


def batch(B=2, S=12, seed=1):
    return torch.randint(0, 64, (B, S), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(ROUTER_CONFIGS))
def test_forward_shapes_and_loss_parts(name):
    model = build(name).train()
    ids = batch()
    out = model(ids, labels=ids, output_router_logits=True)
    assert out.logits.shape == (2, 12, 64)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    num_moe = len(model.config.moe_layers)
    assert len(out.expert_load) == len(out.expert_indices) == num_moe
    routes = [2 * 12 * index.shape[1] for index in out.expert_indices]
    assert int(sum(load.sum() for load in out.expert_load) + out.dropped_tokens) == sum(routes)
    for load, count in zip(out.expert_load_chosen, routes):
        assert int(load.sum()) == count  # before capacity: every route
    out.loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname


@pytest.mark.parametrize("name", list(ROUTER_CONFIGS))
def test_save_load_gives_equal_logits(name, tmp_path):
    model = build(name).eval()
    if name == "hash-balanced":  # a fitted table must survive the round trip
        model.fit_hash_tables(token_counts=torch.arange(64) ** 2)
    if name == "switch-bias":  # and so must a balancing bias
        model.train()(batch(seed=5))
        model.update_router_biases()
        assert model.model.layers[1].mlp.router.score_correction_bias.abs().sum() > 0
        model.eval()
    ids = batch()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == "HashMoEForCausalLM"
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    for (n1, b1), (n2, b2) in zip(model.named_buffers(), loaded.named_buffers()):
        assert n1 == n2 and torch.equal(b1, b2)


@pytest.mark.parametrize("name", list(ROUTER_CONFIGS))
def test_cached_generation_equals_uncached(name):
    model = build(name).eval()
    prompt = batch(B=2, S=5, seed=3)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 17)
    assert torch.equal(with_cache, without)


def test_cached_sampling_equals_uncached_sampling():
    model = build("hash-bigram").eval()
    prompt = batch(B=1, S=4, seed=5)
    kwargs = dict(max_new_tokens=10, do_sample=True, top_k=20, temperature=1.5, pad_token_id=0)
    torch.manual_seed(11)
    a = model.generate(prompt, use_cache=True, **kwargs)
    torch.manual_seed(11)
    b = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(a, b)


def test_incremental_forward_equals_full_forward_for_context_hashes():
    """prev-token/bigram routing needs the id before the new chunk: prev_token_ids carries it."""
    model = build("hash-bigram").eval()
    ids = batch(B=2, S=10)
    full = model(ids, use_cache=False).logits
    first = model(ids[:, :6], use_cache=True)
    rest = model(ids[:, 6:], past_key_values=first.past_key_values, prev_token_ids=ids[:, 5:6])
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, rtol=1e-5, atol=1e-5)


def test_left_padded_batch_generation_matches_single_sequence():
    model = build("hash-prev").eval()
    short = torch.tensor([[5, 9, 13]])
    padded = torch.tensor([[0, 0, 5, 9, 13], [1, 2, 3, 4, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone = model.generate(short, **kwargs)[0, 3:]
    together = model.generate(padded, attention_mask=mask, **kwargs)[0, 5:]
    assert torch.equal(alone, together)


def test_oracle_future_refuses_to_generate():
    model = HashMoEForCausalLM(tiny_config(router="hash", hash_function="oracle_future")).eval()
    ids = batch()
    # in a forward pass it routes by the next token (the analysis upper bound) ...
    out = model(ids, output_router_logits=True)
    table = model.model.layers[1].mlp.router.table[0]
    routed_BS = out.expert_indices[0][:, 0].view(ids.shape)
    assert torch.equal(routed_BS[:, :-1], table[ids[:, 1:]])
    assert torch.equal(routed_BS[:, -1], table[64].expand(2))  # no next token: the "none" key
    # ... but generation has no next token
    with pytest.raises(ValueError, match="oracle_future"):
        model.generate(ids, max_new_tokens=2)


def test_parameter_counts_exact_for_a_hand_computed_config():
    config = tiny_config(vocab_size=10, hidden_size=4, intermediate_size=6, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=8, moe_layers=[1], num_experts=3,
                         router="topk", num_experts_per_tok=2)
    counts = HashMoEForCausalLM(config).parameter_counts()
    d, f = 4, 6
    embeddings = 10 * d + 8 * d  # tied lm_head counted once
    attention = 3 * d * d + d * d
    norms = 2 * 2 * d
    dense_ffn = 2 * d * f
    expert = 2 * d * f
    router = 3 * d
    final_norm = 2 * d
    total = embeddings + 2 * (attention + norms) + dense_ffn + 3 * expert + router + final_norm
    assert counts["total"] == total == sum(p.numel() for p in HashMoEForCausalLM(config).parameters())
    assert counts["trainable"] == total and counts["frozen"] == 0
    assert counts["active"] == total - 1 * expert  # top-2 of 3 experts
    assert counts["active_non_embedding"] == total - expert - embeddings


def test_hash_tables_identical_across_independent_constructions():
    """Every process builds the same tables from the config alone (no shared RNG state)."""
    torch.manual_seed(1)
    a = build("hash-multi")
    torch.manual_seed(2)
    b = build("hash-multi")
    assert torch.equal(a.model.layers[1].mlp.router.table, b.model.layers[1].mlp.router.table)


@pytest.mark.parametrize("name", ["hash-multi", "switch", "topk", "modern-v4"])
def test_experts_implementations_give_the_same_model(name, tmp_path):
    """transformers' switch, from_pretrained(experts_implementation=...): "grouped_mm", "batched_mm" and "eager"
    give the same logits and gradients; an implementation hashmoe does not offer is refused naming those it does."""
    build(name).save_pretrained(tmp_path)
    ids = batch()
    results = {}
    for implementation in ("grouped_mm", "batched_mm", "eager"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=implementation).train()
        assert model.config._experts_implementation == implementation
        torch.manual_seed(3)  # the same router jitter
        out = model(ids, labels=ids)
        out.loss.backward()
        results[implementation] = (out.logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    logits_e, grads_e = results.pop("eager")
    for implementation, (logits, grads) in results.items():
        torch.testing.assert_close(logits, logits_e, rtol=1e-5, atol=1e-5, msg=implementation)
        assert grads.keys() == grads_e.keys()
        for key in grads:
            torch.testing.assert_close(grads[key], grads_e[key], rtol=1e-4, atol=1e-5, msg=f"{implementation} {key}")
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._experts_implementation is None  # per device
    with pytest.raises(ValueError, match="grouped_mm, batched_mm, eager"):
        AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="sonicmoe")


def test_the_balancing_bias_stays_fp32_under_a_bf16_load_and_counts_stay_exact(tmp_path):
    build("switch-bias").save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    router = loaded.model.layers[1].mlp.router
    assert router.weight.dtype == torch.bfloat16
    # steps of 1e-2 on fp32 probabilities: from_pretrained casts the parameters, and keeps the saved fp32 buffer
    assert router.score_correction_bias.dtype == torch.float32
    loaded.to(torch.bfloat16)
    assert router.chosen_since_update.dtype == torch.long  # bf16 would stop counting at 256


def test_active_parameters_count_every_expert_a_token_uses():
    """k whole experts per token (top-k, and V4's hash table of k experts) are active; multi-hash heads share one."""
    for name, k in (("modern-v4", 2), ("topk", 2), ("hash-multi", 1)):
        model = build(name)
        counts = model.parameter_counts()
        inactive = 0
        for layer in model.model.layers:
            if hasattr(layer.mlp, "experts"):
                bank = layer.mlp.experts
                inactive += (bank.num_experts - k) * (bank.w1[0].numel() + bank.w2[0].numel())
        assert counts["active"] == counts["total"] - inactive, name


def test_the_position_hash_keeps_its_length_limit_under_rope():
    torch.manual_seed(0)
    model = HashMoEForCausalLM(tiny_config(router="hash", hash_function="position", **MODERN_BLOCK)).eval()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 65, dtype=torch.long))
