"""MLP.sgd_step: the whole SGD step by hand equals autograd + torch.optim.SGD."""

from __future__ import annotations

import copy

import pytest
import torch

import torchbp

from oracles import oracle_cost, sequential_like

SIZES = [7, 5, 4, 3]
LR = 0.5


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("cost", ["quadratic", "cross_entropy"])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_sgd_step_equals_autograd_and_torch_sgd(fused, cost, reduction):
    """Three steps of sgd_step leave the same parameters (1e-12, float64) and costs as backward() + SGD.step()."""
    torch.manual_seed(0)
    by_hand = torchbp.MLP(SIZES, fused=fused, dtype=torch.float64)
    oracle = sequential_like(by_hand)
    optimizer = torch.optim.SGD(oracle.parameters(), lr=LR)
    x = torch.randn(2, 3, SIZES[0], dtype=torch.float64)  # 3-D input: samples are the leading dims
    y = torch.rand(2, 3, SIZES[-1], dtype=torch.float64)
    for _ in range(3):
        c = oracle_cost(oracle(x), y, cost, reduction)
        optimizer.zero_grad()
        c.sum().backward()
        optimizer.step()
        c_by_hand = by_hand.sgd_step(x, y, LR, cost, reduction)
        torch.testing.assert_close(c_by_hand, c.detach(), rtol=0, atol=1e-12)
    for (name, p), q in zip(by_hand.named_parameters(), oracle.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=f"{name} after 3 steps")
        assert p.grad is None, f"{name}.grad must be left alone"


def test_sgd_step_without_bias_and_with_delta_hooks():
    """bias=False works; every layer's delta hook sees δ^l = ∂C/∂z^l of the step, as computed by autograd."""
    torch.manual_seed(1)
    model = torchbp.MLP([6, 4, 2], bias=False, dtype=torch.float64)
    reference = copy.deepcopy(model)
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.rand(5, 2, dtype=torch.float64)
    seen = {}
    for layer in model.linears:
        layer.register_delta_hook(lambda m, d: seen.__setitem__(id(m), d.clone()))
    z = []
    for layer in reference.linears:
        layer.register_forward_hook(lambda m, inp, out: z.append(out))
    c = reference.cost(x, y)
    expected = torch.autograd.grad(c, z)
    model.sgd_step(x, y, LR)
    for layer, delta in zip(model.linears, expected):
        torch.testing.assert_close(seen[id(layer)], delta, rtol=0, atol=1e-12)
    assert model[0].bias is None


def test_sgd_step_rejects_bad_input():
    model = torchbp.MLP([4, 3])
    with pytest.raises(ValueError, match=r"target must have shape \(2, 3\) \(the output's\), got \(2, 4\)"):
        model.sgd_step(torch.randn(2, 4), torch.rand(2, 4), LR)
    with pytest.raises(ValueError, match=r"cost must be one of \('quadratic', 'cross_entropy'\), got 'hinge'"):
        model.sgd_step(torch.randn(2, 4), torch.rand(2, 3), LR, cost="hinge")
    for lr in (-0.1, float("nan"), torch.tensor(0.1), True):
        with pytest.raises(ValueError, match=r"lr must be a real number >= 0 \(not a tensor\), got "):
            model.sgd_step(torch.randn(2, 4), torch.rand(2, 3), lr)


def test_sgd_step_refuses_autocast():
    """Under autocast the step would update casts of the parameters, not the parameters: it must refuse."""
    model = torchbp.MLP([4, 3])
    before = [p.clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="autocast is enabled for cpu"):
        model.sgd_step(torch.randn(2, 4), torch.rand(2, 3), LR)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_sgd_step_equals_network_py():
    """Oracle: the book's network.py step (numpy, one sample at a time, float64) leaves the same parameters (1e-12)."""
    from benchmarks.network_py import Network

    torch.manual_seed(2)
    model = torchbp.MLP(SIZES, dtype=torch.float64)
    book = Network([m.weight for m in model.linears], [m.bias for m in model.linears])
    for _ in range(3):
        x = torch.rand(6, SIZES[0], dtype=torch.float64)
        y = torch.rand(6, SIZES[-1], dtype=torch.float64)
        model.sgd_step(x, y, LR)
        book.update_mini_batch(x.numpy(), y.numpy(), LR)
    for l, layer in enumerate(model.linears):
        torch.testing.assert_close(layer.weight, torch.from_numpy(book.weights[l]), rtol=0, atol=1e-12)
        torch.testing.assert_close(layer.bias, torch.from_numpy(book.biases[l]).flatten(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sgd_step_on_an_empty_batch_moves_nothing(reduction):
    """No samples: C as torch computes it (nan for a mean, 0 for a sum, no costs) and the parameters unchanged."""
    model = torchbp.MLP([4, 3])
    before = [p.clone() for p in model.parameters()]
    x, y = torch.randn(0, 4), torch.rand(0, 3)
    c = 0.5 * ((model(x) - y) ** 2).sum(-1).detach()  # torch's own reductions of nothing: nan, 0, empty
    expected = {"mean": c.mean(), "sum": c.sum(), "none": c}[reduction]
    torch.testing.assert_close(model.sgd_step(x, y, LR, reduction=reduction), expected, equal_nan=True)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
