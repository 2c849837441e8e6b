"""The expert bank and the dispatcher against a naive reference, for both implementations (grouped_mm, the
per-slot loop), outputs and gradients, multi-hash segments, dropped routes and empty experts included."""

import pytest
import torch

from models.experts import (
    ExpertBank,
    dispatch,
    expert_ffn,
    expert_ffn_backward,
    expert_ffn_forward,
    positions_in_slot,
    use_grouped_mm,
)

IMPLEMENTATIONS = ["grouped_mm", "batched_mm", "eager"]


def naive_moe(x_TD, index_TK, weight_TK, bank):
    """Reference: one token at a time, one choice at a time."""
    rows = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros_like(x_TD[t])
        for k in range(index_TK.shape[1]):
            expert = int(index_TK[t, k])
            if expert >= 0:
                slot = expert * bank.num_segments + (k if bank.num_segments > 1 else 0)
                y = y + weight_TK[t, k] * bank.forward_slot(slot, x_TD[t:t + 1])[0]
        rows.append(y)
    return torch.stack(rows)


def make_bank(num_experts, segments, dtype=torch.float32, activation="gelu", gated=False):
    torch.manual_seed(0)
    bank = ExpertBank(num_experts, 8, 16, activation, num_segments=segments, gated=gated).to(dtype)
    bank.reset_parameters(0.3, 0.3)
    return bank


def as_float64(bank):
    ref = bank.shaped_like(bank.num_experts)
    ref.load_state_dict({k: v.double() for k, v in bank.state_dict().items()})
    return ref.double()


def dispatch_and_grads(bank, x, index, weight, implementation):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    y = dispatch(x, index, weight, bank, implementation=implementation)
    return (y, *torch.autograd.grad(y.square().sum(), [x, weight, bank.w1, bank.w2]))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("activation,gated", [("gelu", False), ("relu", False), ("silu", False), ("silu", True),
                                              ("gelu", True)])
@pytest.mark.parametrize("segments,k", [(1, 1), (1, 2), (4, 4), (2, 2)])
def test_dispatch_equals_naive_loop_outputs_and_gradients(implementation, activation, gated, segments, k):
    bank = make_bank(5, segments, activation=activation, gated=gated)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(23, 8, generator=g)
    index = torch.randint(-1, 5, (23, k), generator=g)  # -1 = dropped
    index[:, :][index == 3] = 2  # expert 3 gets nothing: an empty group
    weight = torch.rand(23, k, generator=g)
    assert use_grouped_mm(implementation, x, *bank.slot_weights()) == (implementation == "grouped_mm")  # batched: its own
    assert not use_grouped_mm(None, x, *bank.slot_weights())  # unset on CPU: the loop (measured faster)

    got = dispatch_and_grads(bank, x, index, weight, implementation)
    ref_bank = as_float64(bank)
    want = dispatch_and_grads(ref_bank, x.double(), index, weight.double(), None)  # float64: the loop
    naive_x, naive_w = x.double().requires_grad_(), weight.double().requires_grad_()
    naive = naive_moe(naive_x, index, naive_w, ref_bank)
    torch.testing.assert_close(want[0], naive, rtol=0, atol=1e-12)
    for name, a, b in zip(["y", "x", "weight", "w1", "w2"], got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=name)
    assert torch.all(got[3][3] == 0) and torch.all(got[4][3] == 0)  # the empty expert's gradient


def test_float64_loop_equals_naive_gradients_exactly():
    bank = make_bank(5, 2, torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(23, 8, dtype=torch.float64, generator=g, requires_grad=True)
    index = torch.randint(-1, 5, (23, 2), generator=g)
    weight = torch.rand(23, 2, dtype=torch.float64, generator=g, requires_grad=True)
    y = dispatch(x, index, weight, bank)
    grads = torch.autograd.grad(y.square().sum(), [x, weight, bank.w1, bank.w2])
    y_ref = naive_moe(x, index, weight, bank)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x, weight, bank.w1, bank.w2])
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_dropped_tokens_give_zero_and_unused_experts_get_zero_grad(implementation):
    bank = make_bank(4, 1)
    x = torch.randn(6, 8)
    index = torch.tensor([[0], [-1], [0], [2], [-1], [2]])
    y = dispatch(x, index, torch.ones(6, 1), bank, implementation=implementation)
    assert torch.all(y[[1, 4]] == 0)
    y.sum().backward()
    assert torch.all(bank.w1.grad[[1, 3]] == 0) and bank.w1.grad[0].abs().sum() > 0


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_all_tokens_dropped_still_backpropagates(implementation):
    bank = make_bank(2, 1)
    x = torch.randn(3, 8, requires_grad=True)
    y = dispatch(x, torch.full((3, 1), -1), torch.ones(3, 1), bank, implementation=implementation)
    assert torch.all(y == 0)
    y.sum().backward()
    assert bank.w1.grad is not None and torch.all(bank.w1.grad == 0) and torch.all(x.grad == 0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("gated", [False, True])
def test_multi_hash_segments_on_one_expert_equal_the_whole_ffn(implementation, gated):
    """Multi-hash (Roller et al. sec. 3): segment outputs concatenated = the expert's full FFN; gated, w1 is
    transformers' [gate; up] layout (`gate_up_proj`), written out here by hand."""
    bank = make_bank(3, 4, gated=gated)
    x = torch.randn(7, 8)
    index = torch.full((7, 4), 2)
    y = dispatch(x, index, torch.ones(7, 4), bank, implementation=implementation)
    if gated:
        gate, up = bank.w1[2, :16], bank.w1[2, 16:]
        whole = (torch.nn.functional.gelu(x @ gate.t()) * (x @ up.t())) @ bank.w2[2].t()
    else:
        whole = torch.nn.functional.gelu(x @ bank.w1[2].t()) @ bank.w2[2].t()
    torch.testing.assert_close(y, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gated,segments", [(False, 1), (False, 4), (True, 1), (True, 4)])
def test_slot_layout_round_trips(gated, segments):
    bank = make_bank(3, segments, gated=gated)
    for name in ("w1", "w2"):
        weight = getattr(bank, name)
        torch.testing.assert_close(bank.from_slots(name, bank.to_slots(name, weight)), weight, rtol=0, atol=0)


def test_unknown_implementation_names_the_choices():
    bank = make_bank(2, 1)
    with pytest.raises(ValueError, match="grouped_mm, batched_mm, eager"):
        dispatch(torch.randn(3, 8), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), bank,
                 implementation="sonicmoe")


def test_grouped_mm_falls_back_where_its_kernel_refuses_the_strides():
    bank = ExpertBank(2, 6, 6, "gelu")  # 6 floats = 24 bytes: not a multiple of 16
    assert not use_grouped_mm("grouped_mm", torch.randn(4, 6), *bank.slot_weights())
    assert not use_grouped_mm(None, torch.randn(4, 8, dtype=torch.float64))


def test_positions_in_slot_counts_within_each_slot_in_the_order_given():
    slot = torch.tensor([2, 0, 2, -1, 0, 2])
    assert positions_in_slot(slot, 3).tolist() == [0, 0, 1, 0, 1, 2]


@pytest.mark.parametrize("activation,gated", [("gelu", False), ("relu", False), ("silu", False), ("silu", True)])
@pytest.mark.parametrize("segments,counts", [(1, [3, 0, 4, 0]), (2, [2, 0, 0, 3, 1, 1, 2]), (1, [0, 0, 0, 2])])
def test_expert_ffn_backward_passes_gradcheck(activation, gated, segments, counts):
    """The hand-written backward of the expert_ffn op: the loop against finite differences (float64), grouped_mm
    (no float64 kernel) against the loop in float32; empty slots and dropped rows (the last count: rows after
    every slot's, which must give 0) included; and torch.library's op checks for both."""
    bank = ExpertBank(3, 4, 4 * segments, activation, num_segments=segments, gated=gated).double()
    bank.reset_parameters(0.5, 0.5)
    x = torch.randn(sum(counts), 4, dtype=torch.float64, requires_grad=True)
    w1_GSD, w2_GDS = (w.detach().clone().requires_grad_() for w in bank.slot_weights())
    counts_G = torch.tensor(counts[:-1])
    assert torch.autograd.gradcheck(lambda x, w1, w2: expert_ffn(x, w1, w2, counts_G, activation, False, gated),
                                    (x, w1_GSD, w2_GDS))
    inputs32 = [t.detach().float().requires_grad_() for t in (x, w1_GSD, w2_GDS)]
    assert use_grouped_mm("grouped_mm", *inputs32)
    g = torch.randn(x.shape)
    results = {}
    for grouped in (True, False):
        y = expert_ffn(*inputs32, counts_G, activation, grouped, gated)
        assert torch.equal(y[sum(counts[:-1]):], torch.zeros(counts[-1], 4))
        results[grouped] = (y, *torch.autograd.grad(y, inputs32, g))
        plain = [t.detach() for t in inputs32]
        torch.library.opcheck(expert_ffn_forward, (*plain, counts_G, activation, grouped, gated))
        _, pre, h = expert_ffn_forward(*plain, counts_G, activation, grouped, gated)
        torch.library.opcheck(expert_ffn_backward, (g, *plain, pre, h, counts_G, activation, grouped, gated))
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("segments,k", [(1, 1), (1, 2), (2, 2)])
def test_cuda_bf16_grouped_mm_equals_the_loop(segments, k):
    """On a GPU in bf16: the grouped path (no host read, rows of dropped routes masked on the device) against the
    per-slot loop, outputs and gradients."""
    bank = ExpertBank(8, 64, 128, "gelu", num_segments=segments).cuda().bfloat16()
    bank.reset_parameters(0.05, 0.05)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 64, generator=g).cuda().bfloat16()
    index = torch.randint(-1, 8, (512, k), generator=g)
    index[index == 3] = 2  # an empty group: its weight gradient must be zeros, not what the buffer held
    index, weight = index.cuda(), torch.rand(512, k, generator=g).cuda().bfloat16()
    assert use_grouped_mm("grouped_mm", x, *bank.slot_weights())
    got = dispatch_and_grads(bank, x, index, weight, "grouped_mm")
    want = dispatch_and_grads(bank, x, index, weight, "eager")
    for name, a, b in zip(["y", "x", "weight", "w1", "w2"], got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, msg=name)
    assert torch.all(got[3][3] == 0) and torch.all(got[4][3] == 0)
