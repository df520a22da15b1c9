"""torchbp.nn against torch.nn and the notes by hand.

Linear / Sigmoid / MLP are checked against torch.nn.Linear / nn.Sigmoid /
nn.Sequential with the same weights (outputs and gradients, float64 to 1e-12),
the notes' recursion is written out with column vectors for one sample,
state_dicts load both ways, convert() swaps modules anywhere, and delta hooks
receive δ = ∂C/∂z as torch.autograd.grad computes it on the nn model.
"""

from __future__ import annotations

import copy
import functools
import re

import numpy as np
import pytest
import torch
from torch import nn

import torchbp
from torchbp import functional as F

from oracles import close, nn_deltas, oracle_cost, sequential_like

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}  # same operations, only rounding may differ
SIZES = [6, 5, 4, 3]  # a three-layer network, as in the notes' examples


def _grads(outputs, inputs):
    outputs = [o.sum() if o.dim() else o for o in outputs]
    return torch.autograd.grad(outputs, inputs, allow_unused=False)


# --------------------------------------------------------------------------
# Linear, Sigmoid, costs: drop-in for torch.nn
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_matches_nn_linear(bias, dtype, device):
    """Output and the gradients of input, weight and bias equal nn.Linear's with the same state_dict."""
    torch.manual_seed(0)
    reference = nn.Linear(4, 3, bias=bias, device=device, dtype=dtype)
    layer = torchbp.Linear(4, 3, bias=bias, device=device, dtype=dtype)
    layer.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 5, 4, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 5, 3, device=device, dtype=dtype)
    z, z_ref = layer(x), reference(x)
    close(z, z_ref, TOL[dtype], "output")
    params, params_ref = list(layer.parameters()), list(reference.parameters())
    for got, expected in zip(torch.autograd.grad(z, [x, *params], g), torch.autograd.grad(z_ref, [x, *params_ref], g)):
        close(got, expected, TOL[dtype], "gradient")


def test_sigmoid_matches_nn_sigmoid(device):
    """torchbp.Sigmoid's output and input gradient equal nn.Sigmoid's (float64, 1e-12)."""
    z = torch.randn(3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    a, a_ref = torchbp.Sigmoid()(z), nn.Sigmoid()(z)
    close(a, a_ref)
    g = torch.randn_like(a)
    close(torch.autograd.grad(a, z, g)[0], torch.autograd.grad(a_ref, z, g)[0])


@pytest.mark.parametrize("default", [torch.float32, torch.float64])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_sigmoid_promotes_integers_as_nn_sigmoid_does(dtype, default):
    """An integer or bool z becomes the default float dtype, as in nn.Sigmoid: same dtype, values to 1e-6."""
    z = torch.arange(-3, 4).to(dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        a, a_ref = torchbp.Sigmoid()(z), nn.Sigmoid()(z)
    finally:
        torch.set_default_dtype(previous)
    assert a.dtype == a_ref.dtype == default
    torch.testing.assert_close(a, a_ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("cost", ["quadratic", "cross_entropy"])
def test_cost_modules_match_formula(cost, reduction):
    """QuadraticCost / CrossEntropyCost equal the formulas with torch ops; gradients too (float64)."""
    module = (torchbp.QuadraticCost if cost == "quadratic" else torchbp.CrossEntropyCost)(reduction)
    a = (0.1 + 0.8 * torch.rand(3, 4, 5, dtype=torch.float64)).requires_grad_()
    y = torch.rand(3, 4, 5, dtype=torch.float64, requires_grad=True)
    c, c_ref = module(a, y), oracle_cost(a, y, cost, reduction)
    close(c, c_ref)
    for got, expected in zip(_grads([c], [a, y]), _grads([c_ref], [a, y])):
        close(got, expected)
    assert repr(module) == f"{type(module).__name__}(reduction={reduction!r})"


@pytest.mark.parametrize("module", [torchbp.QuadraticCost, torchbp.CrossEntropyCost])
def test_cost_module_rejects_bad_reduction(module):
    """A bad reduction fails at construction, naming the choices and the value given."""
    with pytest.raises(ValueError, match=re.escape("reduction must be one of ('mean', 'sum', 'none'), got 'avg'")):
        module("avg")


@pytest.mark.parametrize("bias", [True, False])
def test_linear_same_seed_same_init_as_nn_linear(bias):
    """The same seed gives torchbp.Linear exactly nn.Linear's initial weight and bias."""
    torch.manual_seed(123)
    reference = nn.Linear(7, 5, bias=bias)
    torch.manual_seed(123)
    layer = torchbp.Linear(7, 5, bias=bias)
    assert torch.equal(layer.weight, reference.weight)
    assert (layer.bias is None) == (reference.bias is None)
    if bias:
        assert torch.equal(layer.bias, reference.bias)
    # The draw advanced the generator by the same amount: the next number is the same for both.
    torch.manual_seed(123)
    nn.Linear(7, 5, bias=bias)
    after_reference = torch.rand(1)
    torch.manual_seed(123)
    torchbp.Linear(7, 5, bias=bias)
    assert torch.equal(torch.rand(1), after_reference)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_repr_equals_nn_linear(bias):
    """repr and extra_repr read exactly like nn.Linear's."""
    assert repr(torchbp.Linear(7, 5, bias=bias)) == repr(nn.Linear(7, 5, bias=bias))
    assert torchbp.Linear(7, 5, bias=bias).extra_repr() == nn.Linear(7, 5, bias=bias).extra_repr()


def test_linear_without_bias_registers_none_like_nn_linear():
    """bias=False: bias is None, registered as a parameter slot, absent from the state_dict, as for nn.Linear."""
    layer, reference = torchbp.Linear(4, 3, bias=False), nn.Linear(4, 3, bias=False)
    assert layer.bias is None and "bias" in layer._parameters
    assert list(layer.state_dict()) == list(reference.state_dict()) == ["weight"]
    assert [name for name, _ in layer.named_parameters()] == ["weight"]


@pytest.mark.parametrize("bias", [True, False])
def test_linear_state_dict_round_trip_with_nn_linear(bias):
    """torchbp.Linear's state_dict loads strictly into nn.Linear and back; the values arrive unchanged."""
    source = torchbp.Linear(4, 3, bias=bias)
    reference = nn.Linear(4, 3, bias=bias)
    reference.load_state_dict(source.state_dict(), strict=True)
    back = torchbp.Linear(4, 3, bias=bias)
    back.load_state_dict(reference.state_dict(), strict=True)
    for key, value in source.state_dict().items():
        assert torch.equal(reference.state_dict()[key], value)
        assert torch.equal(back.state_dict()[key], value)


def test_linear_accepts_factory_kwargs():
    """device and dtype are passed to the parameters as nn.Linear does."""
    layer = torchbp.Linear(4, 3, device="meta", dtype=torch.float64)
    assert layer.weight.device.type == "meta" and layer.weight.dtype == torch.float64
    assert layer.bias.device.type == "meta" and layer.bias.dtype == torch.float64


# --------------------------------------------------------------------------
# MLP: the same network as nn.Sequential(Linear, Sigmoid, ...)
# --------------------------------------------------------------------------


# Bad input where torch raises RuntimeError: (name, torch's call, torchbp's call); each builds its own layers.
_BAD_INPUTS = [
    ("wrong in_features", lambda: nn.Linear(12, 2)(torch.randn(1, 3, 5)),
     lambda: torchbp.Linear(12, 2)(torch.randn(1, 3, 5))),
    ("float64 input, float32 layer", lambda: nn.Linear(4, 2)(torch.randn(3, 4, dtype=torch.float64)),
     lambda: torchbp.Linear(4, 2)(torch.randn(3, 4, dtype=torch.float64))),
    ("0-d input", lambda: nn.Linear(1, 2)(torch.tensor(1.0)), lambda: torchbp.Linear(1, 2)(torch.tensor(1.0))),
    ("integer input", lambda: nn.Linear(4, 2)(torch.ones(3, 4, dtype=torch.long)),
     lambda: torchbp.Linear(4, 2)(torch.ones(3, 4, dtype=torch.long))),
    ("fused network, wrong in_features", lambda: nn.Sequential(nn.Linear(4, 3), nn.Sigmoid())(torch.randn(2, 5)),
     lambda: torchbp.MLP([4, 3], fused=True)(torch.randn(2, 5))),
    ("cost, target of another size", lambda: nn.MSELoss()(torch.rand(3, 4), torch.rand(3, 5)),
     lambda: torchbp.QuadraticCost()(torch.rand(3, 4), torch.rand(3, 5))),
]


@pytest.mark.filterwarnings("ignore:Using a target size")
@pytest.mark.parametrize("torch_call, torchbp_call", [case[1:] for case in _BAD_INPUTS],
                         ids=[case[0] for case in _BAD_INPUTS])
def test_bad_input_raises_a_runtime_error_where_torch_does(torch_call, torchbp_call):
    """Where torch's layer raises RuntimeError (the oracle, run first), torchbp's does too, so code that
    catches RuntimeError around a layer works after convert(); it stays a ValueError or TypeError as well."""
    with pytest.raises(RuntimeError):
        torch_call()
    with pytest.raises(RuntimeError) as error:
        torchbp_call()
    assert isinstance(error.value, (ValueError, TypeError))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_mlp_state_dict_round_trip_with_sequential(bias):
    """MLP's state_dict loads strictly into the equivalent nn.Sequential and back, with the same keys."""
    model = torchbp.MLP(SIZES, bias=bias)
    reference = sequential_like(model)  # loads model -> Sequential strictly
    assert list(model.state_dict()) == list(reference.state_dict())
    for p in reference.parameters():
        nn.init.normal_(p)
    model.load_state_dict(reference.state_dict(), strict=True)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    assert [type(m) for m in model] == [torchbp.Linear, torchbp.Sigmoid] * (len(SIZES) - 1)
    assert model.linears == [model[0], model[2], model[4]]
    assert len(model) == 2 * (len(SIZES) - 1)


@pytest.mark.parametrize("idx", [4, -5, 10, "0", 1.0])
def test_mlp_index_out_of_range_or_not_an_int_fails_as_sequential(idx):
    """A bad index fails as nn.Sequential's does, reading or replacing a layer: IndexError naming the index
    (the MLP's 4 layers end at 3 and -4), TypeError for a non-integer; an index in range counts from the
    end when negative (oracle: nn.Sequential's own errors and layers)."""
    model = torchbp.MLP([3, 4, 2])
    reference = sequential_like(model)
    with pytest.raises((IndexError, TypeError)) as expected:
        reference[idx]
    for access in (lambda: model[idx], lambda: model.__setitem__(idx, nn.ReLU())):
        with pytest.raises(expected.type, match=re.escape(str(expected.value))):
            access()
    assert model[-4] is model[0] and isinstance(model[-1], torchbp.Sigmoid)
    model[-1] = nn.ReLU()
    assert isinstance(model[3], nn.ReLU)


def test_mlp_refuses_deleting_a_layer_by_name():
    """del model[i] (which nn.Sequential takes) is refused in words, not with Python's bare AttributeError
    '__delitem__' of a class that has __setitem__ only; the MLP is left whole."""
    model = torchbp.MLP([3, 4, 2])
    for idx in (-1, slice(2, None)):
        with pytest.raises(TypeError, match=re.escape("MLP does not support deleting layers (nn.Sequential does)")):
            del model[idx]
    assert len(model) == 4


@pytest.mark.parametrize("idx", [slice(2, None), slice(None, 3), slice(1, 5, 2), slice(None, None, -1)],
                         ids=["2:", ":3", "1:5:2", "::-1"])
@pytest.mark.parametrize("sizes", [SIZES, [4] * 7], ids=["shallow", "12-layers"])
def test_mlp_slice_keeps_layer_names_as_sequential_does(idx, sizes):
    """A slice of an MLP is what nn.Sequential's slice is: the same layers under their own names, in order
    (12 layers: "10" after "9"), so the state_dict keys match (``2.weight``, not ``0.weight``) and load
    strictly into the slice of the Sequential."""
    model = torchbp.MLP(sizes)
    reference = sequential_like(model)
    part, reference_part = model[idx], reference[idx]
    assert list(part._modules) == list(reference_part._modules)
    assert list(part.state_dict()) == list(reference_part.state_dict())
    reference_part.load_state_dict(part.state_dict(), strict=True)
    assert all(a is b for a, b in zip(part, list(model)[idx]))  # the MLP's own layers, not copies


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_mlp_matches_sequential(fused, dtype, device):
    """Output and gradients (input and every parameter) equal nn.Sequential's; 3-D input."""
    torch.manual_seed(0)
    model = torchbp.MLP(SIZES, fused=fused, device=device, dtype=dtype)
    reference = sequential_like(model)
    x = torch.randn(2, 7, SIZES[0], dtype=dtype, device=device, requires_grad=True)
    a, a_ref = model(x), reference(x)
    close(a, a_ref, TOL[dtype], "output")
    g = torch.randn_like(a)
    got = torch.autograd.grad(a, [x, *model.parameters()], g)
    expected = torch.autograd.grad(a_ref, [x, *reference.parameters()], g)
    for name, gg, ee in zip(["input", *dict(model.named_parameters())], got, expected):
        close(gg, ee, TOL[dtype], name)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("cost", ["quadratic", "cross_entropy"])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_mlp_cost_matches_sequential(fused, cost, reduction):
    """MLP.cost equals the cost of nn.Sequential's output; gradients of input, target and parameters too."""
    torch.manual_seed(1)
    model = torchbp.MLP(SIZES, fused=fused, dtype=torch.float64)
    reference = sequential_like(model)
    x = torch.randn(7, SIZES[0], dtype=torch.float64, requires_grad=True)
    y = torch.rand(7, SIZES[-1], dtype=torch.float64, requires_grad=True)
    c, c_ref = model.cost(x, y, cost, reduction), oracle_cost(reference(x), y, cost, reduction)
    close(c, c_ref, what="cost")
    for gg, ee in zip(_grads([c], [x, y, *model.parameters()]), _grads([c_ref], [x, y, *reference.parameters()])):
        close(gg, ee, what="gradient")


@pytest.mark.parametrize("model_dtype, target_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)],
                         ids=["model32-target64", "model64-target32"])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_mlp_cost_with_a_target_of_another_dtype_promotes_as_mse_loss(fused, model_dtype, target_dtype):
    """A target of another floating dtype (a float64 one from numpy, say): MLP.cost is the quadratic cost in
    the wider dtype, as nn.Sequential + mse_loss computes it, and every gradient stays in its tensor's dtype.
    Oracle: nn.Sequential's output with torch's own promotion in the cost. Tolerance 1e-12 for float64
    values, 1e-6 for float32 ones."""
    torch.manual_seed(2)
    model = torchbp.MLP(SIZES, fused=fused, dtype=model_dtype)
    reference = sequential_like(model)
    x = torch.randn(7, SIZES[0], dtype=model_dtype)
    y = torch.rand(7, SIZES[-1], dtype=target_dtype, requires_grad=True)
    c, c_ref = model.cost(x, y), oracle_cost(reference(x), y)
    assert c.dtype == c_ref.dtype == torch.float64
    close(c, c_ref, tol=1e-12 if model_dtype == torch.float64 else 1e-6, what="cost")
    for g, e, t in zip(_grads([c], [y, *model.parameters()]), _grads([c_ref], [y, *reference.parameters()]),
                       [y, *model.parameters()]):
        assert g.dtype == e.dtype == t.dtype
        close(g, e, tol=1e-12 if t.dtype == torch.float64 else 1e-6, what="gradient")


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_an_integer_one_hot_target_is_taken_as_mse_loss_takes_it(fused):
    """y = one_hot(labels), an int64 tensor: the quadratic cost (module, MLP.cost, the step by hand) takes it in
    the input's dtype, as mse_loss does; the cross-entropy refuses it, as binary_cross_entropy does. Oracle:
    the same cost of a float64 copy of y (1e-12)."""
    torch.manual_seed(6)
    model = torchbp.MLP(SIZES, fused=fused, dtype=torch.float64)
    x = torch.randn(5, SIZES[0], dtype=torch.float64)
    y = nn.functional.one_hot(torch.randint(SIZES[-1], (5,)), SIZES[-1])
    expected = oracle_cost(sequential_like(model)(x), y.double())
    close(model.cost(x, y), expected, what="MLP.cost")
    close(torchbp.QuadraticCost()(model(x), y), expected, what="QuadraticCost")
    close(model.sgd_step(x, y, 0.1), expected, what="sgd_step")
    with pytest.raises(TypeError, match="target must have a floating-point dtype, got torch.int64"):
        model.cost(x, y, cost="cross_entropy")


def test_fused_cross_entropy_where_the_output_saturates_keeps_delta_a_minus_y():
    """float32 outputs at z = ±20 saturate at exactly 1 or 0. The fused node's δ^L = a − y is the gradient that
    binary_cross_entropy_with_logits gives (oracle, 1e-6), where the per-layer composition, like torch's
    binary_cross_entropy after a sigmoid, clamps a(1 − a) and gives δ^L = 0 (the documented difference);
    the cost is binary_cross_entropy's in both (ln clamped at −100)."""
    model = torchbp.MLP([2, 2], fused=True)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[20.0, 0.0], [0.0, -20.0]]))
        model[0].bias.zero_()
    x = torch.tensor([[1.0, 1.0], [0.5, 0.0]])
    y = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # the first sample wrong on both outputs, at saturation
    z = x @ model[0].weight.T + model[0].bias
    c = model.cost(x, y, "cross_entropy")
    close(c, oracle_cost(torch.sigmoid(z), y, "cross_entropy"), tol=1e-6)
    c.backward()
    c_logits = nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none").sum(-1).mean()
    expected = torch.autograd.grad(c_logits, [model[0].weight, model[0].bias])
    close(model[0].weight.grad, expected[0], tol=1e-6)
    close(model[0].bias.grad, expected[1], tol=1e-6)
    assert model[0].bias.grad.abs().min() > 0.2  # the saturated, wrong outputs still learn
    reference = sequential_like(model)
    oracle_cost(reference(x), y, "cross_entropy").backward()
    model.fused = False
    model.zero_grad()
    model.cost(x, y, "cross_entropy").backward()
    close(model[0].bias.grad, reference[0].bias.grad, tol=1e-6)  # the per-layer path is torch's composition
    assert reference[0].bias.grad.abs().min() < 1e-4  # which all but stops there


def test_jagged_nested_input_backpropagates_like_nn():
    """Variable-length sequences as a jagged nested tensor (what a converted transformer gets): output, input
    gradient and parameter gradients equal nn.Linear + nn.Sigmoid's (float64, 1e-12); Linear's backward once
    failed reshaping the jagged δ into rows."""
    torch.manual_seed(4)
    reference = nn.Sequential(nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2)).double()
    model = torchbp.convert(reference)
    rows = [torch.randn(2, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)]
    outputs, grads = [], []
    for m in (model, reference):
        x = torch.nested.nested_tensor(rows, layout=torch.jagged, requires_grad=True)
        m.zero_grad()
        out = m(x).values()
        out.pow(2).sum().backward()
        outputs.append(out)
        grads.append([x.grad.values(), *(p.grad for p in m.parameters())])
    close(outputs[0], outputs[1], what="output")
    for g, e in zip(*grads):
        close(g, e, what="gradient")


@pytest.mark.parametrize("blocks", [False, True], ids=["whole", "in-blocks"])
def test_fused_mlp_on_jagged_input_equals_the_unfused_one(blocks, monkeypatch):
    """A jagged nested batch through MLP(fused=True): output and parameter gradients equal the per-layer
    MLP's (float64, 1e-12), whether the fused backward runs on all samples at once or in blocks of 2
    (its block size made that small). Its sample count is a nested int, which the backward once compared
    and failed on."""
    if blocks:
        monkeypatch.setattr(torchbp.functional, "_BLOCK_ELEMENTS", 2 * max(SIZES))
    torch.manual_seed(5)
    fused = torchbp.MLP(SIZES, fused=True, dtype=torch.float64)
    unfused = torchbp.MLP(SIZES, dtype=torch.float64)
    unfused.load_state_dict(fused.state_dict())
    rows = [torch.randn(2, SIZES[0], dtype=torch.float64), torch.randn(5, SIZES[0], dtype=torch.float64)]
    x = torch.nested.nested_tensor(rows, layout=torch.jagged)
    outputs = []
    for m in (fused, unfused):
        out = m(x).values()
        out.pow(2).sum().backward()
        outputs.append(out)
    close(outputs[0], outputs[1], what="output")
    for p, q in zip(fused.parameters(), unfused.parameters()):
        close(p.grad, q.grad, what="gradient")


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_an_older_strided_nested_input_is_refused_by_name(fused):
    """A nested tensor of the older strided layout has no shape to check: refused with a message that names
    the layout to use (it raised torch's "Internal error: ... doesn't support sizes")."""
    x = torch.nested.nested_tensor([torch.randn(2, SIZES[0]), torch.randn(3, SIZES[0])], layout=torch.strided)
    fn = "mlp" if fused else "linear"
    with pytest.raises(TypeError, match=rf"{fn}\(\): a nested input must have layout=torch.jagged, got torch.strided"):
        torchbp.MLP(SIZES, fused=fused)(x)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_a_cost_of_nested_tensors_is_refused_by_name(fused):
    """The costs sum a sample's features and reduce over samples, which a jagged tensor's rows are not:
    MLP.cost, the cost modules and the steps by hand refuse one and say to pass the packed rows."""
    model = torchbp.MLP(SIZES, fused=fused)
    x = torch.nested.nested_tensor([torch.randn(2, SIZES[0]), torch.randn(3, SIZES[0])], layout=torch.jagged)
    y = torch.nested.nested_tensor([torch.rand(2, SIZES[-1]), torch.rand(3, SIZES[-1])], layout=torch.jagged)
    fn = "mlp_cost" if fused else "quadratic_cost"
    with pytest.raises(ValueError, match=rf"{fn}\(\): .* must be a dense tensor, got a nested one"):
        model.cost(x, y)
    with pytest.raises(ValueError, match=r"quadratic_cost\(\): input must be a dense tensor, got a nested one; "
                                         r"pass the packed rows of input and target \(.values\(\) of a jagged tensor\)"):
        torchbp.QuadraticCost()(model(x), y)
    with pytest.raises(ValueError, match=r"mlp_sgd_step\(\): input must be a dense tensor"):
        model.sgd_step(x, y, 0.1)


def test_a_bad_reduction_of_mlp_cost_is_refused_before_the_forward():
    """MLP.cost checks its reduction first, as the fused path does: the per-layer path (an MLP with a forward
    hook runs layer by layer) names MLP.cost and runs no forward (it once ran the forward, hooks included,
    and then failed in quadratic_cost)."""
    model = torchbp.MLP(SIZES, fused=True)
    calls = []
    model[0].register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"^MLP\.cost\(\): reduction must be one of"):
        model.cost(torch.randn(2, SIZES[0]), torch.rand(2, SIZES[-1]), reduction="avg")
    assert calls == []


def test_the_fx_check_is_the_one_that_does_not_warn():
    """Where torch has is_fx_symbolic_tracing, that is the check (is_fx_tracing logs a warning each process
    and is true under torch.export too)."""
    fx = torch.fx._symbolic_trace
    if hasattr(fx, "is_fx_symbolic_tracing"):
        assert torchbp.nn._fx_tracing is fx.is_fx_symbolic_tracing


@pytest.mark.parametrize("blocks", [False, True], ids=["whole", "in-blocks"])
def test_a_frozen_first_layer_keeps_no_input_as_nn_does(blocks, monkeypatch):
    """W^1 frozen: the fused node keeps no a^0 = x (only ∇_{W^1} C reads it), so x may change in place between
    forward and backward as it may under nn.Linear, and the gradients (x's where it asks, the other layers')
    equal nn.Sequential's (float64, 1e-12), in blocks of samples too."""
    if blocks:
        monkeypatch.setattr(torchbp.functional, "_BLOCK_ELEMENTS", 2 * max(SIZES))
    torch.manual_seed(8)
    model = torchbp.MLP(SIZES, fused=True, dtype=torch.float64)
    reference = sequential_like(model)
    for m in (model, reference):
        m[0].weight.requires_grad_(False)
    y = torch.rand(7, SIZES[-1], dtype=torch.float64)
    grads = []
    for m in (model, reference):
        x = torch.randn(7, SIZES[0], dtype=torch.float64, generator=torch.Generator().manual_seed(9),
                        requires_grad=not blocks)
        c = oracle_cost(m(x), y)
        if not blocks:
            with torch.no_grad():
                x.mul_(2)  # in place after the forward: nn's saved tensors do not include x
        c.backward()
        grads.append([*([] if blocks else [x.grad]), *(p.grad for p in m.parameters() if p.requires_grad)])
    for g, e in zip(*grads):
        close(g, e)


@pytest.mark.parametrize("via", ["forward+cost", "MLP.cost"])
@pytest.mark.parametrize("layer", [0, 1], ids=["W1, input needs no grad", "W2, first layer frozen too"])
def test_a_weight_no_gradient_passes_through_is_not_kept_as_nn_does(layer, via):
    """The fused node keeps W^l only to send (W^l)^T δ^l down to a layer or input that asks for a gradient;
    where none does, that weight may change in place between forward and backward as it may under
    nn.Linear (whose node then keeps no weight), and the gradients equal nn.Sequential's (float64, 1e-12)."""
    torch.manual_seed(10)
    model = torchbp.MLP(SIZES, fused=True, dtype=torch.float64)
    reference = sequential_like(model)
    x, y = torch.randn(7, SIZES[0], dtype=torch.float64), torch.rand(7, SIZES[-1], dtype=torch.float64)
    grads = []
    for m in (model, reference):
        if layer == 1:
            m[0].weight.requires_grad_(False)
            m[0].bias.requires_grad_(False)
        c = m.cost(x, y) if via == "MLP.cost" and m is model else oracle_cost(m(x), y)
        with torch.no_grad():
            m[2 * layer].weight.mul_(2)  # in place after the forward
        c.backward()
        grads.append([p.grad for p in m.parameters() if p.requires_grad])
    for g, e in zip(*grads):
        close(g, e)


def test_fused_and_unfused_mlp_agree():
    """The fused path (one autograd node) and the per-layer path give the same cost and .grad (float64)."""
    torch.manual_seed(2)
    unfused = torchbp.MLP(SIZES, dtype=torch.float64)
    fused = copy.deepcopy(unfused)
    fused.fused = True
    x = torch.randn(7, SIZES[0], dtype=torch.float64)
    y = torch.rand(7, SIZES[-1], dtype=torch.float64)
    c_unfused, c_fused = unfused.cost(x, y), fused.cost(x, y)
    close(c_fused, c_unfused)
    c_unfused.backward()
    c_fused.backward()
    for p_unfused, p_fused in zip(unfused.parameters(), fused.parameters()):
        close(p_fused.grad, p_unfused.grad)


class _Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_a_parametrized_weight_is_the_one_every_path_uses(fused):
    """torch.nn.utils.parametrize on a layer's weight (here W = 2 W_0): the forward and the .grad of the original
    follow it, as in torch.nn (oracle: the same parametrization on nn.Linear, float64, 1e-12)."""
    torch.manual_seed(3)
    model = torchbp.MLP(SIZES, fused=fused, dtype=torch.float64)
    reference = sequential_like(model)
    for m in (model[0], reference[0]):
        nn.utils.parametrize.register_parametrization(m, "weight", _Doubled())
    x = torch.randn(5, SIZES[0], dtype=torch.float64)
    y = torch.rand(5, SIZES[-1], dtype=torch.float64)
    close(model(x), reference(x))
    model.cost(x, y).backward()
    oracle_cost(reference(x), y, "quadratic", "mean").backward()
    original, expected = model[0].parametrizations.weight.original, reference[0].parametrizations.weight.original
    close(original.grad, expected.grad)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_mlp_cost_rejects_bad_cost(fused):
    """MLP.cost names the allowed costs and the value given."""
    model = torchbp.MLP([3, 2], fused=fused)
    with pytest.raises(ValueError, match=re.escape("cost must be one of ('quadratic', 'cross_entropy'), got 'l1'")):
        model.cost(torch.zeros(4, 3), torch.zeros(4, 2), cost="l1")
    # the scripts' spelling, --cost cross-entropy, gets the function's named
    with pytest.raises(ValueError, match=re.escape("got 'cross-entropy'; did you mean 'cross_entropy'?")):
        model.cost(torch.zeros(4, 3), torch.zeros(4, 2), cost="cross-entropy")


@pytest.mark.parametrize("sizes", [[3], [], [3, 0], [3, -2], [3, 2.0], [True, 2], [3, "2"]], ids=str)
def test_mlp_rejects_bad_sizes(sizes):
    """sizes must be at least two positive ints; the message shows what was given."""
    with pytest.raises(ValueError, match=re.escape(f"MLP: sizes must be at least two positive ints (input first), got {sizes}")):
        torchbp.MLP(sizes)


@pytest.mark.parametrize("dtype", [torch.cdouble, torch.int64, torch.bool], ids=str)
def test_mlp_refuses_every_non_floating_dtype_by_name(dtype):
    """The notes' network and its costs are real: a complex, integer or bool dtype is refused by name at
    construction (an integer one fell through to torch's "only floating point ... can require gradients")."""
    with pytest.raises(TypeError, match=re.escape("MLP: dtype must be a floating-point dtype (") + f".*got {dtype}"):
        torchbp.MLP([4, 3], dtype=dtype)


def test_mlp_refuses_a_dtype_that_is_no_torch_dtype_by_name():
    """A dtype given as a string is refused at construction naming it (it was torch.empty's own message)."""
    with pytest.raises(TypeError, match=re.escape("MLP: dtype must be a torch.dtype or None, got 'float32'")):
        torchbp.MLP([4, 3], dtype="float32")


def test_register_delta_hook_refuses_what_it_cannot_call():
    """A hook is called only in backward; one that is no function is refused where it is registered, and
    none is registered (the layer's backward then runs as without)."""
    layer = torchbp.Linear(3, 2)
    with pytest.raises(TypeError, match=re.escape("register_delta_hook(): hook must be a function called as "
                                                  "hook(module, delta), got int")):
        layer.register_delta_hook(3)
    assert not layer._delta_hooks
    layer(torch.randn(4, 3)).sum().backward()


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_mlp_cost_names_a_target_of_the_wrong_shape_as_the_outputs(fused):
    """A target shaped like the input, not the output: both paths name the output's shape (the per-layer
    path said "the shape of input (4, 2)", the network's output, which the caller calls no input)."""
    model = torchbp.MLP([3, 2], fused=fused)
    with pytest.raises(F.TensorValueError, match=re.escape("target must have shape (4, 2) (the output's), "
                                                           "got (4, 3)")):
        model.cost(torch.randn(4, 3), torch.rand(4, 3))


def test_mlp_takes_numpy_integer_sizes():
    """sizes from numpy (np.array([784, 30, 10]), say) are ints too: the same network, stored as plain ints."""
    model = torchbp.MLP(np.array([5, 4, 2]))
    assert model.sizes == (5, 4, 2) and all(type(n) is int for n in model.sizes)
    assert [tuple(m.weight.shape) for m in model.linears] == [(4, 5), (2, 4)]


def test_mlp_repr_names_sizes_and_path():
    """repr shows the layers like nn.Sequential plus sizes and whether the network is fused."""
    text = repr(torchbp.MLP([3, 2], fused=True))
    assert text.startswith("MLP(\n  sizes=[3, 2], fused=True\n")
    assert "(0): Linear(in_features=3, out_features=2, bias=True)" in text and "(1): Sigmoid()" in text


# --------------------------------------------------------------------------
# The notes' recursion by hand, one sample, column vectors
# --------------------------------------------------------------------------


def _phi(z):
    return 1 / (1 + torch.exp(-z))  # the notes' φ, written out rather than torch.sigmoid


def _by_hand(model: torchbp.MLP, x: torch.Tensor, y: torch.Tensor, cost: str):
    """The notes' backpropagation for one sample: x (n_0, 1), y (n_L, 1) column vectors.

    Returns (∇_x C, [∇_{W^l} C], [∇_{b^l} C]) for C = ½‖a^L − y‖² (or the cross entropy).
    """
    weights = [m.weight.detach() for m in model.linears]
    biases = [m.bias.detach().reshape(-1, 1) for m in model.linears]  # b^l as a column vector
    a, z = [x], []
    for W, b in zip(weights, biases):
        z.append(W @ a[-1] + b)  # z^l = W^l a^{l-1} + b^l
        a.append(_phi(z[-1]))  # a^l = φ(z^l)
    dphi = [_phi(zl) * (1 - _phi(zl)) for zl in z]  # φ'(z) = φ(z)(1 − φ(z))
    L = len(weights)
    delta = [None] * L
    if cost == "quadratic":
        delta[L - 1] = (a[L] - y) * dphi[L - 1]  # δ^L = ∇_a C ∘ φ'(z^L), ∇_a C = a − y
    else:
        delta[L - 1] = a[L] - y  # cross entropy: δ^L = a^L − y
    for l in range(L - 1, 0, -1):
        delta[l - 1] = dphi[l - 1] * (weights[l].T @ delta[l])  # δ^{l-1} = φ'(z^{l-1}) ∘ (W^l)^T δ^l
    grad_w = [delta[l] @ a[l].T for l in range(L)]  # ∇_{W^l} C = δ^l (a^{l-1})^T
    grad_b = [delta[l] for l in range(L)]  # ∇_{b^l} C = δ^l
    grad_x = weights[0].T @ delta[0]  # the input as one more layer: (W^1)^T δ^1
    return grad_x, grad_w, grad_b


@pytest.mark.parametrize(
    "path", ["MLP.cost-sum", "MLP.cost-mean", "QuadraticCost-sum", "MLP.cost-cross_entropy"]
)
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_gradients_equal_the_notes_recursion_by_hand(fused, path):
    """Every .grad (and ∇_x C) equals δ^l (a^{l-1})^T and δ^l from the notes' recursion for one sample."""
    torch.manual_seed(3)
    model = torchbp.MLP(SIZES, fused=fused, dtype=torch.float64)
    x = torch.randn(SIZES[0], 1, dtype=torch.float64)  # one sample as a column vector
    y = torch.rand(SIZES[-1], 1, dtype=torch.float64)
    cost = "cross_entropy" if path.endswith("cross_entropy") else "quadratic"
    x_row = x.T.clone().requires_grad_()  # the module takes samples as rows: (1, n_0)
    if path.startswith("MLP.cost"):
        c = model.cost(x_row, y.T, cost, reduction="mean" if path.endswith("mean") else "sum")
    else:
        c = torchbp.QuadraticCost("sum")(model(x_row), y.T)
    c.backward()
    grad_x, grad_w, grad_b = _by_hand(model, x, y, cost)
    close(x_row.grad, grad_x.T, what="∇_x C")
    for l, layer in enumerate(model.linears):
        close(layer.weight.grad, grad_w[l], what=f"∇_W C of layer {l + 1}")
        close(layer.bias.grad, grad_b[l].reshape(-1), what=f"∇_b C of layer {l + 1}")


# --------------------------------------------------------------------------
# needs_input_grad: frozen parameters and inputs get no gradient
# --------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_frozen_parameters_get_no_grad(fused):
    """A frozen weight and an input without requires_grad get no .grad; the others equal nn.Sequential's."""
    torch.manual_seed(4)
    model = torchbp.MLP(SIZES, fused=fused, dtype=torch.float64)
    reference = sequential_like(model)
    for m in (model, reference):
        m[2].weight.requires_grad_(False)  # layer 2's weight frozen
    x = torch.randn(5, SIZES[0], dtype=torch.float64)  # no requires_grad
    y = torch.rand(5, SIZES[-1], dtype=torch.float64)
    model.cost(x, y).backward()
    oracle_cost(reference(x), y).backward()
    assert model[2].weight.grad is None and x.grad is None
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        if p.requires_grad:
            close(p.grad, p_ref.grad, what=name)


def test_linear_without_any_gradient_needed_builds_no_graph():
    """Input and parameters all frozen: the output needs no gradient, as with nn.Linear."""
    layer = torchbp.Linear(4, 3).requires_grad_(False)
    assert not layer(torch.randn(2, 4)).requires_grad
    with torch.no_grad():
        assert not torchbp.MLP([4, 3], fused=True)(torch.randn(2, 4)).requires_grad


# --------------------------------------------------------------------------
# convert(): swap Linear and Sigmoid anywhere, nothing else
# --------------------------------------------------------------------------


class _Net(nn.Module):
    """Sequential inside a ModuleList inside a ModuleDict inside a custom module, plus ReLU and LayerNorm."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({
            "body": nn.ModuleList([nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.LayerNorm(5)), nn.ReLU()]),
        })
        self.head = nn.Linear(5, 3, bias=False)
        self.out = nn.Sigmoid()

    def forward(self, x):
        block, relu = self.blocks["body"]
        return self.out(self.head(relu(block(x))))


def _count(model, cls):
    return sum(type(m) is cls for m in model.modules())


def _net(dtype=torch.float64):
    torch.manual_seed(5)
    return _Net().to(dtype)


def test_convert_swaps_every_linear_and_sigmoid_only():
    """All nn.Linear / nn.Sigmoid in nested containers become torchbp's; ReLU and LayerNorm stay."""
    original = _net()
    model = torchbp.convert(original)
    assert _count(model, nn.Linear) == 0 and _count(model, nn.Sigmoid) == 0
    assert _count(model, torchbp.Linear) == 2 and _count(model, torchbp.Sigmoid) == 2
    assert _count(model, nn.LayerNorm) == 1 and _count(model, nn.ReLU) == 1
    assert model.head.bias is None and model.head.extra_repr() == original.head.extra_repr()
    assert list(model.state_dict()) == list(original.state_dict())
    for key, value in original.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
        assert model.state_dict()[key].dtype == torch.float64  # dtype carried


def test_convert_keeps_outputs_and_gradients():
    """The converted model computes the same output and gradients (input and parameters) as the original."""
    original = _net()
    model = torchbp.convert(original)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    a, a_ref = model(x), original(x)
    close(a, a_ref)
    g = torch.randn_like(a)
    for gg, ee in zip(torch.autograd.grad(a, [x, *model.parameters()], g),
                      torch.autograd.grad(a_ref, [x, *original.parameters()], g)):
        close(gg, ee)


def test_convert_copy_leaves_original_untouched():
    """inplace=False: the original keeps its nn modules and Parameters; the copy's parameters are new tensors."""
    original = _net()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    model = torchbp.convert(original, inplace=False)
    assert model is not original
    assert _count(original, nn.Linear) == 2 and _count(original, nn.Sigmoid) == 2
    assert all(p is not q for p, q in zip(model.parameters(), original.parameters()))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for key, value in original.state_dict().items():
        assert torch.equal(value, before[key])


def test_convert_inplace_shares_parameters_and_optimizer_keeps_working():
    """inplace=True: the same Parameter objects, so an optimizer built before converting updates the model."""
    original = _net()
    params = list(original.parameters())
    layer_norm = original.blocks["body"][0][2]
    optimizer = torch.optim.SGD(original.parameters(), lr=0.5)
    model = torchbp.convert(original, inplace=True)
    assert model is original and model.blocks["body"][0][2] is layer_norm  # untouched module kept as is
    assert all(p is q for p, q in zip(model.parameters(), params))
    x = torch.randn(6, 4, dtype=torch.float64)
    model(x).square().sum().backward()
    expected = [(p - 0.5 * p.grad).detach() for p in params]  # plain SGD: W ← W − η ∇_W C
    optimizer.step()
    for p, e in zip(model.parameters(), expected):
        close(p.detach(), e)


@pytest.mark.parametrize("inplace", [False, True])
def test_convert_carries_training_mode(inplace):
    """An eval model converts to an eval model, a training one to a training one, module by module."""
    original = _net()
    original.eval()
    original.head.train()  # mixed modes are carried one by one
    modes = [m.training for m in original.modules()]
    model = torchbp.convert(original, inplace=inplace)
    assert [m.training for m in model.modules()] == modes


def test_convert_a_bare_module_and_bad_argument():
    """convert() swaps the module itself; a non-module is a TypeError naming the type."""
    layer = nn.Linear(3, 2)
    converted = torchbp.convert(layer, inplace=True)
    assert type(converted) is torchbp.Linear and converted.weight is layer.weight
    assert type(torchbp.convert(nn.Sigmoid())) is torchbp.Sigmoid
    relu = nn.ReLU()
    assert torchbp.convert(relu, inplace=True) is relu
    with pytest.raises(TypeError, match="convert\\(\\): module must be a torch.nn.Module, got list"):
        torchbp.convert([nn.Linear(3, 2)])


def test_convert_keeps_hooks_attributes_and_shared_layers():
    """A converted layer keeps its forward hooks (their handles still remove them) and attributes, and one
    layer used twice stays one layer; its output equals the original's (oracle: the unconverted copy)."""
    layer = nn.Linear(3, 3, dtype=torch.float64)
    layer.tag = "encoder"
    calls = []
    handle = layer.register_forward_hook(lambda m, inp, out: calls.append(type(m)))
    original = nn.Sequential(layer, nn.Sigmoid(), layer)  # weight sharing by reusing the module
    model = torchbp.convert(original)
    assert model[0] is model[2] and type(model[0]) is torchbp.Linear and model[0].tag == "encoder"
    x = torch.randn(4, 3, dtype=torch.float64)
    close(model(x), original(x))
    assert calls == [torchbp.Linear] * 2 + [nn.Linear] * 2  # the copy's hook fired in torchbp's Linear
    torchbp.convert(original, inplace=True)
    handle.remove()  # the handle taken before converting still removes the hook
    original(x)
    assert len(calls) == 4


def test_convert_leaves_subclasses_alone():
    """A subclass of nn.Linear may compute something else (here 2z; a parametrized layer is one too): kept as is."""

    class Doubled(nn.Linear):
        def forward(self, input):
            return 2 * super().forward(input)

    original = nn.Sequential(Doubled(3, 2), nn.Linear(2, 2))
    nn.utils.parametrize.register_parametrization(original[1], "weight", nn.Identity())
    model = torchbp.convert(original)
    assert type(model[0]) is Doubled and not isinstance(model[1], torchbp.Linear)
    x = torch.randn(4, 3)
    close(model(x), original(x), 0)


def test_layers_are_nn_subclasses_found_by_isinstance():
    """torchbp.Linear is an nn.Linear and torchbp.Sigmoid an nn.Sigmoid, so the usual init loop over
    isinstance(m, nn.Linear) reaches every layer of an MLP and of a converted model; their forward still
    runs torchbp's Function (a delta hook fires) and a second convert() leaves them as they are."""
    torch.manual_seed(0)
    models = [torchbp.MLP([4, 3, 2]), torchbp.convert(nn.Sequential(nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2)))]
    for model in models:
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.constant_(m.weight, 0.5)
        linears = [m for m in model.modules() if isinstance(m, torchbp.Linear)]
        assert len(linears) == 2 and all(bool((m.weight == 0.5).all()) for m in linears)
        assert isinstance(model[1], nn.Sigmoid) and isinstance(model[1], torchbp.Sigmoid)
        calls = []
        linears[0].register_delta_hook(lambda module, delta: calls.append(delta.shape))
        model(torch.randn(5, 4)).sum().backward()
        assert calls == [(5, 3)]
        assert [type(m) for m in torchbp.convert(model).modules()] == [type(m) for m in model.modules()]


def test_a_complex_model_converts_and_matches_torch():
    """nn.Linear and nn.Sigmoid take complex tensors; converted, the model gives torch's outputs and its
    (conjugate-convention) gradients of a real loss, for the input and every parameter (complex128, 1e-12),
    and a delta hook sees torch's ∂L/∂z; the costs and the MLP, real by the notes, refuse complex input."""
    torch.manual_seed(11)
    reference = nn.Sequential(nn.Linear(4, 3, dtype=torch.cdouble), nn.Sigmoid(), nn.Linear(3, 2, dtype=torch.cdouble))
    model = torchbp.convert(reference)
    assert isinstance(model[0], torchbp.Linear) and isinstance(model[1], torchbp.Sigmoid)
    x = torch.randn(5, 4, dtype=torch.cdouble)
    zs, deltas = [], []
    reference[0].register_forward_hook(lambda m, inputs, z: zs.append(z))
    model[0].register_delta_hook(lambda m, delta: deltas.append(delta))
    results = []
    for m in (reference, model):
        xi = x.clone().requires_grad_()
        out = m(xi)
        loss = out.abs().pow(2).sum()
        params = list(m.parameters())
        results.append((out, *torch.autograd.grad(loss, [xi, *params, *(zs if m is reference else [])])))
    (expected_delta,) = results[0][-1:]
    for got, expected in zip(results[1], results[0][:-1]):
        close(got, expected)
    close(deltas[0], expected_delta)
    with pytest.raises(TypeError, match="floating-point dtype, got torch.complex128"):
        torchbp.QuadraticCost()(x, x)
    with pytest.raises(TypeError, match=r"MLP: dtype must be a floating-point dtype \(for a complex network"):
        torchbp.MLP([4, 3], dtype=torch.cdouble)
    with pytest.raises(TypeError, match="floating-point dtype, got torch.complex128"):
        torchbp.MLP([4, 3], fused=True).to(torch.cdouble)(x)


@pytest.mark.parametrize("inplace", [False, True])
def test_convert_rejects_uninitialized_lazy_linear_and_changes_nothing(inplace):
    """A LazyLinear has no shape yet: convert() says to run a forward pass first, naming the module, and
    leaves the layers before it as they were (inplace=True once left a half-converted model)."""
    model = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.LazyLinear(3))
    with pytest.raises(ValueError, match=re.escape("convert(): module '2' is a LazyLinear with uninitialized "
                                                   "parameters; run one forward pass before converting")):
        torchbp.convert(model, inplace=inplace)
    assert [type(m) for m in model] == [nn.Linear, nn.Sigmoid, nn.LazyLinear]


def test_convert_refuses_scripted_layers_it_cannot_change():
    """A torch.jit.script-ed model's Linear is TorchScript: convert() refuses it by name (it returned the
    model unchanged, silently); a scripted module with no Linear or Sigmoid inside is left alone."""
    scripted = torch.jit.script(nn.Sequential(nn.Linear(2, 3), nn.Sigmoid()))
    with pytest.raises(TypeError, match=re.escape("convert(): module '0' is a TorchScript Linear")):
        torchbp.convert(scripted)
    model = nn.Sequential(nn.Linear(2, 3), torch.jit.script(nn.Tanh()))
    converted = torchbp.convert(model)
    assert type(converted[0]) is torchbp.Linear


def test_convert_refuses_a_layer_whose_forward_is_set_on_the_instance():
    """A Linear or Sigmoid whose forward a tool replaced on the instance would keep running that forward (which
    calls nn.Linear's) after its class changed: torchbp's backward would never run, and a DeltaMonitor would
    record nothing, silently. convert() names it and changes no module; the patched layer's own type is kept."""
    for patched in (nn.Linear(2, 3), nn.Sigmoid()):
        model = nn.Sequential(nn.Linear(3, 2), patched)
        patched.forward = type(patched).forward.__get__(patched)  # as accelerate's add_hook_to_module does
        what = type(patched).__name__
        with pytest.raises(TypeError, match=re.escape(f"convert(): module '1' is an nn.{what} with a forward of its own")):
            torchbp.convert(model, inplace=True)
        assert [type(m) for m in model] == [nn.Linear, type(patched)]


# --------------------------------------------------------------------------
# Delta hooks: δ^l = ∂C/∂z^l during backward
# --------------------------------------------------------------------------


def _reference_deltas(model: torchbp.MLP, x, y, cost="quadratic"):
    """δ^1..δ^L = torch.autograd.grad(C, z^l) on the equivalent nn.Sequential."""
    return list(nn_deltas(sequential_like(model), x, y, cost).values())


def _record(model: torchbp.MLP):
    calls, handles = [], []
    for layer in model.linears:
        handles.append(layer.register_delta_hook(lambda module, delta: calls.append((module, delta.detach().clone()))))
    return calls, handles


@pytest.mark.parametrize("cost", ["quadratic", "cross_entropy"])
@pytest.mark.parametrize("via", ["forward+cost", "MLP.cost"])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_delta_hooks_receive_dC_dz(fused, via, cost):
    """Each Linear's hook gets (module, δ^l) with δ^l = ∂C/∂z^l of the nn model, once, from layer L down."""
    torch.manual_seed(6)
    model = torchbp.MLP(SIZES, fused=fused, dtype=torch.float64)
    x = torch.randn(2, 3, SIZES[0], dtype=torch.float64)  # 3-D: δ has shape (*, out_features)
    y = torch.rand(2, 3, SIZES[-1], dtype=torch.float64)
    calls, _ = _record(model)
    if via == "MLP.cost":
        c = model.cost(x, y, cost)
    else:
        c = (torchbp.QuadraticCost() if cost == "quadratic" else torchbp.CrossEntropyCost())(model(x), y)
    assert calls == []  # nothing in forward
    c.backward()
    expected = _reference_deltas(model, x, y, cost)
    assert [module for module, _ in calls] == model.linears[::-1]  # backward runs from the output layer down
    for (module, delta), l in zip(calls, range(len(expected) - 1, -1, -1)):
        assert delta.shape == (2, 3, SIZES[l + 1])
        close(delta, expected[l], what=f"δ of layer {l + 1}")


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_delta_hook_removed_by_handle(fused):
    """handle.remove() stops that hook; another hook on the same layer keeps being called."""
    model = torchbp.MLP([4, 3, 2], fused=fused)
    layer = model.linears[1]
    first, second = [], []
    handle = layer.register_delta_hook(lambda module, delta: first.append(delta))
    layer.register_delta_hook(lambda module, delta: second.append(delta))
    x = torch.randn(5, 4)
    model(x).sum().backward()
    assert len(first) == 1 and len(second) == 1
    handle.remove()
    model(x).sum().backward()
    assert len(first) == 1 and len(second) == 2


def test_delta_hook_of_a_single_linear():
    """On a lone torchbp.Linear the hook's δ is the grad_output: ∂(Σ g∘z)/∂z = g."""
    layer = torchbp.Linear(4, 3, dtype=torch.float64)
    seen = []
    handle = layer.register_delta_hook(lambda module, delta: seen.append((module, delta)))
    z = layer(torch.randn(5, 4, dtype=torch.float64))
    g = torch.randn_like(z)
    z.backward(g)
    assert len(seen) == 1 and seen[0][0] is layer
    close(seen[0][1], g)
    handle.remove()
    layer(torch.randn(5, 4, dtype=torch.float64)).sum().backward()
    assert len(seen) == 1


def test_fused_and_unfused_hooks_see_the_same_deltas():
    """The fused backward calls the Linear layers' hooks with the δ^l of the per-layer path."""
    torch.manual_seed(7)
    unfused = torchbp.MLP(SIZES, dtype=torch.float64)
    fused = copy.deepcopy(unfused)
    fused.fused = True
    x, y = torch.randn(5, SIZES[0], dtype=torch.float64), torch.rand(5, SIZES[-1], dtype=torch.float64)
    calls_unfused, _ = _record(unfused)
    calls_fused, _ = _record(fused)
    unfused.cost(x, y).backward()
    fused.cost(x, y).backward()
    assert [fused.linears.index(m) for m, _ in calls_fused] == [unfused.linears.index(m) for m, _ in calls_unfused]
    for (_, d_fused), (_, d_unfused) in zip(calls_fused, calls_unfused):
        close(d_fused, d_unfused)


def test_functional_mlp_delta_hook_gets_layer_index():
    """F.mlp's delta_hook(layer_index, δ) is called for layers L-1 .. 0 with δ^l = ∂C/∂z^l."""
    torch.manual_seed(8)
    model = torchbp.MLP(SIZES, dtype=torch.float64)
    x, y = torch.randn(5, SIZES[0], dtype=torch.float64), torch.rand(5, SIZES[-1], dtype=torch.float64)
    seen = []
    weights = [m.weight for m in model.linears]
    biases = [m.bias for m in model.linears]
    c, _ = F.mlp_cost(x, y, weights, biases, delta_hook=lambda l, delta: seen.append((l, delta)))
    c.backward()
    expected = _reference_deltas(model, x, y)
    assert [l for l, _ in seen] == [2, 1, 0]
    for l, delta in seen:
        close(delta, expected[l])


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_hook_based_weight_utilities_on_a_child_layer_work_as_on_sequential(fused):
    """nn.utils.spectral_norm (a forward pre-hook on model[0]) and a forward hook: the fused node never calls
    its children, so a hooked child sends the network through its layers. Oracle: the same on nn.Sequential,
    the same seed for spectral_norm's power iteration; output and ∇ of weight_orig to 1e-12 (float64)."""
    torch.manual_seed(4)
    model = torchbp.MLP(SIZES, fused=fused, dtype=torch.float64)
    reference = sequential_like(model)
    for m in (model, reference):
        torch.manual_seed(5)
        nn.utils.spectral_norm(m[0])
    calls = []
    model[2].register_forward_hook(lambda *args: calls.append("forward"))
    x = torch.randn(5, SIZES[0], dtype=torch.float64)
    y = torch.rand(5, SIZES[-1], dtype=torch.float64)
    c = model.cost(x, y)
    c_ref = oracle_cost(reference(x), y, "quadratic", "mean")
    close(c, c_ref)
    c.backward()
    c_ref.backward()
    close(model[0].weight_orig.grad, reference[0].weight_orig.grad)
    assert calls == ["forward"]


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_hooks_on_the_mlp_itself_run_in_cost_as_on_sequential(fused):
    """A forward pre-hook and a forward hook on the MLP that change its input and output, and a full backward
    hook: MLP.cost must run them as nn.Sequential's call does (the fused cost once skipped them). Oracle: the
    same hooks on nn.Sequential; cost and every gradient to 1e-12 (float64), the backward hook fired once."""
    torch.manual_seed(4)
    model = torchbp.MLP(SIZES, fused=fused, dtype=torch.float64)
    reference = sequential_like(model)
    fired = []
    for m in (model, reference):
        m.register_forward_pre_hook(lambda module, args: (2 * args[0],))
        m.register_forward_hook(lambda module, args, output: output.sqrt())
        m.register_full_backward_hook(lambda module, grad_input, grad_output: fired.append(type(module)))
    x = torch.randn(5, SIZES[0], dtype=torch.float64, requires_grad=True)
    y = torch.rand(5, SIZES[-1], dtype=torch.float64)
    c, c_ref = model.cost(x, y), oracle_cost(reference(x), y)
    close(c, c_ref)
    got = _grads([c], [x, *model.parameters()])
    expected = _grads([c_ref], [x, *reference.parameters()])
    for g, e in zip(got, expected):
        close(g, e)
    assert fired == [torchbp.MLP, nn.Sequential]


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_hooks_registered_for_every_module_see_every_layer_as_on_sequential(fused):
    """torch.nn.modules.module.register_module_forward_pre_hook / _forward_hook (profilers, module trackers)
    are called for every module: the fused MLP must run its layers then, as nn.Sequential does. Oracle: the
    order of modules seen on nn.Sequential, and a hook that changes the output changes both alike (1e-12)."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    torch.manual_seed(4)
    model = torchbp.MLP(SIZES, fused=fused, dtype=torch.float64)
    reference = sequential_like(model)
    x = torch.randn(5, SIZES[0], dtype=torch.float64)
    y = torch.rand(5, SIZES[-1], dtype=torch.float64)
    seen = []

    def halve_sigmoids(module, args, output):
        return output / 2 if isinstance(module, nn.Sigmoid) else None

    handles = [register_module_forward_pre_hook(lambda module, args: seen.append(type(module).__name__)),
               register_module_forward_hook(halve_sigmoids)]
    try:
        c, c_ref = model.cost(x, y), oracle_cost(reference(x), y)
    finally:
        for handle in handles:
            handle.remove()
    close(c, c_ref)
    layers = ["Linear", "Sigmoid"] * (len(SIZES) - 1)
    assert seen == ["MLP", *layers, "Sequential", *layers]


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_a_childs_backward_pre_hook_runs_as_on_sequential(fused):
    """register_full_backward_pre_hook on a child (here one that doubles the gradient reaching layer 2): the
    fused MLP must run its layers so that the hook runs and changes the gradients below it, as on
    nn.Sequential (oracle: the same hook there; gradients to 1e-12, float64, the hook called once each);
    the steps by hand, which run no hook, refuse the model."""
    torch.manual_seed(5)
    model = torchbp.MLP(SIZES, fused=fused, dtype=torch.float64)
    reference = sequential_like(model)
    calls = []

    def double(module, grad_output):
        calls.append(type(module).__name__)
        return (2 * grad_output[0],)

    for m in (model, reference):
        m[2].register_full_backward_pre_hook(double)
    x = torch.randn(5, SIZES[0], dtype=torch.float64, requires_grad=True)
    y = torch.rand(5, SIZES[-1], dtype=torch.float64)
    c, c_ref = model.cost(x, y), oracle_cost(reference(x), y)
    close(c, c_ref)
    for g, e in zip(_grads([c], [x, *model.parameters()]), _grads([c_ref], [x, *reference.parameters()])):
        close(g, e)
    assert calls == ["Linear", "Linear"]
    with pytest.raises(RuntimeError, match=re.escape("MLP.sgd_step(): layer 2 (Linear) has forward or backward hooks")):
        model.sgd_step(x.detach(), y, 0.5)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_a_backward_pre_hook_for_every_module_sees_every_layer_as_on_sequential(fused):
    """torch.nn.modules.module.register_module_full_backward_pre_hook is called in backward for every module:
    the fused MLP must run its layers then, as nn.Sequential does. Oracle: the modules it sees on
    nn.Sequential, output layer first; the steps by hand, which run no hook, refuse the model."""
    from torch.nn.modules.module import register_module_full_backward_pre_hook

    torch.manual_seed(6)
    model = torchbp.MLP(SIZES, fused=fused, dtype=torch.float64)
    reference = sequential_like(model)
    x, y = torch.randn(5, SIZES[0], dtype=torch.float64), torch.rand(5, SIZES[-1], dtype=torch.float64)
    seen = []
    handle = register_module_full_backward_pre_hook(lambda module, grad_output: seen.append(type(module).__name__))
    try:
        model.cost(x, y).backward()
        model_seen, seen[:] = seen[:], []
        oracle_cost(reference(x), y).backward()
        with pytest.raises(RuntimeError, match=re.escape("MLP.sgd_step(): the MLP has forward or backward hooks")):
            model.sgd_step(x, y, 0.5)
    finally:
        handle.remove()
    assert seen[0] == "Sequential" and model_seen == ["MLP", *seen[1:]]
    assert seen[1:] == ["Sigmoid", "Linear"] * (len(SIZES) - 1)


def _relu_in_the_middle(model):
    model[1] = nn.ReLU()  # as nn.Sequential takes it


def _plain_nn_linear(model):
    layer = nn.Linear(*reversed(model[2].weight.shape), dtype=model[2].weight.dtype)
    layer.load_state_dict(model[2].state_dict())  # the same numbers: only the class differs
    model[-2] = layer


def _softmax_appended(model):
    model.add_module(str(len(model)), nn.Softmax(dim=-1))


class Doubled(torchbp.Linear):
    """A torchbp.Linear subclass with a forward of its own."""

    def forward(self, input):
        return 2 * super().forward(input)


def _linear_subclass(model):
    layer = Doubled(*reversed(model[0].weight.shape), dtype=model[0].weight.dtype)
    layer.load_state_dict(model[0].state_dict())
    model[0] = layer


REPLACED = {  # children a user swaps or adds after building the MLP, as in an nn.Sequential
    "ReLU for a Sigmoid": (_relu_in_the_middle, "layer 1 is a torch.nn.modules.activation.ReLU where it was "
                                                "built with a torchbp.Sigmoid"),
    "nn.Linear for a Linear": (_plain_nn_linear, "layer 2 is a torch.nn.modules.linear.Linear where it was "
                                                 "built with a torchbp.Linear"),
    "a layer appended": (_softmax_appended, "it has 5 layers where it was built with 4"),
    # a subclass of torchbp's own Linear has its own forward too
    "a Linear subclass": (_linear_subclass, f"layer 0 is a {Doubled.__module__}.Doubled where it was built with "
                                            "a torchbp.Linear"),
}


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("change", REPLACED, ids=list(REPLACED))
def test_replaced_children_are_computed_as_on_sequential(change, fused):
    """A child replaced or appended: forward, cost and every gradient are those of nn.Sequential with the
    same change (the fused node once computed Linear, Sigmoid, ... regardless, or crashed on a plain
    nn.Linear); 1e-12 in float64. The steps by hand, which compute the network as built, refuse it."""
    make, message = REPLACED[change]
    torch.manual_seed(7)
    model = torchbp.MLP([4, 3, 2], fused=fused, dtype=torch.float64)
    reference = sequential_like(model)
    make(model)
    make(reference)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.rand(5, 2, dtype=torch.float64)
    close(model(x), reference(x))
    c, c_ref = model.cost(x, y), oracle_cost(reference(x), y)
    close(c, c_ref)
    for g, e in zip(_grads([c], [x, *model.parameters()]), _grads([c_ref], [x, *reference.parameters()])):
        close(g, e)
    for method, args in (("sgd_step", (0.5,)), ("sgd_epoch", (0.5, 2))):
        with pytest.raises(RuntimeError, match=re.escape(f"MLP.{method}(): {message}")):
            getattr(model, method)(x.detach(), y, *args)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_a_subclass_forward_runs_in_cost_and_is_refused_by_the_steps_by_hand(fused):
    """MLP.cost is the cost of self(input): a subclass that scales its input in forward gets that cost
    (the fused cost once skipped forward); oracle: quadratic_cost of nn.Sequential on the scaled input.
    The steps by hand would skip forward too, and refuse."""

    class Scaled(torchbp.MLP):
        def forward(self, input):
            return super().forward(input / 255)

    torch.manual_seed(8)
    model = Scaled([4, 3, 2], fused=fused, dtype=torch.float64)
    reference = sequential_like(model)
    x = 255 * torch.rand(5, 4, dtype=torch.float64)
    y = torch.rand(5, 2, dtype=torch.float64)
    close(model.cost(x, y), oracle_cost(reference(x / 255), y))
    with pytest.raises(RuntimeError, match=re.escape("MLP.sgd_step(): Scaled overrides MLP.forward")):
        model.sgd_step(x, y, 0.5)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("where", ["layer", "mlp"])
def test_a_forward_set_on_the_instance_runs_and_is_refused_by_the_steps_by_hand(fused, where):
    """A forward patched on one instance (as tools that wrap layers do), of a Linear or of the MLP: the
    output and cost go through it, as calling the modules would (the fused node once skipped it). Oracle:
    nn.Sequential on the same scaled pre-activations or input, 1e-12 in float64. The steps by hand would
    skip it, and refuse."""
    torch.manual_seed(9)
    model = torchbp.MLP([4, 3, 2], fused=fused, dtype=torch.float64)
    reference = sequential_like(model)
    x, y = torch.rand(5, 4, dtype=torch.float64), torch.rand(5, 2, dtype=torch.float64)
    if where == "layer":
        layer = model[2]
        layer.forward = lambda input: 2 * torchbp.Linear.forward(layer, input)
        expected = torch.sigmoid(2 * reference[2](reference[:2](x)))
        refused = "MLP.sgd_step(): layer 2 has a forward of its own, set on the instance"
    else:
        model.forward = lambda input: torchbp.MLP.forward(model, input / 2)
        expected = reference(x / 2)
        refused = "MLP.sgd_step(): the instance's forward overrides MLP.forward"
    close(model(x), expected)
    close(model.cost(x, y), oracle_cost(expected, y))
    with pytest.raises(RuntimeError, match=re.escape(refused)):
        model.sgd_step(x, y, 0.5)


def test_mlp_rejects_a_non_bool_fused_and_a_non_sequence_sizes():
    with pytest.raises(TypeError, match=re.escape("MLP: fused must be a bool, got 'no'")):
        torchbp.MLP([3, 2], fused="no")
    with pytest.raises(TypeError, match=re.escape("MLP: sizes must be a sequence of ints (input first), got 4")):
        torchbp.MLP(4)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("via", ["MLP.cost", "F.mlp_cost", "MLP"])
@pytest.mark.parametrize("save", [None, "addmm", "mm"])
def test_non_reentrant_checkpoint_gives_the_same_gradients(fused, via, save):
    """torch.utils.checkpoint (use_reentrant=False) recomputes the forward in backward and hands the saved
    tensors out once per unpack; the fused backward once read them twice and failed. With ``save``, a
    selective checkpoint keeps that op's outputs (the matmul z = W a + b: addmm with a bias, mm without),
    as the docs' "save the matmuls" policy does: the fused forward once wrote a^l over the z^l it had
    cached, and the backward refused the mutated cache. Oracle: the same computation without
    checkpointing; cost and every gradient to 1e-12 (float64)."""
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    context_fn = torch.utils.checkpoint.noop_context_fn
    if save is not None:
        saved_op = getattr(torch.ops.aten, save).default

        def policy(ctx, op, *args, **kwargs):
            return CheckpointPolicy.MUST_SAVE if op is saved_op else CheckpointPolicy.PREFER_RECOMPUTE

        context_fn = functools.partial(create_selective_checkpoint_contexts, policy)
    torch.manual_seed(4)
    model = torchbp.MLP(SIZES, bias=save != "mm", fused=fused, dtype=torch.float64)
    x = torch.randn(5, SIZES[0], dtype=torch.float64, requires_grad=True)
    y = torch.rand(5, SIZES[-1], dtype=torch.float64)

    def run(x):
        if via == "MLP.cost":
            return model.cost(x, y)
        if via == "F.mlp_cost":
            return F.mlp_cost(x, y, [m.weight for m in model.linears], [m.bias for m in model.linears])[0]
        return model(x).square().sum()

    c = checkpoint(run, x, use_reentrant=False, context_fn=context_fn)
    c_ref = run(x)
    close(c, c_ref)
    inputs = [x, *model.parameters()]
    for g, e in zip(_grads([c], inputs), _grads([c_ref], inputs)):
        close(g, e)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_float16_mean_cost_does_not_overflow_where_the_mean_fits(fused):
    """10,000 samples with ½‖a − y‖² ≈ 4.5 each: the mean fits float16, but Σ‖a − y‖² ≈ 90,000 taken
    before the ½ and the 1/N does not (float16's largest is 65504). Oracle: the float64 cost, to 1e-2."""
    a = torch.full((10_000, 10), 0.95, dtype=torch.float16)
    y = torch.zeros_like(a)
    expected = 0.5 * (a.double() ** 2).sum(-1).mean()
    for c in (torchbp.QuadraticCost()(a, y), F.quadratic_cost(a, y), F.quadratic_cost(a, y, "sum") / 10_000):
        assert torch.isfinite(c) and abs(c.double() - expected) < 1e-2, (c, expected)
    model = torchbp.MLP([3, 10], fused=fused, dtype=torch.float16)
    x = torch.zeros(10_000, 3, dtype=torch.float16)
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(3.0)  # a = σ(3) ≈ 0.9526 for every output
    c = model.cost(x, y)
    assert torch.isfinite(c) and abs(c.double() - 0.5 * 10 * torch.sigmoid(torch.tensor(3.0)).double() ** 2) < 1e-2


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_float16_mean_cost_of_a_small_batch_does_not_overflow_where_the_mean_fits(fused):
    """2,000 samples of 10 features (20,000 elements, a batch small enough for the one-dot sum of float32 and
    float64) with a − y ≈ 2, ½‖a − y‖² ≈ 20 each: the mean fits float16, Σ‖a − y‖² ≈ 80,000 does not (65504).
    quadratic_cost, MLP.cost and the cost sgd_step returns stay finite. Oracle: the float64 cost, to 1e-2."""
    y = -torch.ones(2000, 10, dtype=torch.float16)
    a = torch.ones_like(y)
    c = F.quadratic_cost(a, y)
    assert torch.isfinite(c) and abs(c.double() - 0.5 * ((a.double() - y.double()) ** 2).sum(-1).mean()) < 1e-2
    model = torchbp.MLP([3, 10], fused=fused, dtype=torch.float16)
    x = torch.zeros(2000, 3, dtype=torch.float16)
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(10.0)  # a = σ(10) ≈ 0.99995 for every output
    expected = 0.5 * 10 * (torch.sigmoid(torch.tensor(10.0, dtype=torch.float64)) + 1) ** 2
    for c in (model.cost(x, y), model.sgd_step(x, y, 0.0)):
        assert torch.isfinite(c) and abs(c.double() - expected) < 1e-2, (c, expected)


@pytest.mark.parametrize("n_in, n_out", [(0, 3), (3, 0)], ids=["in0", "out0"])
def test_linear_with_zero_features_backpropagates_on_3d_input_like_nn_linear(n_in, n_out):
    """in_features or out_features 0 on a (2, 4, in) input: forward and every gradient as nn.Linear (all of
    them empty or zero). The per-sample rows were once reshaped with -1, which 0 features make ambiguous."""
    torch.manual_seed(6)
    layer = torchbp.Linear(n_in, n_out, dtype=torch.float64)
    reference = nn.Linear(n_in, n_out, dtype=torch.float64)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, n_in, dtype=torch.float64, requires_grad=True)
    z, z_ref = layer(x), reference(x)
    close(z, z_ref)
    g = torch.randn(z.shape, dtype=torch.float64)
    got = torch.autograd.grad(z, [x, layer.weight, layer.bias], g)
    expected = torch.autograd.grad(z_ref, [x, reference.weight, reference.bias], g)
    for a, e in zip(got, expected):
        assert a.shape == e.shape
        close(a, e)


@pytest.mark.parametrize("cls", [nn.Linear, torchbp.Linear], ids=["nn.Linear", "torchbp.Linear"])
def test_a_linear_subclass_with_a_state_of_its_own_deep_copies_as_an_nn_linear_one(cls):
    """A subclass that leaves a lock out of its own __getstate__ deep-copies (and so convert() copies it),
    as an nn.Linear subclass does: torchbp.Linear's __deepcopy__ once took Linear's state by name and
    failed on the lock. Oracle: the nn.Linear subclass; the copy computes what the original does."""
    import threading

    class Locked(cls):
        def __init__(self, *args):
            super().__init__(*args)
            self.lock = threading.Lock()

        def __getstate__(self):
            return {key: value for key, value in super().__getstate__().items() if key != "lock"}

        def __setstate__(self, state):
            super().__setstate__(state)
            self.lock = threading.Lock()

    layer = Locked(3, 2)
    twin = copy.deepcopy(layer)
    x = torch.randn(4, 3)
    assert torch.equal(twin(x), layer(x)) and twin.lock is not layer.lock
    torchbp.convert(nn.Sequential(layer))


@pytest.mark.parametrize("cls", [nn.Linear, torchbp.Linear], ids=["nn.Linear", "torchbp.Linear"])
def test_a_copy_of_a_compiled_linear_is_a_module_of_its_own(cls):
    """After module.compile(), nn.Linear's copies drop the compiled call (it would run the original's
    forward), and torch.save works; torchbp.Linear, which also drops its δ hooks from copies, the same.
    Oracle: the copy's output from its own (zeroed) parameters."""
    import io

    layer = cls(3, 2)
    layer.compile()
    copied = copy.deepcopy(layer)
    assert "_compiled_call_impl" not in vars(copied)
    torch.save(layer, io.BytesIO())
    with torch.no_grad():
        copied.weight.zero_()
        copied.bias.zero_()
    copied._compiled_call_impl = None  # run it eagerly here: compiling is the slow part, not what is tested
    assert torch.equal(copied(torch.ones(1, 3)), torch.zeros(1, 2))


def test_fused_backward_with_only_a_lower_bias_training():
    """Everything frozen but b^1: the fused recursion must go down to layer 1 for it (stopping where no
    weight below trains would leave b^1.grad None). Oracle: the same on nn.Sequential, 1e-12."""
    torch.manual_seed(9)
    model = torchbp.MLP(SIZES, fused=True, dtype=torch.float64)
    reference = sequential_like(model)
    for m in (model, reference):
        for name, p in m.named_parameters():
            p.requires_grad_(name == "0.bias")
    x, y = torch.randn(5, SIZES[0], dtype=torch.float64), torch.rand(5, SIZES[-1], dtype=torch.float64)
    model.cost(x, y).backward()
    oracle_cost(reference(x), y).backward()
    close(model[0].bias.grad, reference[0].bias.grad)


def test_delta_hooks_see_whole_deltas_where_the_fused_backward_runs_in_blocks(monkeypatch):
    """A fused backward over many samples runs on blocks of them; with a delta hook it must run on all at
    once and call the hook with each whole δ^l. Blocks of 4 samples here (the widest layer is 6 wide);
    oracle: torch's autograd on the torch.nn twin, its δ and gradients, 1e-12 in float64."""
    monkeypatch.setattr(F, "_BLOCK_ELEMENTS", 24)
    torch.manual_seed(10)
    fused = torchbp.MLP(SIZES, fused=True, dtype=torch.float64)
    reference = sequential_like(fused)
    seen = {}
    for name, layer in fused.named_children():
        if isinstance(layer, torchbp.Linear):
            layer.register_delta_hook(lambda m, delta, name=name: seen.__setitem__(name, delta.clone()))
    x, y = torch.randn(20, SIZES[0], dtype=torch.float64), torch.rand(20, SIZES[-1], dtype=torch.float64)
    expected = nn_deltas(reference, x, y)
    fused.cost(x, y).backward()
    oracle_cost(reference(x), y).backward()
    assert set(seen) == set(expected)
    for name, delta in expected.items():
        close(seen[name], delta, what=f"δ of layer {name}")
    for p, q in zip(fused.parameters(), reference.parameters()):
        close(p.grad, q.grad)


def test_linear_saves_no_input_when_its_weight_is_frozen():
    """∇_W needs a^{l-1}, ∇_a needs W: with the weight frozen the input is not kept for backward (memory),
    with the input not needing a gradient the weight is not."""
    x = torch.randn(4, 3, requires_grad=True)
    layer = torchbp.Linear(3, 2)
    layer.weight.requires_grad_(False)
    saved_input, saved_weight = layer(x).grad_fn.saved_tensors
    assert saved_input is None and saved_weight is layer.weight
    layer.weight.requires_grad_(True)
    saved_input, saved_weight = layer(x.detach()).grad_fn.saved_tensors
    assert saved_weight is None and torch.equal(saved_input, x)


def test_fused_mlp_under_autocast_takes_a_bfloat16_input_with_float32_parameters():
    """Under CPU bf16 autocast a bf16 input meets float32 parameters, as in nn.Sequential, which casts both:
    the fused MLP's output and F.mlp_cost's cost and output equal nn.Sequential's under the same autocast
    (its output, and the quadratic cost of it with torch ops), to bf16's tolerance (rtol 1.6e-2, atol 1e-5)."""
    torch.manual_seed(12)
    model = torchbp.MLP([3, 4, 2], fused=True)
    reference = sequential_like(model)
    x, y = torch.randn(5, 3, dtype=torch.bfloat16), torch.rand(5, 2)
    weights, biases = [m.weight for m in model.linears], [m.bias for m in model.linears]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(x)
        c_ref = oracle_cost(expected, y)
        out = model(x)
        c, a = F.mlp_cost(x, y, weights, biases)
    bf16 = {"rtol": 1.6e-2, "atol": 1e-5}
    assert out.dtype == a.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, **bf16)
    torch.testing.assert_close(a, expected, **bf16)
    torch.testing.assert_close(c, c_ref, **bf16)


def test_fused_cross_entropy_under_autocast_takes_its_logs_in_float32():
    """Under bf16 autocast the fused and per-layer cross-entropy see the same bf16 activations and both
    take the cost in float32 (as binary_cross_entropy under autocast): equal to 1e-6 (in bf16 the logs
    were 3e-4 off)."""
    torch.manual_seed(11)
    fused = torchbp.MLP([8, 6, 4], fused=True)
    unfused = copy.deepcopy(fused)
    unfused.fused = False
    x, y = torch.randn(16, 8), torch.rand(16, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c, c_ref = fused.cost(x, y, cost="cross_entropy"), unfused.cost(x, y, cost="cross_entropy")
    assert c.dtype == c_ref.dtype == torch.float32
    torch.testing.assert_close(c, c_ref, rtol=1e-6, atol=0)
