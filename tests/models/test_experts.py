import pytest
import torch

from models.experts import ExpertBank, dispatch_local


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


def make_bank(num_experts, segments, dtype=torch.float64):
    torch.manual_seed(0)
    bank = ExpertBank(num_experts, 8, 12, "gelu", num_segments=segments).to(dtype)
    bank.reset_parameters(0.3, 0.3)
    return bank


@pytest.mark.parametrize("segments,k", [(1, 1), (1, 2), (3, 3)])
def test_dispatch_equals_naive_loop_outputs_and_gradients(segments, k):
    bank = make_bank(5, segments)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(23, 8, dtype=torch.float64, generator=g, requires_grad=True)
    index = torch.randint(-1, 5, (23, k), generator=g)  # -1 = dropped
    weight = torch.rand(23, k, dtype=torch.float64, generator=g, requires_grad=True)

    y = dispatch_local(x, index, weight, bank)
    grads = torch.autograd.grad(y.square().sum(), [x, weight, bank.w1, bank.w2])
    y_ref = naive_moe(x, index, weight, bank)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x, weight, bank.w1, bank.w2])

    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_dropped_tokens_give_zero_and_unused_experts_get_zero_grad():
    bank = make_bank(4, 1)
    x = torch.randn(6, 8, dtype=torch.float64)
    index = torch.tensor([[0], [-1], [0], [2], [-1], [2]])
    y = dispatch_local(x, index, torch.ones(6, 1, dtype=torch.float64), bank)
    assert torch.all(y[[1, 4]] == 0)
    y.sum().backward()
    assert torch.all(bank.w1.grad[[1, 3]] == 0) and bank.w1.grad[0].abs().sum() > 0


def test_all_tokens_dropped_still_backpropagates():
    bank = make_bank(2, 1)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    y = dispatch_local(x, torch.full((3, 1), -1), torch.ones(3, 1, dtype=torch.float64), bank)
    assert torch.all(y == 0)
    y.sum().backward()
    assert bank.w1.grad is not None and torch.all(bank.w1.grad == 0)


def test_multi_hash_segments_on_one_expert_equal_the_whole_ffn():
    """Multi-hash (Roller et al. sec. 3): segment outputs concatenated = the expert's full FFN."""
    bank = make_bank(3, 4)
    x = torch.randn(7, 8, dtype=torch.float64)
    index = torch.full((7, 4), 2)
    y = dispatch_local(x, index, torch.ones(7, 4, dtype=torch.float64), bank)
    whole = torch.nn.functional.gelu(x @ bank.w1[2].t()) @ bank.w2[2].t()
    torch.testing.assert_close(y, whole, rtol=0, atol=1e-12)


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
@pytest.mark.parametrize("segments,counts", [(1, [3, 0, 4, 0]), (2, [2, 0, 0, 3, 1, 1, 2]), (1, [0, 0, 0, 2])])
def test_expert_ffn_backward_passes_gradcheck(activation, segments, counts):
    """The hand-written backward of the expert_ffn op against finite differences, empty slots and dropped rows
    (the last count: rows after every slot's, which must give 0) included; and torch.library's op checks."""
    from models.experts import expert_ffn

    bank = ExpertBank(3, 4, 6, activation, num_segments=segments).double()
    bank.reset_parameters(0.5, 0.5)
    x = torch.randn(sum(counts), 4, dtype=torch.float64, requires_grad=True)
    w1, w2 = bank.w1.detach().clone().requires_grad_(), bank.w2.detach().clone().requires_grad_()
    counts_G1 = torch.tensor(counts)
    assert torch.autograd.gradcheck(lambda x, w1, w2: expert_ffn(x, w1, w2, counts_G1, segments, activation)[0],
                                    (x, w1, w2))
    y = expert_ffn(x, w1, w2, counts_G1, segments, activation)[0]
    assert torch.equal(y[sum(counts[:-1]):], torch.zeros(counts[-1], 4, dtype=torch.float64))
    torch.library.opcheck(expert_ffn, (x, w1, w2, counts_G1, segments, activation))
