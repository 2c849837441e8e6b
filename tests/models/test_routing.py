import math

import pytest
import torch

from models.hashing import balanced_table, bigram_hash, random_table
from models.routing import (
    BaseRouter,
    HashRouter,
    RoutingInputs,
    SoftmaxRouter,
    drop_over_capacity,
    load_balancing_loss,
    router_z_loss,
)

V, E = 20, 4


def routing_for(ids, positions=None):
    ids = torch.as_tensor(ids)
    prev = torch.cat([torch.tensor([V]), ids[:-1]])
    nxt = torch.cat([ids[1:], torch.tensor([V])])
    positions = torch.arange(len(ids)) if positions is None else torch.as_tensor(positions)
    return RoutingInputs(ids, prev, nxt, positions)


def hash_router(function, heads=1, seed=7):
    return HashRouter(function, E, heads, vocab_size=V, max_positions=32, seed=seed)


IDS = [3, 17, 3, 0, 19, 5, 5, 11]


@pytest.mark.parametrize("function,key", [
    ("random", lambda r: r.input_ids_T),
    ("prev_token", lambda r: r.prev_ids_T),
    ("oracle_future", lambda r: r.next_ids_T),
    ("position", lambda r: r.position_ids_T),
])
def test_table_hashes_pick_the_table_entry_of_their_key(function, key):
    router = hash_router(function)
    routing = routing_for(IDS, positions=[4, 5, 6, 7, 8, 9, 10, 11])
    out = router(torch.zeros(len(IDS), 3), routing)
    num_keys = {"position": 32, "random": V}.get(function, V + 1)
    expected = random_table(num_keys, E, 7)[key(routing)]
    assert torch.equal(out.expert_index_TK[:, 0], expected)
    assert torch.equal(out.expert_weight_TK, torch.ones(len(IDS), 1)) and out.aux_loss == 0


def test_prev_token_at_sequence_start_uses_the_none_key():
    router = hash_router("prev_token")
    out = router(torch.zeros(2, 3), routing_for([4, 4]))
    table = random_table(V + 1, E, 7)
    assert out.expert_index_TK[:, 0].tolist() == [table[V].item(), table[4].item()]


def test_bigram_hash_uses_previous_and_current_token():
    router = hash_router("bigram")
    routing = routing_for(IDS)
    out = router(torch.zeros(len(IDS), 3), routing)
    expected = bigram_hash(routing.prev_ids_T, routing.input_ids_T, router.hash_params[0], E)
    assert torch.equal(out.expert_index_TK[:, 0], expected)
    # token 5 follows 19 at t=5 and 5 at t=6: the same id may go to different experts
    assert out.expert_index_TK.shape == (len(IDS), 1)


def test_multi_hash_heads_use_independent_tables():
    router = hash_router("random", heads=3)
    out = router(torch.zeros(len(IDS), 3), routing_for(IDS))
    assert out.expert_index_TK.shape == (len(IDS), 3)
    for h in range(3):
        assert torch.equal(out.expert_index_TK[:, h], random_table(V, E, 7 + h)[torch.tensor(IDS)])


@pytest.mark.parametrize("function,order_seed", [("balanced", 7), ("balanced_lpt", None)])
def test_balanced_table_is_fit_from_counts_and_is_a_buffer_without_grad(function, order_seed):
    router = hash_router(function)  # seed 7: the layer's seed orders the greedy fill of `balanced`
    assert torch.equal(router.table[0], balanced_table(torch.ones(V, dtype=torch.long), E, order_seed))
    counts = torch.arange(V) ** 2
    router.fit(token_counts=counts)
    assert torch.equal(router.table[0], balanced_table(counts, E, order_seed))
    assert "table" in dict(router.named_buffers()) and list(router.parameters()) == []
    assert "table" in router.state_dict()


def test_clustered_refuses_to_route_before_fit_then_follows_kmeans():
    router = hash_router("clustered")
    with pytest.raises(RuntimeError, match="fit_hash_tables"):
        router(torch.zeros(2, 3), routing_for([1, 2]))
    centers = torch.eye(E) * 10
    embeddings = centers.repeat_interleave(V // E, dim=0) + 0.01 * torch.randn(V, E)
    router.fit(embeddings=embeddings)
    out = router(torch.zeros(V, 3), routing_for(list(range(V))))
    groups = out.expert_index_TK[:, 0].view(E, V // E)
    assert all(len(set(g.tolist())) == 1 for g in groups) and len(set(groups[:, 0].tolist())) == E


def switch_router(capacity_factor=1.0, z=0.0, k=1, E_=2):
    router = SoftmaxRouter(2, E_, k=k, renormalize=k > 1, jitter=0.0, capacity_factor=capacity_factor,
                           eval_capacity_factor=capacity_factor, aux_loss_coef=0.01, z_loss_coef=z,
                           init_scale=0.1)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E_, 2))
    return router


def test_switch_capacity_drops_exactly_the_tokens_over_capacity_in_order():
    router = switch_router(capacity_factor=1.0)
    # tokens 0..4 prefer expert 0, token 5 prefers expert 1; capacity = ceil(6 * 1.0 / 2) = 3
    x = torch.tensor([[2.0, 0.0]] * 5 + [[0.0, 2.0]])
    out = router(x, routing_for([0] * 6))
    assert out.expert_index_TK[:, 0].tolist() == [0, 0, 0, -1, -1, 1]
    p = torch.softmax(torch.tensor([2.0, 0.0]), 0)[0]
    torch.testing.assert_close(out.expert_weight_TK[:3, 0], p.expand(3))
    no_cap = switch_router(capacity_factor=None)(x, routing_for([0] * 6))
    assert (no_cap.expert_index_TK >= 0).all()


def test_balance_and_z_loss_match_the_formulas():
    router = switch_router(capacity_factor=None, z=1e-3)
    x = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 0.5]])
    out = router(x, routing_for([0, 0, 0]))
    logits = x  # identity router weight
    probs = logits.softmax(-1)
    f = torch.tensor([2 / 3, 1 / 3])  # argmax: 0, 1, 0
    balance = 0.01 * 2 * (f * probs.mean(0)).sum()
    z = 1e-3 * (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(out.aux_loss, balance + z)
    torch.testing.assert_close(router_z_loss(logits), (torch.logsumexp(logits, -1) ** 2).mean())
    torch.testing.assert_close(load_balancing_loss(probs, torch.tensor([[0], [1], [0]])), 2 * (f * probs.mean(0)).sum())


def test_capacity_priority_puts_first_choices_before_second_choices():
    index = torch.tensor([[0, 1], [1, 0], [0, 1]])
    # capacity 2. Expert 0: first choices of tokens 0 and 2 fill it, token 1's second choice is dropped.
    # Expert 1: token 1's first choice, then second choices in token order: token 0 kept, token 2 dropped.
    assert drop_over_capacity(index, 2, 2).tolist() == [[0, 1], [1, -1], [0, -1]]


def test_topk_weights_are_renormalised_softmax():
    router = switch_router(capacity_factor=None, k=2, E_=3)
    x = torch.tensor([[1.0, 0.0], [0.2, 0.9]])
    out = router(x, routing_for([0, 0]))
    probs = torch.nn.functional.linear(x, router.weight).softmax(-1)
    top, idx = probs.topk(2)
    assert torch.equal(out.expert_index_TK, idx)
    torch.testing.assert_close(out.expert_weight_TK, top / top.sum(-1, keepdim=True))


def test_learned_router_gets_gradient():
    router = switch_router(capacity_factor=None)
    out = router(torch.randn(5, 2), routing_for([0] * 5))
    (out.expert_weight_TK.sum() + out.aux_loss).backward()
    assert router.weight.grad.abs().sum() > 0


def test_base_training_assignment_is_exactly_balanced_and_eval_is_greedy():
    torch.manual_seed(0)
    router = BaseRouter(8, E, centroid_gain=0.1)
    router.reset_parameters()
    x = torch.randn(32, 8)
    x[:, 0] += 5  # most tokens prefer the same expert
    out = router.train()(x, routing_for([0] * 32))
    assert torch.bincount(out.expert_index_TK[:, 0], minlength=E).tolist() == [8] * E
    eval_out = router.eval()(x, routing_for([0] * 32))
    assert torch.equal(eval_out.expert_index_TK[:, 0], (x @ router.centroids.t()).argmax(-1))
    gate = torch.sigmoid((x * router.centroids[eval_out.expert_index_TK[:, 0]]).sum(-1))
    torch.testing.assert_close(eval_out.expert_weight_TK[:, 0], gate)


def test_base_centroids_learn_through_the_gate_only():
    router = BaseRouter(8, E, centroid_gain=0.1)
    router.reset_parameters()
    x = torch.randn(16, 8, requires_grad=True)
    out = router.train()(x, routing_for([0] * 16))
    out.expert_weight_TK.sum().backward()
    assert router.centroids.grad.abs().sum() > 0
    assert "centroids" in dict(router.named_parameters())
    assert not any("expert" in name for name, _ in router.named_parameters())


def test_capacity_is_k_tokens_factor_over_experts():
    router = switch_router(capacity_factor=1.25, k=2, E_=3)
    assert router.train().capacity(10) == math.ceil(2 * 10 * 1.25 / 3)


# ---- DeepSeek-V4 hash gate, DeepSeek-V3 bias balancing, the choice before capacity ------------------------------


@pytest.mark.parametrize("heads", [1, 2])
def test_hash_gate_weights_the_hashed_expert_by_a_learned_sqrt_softplus_score(heads):
    plain = hash_router("random", heads=heads)
    gated = HashRouter("random", E, heads, vocab_size=V, max_positions=32, seed=7, gate="sqrtsoftplus",
                       hidden_size=3)
    gated.reset_parameters()
    x = torch.randn(len(IDS), 3)
    out = gated(x, routing_for(IDS))
    assert torch.equal(out.expert_index_TK, plain(x, routing_for(IDS)).expert_index_TK)  # the table still picks
    score = torch.sqrt(torch.nn.functional.softplus(x @ gated.weight.t())).gather(1, out.expert_index_TK)
    expected = heads * score / score.sum(-1, keepdim=True) if heads > 1 else score  # H segments: sum H
    torch.testing.assert_close(out.expert_weight_TK, expected)
    out.expert_weight_TK[:, 0].sum().backward()
    assert gated.weight.grad is not None and gated.weight.grad.abs().sum() > 0


def biased_router(rate, capacity_factor=None, k=1):
    router = SoftmaxRouter(2, E, k=k, renormalize=k > 1, jitter=0.0, capacity_factor=capacity_factor,
                           eval_capacity_factor=None, aux_loss_coef=0.0, z_loss_coef=0.0, init_scale=0.1,
                           bias_update_rate=rate)
    with torch.no_grad():  # every token prefers expert 0 by a margin that only the bias can overcome
        router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.3], [0.0, 0.2], [0.0, 0.1]]))
    router.reset_parameters = None  # keep the hand-set weight
    return router


def test_bias_balancing_moves_the_choice_not_the_weight_and_balances_the_load():
    torch.manual_seed(0)
    x = torch.randn(256, 2) * 2 + torch.tensor([3.0, 0.0])
    router = biased_router(rate=0.01)
    assert "score_correction_bias" in router.state_dict() and "chosen_since_update" not in router.state_dict()
    first = router(x, routing_for([0] * 256))
    loads = [torch.bincount(first.expert_index_TK[:, 0], minlength=E)]
    for _ in range(200):
        out = router(x, routing_for([0] * 256))
        router.update_bias(router.chosen_since_update.clone())
        loads.append(torch.bincount(out.expert_index_TK[:, 0], minlength=E))
    assert loads[0][0] > 0.9 * 256  # unbalanced before any update
    assert router.chosen_since_update.sum() == 0  # the update consumes the counts
    late_E = torch.stack(loads[-50:]).float().mean(0)  # sign steps oscillate around the balance: average them
    assert late_E.max() < 0.35 * 256 and late_E.min() > 0.15 * 256, late_E
    out = router(x, routing_for([0] * 256))
    probs = torch.softmax(x @ router.weight.t(), -1)
    torch.testing.assert_close(out.expert_weight_TK, probs.gather(1, out.expert_index_TK))  # weights: no bias
    router.eval()
    before = router.chosen_since_update.clone()
    router(x, routing_for([0] * 256))
    assert torch.equal(router.chosen_since_update, before)  # evaluation is not counted


def test_the_choice_before_capacity_is_reported_beside_what_was_kept():
    router = switch_router(capacity_factor=1.0)
    x = torch.tensor([[2.0, 0.0]] * 5 + [[0.0, 2.0]])
    out = router(x, routing_for([0] * 6))
    assert out.chosen_index_TK[:, 0].tolist() == [0, 0, 0, 0, 0, 1]
    assert out.expert_index_TK[:, 0].tolist() == [0, 0, 0, -1, -1, 1]


# ---- DeepSeek-V4's MoE layers, against transformers' own classes ------------------------------------------------
def deepseek_v4_pair(router: str, seed: int = 0):
    """transformers' DeepseekV4SparseMoeBlock (hash or learned top-k layer, shared expert included) and hashmoe's
    MoE layer with the same weights and table. V4's SwiGLU clamp (swiglu_limit) is set out of reach: hashmoe does
    not offer it."""
    from transformers.models.deepseek_v4 import configuration_deepseek_v4, modeling_deepseek_v4

    from models import HashMoEConfig
    from models.modeling_hashmoe import HashMoESparseMLP

    torch.manual_seed(seed)
    native_config = configuration_deepseek_v4.DeepseekV4Config(
        vocab_size=V, hidden_size=16, moe_intermediate_size=12, num_hidden_layers=1, n_routed_experts=6,
        num_experts_per_tok=3, n_shared_experts=1, routed_scaling_factor=1.5, swiglu_limit=1e9,
        mlp_layer_types=["hash_moe" if router == "hash" else "moe"])
    native = modeling_deepseek_v4.DeepseekV4SparseMoeBlock(native_config, 0).eval()
    with torch.no_grad():
        for param in native.parameters():
            param.normal_(0, 0.3)
    # the V4 layout in one config line: hash in the first MoE layer, learned top-k above
    config = HashMoEConfig(vocab_size=V, hidden_size=16, num_attention_heads=2, num_hidden_layers=2, moe_layers=[0, 1],
                           num_experts=6, expert_intermediate_size=12, router=["hash", "topk"], hidden_act="silu",
                           gated_ffn=True, num_shared_experts=1, routed_scaling_factor=1.5, norm_topk_prob=True,
                           hash_function="random", hash_experts_per_tok=3, hash_gate="sqrtsoftplus",
                           num_experts_per_tok=3, scoring_func="sqrtsoftplus", capacity_factor=None)
    ours = HashMoESparseMLP(config, 0 if router == "hash" else 1).eval()
    with torch.no_grad():
        ours.router.weight.copy_(native.gate.weight)
        if router == "hash":
            native.gate.tid2eid.copy_(ours.router.table.t())  # k distinct experts per token id
        ours.experts.w1.copy_(native.experts.gate_up_proj)
        ours.experts.w2.copy_(native.experts.down_proj)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(ours.shared_mlp, name).weight.copy_(getattr(native.shared_experts, name).weight)
    return native, ours


@pytest.mark.parametrize("router", ["hash", "topk"])
def test_deepseek_v4_moe_layer_equals_transformers(router):
    """The V4 layout's two layer kinds: the hash layer (tid2eid table of k experts, sqrtsoftplus gate normalised
    over them, routed_scaling_factor, shared expert) and the learned layer (sqrtsoftplus top-k)."""
    native, ours = deepseek_v4_pair(router)
    ids_BS = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(2))
    x_BSD = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(3))
    if router == "hash":
        table = ours.router.table
        assert table.shape == (3, V) and all(len(set(table[:, v].tolist())) == 3 for v in range(V))
    with torch.no_grad():
        want = native(x_BSD, ids_BS) if router == "hash" else native(x_BSD)
        got, stats = ours(x_BSD, routing_for_batch(ids_BS))
    assert (got - want).abs().max().item() <= 1e-5
    assert stats.router.expert_index_TK.shape == (21, 3)


def routing_for_batch(ids_BS):
    from models.modeling_hashmoe import routing_inputs

    B, S = ids_BS.shape
    return routing_inputs(ids_BS, torch.arange(S).expand(B, S), V)


def test_a_vocabulary_resize_keeps_k_experts_per_token_distinct():
    router = HashRouter("random", E, 1, vocab_size=V, max_positions=32, seed=7, experts_per_token=3)
    router.resize_vocab(V + 9)
    table = router.table
    assert table.shape == (3, V + 9)
    assert all(len(set(table[:, v].tolist())) == 3 for v in range(V + 9))
