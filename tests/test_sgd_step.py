"""MLP.sgd_step and MLP.sgd_epoch: the SGD steps by hand equal autograd + torch.optim.SGD."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

import torchbp
from torchbp import functional as F
from torchbp import sgd

from oracles import flat_views, nn_deltas, oracle_cost, sequential_like

SIZES = [7, 5, 4, 3]
LR = 0.5


def autograd_deltas(model: torchbp.MLP, x, y):
    """(C, (δ^1, ..., δ^L)) of ``model.cost(x, y)``: torch.autograd.grad of C on each layer's output z^l.

    The graph is kept, so that ``C.backward()`` can follow.
    """
    z = []
    handles = [layer.register_forward_hook(lambda m, inp, out: z.append(out)) for layer in model.linears]
    c = model.cost(x, y)
    for handle in handles:
        handle.remove()
    return c, torch.autograd.grad(c, z, retain_graph=True)


def assert_equals_book(model: torchbp.MLP, book) -> None:
    """The model's weights and biases equal network.py's (``book``), to 1e-12."""
    for l, layer in enumerate(model.linears):
        torch.testing.assert_close(layer.weight, torch.from_numpy(book.weights[l]), rtol=0, atol=1e-12)
        torch.testing.assert_close(layer.bias, torch.from_numpy(book.biases[l]).flatten(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["sgd_step", "sgd_epoch"])
def test_a_float16_step_over_many_samples_stays_finite_as_autograd_does(method):
    """float16, 200,000 samples, each δ^L = a − y about 1 (cross-entropy, an output near 1, target 0): the
    sums over samples are those of the mean's δ^L, as autograd forms them, far inside float16's range; the
    unscaled sums (about 196,000 > 65,504) went to inf, and the parameters with them. Oracle: the torch.nn
    twin's binary_cross_entropy + torch.optim.SGD, to float16's rounding."""
    model = torchbp.MLP([1, 1], dtype=torch.float16)
    with torch.no_grad():
        model[0].weight.fill_(0.5)
        model[0].bias.fill_(4.0)
    reference = sequential_like(model)
    x, y = torch.ones(200_000, 1, dtype=torch.float16), torch.zeros(200_000, 1, dtype=torch.float16)
    oracle_cost(reference(x), y, "cross_entropy").backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    if method == "sgd_step":
        model.sgd_step(x, y, 0.1, "cross_entropy")
    else:
        model.sgd_epoch(x, y, 0.1, len(x), "cross_entropy")
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q, rtol=0, atol=4e-3)  # a float16 ulp at 4 is 4e-3


@pytest.mark.parametrize("method", ["sgd_step", "sgd_epoch"])
def test_a_small_step_over_many_samples_moves_every_parameter_as_torch_sgd_does(method):
    """float32, 65,536 samples, lr 1e-3: each parameter's update is as close to the float64 truth as
    autograd + torch.optim.SGD's (relative error at most 1.5 times SGD's, which is 1e-4 to 4e-3 here). The
    step once added the samples into the parameters block by block, rounding them each time, and
    left 83-100% of the parameters where they were (relative error 1.0). Oracle: the torch.nn twin's
    backward() + torch.optim.SGD in float64."""
    torch.manual_seed(0)
    model = torchbp.MLP([4, 3, 2])
    x, y, lr = torch.rand(65536, 4), torch.rand(65536, 2), 1e-3
    before = [p.detach().double() for p in model.parameters()]
    truth = sequential_like(model).double()
    oracle_cost(truth(x.double()), y.double()).backward()
    torch.optim.SGD(truth.parameters(), lr=lr).step()
    reference = copy.deepcopy(model)
    reference.cost(x, y).backward()
    torch.optim.SGD(reference.parameters(), lr=lr).step()
    model.sgd_step(x, y, lr) if method == "sgd_step" else model.sgd_epoch(x, y, lr, batch_size=len(x))

    def update_error(p, p0, exact):  # ‖update − exact update‖ / ‖exact update‖
        return ((p.detach().double() - p0) - exact).norm() / exact.norm()

    for p, q, t, p0 in zip(model.parameters(), reference.parameters(), truth.parameters(), before):
        exact = t.detach() - p0
        assert update_error(p, p0, exact) <= 1.5 * update_error(q, p0, exact) + 1e-12


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


@pytest.mark.parametrize("model_dtype, target_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)],
                         ids=["model32-target64", "model64-target32"])
@pytest.mark.parametrize("by", ["step", "epoch"])
def test_steps_by_hand_with_a_target_of_another_dtype_equal_autograd_and_torch_sgd(by, model_dtype, target_dtype):
    """A target of another floating dtype: the cost in the wider dtype, δ^L in the model's, as MLP.cost
    (which promotes as mse_loss) + backward + SGD.step() do it. Oracle: nn.Sequential with torch's own
    promotion in the cost. Tolerance 1e-12 for float64 parameters, 1e-6 for float32 ones."""
    torch.manual_seed(3)
    by_hand = torchbp.MLP(SIZES, dtype=model_dtype)
    oracle = sequential_like(by_hand)
    optimizer = torch.optim.SGD(oracle.parameters(), lr=LR)
    x = torch.randn(4, SIZES[0], dtype=model_dtype)
    y = torch.rand(4, SIZES[-1], dtype=target_dtype)
    costs = []
    for i in range(0, 4, 2):
        c = oracle_cost(oracle(x[i : i + 2]), y[i : i + 2])
        optimizer.zero_grad()
        c.backward()
        optimizer.step()
        costs.append(c.detach())
    if by == "step":
        c_by_hand = torch.stack([by_hand.sgd_step(x[i : i + 2], y[i : i + 2], LR) for i in range(0, 4, 2)])
    else:
        c_by_hand = by_hand.sgd_epoch(x, y, LR, batch_size=2)
    assert c_by_hand.dtype == torch.float64
    tol = 1e-12 if model_dtype == torch.float64 else 1e-6
    torch.testing.assert_close(c_by_hand, torch.stack(costs), rtol=tol, atol=tol)
    for (name, p), q in zip(by_hand.named_parameters(), oracle.parameters()):
        assert p.dtype == model_dtype
        torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=f"{name} after 2 steps")


def test_sgd_step_without_bias_and_with_delta_hooks():
    """bias=False works; every layer's delta hook sees δ^l = ∂C/∂z^l of the step, as computed by autograd."""
    torch.manual_seed(1)
    model = torchbp.MLP([6, 4, 2], bias=False, dtype=torch.float64)
    reference = copy.deepcopy(model)
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.rand(5, 2, dtype=torch.float64)
    seen = {}
    for layer in model.linears:
        layer.register_delta_hook(lambda m, d: seen.__setitem__(id(m), d.clone()))
    _, expected = autograd_deltas(reference, x, y)
    model.sgd_step(x, y, LR)
    for layer, delta in zip(model.linears, expected):
        torch.testing.assert_close(seen[id(layer)], delta, rtol=0, atol=1e-12)
    assert model[0].bias is None


@pytest.mark.parametrize("method", ["sgd_step", "sgd_epoch"])
def test_delta_hooks_of_a_float16_step_see_the_delta_autograd_sees(method):
    """In float16 the step by hand carries δ without the mean's 1/N (applied in the update instead, so that
    small δ do not underflow); its hooks still see δ^l = ∂C/∂z^l of the mean cost. Oracle: torch.autograd.grad
    on the torch.nn twin in float64, to float16's rounding (rtol 1e-2, atol 1e-3 of δ's largest entry); one
    mini-batch of all 8 samples."""
    torch.manual_seed(12)
    model = torchbp.MLP([6, 4, 2], dtype=torch.float16)
    reference = sequential_like(model).double()
    x, y = torch.randn(8, 6, dtype=torch.float16), torch.rand(8, 2, dtype=torch.float16)
    seen = {}
    for name, layer in model.named_children():
        if isinstance(layer, torchbp.Linear):
            layer.register_delta_hook(lambda m, d, name=name: seen.__setitem__(name, d.double()))
    expected = nn_deltas(reference, x.double(), y.double())
    if method == "sgd_step":
        model.sgd_step(x, y, LR)
    else:
        model.sgd_epoch(x, y, LR, batch_size=8)
    assert set(seen) == set(expected)
    for name, delta in expected.items():
        scale = delta.abs().max().item()
        torch.testing.assert_close(seen[name], delta, rtol=1e-2, atol=1e-3 * scale)


@pytest.mark.parametrize("method", ["sgd_step", "sgd_epoch"])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_frozen_parameters_stay_as_autograd_and_torch_sgd_leave_them(fused, method):
    """Parameters with requires_grad=False do not move; the others move as backward() + SGD.step() moves them.

    Frozen: the first layer's weight and the last layer's bias, so the recursion must still reach layer 1
    for its bias. Then a frozen first layer: the step stops above it. Oracle: torch.nn and torch.optim.SGD
    (whose frozen parameters get no .grad and are skipped), float64, 1e-12.
    """
    torch.manual_seed(2)
    by_hand = torchbp.MLP(SIZES, fused=fused, dtype=torch.float64)
    x, y = torch.randn(6, SIZES[0], dtype=torch.float64), torch.rand(6, SIZES[-1], dtype=torch.float64)
    for frozen in (("0.weight", "4.bias"), ("0.weight", "0.bias")):
        oracle = sequential_like(by_hand)
        for model in (by_hand, oracle):
            for name, p in model.named_parameters():
                p.requires_grad_(name not in frozen)
        before = {name: p.detach().clone() for name, p in by_hand.named_parameters()}
        optimizer = torch.optim.SGD(oracle.parameters(), lr=LR)
        for i in range(0, 6, 3):  # two mini-batches of 3
            optimizer.zero_grad()
            oracle_cost(oracle(x[i : i + 3]), y[i : i + 3]).backward()
            optimizer.step()
        if method == "sgd_step":
            for i in range(0, 6, 3):
                by_hand.sgd_step(x[i : i + 3], y[i : i + 3], LR)
        else:
            by_hand.sgd_epoch(x, y, LR, 3)
        for (name, p), q in zip(by_hand.named_parameters(), oracle.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=f"{name}, frozen {frozen}")
            assert torch.equal(p, before[name]) == (name in frozen), name


def test_sgd_step_refuses_a_model_with_nothing_to_train_and_tied_weights():
    """No parameter requires grad: refused, as backward() would be. A weight passed twice: refused, nothing moves."""
    model = torchbp.MLP([3, 3, 3], dtype=torch.float64)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.rand(4, 3, dtype=torch.float64)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"sgd_step\(\): no weight or bias requires grad, so there is nothing to train"):
        model.sgd_step(x, y, LR)
    model.requires_grad_(True)
    model[2].weight = model[0].weight  # tied: one Parameter in both layers
    before = [p.clone() for p in model.parameters()]
    for method, args in (("sgd_step", (LR,)), ("sgd_epoch", (LR, 2))):
        with pytest.raises(ValueError, match=re.escape("weights and biases must be distinct tensors, got weights[0] "
                                                       "passed again as weights[1] (tied weights)")):
            getattr(model, method)(x, y, *args)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_sgd_step_rejects_bad_input():
    model = torchbp.MLP([4, 3])
    with pytest.raises(ValueError, match=r"target must have shape \(2, 3\) \(the output's\), got \(2, 4\)"):
        model.sgd_step(torch.randn(2, 4), torch.rand(2, 4), LR)
    with pytest.raises(ValueError, match=r"cost must be one of \('quadratic', 'cross_entropy'\), got 'hinge'"):
        model.sgd_step(torch.randn(2, 4), torch.rand(2, 3), LR, cost="hinge")
    for lr in (-0.1, float("nan")):
        with pytest.raises(ValueError, match=r"lr must be a real number >= 0, got (-0\.1|nan)$"):
            model.sgd_step(torch.randn(2, 4), torch.rand(2, 3), lr)
    # not a number at all: a TypeError, as the README promises for a non-tensor argument of the wrong type
    for lr, name in ((torch.tensor(0.1), "Tensor"), (True, "bool"), ("0.1", "str"), (None, "NoneType")):
        with pytest.raises(TypeError, match=rf"lr must be a real number >= 0 \(not a tensor\), got {name} "):
            model.sgd_step(torch.randn(2, 4), torch.rand(2, 3), lr)
    # An lr the parameters' dtype cannot hold (it becomes addmm_'s alpha in that dtype) is refused by name,
    # before any parameter moves; float64 parameters take it.
    before = [p.clone() for p in model.parameters()]
    for lr in (float("inf"), 1e39):
        with pytest.raises(ValueError, match=r"lr must be finite and at most 3\.403e\+38 \(the largest torch\.float32"):
            model.sgd_step(torch.randn(2, 4), torch.rand(2, 3), lr)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    torchbp.MLP([4, 3], dtype=torch.float64).sgd_step(torch.randn(2, 4, dtype=torch.float64),
                                                      torch.rand(2, 3, dtype=torch.float64), 1e39)


def _parametrize(model):
    torch.nn.utils.parametrize.register_parametrization(model[0], "weight", torch.nn.Tanh())


def _prune(model):
    import torch.nn.utils.prune as prune

    prune.l1_unstructured(model[0], "weight", amount=0.5)


def _spectral_norm(model):
    torch.nn.utils.spectral_norm(model[2])


def _child_hook(model):
    model[1].register_forward_hook(lambda module, input, output: 2 * output)


def _own_hook(model):
    model.register_forward_pre_hook(lambda module, args: (args[0] + 1,))


def _bias_parametrized(model):
    torch.nn.utils.parametrize.register_parametrization(model[0], "bias", torch.nn.Tanh())


def _global_hook(model):
    from torch.nn.modules.module import register_module_forward_pre_hook

    return register_module_forward_pre_hook(lambda module, args: (args[0] + 1,))


REFUSED = {  # what changes the network's computation outside the parameters the step by hand would move
    "parametrize": (_parametrize, "layer 0's weight or bias is computed from other tensors"),
    "parametrized bias": (_bias_parametrized, "layer 0's weight or bias is computed from other tensors"),
    "prune": (_prune, r"layer 0 \(Linear\) has forward or backward hooks"),
    "spectral_norm": (_spectral_norm, r"layer 2 \(Linear\) has forward or backward hooks"),
    "child hook": (_child_hook, r"layer 1 \(Sigmoid\) has forward or backward hooks"),
    "own hook": (_own_hook, "the MLP has forward or backward hooks"),
    "hook for every module": (_global_hook, r"the MLP has forward or backward hooks \(of its own, or registered for every"),
}


@pytest.mark.parametrize("method", ["sgd_step", "sgd_epoch"])
@pytest.mark.parametrize("change", REFUSED, ids=list(REFUSED))
def test_sgd_step_refuses_a_network_it_would_train_wrong(change, method):
    """A step by hand calls no module: with a parametrized or hooked layer it would move a copy of the weight or
    skip the hook, silently. It must refuse by name before anything moves; the autograd path, which calls every
    module, trains the same network and moves its parameters (oracle: an unchanged parameter would fail)."""
    make, message = REFUSED[change]
    torch.manual_seed(0)
    model = torchbp.MLP([4, 3, 2], fused=True, dtype=torch.float64)
    handle = make(model)  # a handle where the change is global, to undo it
    try:
        x, y = torch.randn(6, 4, dtype=torch.float64), torch.rand(6, 2, dtype=torch.float64)
        before = copy.deepcopy(model.state_dict())
        args = (LR,) if method == "sgd_step" else (LR, 3)
        with pytest.raises(RuntimeError, match=rf"MLP\.{method}\(\): {message}.*MLP\.cost\(\.\.\.\)\.backward\(\)"):
            getattr(model, method)(x, y, *args)
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        model.cost(x, y).backward()
        optimizer.step()
    finally:
        if handle is not None:
            handle.remove()
    assert all(not torch.equal(p, before[k]) for k, p in model.named_parameters() if k in before)


def test_sgd_step_takes_a_numpy_lr_without_warnings():
    """np.float32(0.5) on float64 parameters: bit for bit the step of lr=0.5 (numpy once rounded lr/N to float32)
    and no numpy overflow warning from the lr check (numpy cast float64's max to float32's inf there)."""
    import warnings

    torch.manual_seed(0)
    model = torchbp.MLP([4, 3], dtype=torch.float64)
    oracle = copy.deepcopy(model)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.rand(6, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.sgd_step(x, y, np.float32(0.5))
        model.sgd_epoch(x, y, np.float64(0.5), 3)
    oracle.sgd_step(x, y, 0.5)
    oracle.sgd_epoch(x, y, 0.5, 3)
    for p, q in zip(model.parameters(), oracle.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("method", ["sgd_step", "sgd_epoch"])
def test_sgd_step_refuses_autocast(method):
    """Under autocast the step would update casts of the parameters, not the parameters: it must refuse."""
    model = torchbp.MLP([4, 3])
    before = [p.clone() for p in model.parameters()]
    args = (LR,) if method == "sgd_step" else (LR, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="autocast is enabled for cpu"):
        getattr(model, method)(torch.randn(2, 4), torch.rand(2, 3), *args)
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
    assert_equals_book(model, book)


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


def test_sgd_step_under_no_grad_still_calls_delta_hooks():
    """The step by hand runs its backward whatever the grad mode: hooks see δ^l inside torch.no_grad() too."""
    model = torchbp.MLP([4, 3, 2])
    calls = []
    for layer in model.linears:
        layer.register_delta_hook(lambda m, d: calls.append(m))
    with torch.no_grad():
        model.sgd_step(torch.randn(5, 4), torch.rand(5, 2), LR)
        model.sgd_epoch(torch.randn(5, 4), torch.rand(5, 2), LR, batch_size=2)
    assert calls == [model[2], model[0]] * 4  # one step, then three: output layer first each time


@pytest.mark.parametrize("rows", [(2,), (2, 5)], ids=["3d", "4d"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("cost", ["quadratic", "cross_entropy"])
def test_sgd_epoch_equals_autograd_and_torch_sgd_on_each_mini_batch(cost, reduction, rows):
    """Oracle: backward() + SGD.step() on x[0:3], x[3:6], x[6:7] in turn: same costs and parameters (1e-12, float64).

    Seven samples at batch_size 3 leave a last mini-batch of one, which takes a step of its own; the
    input is 3-D or 4-D, so a mini-batch of 3 rows holds 3 x 2 or 3 x 2 x 5 samples.
    """
    torch.manual_seed(3)
    model = torchbp.MLP(SIZES, dtype=torch.float64)
    oracle = sequential_like(model)
    optimizer = torch.optim.SGD(oracle.parameters(), lr=LR)
    x = torch.randn(7, *rows, SIZES[0], dtype=torch.float64)
    y = torch.rand(7, *rows, SIZES[-1], dtype=torch.float64)
    expected = []
    for i in range(0, 7, 3):
        c = oracle_cost(oracle(x[i : i + 3]), y[i : i + 3], cost, reduction)
        optimizer.zero_grad()
        c.sum().backward()
        optimizer.step()
        expected.append(c.detach())
    costs = model.sgd_epoch(x, y, LR, 3, cost, reduction)
    torch.testing.assert_close(costs, torch.cat(expected) if reduction == "none" else torch.stack(expected),
                               rtol=0, atol=1e-12)
    assert costs.shape == ((7, *rows) if reduction == "none" else (3,))
    for (name, p), q in zip(model.named_parameters(), oracle.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=f"{name} after the epoch")
        assert p.grad is None, f"{name}.grad must be left alone"


def test_sgd_epoch_equals_network_py_sgd_epoch():
    """Oracle: network.py's update_mini_batch on each mini-batch of 4 of 10 shuffled samples (numpy, float64)."""
    from benchmarks.network_py import Network

    torch.manual_seed(4)
    model = torchbp.MLP(SIZES, dtype=torch.float64)
    book = Network([m.weight for m in model.linears], [m.bias for m in model.linears])
    x, y = torch.rand(10, SIZES[0], dtype=torch.float64), torch.rand(10, SIZES[-1], dtype=torch.float64)
    perm = torch.randperm(10)
    model.sgd_epoch(x[perm], y[perm], LR, batch_size=4)
    for i in range(0, 10, 4):
        book.update_mini_batch(x[perm][i : i + 4].numpy(), y[perm][i : i + 4].numpy(), LR)
    assert_equals_book(model, book)


def test_sgd_epoch_delta_hooks_see_every_steps_delta():
    """The hooks see each mini-batch's δ^l: the same as autograd's δ = ∂C/∂z^l of that step (1e-12, float64)."""
    torch.manual_seed(5)
    model = torchbp.MLP([6, 4, 2], dtype=torch.float64)
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.rand(5, 2, dtype=torch.float64)
    seen = []
    for l, layer in enumerate(model.linears):
        layer.register_delta_hook(lambda m, d, l=l: seen.append((l, d.clone())))
    expected = []
    for i in range(0, 5, 2):
        c, deltas = autograd_deltas(reference, x[i : i + 2], y[i : i + 2])
        optimizer.zero_grad()
        expected += [(1, deltas[1]), (0, deltas[0])]  # the output layer's first
        c.backward()
        optimizer.step()
    model.sgd_epoch(x, y, LR, batch_size=2)
    assert [l for l, _ in seen] == [l for l, _ in expected]
    for (l, delta), (_, reference_delta) in zip(seen, expected):
        torch.testing.assert_close(delta, reference_delta, rtol=0, atol=1e-12, msg=f"layer {l}")


def test_sgd_epoch_rejects_bad_input():
    model = torchbp.MLP([4, 3])
    x, y = torch.randn(4, 4), torch.rand(4, 3)
    for batch_size in (0, -1):
        with pytest.raises(ValueError, match=r"mlp_sgd_epoch\(\): batch_size must be a positive int, got "):
            model.sgd_epoch(x, y, LR, batch_size)
    for batch_size, name in ((2.0, "float"), (True, "bool"), (None, "NoneType"), ("2", "str")):
        with pytest.raises(TypeError,
                           match=rf"mlp_sgd_epoch\(\): batch_size must be a positive int, got {name} "):
            model.sgd_epoch(x, y, LR, batch_size)
    with pytest.raises(ValueError, match=r"mlp_sgd_epoch\(\): input must have a leading samples dimension, "
                                         r"\(N, \*, in_features\), got shape \(4,\)"):
        model.sgd_epoch(x[0], y[0], LR, 1)
    with pytest.raises(ValueError, match=r"mlp_sgd_epoch\(\): target must have shape \(4, 3\) \(the output's\), got \(3, 3\)"):
        model.sgd_epoch(x, y[:3], LR, 2)
    with pytest.raises(ValueError, match=r"mlp_sgd_epoch\(\): lr must be a real number >= 0"):
        model.sgd_epoch(x, y, -1.0, 2)
    assert model.sgd_epoch(x, y, LR, np.int64(3)).shape == (2,)  # any integer type will do: steps of 3 and 1


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_sgd_epoch_on_no_samples_takes_no_step(reduction):
    """No samples: no mini-batch, no step; the costs are empty, of shape (0,) (``none``: the input's (0, 2))."""
    model = torchbp.MLP([4, 3])
    before = [p.clone() for p in model.parameters()]
    costs = model.sgd_epoch(torch.randn(0, 2, 4), torch.rand(0, 2, 3), LR, 5, reduction=reduction)
    assert costs.shape == ((0, 2) if reduction == "none" else (0,))
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sgd_epoch_on_rows_of_no_samples_equals_sgd_step_per_mini_batch(reduction):
    """Input (5, 0, in): five rows that hold no samples. Oracle: sgd_step on x[0:2], x[2:4], x[4:5]; each
    step's cost is that of no samples (mean nan, as torch's mean of nothing; sum 0) and no parameter moves."""
    model = torchbp.MLP([4, 3])
    before = [p.clone() for p in model.parameters()]
    x, y = torch.randn(5, 0, 4), torch.rand(5, 0, 3)
    costs = model.sgd_epoch(x, y, LR, 2, reduction=reduction)
    expected = [model.sgd_step(x[i : i + 2], y[i : i + 2], LR, reduction=reduction) for i in range(0, 5, 2)]
    torch.testing.assert_close(costs, torch.cat(expected) if reduction == "none" else torch.stack(expected),
                               rtol=0, atol=0, equal_nan=True)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_sgd_epoch_with_a_batch_larger_than_the_data_takes_one_step():
    """batch_size 10**12 over 5 samples: one step, the same as sgd_step on all of them (1e-12, float64)."""
    torch.manual_seed(6)
    model = torchbp.MLP(SIZES, dtype=torch.float64)
    reference = copy.deepcopy(model)
    x, y = torch.randn(5, SIZES[0], dtype=torch.float64), torch.rand(5, SIZES[-1], dtype=torch.float64)
    costs = model.sgd_epoch(x, y, LR, 10**12)
    torch.testing.assert_close(costs, reference.sgd_step(x, y, LR).reshape(1), rtol=0, atol=1e-12)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_sgd_epoch_on_every_device_equals_sgd_step_per_mini_batch(device):
    """On each device (CUDA where there is one): sgd_epoch's parameters equal one sgd_step per mini-batch on
    the same device, float32, bit for bit (the same ops on the same data, as documented); its costs, formed
    after the last step from each step's a^L, equal sgd_step's to float32 rounding (1e-6 relative)."""
    torch.manual_seed(7)
    model = torchbp.MLP([20, 8, 3], device=device)
    reference = copy.deepcopy(model)
    x, y = torch.rand(23, 20, device=device), torch.rand(23, 3, device=device)
    costs = model.sgd_epoch(x, y, LR, 5)
    expected = torch.stack([reference.sgd_step(x[i : i + 5], y[i : i + 5], LR) for i in range(0, 23, 5)])
    assert costs.device == x.device
    torch.testing.assert_close(costs, expected, rtol=1e-6, atol=0)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_functional_step_refuses_a_computed_weight():
    """sgd.mlp_sgd_step on a weight computed from a parameter (V * 2, as a parametrization gives) would move
    that temporary in place and leave V as it is: refused by name, V untouched."""
    torch.manual_seed(0)
    v = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.rand(6, 3, dtype=torch.float64)
    before = v.detach().clone()
    with pytest.raises(ValueError, match=r"mlp_sgd_step\(\): weights\[0\] must be a parameter or a view of one "
                                         r"to be trained in place, got one computed by MulBackward0"):
        sgd.mlp_sgd_step(x, y, [v * 2], [b], LR)
    assert torch.equal(v.detach(), before)


def test_functional_step_trains_views_of_a_flat_parameter():
    """Weights and biases as views of one flat leaf (a flat parameter buffer): the step moves the buffer as
    backward + torch.optim.SGD would (oracle), to 1e-12 in float64."""
    torch.manual_seed(1)
    flat = torch.randn(4 * 3 + 3 + 3 * 2 + 2, dtype=torch.float64, requires_grad=True)
    oracle = flat.detach().clone().requires_grad_()

    x, y = torch.randn(5, 4, dtype=torch.float64), torch.rand(5, 2, dtype=torch.float64)
    sgd.mlp_sgd_step(x, y, *flat_views(flat), LR)
    optimizer = torch.optim.SGD([oracle], lr=LR)
    F.mlp_cost(x, y, *flat_views(oracle))[0].backward()
    optimizer.step()
    torch.testing.assert_close(flat.detach(), oracle.detach(), rtol=1e-12, atol=1e-12)


def test_lr_zero_returns_the_cost_and_moves_nothing():
    """lr=0 is allowed (lr >= 0): the cost of the batch, every parameter bit for bit as it was."""
    torch.manual_seed(2)
    model = torchbp.MLP([4, 3, 2], dtype=torch.float64)
    before = copy.deepcopy(model.state_dict())
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.rand(6, 2, dtype=torch.float64)
    torch.testing.assert_close(model.sgd_step(x, y, 0), oracle_cost(sequential_like(model)(x), y),
                               rtol=1e-12, atol=1e-12)
    model.sgd_epoch(x, y, 0.0, 4)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_functional_step_refuses_a_view_of_a_computed_tensor():
    """A view is trained in place only where it views a parameter: a view of a computed tensor ((W * 1).view)
    would move a temporary, and W never."""
    torch.manual_seed(3)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.rand(6, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"weights\[0\] must be a parameter or a view of one"):
        sgd.mlp_sgd_step(x, y, [(w * 1).view(3, 4)], [b], LR)


@pytest.mark.parametrize("tie", ["data", "overlapping views", "frozen alias", "last element of a strided view"])
def test_parameters_sharing_memory_are_refused(tie):
    """Two distinct Parameters over one memory (tied through .data, or views of one buffer that overlap):
    the step would move one before reading the other, so it refuses them, as it refuses a tensor passed
    twice, and nothing moves (it once updated layer 0 wrongly by ~6e-4). Views side by side are fine
    (test_functional_step_trains_views_of_a_flat_parameter). Refused too: a frozen tensor (requires_grad
    False) over a trained one's memory, which the step reads after moving it; and two views of one buffer
    whose only common element is the last one of a transposed (non-contiguous) view, element 7 here (a
    hand count of the views' elements: 0..7 and 7..10)."""
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.rand(4, 3, dtype=torch.float64)
    if tie == "data":
        model = torchbp.MLP([3, 3, 3, 3], dtype=torch.float64)
        model[4].weight.data = model[2].weight.data
        before = [p.clone() for p in model.parameters()]
        with pytest.raises(ValueError, match=r"sgd_step\(\): weights\[1\] and weights\[2\] share memory"):
            model.sgd_step(x, y, LR)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    elif tie == "overlapping views":
        flat = torch.randn(15, dtype=torch.float64, requires_grad=True)
        w1, w2 = flat[:9].view(3, 3), flat[6:15].view(3, 3)  # elements 6..8 in both
        with pytest.raises(ValueError, match=r"mlp_sgd_step\(\): weights\[0\] and weights\[1\] share memory"):
            sgd.mlp_sgd_step(x, y, [w1, w2], None, LR)
    else:
        if tie == "frozen alias":
            trained = [torch.randn(3, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
            weights = [trained[0], trained[1].detach(), trained[1]]  # W^2 frozen, over W^3's memory
        else:
            flat = torch.randn(30, dtype=torch.float64, requires_grad=True)
            # W^1 (4, 2) apart; W^2 (2, 4) transposed over elements 0..7; W^3 (2, 2) over elements 7..10
            weights = [flat[20:28].view(4, 2), flat[0:8].view(4, 2).t(), flat[7:11].view(2, 2)]
            x, y = torch.randn(4, 2, dtype=torch.float64), torch.rand(4, 2, dtype=torch.float64)
        before = [w.detach().clone() for w in weights]
        with pytest.raises(ValueError, match=re.escape("mlp_sgd_step(): weights[1] and weights[2] share memory")):
            sgd.mlp_sgd_step(x, y, weights, None, LR)
        assert all(torch.equal(w, b) for w, b in zip(weights, before))


@pytest.mark.parametrize("step", ["mlp_sgd_step", "mlp_sgd_epoch"])
@pytest.mark.parametrize("view", ["expand", "as_strided windows"])
def test_a_trained_weight_whose_elements_share_memory_is_refused_before_anything_moves(step, view):
    """A trained weight that is a view of a parameter but holds one element in several places (a row
    expanded to 4 rows, stride 0; a Toeplitz weight of as_strided windows, strides (1, 1), whose overlap
    the strides alone do not tell) cannot be updated in place: refused before any step, and every tensor,
    the later layer's too, as it was. The expanded one once moved W^2 and b^2, then failed in the update."""
    torch.manual_seed(11)
    x, y = torch.rand(6, 5, dtype=torch.float64), torch.rand(6, 3, dtype=torch.float64)
    leaf = torch.rand(1 if view == "expand" else 8, 5, dtype=torch.float64, requires_grad=True)
    w1 = leaf.expand(4, 5) if view == "expand" else leaf.view(-1).as_strided((4, 5), (1, 1))
    w2, b2 = (torch.rand(*shape, dtype=torch.float64, requires_grad=True) for shape in ((3, 4), (3,)))
    before = [t.detach().clone() for t in (leaf, w2, b2)]
    args = (x, y, [w1, w2], [None, b2], LR) + ((2,) if step == "mlp_sgd_epoch" else ())
    with pytest.raises(ValueError, match=re.escape(f"{step}(): weights[0] has elements that are one in memory")):
        getattr(sgd, step)(*args)
    assert all(torch.equal(t.detach(), b) for t, b in zip((leaf, w2, b2), before))


def test_the_overlap_check_agrees_with_element_addresses_and_spares_them_for_plain_views(monkeypatch):
    """sgd._overlaps_itself on 300 random as_strided views (2-3 dimensions, sizes 0-4, strides 0-6) says what
    the elements' addresses, counted by hand, say. Views whose strides alone show that no two elements meet
    (column blocks, step slices, transposes: the strides torch's own check cannot tell) are answered without
    the addresses, which took 30-80 ms for an (800, 784) weight on every step."""
    gen = torch.Generator().manual_seed(13)
    storage = torch.zeros(1000)
    for _ in range(300):
        dims = int(torch.randint(2, 4, (), generator=gen))
        shape = torch.randint(0, 5, (dims,), generator=gen).tolist()
        stride = torch.randint(0, 7, (dims,), generator=gen).tolist()
        view = storage.as_strided(shape, stride)
        addresses = [sum(i * st for i, st in zip(index, stride)) for index in np.ndindex(*shape)]
        assert sgd._overlaps_itself(view) == (len(set(addresses)) < len(addresses)), (shape, stride)

    def no_addresses(t):
        raise AssertionError("the addresses were computed")

    monkeypatch.setattr(sgd, "_addresses", no_addresses)
    flat = torch.zeros(800, 1000)
    for view in (flat[:, :784], flat[::2], flat.t(), flat[:, 100:300].t()):
        assert not sgd._overlaps_itself(view)


def test_interleaved_views_and_aliasing_frozen_tensors_train_as_autograd_does():
    """Column blocks of one parameter (interleaved in memory, no element shared) and two frozen biases that
    alias one element (expanded): nothing trained shares memory, so the step takes them and moves the
    parameter as backward() + SGD.step() do (float64, 1e-12)."""
    torch.manual_seed(10)
    P = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    frozen = torch.zeros(1, dtype=torch.float64)
    b1, b2 = frozen.expand(3), frozen.expand(3)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.rand(4, 3, dtype=torch.float64)
    reference = P.detach().clone().requires_grad_()
    c = F.mlp_cost(x, y, [reference[:, :3], reference[:, 3:]], [b1, b2])[0]
    c.backward()
    expected = reference.detach() - LR * reference.grad
    sgd.mlp_sgd_step(x, y, [P[:, :3], P[:, 3:]], [b1, b2], LR)
    torch.testing.assert_close(P.detach(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("aliased", ["input", "target"])
@pytest.mark.parametrize("method", ["sgd_step", "sgd_epoch"])
def test_an_input_or_target_in_a_trained_parameters_memory_trains_as_autograd_does(aliased, method):
    """An input or target that is a view of a parameter the step moves: the step reads it as it was before
    the step, as backward() forms every gradient before SGD.step() moves anything. Parameters and the
    returned cost equal backward() + torch.optim.SGD's (float64, 1e-12), the cross-entropy target too."""
    torch.manual_seed(11)
    model = torchbp.MLP([4, 4, 4], dtype=torch.float64)
    oracle = sequential_like(model)
    optimizer = torch.optim.SGD(oracle.parameters(), lr=LR)
    x = torch.randn(4, 4, dtype=torch.float64)
    y = torch.rand(4, 4, dtype=torch.float64)
    view = torch.sigmoid(model[2].weight.detach()) if aliased == "target" else model[2].weight.detach()
    if aliased == "target":  # a probability for the cross-entropy, kept in W^2's own memory
        model[2].weight.data.copy_(view)
        oracle[2].weight.data.copy_(view)
        view = model[2].weight.detach()
    x, y = (view, y) if aliased == "input" else (x, view)
    x_ref, y_ref = x.clone(), y.clone()
    c_ref = oracle_cost(oracle(x_ref), y_ref, "cross_entropy")
    c_ref.backward()
    optimizer.step()
    c = getattr(model, method)(x, y, LR, *([4] if method == "sgd_epoch" else []), cost="cross_entropy")
    torch.testing.assert_close(c.reshape(()), c_ref.detach(), rtol=0, atol=1e-12)
    for (name, p), q in zip(model.named_parameters(), oracle.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("hook", ["register_hook", "register_post_accumulate_grad_hook", "on the base"])
@pytest.mark.parametrize("method", ["sgd_step", "sgd_epoch"])
def test_a_trained_parameter_with_gradient_hooks_is_refused(hook, method):
    """A hook on a parameter's gradient (one that zeroes it, say: backward() + SGD then leave the parameter
    alone) is never called by a step by hand, which forms no gradient: refused, naming the parameter, with
    nothing moved (it once moved the parameter silently). On the base of a view that trains, too; a
    frozen parameter's hooks, which autograd never calls either, are no reason to refuse; nor is a hook
    removed."""
    torch.manual_seed(12)
    model = torchbp.MLP([3, 4, 2], dtype=torch.float64)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.rand(6, 2, dtype=torch.float64)
    args = (x, y, LR, *([3] if method == "sgd_epoch" else []))
    weight = model[2].weight
    if hook == "on the base":
        flat = torch.zeros(8, dtype=torch.float64, requires_grad=True)
        handle = flat.register_hook(torch.zeros_like)
        weights, biases = [model[0].weight, flat.view(2, 4)], [model[0].bias, model[2].bias]
        call = getattr(sgd, f"mlp_{method}")
        step = lambda: call(x, y, weights, biases, *args[2:])  # noqa: E731
    else:
        handle = getattr(weight, hook)(torch.zeros_like if hook == "register_hook" else lambda p: None)
        step = lambda: getattr(model, method)(*args)  # noqa: E731
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=re.escape("weights[1] has gradient hooks")):
        step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    model[0].weight.register_hook(torch.zeros_like)
    model[0].weight.requires_grad_(False)  # frozen: its hook is never called by autograd either
    handle.remove()
    step()


def test_steps_by_hand_run_on_the_meta_device():
    """On the meta device (shape dry-runs) every tensor reports address 0, which is no shared memory: sgd_step
    and sgd_epoch run and give a cost of the shape and device torch's ops give on meta (oracle: the cost of
    nn.Sequential's output on meta, shape ()), and a (2,) one for 5 samples in steps of 3 (a hand count)."""
    model = torchbp.MLP([3, 4, 2], device="meta", dtype=torch.float64)
    x = torch.randn(5, 3, device="meta", dtype=torch.float64)
    y = torch.rand(5, 2, device="meta", dtype=torch.float64)
    expected = oracle_cost(sequential_like(model)(x), y)
    c = model.sgd_step(x, y, LR)
    assert (c.shape, c.dtype, c.device) == (expected.shape, expected.dtype, expected.device)
    costs = model.sgd_epoch(x, y, LR, 3)
    assert costs.shape == (2,) and costs.device.type == "meta"


def test_functional_step_refuses_tied_biases():
    """A tensor passed twice is refused, biases too (the docstring's promise)."""
    w1, w2 = (torch.randn(3, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.rand(6, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=re.escape("got biases[0] passed again as biases[1]")):
        sgd.mlp_sgd_step(x, y, [w1, w2], [b, b], LR)
