"""Staircase (Ju et al. 2021): chunks enter a window of shared-weight passes; causal; generation with the
per-step caches equals generation by recomputing the whole sequence."""

import pytest
import torch

from models import HashMoEForCausalLM
from tests.conftest import tiny_config


def staircase(chunk=3, window=6, memory=0, memory_form=None):
    recurrence = {"kind": "staircase", "chunk": chunk, "window": window, "memory": memory}
    return recurrence if memory_form is None else {**recurrence, "memory_form": memory_form}


def build(recurrence=None, **extra):
    torch.manual_seed(0)
    return HashMoEForCausalLM(tiny_config(recurrence=recurrence, **extra)).eval()


def ids(batch, length, seed=1):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


STAIRCASES = [staircase(), staircase(memory=3), staircase(chunk=2, window=6, memory=4), staircase(4, 4),
              staircase(memory=3, memory_form="output"), staircase(chunk=2, window=6, memory=4, memory_form="output")]
# Capacity makes a switch layer drop by how many tokens share a call: compare without it.
ROUTERS = [dict(router="hash", hash_function="prev_token"), dict(router="switch", eval_capacity_factor=None),
           dict(moe_layers=[])]


@pytest.mark.parametrize("recurrence", STAIRCASES)
@pytest.mark.parametrize("router", ROUTERS)
def test_token_by_token_decoding_equals_the_whole_sequence(recurrence, router):
    model = build(recurrence, **router)
    x = ids(2, 17)  # 17: the last chunk is partial
    with torch.no_grad():
        whole = model(x, use_cache=False).logits
        out = model(x[:, :5], past_key_values=None, use_cache=True)
        assert out.past_key_values is None  # scoring without a cache runs the whole sequence
        from models.staircase import StaircaseCache

        cache = StaircaseCache()
        pieces = [model(x[:, :5], past_key_values=cache).logits]
        for t in range(5, 17):
            pieces.append(model(x[:, t:t + 1], past_key_values=cache, prev_token_ids=x[:, t - 1:t]).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("recurrence", STAIRCASES)
def test_changing_future_tokens_leaves_earlier_outputs_unchanged(recurrence):
    model = build(recurrence, router="hash", hash_function="bigram")
    x = ids(1, 20)
    for cut in (1, 6, 11):
        y = x.clone()
        y[:, cut:] = (y[:, cut:] + 7) % 64
        with torch.no_grad():
            a, b = model(x).logits, model(y).logits
        # not bit-equal: the windows' matmuls see other values in the masked-out (future) rows
        torch.testing.assert_close(a[:, :cut], b[:, :cut], atol=1e-6, rtol=0)
        assert (a[:, cut:] - b[:, cut:]).abs().amax(-1).min() > 1e-3  # every later position changes


@pytest.mark.parametrize("recurrence", [staircase(), staircase(chunk=2, window=4, memory=4),
                                        staircase(chunk=2, window=4, memory=4, memory_form="output")])
@pytest.mark.parametrize("router", [dict(router="hash", hash_function="bigram"), dict(router="base"), dict()])
def test_generation_with_cache_equals_without(recurrence, router):
    model = build(recurrence, **router)
    prompt = ids(2, 5)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    assert torch.equal(model.generate(prompt, use_cache=True, **kwargs), model.generate(prompt, use_cache=False, **kwargs))


def test_one_chunk_covering_the_sequence_is_the_plain_model():
    plain, stair = build(), build(staircase(chunk=16, window=16))
    x = ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(stair(x).logits, plain(x).logits, atol=1e-6, rtol=0)


def test_window_of_one_chunk_without_memory_sees_only_its_own_chunk():
    plain, stair = build(), build(staircase(chunk=4, window=4))
    x = ids(1, 12)
    with torch.no_grad():
        whole = stair(x).logits
        for c in range(3):
            alone = plain(x[:, 4 * c:4 * c + 4], position_ids=torch.arange(4 * c, 4 * c + 4)[None]).logits
            torch.testing.assert_close(whole[:, 4 * c:4 * c + 4], alone, atol=1e-5, rtol=0)


def test_every_token_is_processed_window_over_chunk_times():
    model = build(staircase(chunk=3, window=9), router="hash", hash_function="random")
    x = ids(2, 14)
    with torch.no_grad():
        out = model(x)
    assert int(out.expert_load[0].sum()) == 2 * 14 * 3
    assert model.config.passes_per_token == 3


def test_staircase_trains_and_round_trips_through_save_pretrained(tmp_path):
    model = build(staircase(memory=3), router="hash", hash_function="random").train()
    x = ids(2, 12)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval().save_pretrained(tmp_path)
    loaded = HashMoEForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.recurrence == staircase(memory=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)


def test_padded_batches_are_refused_with_a_reason():
    model = build(staircase())
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="padded"):
        model(ids(2, 6), attention_mask=mask)


@pytest.mark.parametrize("recurrence", [
    {"kind": "staircase", "chunk": 3, "window": 7},
    {"kind": "staircase", "chunk": 3, "window": 6, "memory": 4},
    {"kind": "staircase", "chunk": 0, "window": 6},
    {"kind": "staircase", "window": 6},
    {"kind": "staircase", "chunk": 3, "window": 6, "steps": 2},
])
def test_bad_staircase_is_named(recurrence):
    with pytest.raises(ValueError, match=r"HashMoEConfig\.recurrence:"):
        tiny_config(recurrence=recurrence)


def test_gradient_checkpointing_of_the_cached_staircase_is_refused():
    model = HashMoEForCausalLM(tiny_config(recurrence={"kind": "staircase", "chunk": 2, "window": 4, "memory": 2}))
    with pytest.raises(ValueError, match="memory"):
        model.gradient_checkpointing_enable()


@pytest.mark.parametrize("memory", [0])
def test_gradient_checkpointing_gives_the_same_gradients(memory):
    """Each block runs once per staircase step on a different window; checkpointing recomputes each call."""
    torch.manual_seed(0)
    model = HashMoEForCausalLM(tiny_config(router="hash", hash_function="random",
                                           recurrence={"kind": "staircase", "chunk": 2, "window": 4, "memory": memory}))
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-6, atol=1e-7, msg=key)


def test_the_output_memory_holds_each_finished_tokens_output_state_projected_by_every_layer():
    """memory_form "output": the memory keys/values of layer l are layer l's projections of the finished tokens'
    output states, not what layer l computed for them; the two forms give different models with the same weights."""
    from models.staircase import Staircase

    model = build(staircase(chunk=2, window=4, memory=2, memory_form="output"), router="hash",
                  hash_function="random").eval()
    blocks = model.model.layers
    h = torch.randn(2, 2, blocks[0].self_attn.qkv_proj.in_features)
    kv = Staircase(model.config.recurrence, blocks, None)._output_kv(h)
    for block, (k, v) in zip(blocks, kv):
        D = h.shape[-1]
        qkv = block.self_attn.qkv_proj(block.input_layernorm(h))
        heads = block.self_attn.num_heads
        torch.testing.assert_close(k, qkv[..., D:2 * D].view(2, 2, heads, -1).transpose(1, 2))
        torch.testing.assert_close(v, qkv[..., 2 * D:].view(2, 2, heads, -1).transpose(1, 2))
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(3))
    layers_form = build(staircase(chunk=2, window=4, memory=2), router="hash", hash_function="random").eval()
    layers_form.load_state_dict(model.state_dict())
    with torch.no_grad():
        out, ref = model(ids).logits, layers_form(ids).logits
    torch.testing.assert_close(out[:, :2], ref[:, :2])  # chunk 0 leaves before any memory is read
    assert not torch.allclose(out[:, 2:], ref[:, 2:])
