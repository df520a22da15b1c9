"""torchbp.functional against independent oracles.

* finite differences: gradcheck / gradgradcheck (float64) of every Function,
  forward AD, batched (vmap) gradients and forward-over-reverse included;
* torch's own ops (F.linear, torch.sigmoid, the cost formulas written with
  torch ops, F.binary_cross_entropy): outputs and every gradient equal;
* needs_input_grad: the backward does no work for inputs that need no gradient;
* every bad input fails at the boundary with a message naming the argument,
  the expected and the actual value.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as TF
from torch.autograd import gradcheck, gradgradcheck
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import torchbp.functional as F
from torchbp import sgd

from oracles import oracle_cost

IN, HIDDEN, OUT = 3, 4, 2  # a two-layer network 3 -> 4 -> 2; small so finite differences stay quick

# Leading (sample) dimensions of the inputs: a batch of one, a batch of seven, 3-D and 4-D inputs.
BATCHES = {"batch1": (1,), "batch7": (7,), "3d": (2, 3), "4d": (2, 1, 2)}

# float64: the hand-written backward must equal torch's up to rounding; float32: up to float32 rounding.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


# --------------------------------------------------------------------------
# The Functions under test, each with its oracle written with torch's own ops.
# --------------------------------------------------------------------------


def _oracle_mlp(x, weights, biases):
    a = x
    for weight, bias in zip(weights, biases):
        a = torch.sigmoid(TF.linear(a, weight, bias))
    return a


def _split(params, bias: bool):
    """(W1, b1, W2, b2) -> ([W1, W2], [b1, b2]); without bias (W1, W2) -> ([W1, W2], None)."""
    if bias:
        return list(params[0::2]), list(params[1::2])
    return list(params), None


def _case(name: str):
    """(torchbp function, torch oracle, kinds of its tensor arguments) for a case name.

    Kinds: "x" input (*, IN); "a"/"y" activation and target (*, OUT) in (0, 1);
    "z" weighted input (*, OUT); "w1" (HIDDEN, IN), "b1" (HIDDEN,), "w2" (OUT, HIDDEN),
    "b2" (OUT,), "w" (OUT, IN), "b" (OUT,).
    """
    if name == "linear":
        return F.linear, TF.linear, ("x", "w", "b")
    if name == "linear_nobias":
        return (lambda x, w: F.linear(x, w)), (lambda x, w: TF.linear(x, w)), ("x", "w")
    if name == "sigmoid":
        return F.sigmoid, torch.sigmoid, ("z",)
    kind, _, reduction = name.rpartition("_")
    if kind in ("quadratic_cost", "cross_entropy_cost"):
        fn = F.quadratic_cost if kind == "quadratic_cost" else F.cross_entropy_cost
        cost = kind.removesuffix("_cost")
        return (lambda a, y: fn(a, y, reduction)), (lambda a, y: oracle_cost(a, y, cost, reduction)), ("a", "y")
    if name in ("mlp", "mlp_nobias"):
        bias = name == "mlp"

        def mlp(x, *params):
            return F.mlp(x, *_split(params, bias))

        def oracle(x, *params):
            weights, biases = _split(params, bias)
            return _oracle_mlp(x, weights, biases or [None] * len(weights))

        return mlp, oracle, ("x", "w1", "b1", "w2", "b2") if bias else ("x", "w1", "w2")
    if name.startswith("mlp_cost_"):
        # mlp_cost_<cost>_<reduction>, or mlp_cost_nobias (quadratic, mean)
        bias = name != "mlp_cost_nobias"
        cost, reduction = ("quadratic", "mean") if not bias else (kind.removeprefix("mlp_cost_"), reduction)

        def mlp_cost(x, y, *params):
            return F.mlp_cost(x, y, *_split(params, bias), cost=cost, reduction=reduction)

        def oracle(x, y, *params):
            weights, biases = _split(params, bias)
            a = _oracle_mlp(x, weights, biases or [None] * len(weights))
            return oracle_cost(a, y, cost, reduction), a

        return mlp_cost, oracle, ("x", "y", "w1", "b1", "w2", "b2") if bias else ("x", "y", "w1", "w2")
    raise AssertionError(name)


def _shape(kind: str, batch: tuple[int, ...]) -> tuple[int, ...]:
    return {
        "x": (*batch, IN), "a": (*batch, OUT), "y": (*batch, OUT), "z": (*batch, OUT),
        "w": (OUT, IN), "b": (OUT,), "w1": (HIDDEN, IN), "b1": (HIDDEN,), "w2": (OUT, HIDDEN), "b2": (OUT,),
    }[kind]


def _inputs(kinds, batch, gen, dtype=torch.float64, device="cpu", noncontiguous=False, requires_grad=True):
    """Random arguments; activations and targets in (0.2, 0.8) so the cross entropy stays finite."""
    tensors = []
    for kind in kinds:
        shape = _shape(kind, batch)
        t = torch.rand(shape, generator=gen, dtype=torch.float64)
        t = 0.2 + 0.6 * t if kind in ("a", "y") else 2 * t - 1
        t = t.to(dtype=dtype, device=device)
        if noncontiguous:
            # The same values at stride 2 in the last dimension: a view, not contiguous.
            wide = torch.zeros((*shape[:-1], 2 * shape[-1]), dtype=dtype, device=device)
            wide[..., ::2] = t
            t = wide[..., ::2]
            assert not t.is_contiguous()
        tensors.append(t.requires_grad_(requires_grad))
    return tensors


# Every Function over every batch layout; the variants (reductions, no bias) over one layout.
MAIN = ["linear", "sigmoid", "quadratic_cost_mean", "cross_entropy_cost_mean", "mlp",
        "mlp_cost_quadratic_mean", "mlp_cost_cross_entropy_mean"]
VARIANTS = ["linear_nobias", "quadratic_cost_sum", "quadratic_cost_none", "cross_entropy_cost_sum",
            "cross_entropy_cost_none", "mlp_nobias", "mlp_cost_quadratic_sum", "mlp_cost_quadratic_none",
            "mlp_cost_cross_entropy_sum", "mlp_cost_cross_entropy_none", "mlp_cost_nobias"]
ALL = MAIN + VARIANTS
GRADCHECK_CASES = (
    [(name, layout) for name in MAIN for layout in [*BATCHES, "noncontiguous"]]
    # reduction "none" keeps the sample dimensions, so it runs on a 3-D input
    + [(name, "3d" if name.endswith("_none") else "batch7") for name in VARIANTS]
)


# --------------------------------------------------------------------------
# Finite differences
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name, layout", GRADCHECK_CASES)
def test_gradcheck_and_gradgradcheck(name, layout):
    """Backward, forward AD, batched gradients and double backward all agree with finite differences (float64)."""
    fn, _, kinds = _case(name)
    batch = BATCHES.get(layout, (5,))
    inputs = _inputs(kinds, batch, torch.Generator().manual_seed(0), noncontiguous=layout == "noncontiguous")
    assert gradcheck(fn, inputs, check_batched_grad=True, check_forward_ad=True, check_batched_forward_grad=True)
    assert gradgradcheck(fn, inputs, check_batched_grad=True, gen_non_contig_grad_outputs=True)
    # Forward-over-reverse (the forward AD of the backward) costs one jvp per element: checked along
    # random directions (fast_mode) to keep the suite quick; still fails on any wrong tangent.
    assert gradgradcheck(
        fn, inputs, check_fwd_over_rev=True, check_rev_over_rev=False, check_undefined_grad=False, fast_mode=True
    )


@pytest.mark.parametrize("name", ["linear", "linear_nobias", "sigmoid"])
def test_complex_gradcheck_and_gradgradcheck(name):
    """Complex input and parameters, as torch's linear and sigmoid take them: backward (torch's conjugate
    convention), forward AD and double backward agree with finite differences (complex128)."""
    fn, _, kinds = _case(name)
    gen = torch.Generator().manual_seed(5)
    inputs = [torch.complex(*_inputs((k, k), (5,), gen, requires_grad=False)).requires_grad_() for k in kinds]
    assert gradcheck(fn, inputs, check_batched_grad=True, check_forward_ad=True, check_batched_forward_grad=True)
    assert gradgradcheck(fn, inputs, check_batched_grad=True)


@pytest.mark.parametrize("autocast", [False, True], ids=["eager", "autocast-bf16"])
def test_complex_linear_under_autocast_is_torchs_and_the_network_functions_refuse_complex(autocast):
    """Autocast casts floating tensors only: a complex linear stays complex64 and equals torch's F.linear (it
    once came out bfloat16, its imaginary part dropped). The network functions, real by the notes, refuse a
    complex weight or bias by name (both under autocast too, where a complex bias once slipped through)."""
    gen = torch.Generator().manual_seed(6)
    x, w, b = (torch.randn(*shape, dtype=torch.complex64, generator=gen) for shape in ((5, 3), (2, 3), (2,)))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected, got = TF.linear(x, w, b), F.linear(x, w, b)
        assert got.dtype == expected.dtype == torch.complex64
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        xr, y = x.real.contiguous(), torch.rand(5, 2)
        with pytest.raises(TypeError, match=re.escape("mlp_cost(): weights[0] must have a floating-point dtype")):
            F.mlp_cost(xr, y, [w], [b.real.contiguous()])
        with pytest.raises(TypeError, match=re.escape("mlp_cost(): biases[0] must have a floating-point dtype")):
            F.mlp_cost(xr, y, [w.real.contiguous()], [b])


@pytest.mark.parametrize("layout", ["batch7", "3d"])
@pytest.mark.parametrize("name", ["mlp", "mlp_nobias", "mlp_cost_quadratic_mean", "mlp_cost_cross_entropy_none"])
def test_backward_in_blocks_of_samples(name, layout, monkeypatch):
    """With no gradient asked of the input, the fused backward runs a block of samples at a time.

    Blocks of 2 samples here (7 or 6 samples: 4 or 3 blocks, the last one short). Oracles: finite
    differences (gradcheck, gradgradcheck, batched gradients included) and torch's own ops (1e-12, float64).
    """
    monkeypatch.setattr(F, "_BLOCK_ELEMENTS", 2 * HIDDEN)  # the widest layer is HIDDEN wide
    blocks = []
    backprop_block = F._backprop_block
    monkeypatch.setattr(F, "_backprop_block", lambda *args: blocks.append(len(args[1][0])) or backprop_block(*args))
    fn, oracle, kinds = _case(name)
    inputs = _inputs(kinds, BATCHES[layout], torch.Generator().manual_seed(3))
    inputs[0].requires_grad_(False)  # x: no ∇_x C, so δ^1 is needed only in sums over samples
    outputs, expected = _outputs(fn(*inputs)), _outputs(oracle(*inputs))
    grad_outputs = _grad_outputs(expected, torch.Generator().manual_seed(4))
    wanted = [t for t in inputs if t.requires_grad]
    grads, expected_grads = (torch.autograd.grad(o, wanted, grad_outputs) for o in (outputs, expected))
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    assert blocks == {"batch7": [2, 2, 2, 1], "3d": [2, 2, 2]}[layout]  # samples per block
    assert gradcheck(fn, inputs, check_batched_grad=True)
    assert gradgradcheck(fn, inputs, check_batched_grad=True)


@pytest.mark.parametrize("name", ["mlp", "mlp_cost_quadratic_mean"])
def test_a_gradient_asked_of_the_input_runs_the_backward_on_the_whole_batch(name, monkeypatch):
    """∇_x C needs every sample's δ^1 at once: with x requiring grad the fused backward takes the whole
    batch in one pass even where blocks would be small. Oracle: torch's own ops (1e-12, float64)."""
    monkeypatch.setattr(F, "_BLOCK_ELEMENTS", 2 * HIDDEN)
    blocks = []
    backprop_block = F._backprop_block
    monkeypatch.setattr(F, "_backprop_block", lambda *args: blocks.append(len(args[1][0])) or backprop_block(*args))
    fn, oracle, kinds = _case(name)
    inputs = _inputs(kinds, BATCHES["batch7"], torch.Generator().manual_seed(5))
    assert inputs[0].requires_grad
    outputs, expected = _outputs(fn(*inputs)), _outputs(oracle(*inputs))
    grad_outputs = _grad_outputs(expected, torch.Generator().manual_seed(6))
    wanted = [t for t in inputs if t.requires_grad]
    for g, e in zip(*(torch.autograd.grad(o, wanted, grad_outputs) for o in (outputs, expected))):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    assert blocks == [7]


def test_a_layer_wider_than_a_block_backpropagates_one_sample_at_a_time(monkeypatch):
    """A layer wider than _BLOCK_ELEMENTS (2**20 elements; made 3 here, the hidden layer 4 wide) with no
    gradient asked of the input: the fused backward takes blocks of one sample, not of none. Oracle: torch's
    own ops (1e-12, float64), and a hand count of the blocks, one per sample."""
    monkeypatch.setattr(F, "_BLOCK_ELEMENTS", HIDDEN - 1)
    blocks = []
    backprop_block = F._backprop_block
    monkeypatch.setattr(F, "_backprop_block", lambda *args: blocks.append(len(args[1][0])) or backprop_block(*args))
    fn, oracle, kinds = _case("mlp_cost_quadratic_mean")
    inputs = _inputs(kinds, BATCHES["batch7"], torch.Generator().manual_seed(7))
    inputs[0].requires_grad_(False)
    wanted = [t for t in inputs if t.requires_grad]
    grads = torch.autograd.grad(fn(*inputs)[0], wanted)
    expected = torch.autograd.grad(oracle(*inputs)[0], wanted)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    assert blocks == [1] * 7


def test_a_network_with_no_features_backpropagates():
    """Zero-width layers (as nn.Linear(0, 0) allows): the fused backward gives empty gradients of the
    parameters' shapes, as torch's ops do, instead of dividing by a zero width."""
    x, y = torch.randn(5, 0, dtype=torch.float64), torch.rand(5, 0, dtype=torch.float64)
    w = torch.zeros(0, 0, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    F.mlp_cost(x, y, [w], [b])[0].backward()
    assert w.grad.shape == (0, 0) and b.grad.shape == (0,)


def test_a_jagged_target_alone_is_refused_by_name():
    """A dense input with a jagged target: the costs name the target (not a shape mismatch)."""
    a = torch.rand(7, 2)
    y = torch.nested.nested_tensor([torch.rand(2, 2), torch.rand(5, 2)], layout=torch.jagged)
    for call, fn in ((lambda: F.quadratic_cost(a, y), "quadratic_cost"),
                     (lambda: F.mlp_cost(torch.randn(7, 3), y, [torch.randn(2, 3)]), "mlp_cost")):
        with pytest.raises(ValueError, match=rf"{fn}\(\): target must be a dense tensor, got a nested one"):
            call()


# --------------------------------------------------------------------------
# torch's own ops as the oracle
# --------------------------------------------------------------------------


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


def _grad_outputs(outputs, gen, noncontiguous=False):
    """A random grad_output per output; non-contiguous ones are transposed views of a contiguous tensor."""
    grads = []
    for out in outputs:
        if noncontiguous and out.dim() >= 2:
            g = torch.randn(out.shape[::-1], generator=gen, dtype=torch.float64).to(out.dtype).permute(
                *reversed(range(out.dim()))
            )
            assert not g.is_contiguous()
        else:
            g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
        grads.append(g.to(out.device))
    return grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("layout", ["batch7", "3d"])
@pytest.mark.parametrize("name", ALL)
def test_matches_torch_ops(name, layout, dtype, device):
    """Output and the gradient of every argument equal torch's ops on the same tensors (tolerance 1e-12 / 1e-5)."""
    fn, oracle, kinds = _case(name)
    gen = torch.Generator().manual_seed(1)
    inputs = _inputs(kinds, BATCHES[layout], gen, dtype=dtype, device=device)
    outputs, expected = _outputs(fn(*inputs)), _outputs(oracle(*inputs))
    tol = TOL[dtype]
    assert len(outputs) == len(expected)
    for out, exp in zip(outputs, expected):
        assert out.dtype == exp.dtype and out.device == exp.device
        torch.testing.assert_close(out, exp, rtol=tol, atol=tol)
    grad_outputs = _grad_outputs(expected, gen)
    grads = torch.autograd.grad(outputs, inputs, grad_outputs)
    expected_grads = torch.autograd.grad(expected, inputs, grad_outputs)
    for kind, g, e in zip(kinds, grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol, msg=lambda m, kind=kind: f"gradient of {kind}: {m}")


@pytest.mark.parametrize(
    "name", ["linear", "sigmoid", "quadratic_cost_none", "cross_entropy_cost_none", "mlp",
             "mlp_cost_quadratic_none", "mlp_cost_cross_entropy_none", "mlp_cost_quadratic_mean"]
)
def test_noncontiguous_grad_output(name):
    """A transposed (non-contiguous) grad_output gives the gradients of its contiguous copy and of torch's ops."""
    fn, oracle, kinds = _case(name)
    gen = torch.Generator().manual_seed(2)
    inputs = _inputs(kinds, (3, 4), gen)
    outputs = _outputs(fn(*inputs))
    g_noncontiguous = _grad_outputs(outputs, gen, noncontiguous=True)
    assert any(not g.is_contiguous() for g in g_noncontiguous)
    g_contiguous = [g.contiguous() for g in g_noncontiguous]
    grads = torch.autograd.grad(outputs, inputs, g_noncontiguous, retain_graph=True)
    grads_contiguous = torch.autograd.grad(outputs, inputs, g_contiguous)
    expected = torch.autograd.grad(_outputs(oracle(*inputs)), inputs, g_contiguous)
    for g, c, e in zip(grads, grads_contiguous, expected):
        torch.testing.assert_close(g, c, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_keywords_are_torchs():
    """F.linear, F.sigmoid and the costs take the keywords of torch.nn.functional's linear, sigmoid and
    losses (input, weight, bias; input, target, reduction), so a call written for torch works unchanged;
    results equal torch's (1e-12, float64)."""
    gen = torch.Generator().manual_seed(9)
    x, w, b = _inputs(("x", "w", "b"), (7,), gen, requires_grad=False)
    torch.testing.assert_close(F.linear(input=x, weight=w, bias=b), TF.linear(input=x, weight=w, bias=b),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(F.sigmoid(input=x), TF.sigmoid(input=x), rtol=1e-12, atol=1e-12)
    # the costs take mse_loss's and binary_cross_entropy's (input, target, reduction): the oracle is those
    # losses summed over features, averaged over samples
    a, y = torch.sigmoid(x), torch.sigmoid(x.flip(0))
    torch.testing.assert_close(F.quadratic_cost(input=a, target=y, reduction="mean"),
                               TF.mse_loss(input=a, target=y, reduction="sum") / 2 / len(a), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(F.cross_entropy_cost(input=a, target=y, reduction="mean"),
                               TF.binary_cross_entropy(input=a, target=y, reduction="sum") / len(a),
                               rtol=1e-12, atol=1e-12)


def test_quadratic_cost_is_not_mse_loss():
    """The notes' cost keeps the ½ and averages over samples only: it differs from F.mse_loss by features / 2."""
    gen = torch.Generator().manual_seed(3)
    a, y = _inputs(("a", "y"), (7,), gen, requires_grad=False)
    torch.testing.assert_close(F.quadratic_cost(a, y), TF.mse_loss(a, y) * OUT / 2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("a_dtype, y_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                              (torch.float32, torch.float16)], ids=["a32-y64", "a64-y32", "a32-y16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_quadratic_cost_promotes_mixed_dtypes_as_mse_loss(a_dtype, y_dtype, reduction):
    """a and y of two floating dtypes: the cost in the wider one, as F.mse_loss computes it (mse_loss times
    features / 2 is the oracle), and each gradient in its own tensor's dtype, as mse_loss's. Tolerance:
    1e-12 for a float64 cost, float32 rounding (1e-6) for a float32 one and for the float32 gradients."""
    gen = torch.Generator().manual_seed(12)
    a = torch.rand(7, OUT, generator=gen, dtype=torch.float64).to(a_dtype).requires_grad_()
    y = torch.rand(7, OUT, generator=gen, dtype=torch.float64).to(y_dtype).requires_grad_()
    c = F.quadratic_cost(a, y, reduction)
    ref = TF.mse_loss(a, y, reduction="none").sum(-1) / 2
    ref = {"mean": ref.mean(), "sum": ref.sum(), "none": ref}[reduction]
    assert c.dtype == ref.dtype == torch.promote_types(a_dtype, y_dtype)
    tol = 1e-12 if c.dtype == torch.float64 else 1e-6
    torch.testing.assert_close(c, ref, rtol=tol, atol=tol)
    grads = torch.autograd.grad(c.sum(), (a, y))
    refs = torch.autograd.grad(ref.sum(), (a, y))
    for g, r, t in zip(grads, refs, (a, y)):
        assert g.dtype == r.dtype == t.dtype
        tol = 1e-12 if c.dtype == g.dtype == torch.float64 else 1e-6
        torch.testing.assert_close(g, r, rtol=tol, atol=tol)


def test_quadratic_cost_of_a_large_float32_batch_keeps_float32_precision():
    """3,000,000 float32 elements (a full-dataset cost, say): quadratic_cost and the fused mlp_cost stay
    within 1e-6 (relative) of the float64 cost, as mse_loss does (~4e-8 here); the one-dot shortcut for
    small batches summed serially and drifted by ~1e-5 at this size."""
    gen = torch.Generator().manual_seed(13)
    a = torch.rand(300_000, 10, generator=gen)
    y = torch.rand(300_000, 10, generator=gen)
    expected = 0.5 * ((a.double() - y.double()) ** 2).sum(-1).mean()
    torch.testing.assert_close(F.quadratic_cost(a, y).double(), expected, rtol=1e-6, atol=0)
    w, b = torch.eye(10), torch.zeros(10)
    x = torch.logit(a.double()).float()  # so that the network's a^L = sigmoid(x) is a again, to rounding
    c, a_L = F.mlp_cost(x, y, [w], [b])
    expected = 0.5 * ((a_L.double() - y.double()) ** 2).sum(-1).mean()
    torch.testing.assert_close(c.double(), expected, rtol=1e-6, atol=0)


def test_cross_entropy_delta_is_a_minus_y():
    """Through a sigmoid output the cross entropy's δ^L = ∇_z C is a − y (per sample, reduction sum): φ' cancels."""
    gen = torch.Generator().manual_seed(4)
    (z,) = _inputs(("z",), (7,), gen)
    (y,) = _inputs(("y",), (7,), gen, requires_grad=False)
    a = F.sigmoid(z)
    (delta,) = torch.autograd.grad(F.cross_entropy_cost(a, y, "sum"), z)
    torch.testing.assert_close(delta, (torch.sigmoid(z) - y).detach(), rtol=1e-12, atol=1e-12)


def test_cross_entropy_where_the_output_saturates_equals_binary_cross_entropy():
    """a at exactly 0 or 1 (a float sigmoid past |z| ≈ 17): cost and ∇_a equal torch's binary_cross_entropy,
    which clamps ln at −100 and a(1 − a) at 1e-12; no inf, no nan. Through a sigmoid the unfused δ = 0 there."""
    a = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.5]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    c = F.cross_entropy_cost(a, y, "none")
    c_ref = TF.binary_cross_entropy(a, y, reduction="none").sum(-1)
    torch.testing.assert_close(c, c_ref, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(c.sum(), a)
    (g_ref,) = torch.autograd.grad(c_ref.sum(), a)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=0)  # 1e-8: torch's 1e-12 is a float32 constant
    z = torch.full((1, 1), 40.0, requires_grad=True)  # float32: sigmoid(40) == 1.0 exactly
    (delta,) = torch.autograd.grad(F.cross_entropy_cost(F.sigmoid(z), torch.ones(1, 1)), z)
    assert delta.item() == 0.0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("fused", [False, True], ids=["cross_entropy_cost", "mlp_cost"])
def test_cross_entropy_target_gradient_where_the_output_saturates_equals_binary_cross_entropy(fused, reduction):
    """∇_y C = ln(1 − a) − ln a where a is exactly 1, 0 (σ(40), σ(−800) in float64) or ½: −∞, +∞ and 0 times
    the reduction's weight, as torch's binary_cross_entropy gives them (its ∇_y takes no clamp); through
    cross_entropy_cost and through the fused mlp_cost (a one-layer network, W = 1). Oracle:
    binary_cross_entropy of torch.sigmoid(z), float64, 1e-12 (infinities equal)."""
    x = torch.tensor([[40.0], [-800.0], [0.0]], dtype=torch.float64)
    weight = torch.ones(1, 1, dtype=torch.float64)
    y = torch.full((3, 1), 0.3, dtype=torch.float64, requires_grad=True)
    if fused:
        c = F.mlp_cost(x, y, [weight], None, "cross_entropy", reduction)[0]
    else:
        c = F.cross_entropy_cost(torch.sigmoid(x), y, reduction)
    (g,) = torch.autograd.grad(c.sum(), y)
    (g_ref,) = torch.autograd.grad(oracle_cost(torch.sigmoid(x), y, "cross_entropy", reduction).sum(), y)
    assert g_ref[0].item() == -math.inf and g_ref[1].item() == math.inf  # the saturated outputs, unclamped
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_cross_entropy_forward_ad_where_an_output_saturates_equals_binary_cross_entropy():
    """torch.func.jvp of the cross-entropy with one output at exactly 1 and no tangent on it or on y: finite and
    equal to binary_cross_entropy's (here (0.5 − 0.3) / (0.5 · 0.5) = 0.8), not ±∞ · 0 = nan; float64."""
    a = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    y = torch.tensor([[0.3, 0.3]], dtype=torch.float64)
    a_t = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    _, c_t = torch.func.jvp(lambda a: F.cross_entropy_cost(a, y, "sum"), (a,), (a_t,))
    _, expected = torch.func.jvp(lambda a: TF.binary_cross_entropy(a, y, reduction="sum"), (a,), (a_t,))
    torch.testing.assert_close(c_t, expected, rtol=1e-12, atol=0)
    assert c_t.item() == pytest.approx(0.8, rel=1e-12)


@pytest.mark.parametrize("z", [2.0, 30.0, 40.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_cross_entropy_forward_ad_agrees_with_its_backward(reduction, z):
    """mlp_cost with the cross-entropy: the jvp along W is the backward's ∇_W C · W_t, Σ_n (a_n − y_n) x_n,
    by hand (a one-layer network, float64), also where a = σ(z) saturates (30: a(1 − a) ≈ 1e-13, below the
    clamp; 40: a = 1 exactly), where going through ∇_a C = (a − y) / a(1 − a) gave 1.96 and 0 for 21 and 28."""
    x = torch.tensor([[z], [0.5]], dtype=torch.float64)
    y = torch.tensor([[0.3], [0.9]], dtype=torch.float64)
    weight = torch.ones(1, 1, dtype=torch.float64)
    _, c_t = torch.func.jvp(lambda w: F.mlp_cost(x, y, [w], None, "cross_entropy", reduction)[0],
                            (weight,), (torch.ones_like(weight),))
    per_sample = ((torch.sigmoid(x) - y) * x).sum(-1)  # ∂C_n/∂W · 1 = (a_n − y_n) x_n
    expected = {"mean": per_sample.mean(), "sum": per_sample.sum(), "none": per_sample}[reduction]
    torch.testing.assert_close(c_t, expected, rtol=1e-12, atol=0)
    w = weight.clone().requires_grad_()
    c = F.mlp_cost(x, y, [w], None, "cross_entropy", reduction)[0]
    (grad,) = torch.autograd.grad(c.sum(), w)
    torch.testing.assert_close(grad.sum(), c_t.sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("fn", [F.quadratic_cost, F.cross_entropy_cost], ids=["quadratic", "cross_entropy"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_costs_of_samples_with_no_features(fn, reduction):
    """(3, 0): every sample's cost is an empty sum, 0, and ∇_a is empty, as with torch's ops."""
    a = torch.rand(3, 0, dtype=torch.float64, requires_grad=True)
    y = torch.rand(3, 0, dtype=torch.float64)
    c = fn(a, y, reduction)
    cost = "quadratic" if fn is F.quadratic_cost else "cross_entropy"
    torch.testing.assert_close(c, oracle_cost(a, y, cost, reduction), rtol=0, atol=0)
    c.backward()
    assert a.grad.shape == (3, 0)


# --------------------------------------------------------------------------
# needs_input_grad: no backward work for what needs no gradient
# --------------------------------------------------------------------------


def _backward_flops(output: torch.Tensor, grad_output: torch.Tensor | None = None) -> int:
    """Matmul FLOPs of one backward pass, counted by torch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        output.backward(grad_output)
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "weight_shape, bias_shape",
    [((IN,), None), ((OUT, IN), ()), ((OUT, IN), (1,))],
    ids=["w1d", "b0d", "b1"],
)
@pytest.mark.parametrize("batch", [(), (7,), (2, 3)], ids=["1d", "batch7", "3d"])
def test_linear_takes_what_torch_broadcasts(weight_shape, bias_shape, batch):
    """The shapes torch.nn.functional.linear accepts beyond (out, in) and (out,): a 1-D weight (no bias)
    and a bias of shape () or (1,). Output and every gradient equal torch's (1e-12, float64); gradcheck."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(*batch, IN, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(weight_shape, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = None if bias_shape is None else torch.randn(bias_shape, dtype=torch.float64, generator=gen,
                                                       requires_grad=True)
    _assert_linear_like_torch(x, weight, bias, gen)


@pytest.mark.parametrize(
    "batch, bias_shape",
    [((7,), (7, OUT)), ((7,), (7, 1)), ((7,), (1, OUT)), ((2, 3), (3, OUT)), ((2, 3), (2, 1, OUT)),
     ((), (1, OUT))],
    ids=["per-sample", "per-sample-scalar", "row", "3d-per-position", "3d-per-batch", "1d-row"],
)
def test_linear_takes_a_bias_torch_broadcasts_over_samples(batch, bias_shape):
    """A bias of 2 or more dims that broadcasts to the output (*, out), or to (1, out) for a 1-D input (a
    batch of one to torch, whose output stays 1-D), as torch.nn.functional.linear takes it: output and every
    gradient equal torch's (1e-12, float64); gradcheck; the delta hook still sees δ = ∇_z C, the gradient
    of the output."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(*batch, IN, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(OUT, IN, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(bias_shape, dtype=torch.float64, generator=gen, requires_grad=True)
    _assert_linear_like_torch(x, weight, bias, gen)
    deltas = []
    z = F.linear(x, weight, bias, delta_hook=deltas.append)
    g = torch.randn(z.shape, dtype=torch.float64, generator=gen)
    z.backward(g)
    assert len(deltas) == 1 and torch.equal(deltas[0], g)


def _assert_linear_like_torch(x, weight, bias, gen):
    inputs = [t for t in (x, weight, bias) if t is not None]
    z = F.linear(x, weight, bias)
    expected = TF.linear(x, weight, bias)
    assert z.shape == expected.shape
    torch.testing.assert_close(z, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn(z.shape, dtype=torch.float64, generator=gen)
    for got, want in zip(torch.autograd.grad(z, inputs, g), torch.autograd.grad(expected, inputs, g)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert gradcheck(lambda *t: F.linear(*t), inputs)


@pytest.mark.parametrize("needs", [(True, True, True), (False, True, True), (True, False, False), (False, True, False)])
def test_linear_backward_skips_unneeded_gradients(needs):
    """Each of ∇_a = δW (2·N·out·in FLOPs) and ∇_W = δ^T a (the same) is computed only when asked for."""
    n = 5
    gen = torch.Generator().manual_seed(5)
    x, weight, bias = _inputs(("x", "w", "b"), (n,), gen)
    for t, need in zip((x, weight, bias), needs):
        t.requires_grad_(need)
    z = F.linear(x, weight, bias)
    expected = 2 * n * OUT * IN * (needs[0] + needs[1])
    assert _backward_flops(z, torch.ones_like(z)) == expected
    for t, need in zip((x, weight, bias), needs):
        assert (t.grad is not None) == need


@pytest.mark.parametrize("fused_cost", [False, True], ids=["mlp", "mlp_cost"])
def test_mlp_backward_stops_where_no_gradient_is_needed(fused_cost):
    """Input and first layer frozen: only ∇_{W^2} is computed, the recursion stops before layer 1."""
    n = 5
    gen = torch.Generator().manual_seed(6)
    x, y, w1, b1, w2, b2 = _inputs(("x", "y", "w1", "b1", "w2", "b2"), (n,), gen)
    for t in (x, y, w1, b1):
        t.requires_grad_(False)
    if fused_cost:
        c, _ = F.mlp_cost(x, y, [w1, w2], [b1, b2])
    else:
        c = F.mlp(x, [w1, w2], [b1, b2]).sum()
    # ∇_{W^2} C = δ^2 (a^1)^T: (OUT, N) @ (N, HIDDEN), 2·N·OUT·HIDDEN FLOPs and nothing else.
    assert _backward_flops(c) == 2 * n * OUT * HIDDEN
    assert w1.grad is None and b1.grad is None and x.grad is None
    assert w2.grad is not None and b2.grad is not None
    # Unfrozen, the same backward also runs (W^2)^T δ^2, ∇_{W^1} and ∇_x: the count above can fail.
    x.requires_grad_(True)
    w1.requires_grad_(True)
    c = F.mlp_cost(x, y, [w1, w2], [b1, b2])[0] if fused_cost else F.mlp(x, [w1, w2], [b1, b2]).sum()
    assert _backward_flops(c) == 2 * n * (OUT * HIDDEN + OUT * HIDDEN + HIDDEN * IN + HIDDEN * IN)


class _OpLog(TorchDispatchMode):
    """Records the name of every aten op that runs."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("target_needs_grad", [False, True])
def test_cross_entropy_backward_computes_target_gradient_only_when_needed(target_needs_grad):
    """∇_y C = ln(1 − a) − ln a costs two logarithms; they run in backward only if y requires grad."""
    gen = torch.Generator().manual_seed(7)
    a, y = _inputs(("a", "y"), (7,), gen)
    y.requires_grad_(target_needs_grad)
    c = F.cross_entropy_cost(a, y)
    with _OpLog() as log:
        c.backward()
    assert ("log" in log.ops) == target_needs_grad
    assert (y.grad is not None) == target_needs_grad
    assert a.grad is not None


# --------------------------------------------------------------------------
# Bad input: fail fast, naming the argument, the expected and the actual value
# --------------------------------------------------------------------------


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(shape, dtype=dtype, device=device)


w32, b32 = _t(2, 3), _t(2)  # a layer 3 -> 2
ws, bs = [_t(4, 3), _t(2, 4)], [_t(4), _t(2)]  # a network 3 -> 4 -> 2

BAD_INPUTS = {
    # linear: shapes
    "linear input features": (lambda: F.linear(_t(5, 4), w32, b32), F.TensorValueError,
                              "linear(): input must have last dimension 3 (weight's in_features), got shape (5, 4)"),
    "linear scalar input": (lambda: F.linear(_t(), w32), F.TensorValueError,
                            "linear(): input must have at least 1 dimension(s), got shape ()"),
    "linear weight 3-D": (lambda: F.linear(_t(5, 3), _t(2, 3, 1)), F.TensorValueError,
                          "linear(): weight must be 1-D (in_features,) or 2-D (out_features, in_features), "
                          "got shape (2, 3, 1)"),
    "linear weight 1-D features": (
        lambda: F.linear(_t(5, 3), _t(4)), F.TensorValueError,
        "linear(): input must have last dimension 4 (weight's in_features), got shape (5, 3)",
    ),
    "linear weight 1-D bias": (lambda: F.linear(_t(5, 3), _t(3), _t(1)), F.TensorValueError,
                               "linear(): bias must be None for a 1-D weight, got shape (1,)"),
    "linear bias length": (lambda: F.linear(_t(5, 3), w32, _t(3)), F.TensorValueError,
                           "linear(): bias must have shape (2,) (weight's out_features), (1,) or (), got (3,)"),
    "linear bias not broadcast": (lambda: F.linear(_t(5, 3), w32, _t(3, 2)), F.TensorValueError,
                                  "linear(): bias must broadcast to the output's shape (5, 2), got (3, 2)"),
    "linear bias adds dims": (lambda: F.linear(_t(5, 3), w32, _t(2, 5, 2)), F.TensorValueError,
                              "linear(): bias must broadcast to the output's shape (5, 2), got (2, 5, 2)"),
    "linear 1-D input, bias of 2 rows": (lambda: F.linear(_t(3), w32, _t(2, 2)), F.TensorValueError,
                                        "linear(): bias must broadcast to a 1-D input's output as a batch of one, "
                                        "(1, 2), got (2, 2)"),
    # linear: types and dtypes
    "linear input not a tensor": (lambda: F.linear([[0.0, 0.0, 0.0]], w32), TypeError,
                                  "linear(): input must be a torch.Tensor, got list"),
    "linear integer input": (lambda: F.linear(_t(5, 3, dtype=torch.int64), w32), F.TensorTypeError,
                             "linear(): input must have a floating-point or complex dtype, got torch.int64"),
    "linear boolean weight": (lambda: F.linear(_t(5, 3), _t(2, 3, dtype=torch.bool)), F.TensorTypeError,
                              "linear(): weight must have a floating-point or complex dtype, got torch.bool"),
    "linear integer bias": (lambda: F.linear(_t(5, 3), w32, _t(2, dtype=torch.int32)), F.TensorTypeError,
                            "linear(): bias must have a floating-point or complex dtype, got torch.int32"),
    "linear weight dtype": (lambda: F.linear(_t(5, 3), _t(2, 3, dtype=torch.float64)), F.TensorTypeError,
                            "linear(): weight must have the same dtype as input (torch.float32), got torch.float64"),
    "linear bias dtype": (lambda: F.linear(_t(5, 3), w32, _t(2, dtype=torch.float16)), F.TensorTypeError,
                          "linear(): bias must have the same dtype as input (torch.float32), got torch.float16"),
    # sigmoid
    "linear complex input, real weight": (lambda: F.linear(_t(5, 3, dtype=torch.complex64), w32), F.TensorTypeError,
                                          "linear(): weight must have the same dtype as input (torch.complex64), "
                                          "got torch.float32"),
    "sigmoid not a tensor": (lambda: F.sigmoid(0.5), TypeError, "sigmoid(): input must be a torch.Tensor, got float"),
    # costs
    "quadratic shapes": (lambda: F.quadratic_cost(_t(4, 3), _t(4, 2)), F.TensorValueError,
                         "quadratic_cost(): target must have the shape of input (4, 3), got (4, 2)"),
    "cross entropy shapes": (lambda: F.cross_entropy_cost(_t(4, 3), _t(3)), F.TensorValueError,
                             "cross_entropy_cost(): target must have the shape of input (4, 3), got (3,)"),
    "quadratic scalar": (lambda: F.quadratic_cost(_t(), _t()), F.TensorValueError,
                         "quadratic_cost(): input must have at least 1 dimension(s), got shape ()"),
    "quadratic reduction": (lambda: F.quadratic_cost(_t(4, 3), _t(4, 3), "avg"), ValueError,
                            "quadratic_cost(): reduction must be one of ('mean', 'sum', 'none'), got 'avg'"),
    "cross entropy reduction": (lambda: F.cross_entropy_cost(_t(4, 3), _t(4, 3), "batchmean"), ValueError,
                                "cross_entropy_cost(): reduction must be one of ('mean', 'sum', 'none'), "
                                "got 'batchmean'"),
    # (the quadratic cost takes an integer target as mse_loss does; binary_cross_entropy refuses one)
    "cross entropy integer target": (lambda: F.cross_entropy_cost(_t(4, 3), _t(4, 3, dtype=torch.int64)),
                                     F.TensorTypeError,
                                     "cross_entropy_cost(): target must have a floating-point dtype, got torch.int64"),
    "quadratic integer input": (lambda: F.quadratic_cost(_t(4, 3, dtype=torch.int64), _t(4, 3)), F.TensorTypeError,
                                "quadratic_cost(): input must have a floating-point dtype, got torch.int64"),
    "cross entropy boolean a": (lambda: F.cross_entropy_cost(_t(4, 3, dtype=torch.bool), _t(4, 3)), F.TensorTypeError,
                                "cross_entropy_cost(): input must have a floating-point dtype, got torch.bool"),
    "cross entropy a above 1": (lambda: F.cross_entropy_cost(torch.full((4, 3), 1.5), _t(4, 3)), RuntimeError,
                                "cross_entropy_cost(): every element of input must lie in [0, 1] (a sigmoid's output), "
                                "got one outside"),
    "cross entropy a below 0": (lambda: F.cross_entropy_cost(torch.full((4, 3), -0.5), _t(4, 3)), RuntimeError,
                                "cross_entropy_cost(): every element of input must lie in [0, 1]"),
    "cross entropy a nan": (lambda: F.cross_entropy_cost(torch.full((4, 3), math.nan), _t(4, 3)), RuntimeError,
                            "cross_entropy_cost(): every element of input must lie in [0, 1]"),
    # a target outside [0, 1] (class labels, 0..255 pixels) is refused as binary_cross_entropy refuses it
    "cross entropy y above 1": (lambda: F.cross_entropy_cost(_t(4, 3), torch.full((4, 3), 255.0)), RuntimeError,
                                "cross_entropy_cost(): every element of target must lie in [0, 1] (a probability), "
                                "got one outside"),
    "mlp_cost cross entropy target": (
        lambda: F.mlp_cost(_t(5, 3), torch.full((5, 2), 2.0), ws, bs, cost="cross_entropy"), RuntimeError,
        "mlp_cost(): every element of target must lie in [0, 1] (a probability), got one outside"),
    "mlp_sgd_step cross entropy target": (
        lambda: sgd.mlp_sgd_step(_t(5, 3), torch.full((5, 2), -1.0), ws, bs, 0.5,
                               cost="cross_entropy"), RuntimeError,
        "mlp_sgd_step(): every element of target must lie in [0, 1] (a probability), got one outside"),
    # as binary_cross_entropy (mse_loss, the quadratic cost's twin, promotes instead)
    "cross entropy dtypes": (lambda: F.cross_entropy_cost(_t(4, 3), _t(4, 3, dtype=torch.float64)), F.TensorTypeError,
                             "cross_entropy_cost(): target must have the same dtype as input (torch.float32), got torch.float64"),
    # mlp
    "mlp no layers": (lambda: F.mlp(_t(5, 3), []), ValueError,
                      "mlp(): weights must hold at least one layer's weight, got none"),
    "mlp biases count": (lambda: F.mlp(_t(5, 3), ws, bs[:1]), ValueError,
                         "mlp(): biases must have one entry per weight (2), got 1"),
    "mlp input features": (lambda: F.mlp(_t(5, 4), ws, bs), F.TensorValueError,
                           "mlp(): input must have last dimension 3 (weights[0]'s in_features), got shape (5, 4)"),
    "mlp layer widths": (lambda: F.mlp(_t(5, 3), [_t(4, 3), _t(2, 5)]), F.TensorValueError,
                         "mlp(): weights[1] must have 4 columns (out_features of weights[0]), got shape (2, 5)"),
    "mlp weight 1-D": (lambda: F.mlp(_t(5, 3), [_t(4, 3), _t(4)]), F.TensorValueError,
                       "mlp(): weights[1] must be 2-D (out_features, in_features), got shape (4,)"),
    "mlp bias length": (lambda: F.mlp(_t(5, 3), ws, [_t(4), _t(4)]), F.TensorValueError,
                        "mlp(): biases[1] must have shape (2,) (weights[1]'s out_features), got (4,)"),
    # the first layer's bias too: a bias of shape (1,) or () is linear()'s broadcast, not the network's
    "mlp first bias (1,)": (lambda: F.mlp(_t(5, 3), ws, [_t(1), bs[1]]), F.TensorValueError,
                            "mlp(): biases[0] must have shape (4,) (weights[0]'s out_features), got (1,)"),
    "mlp_cost first bias ()": (lambda: F.mlp_cost(_t(5, 3), _t(5, 2), ws, [_t(), bs[1]]), F.TensorValueError,
                               "mlp_cost(): biases[0] must have shape (4,) (weights[0]'s out_features), got ()"),
    "mlp_sgd_step first bias (1,)": (
        lambda: sgd.mlp_sgd_step(_t(5, 3), _t(5, 2), ws, [_t(1).requires_grad_(), bs[1]], 0.1), F.TensorValueError,
        "mlp_sgd_step(): biases[0] must have shape (4,) (weights[0]'s out_features), got (1,)"),
    "mlp weights a generator": (lambda: F.mlp(_t(5, 3), (w for w in ws), bs), TypeError,
                                "mlp(): weights must be a list or tuple with one tensor per layer, got generator"),
    "mlp weights one tensor": (lambda: F.mlp(_t(5, 3), ws[0], None), TypeError,
                               "mlp(): weights must be a list or tuple with one tensor per layer, got Tensor"),
    # a delta hook is called only in backward: a bad one is refused where it is given
    "linear hook not callable": (lambda: F.linear(_t(5, 3), w32, b32, delta_hook=3), TypeError,
                                 "linear(): delta_hook must be a function called as delta_hook(delta), got int"),
    "mlp hook not callable": (lambda: F.mlp(_t(5, 3), ws, bs, delta_hook="print"), TypeError,
                              "mlp(): delta_hook must be a function called as delta_hook(l, delta), got str"),
    "mlp_cost hook not callable": (lambda: F.mlp_cost(_t(5, 3), _t(5, 2), ws, bs, delta_hook=[]), TypeError,
                                   "mlp_cost(): delta_hook must be a function called as delta_hook(l, delta), got list"),
    "mlp_sgd_epoch hook not callable": (
        lambda: sgd.mlp_sgd_epoch(_t(5, 3), _t(5, 2), [w.requires_grad_() for w in ws], bs, 0.1, 2, delta_hook=1),
        TypeError, "mlp_sgd_epoch(): delta_hook must be a function called as delta_hook(l, delta), got int"),
    # (a dict would give its keys, a set its tensors in no set order)
    "mlp weights a dict": (lambda: F.mlp(_t(5, 3), dict(enumerate(ws)), bs), TypeError,
                           "mlp(): weights must be a list or tuple with one tensor per layer, got dict"),
    "mlp_cost biases a set": (lambda: F.mlp_cost(_t(5, 3), _t(5, 2), ws, set(bs)), TypeError,
                              "mlp_cost(): biases must be a list or tuple with one tensor per layer, got set"),
    "mlp_cost biases a generator": (lambda: F.mlp_cost(_t(5, 3), _t(5, 2), ws, (b for b in bs)), TypeError,
                                    "mlp_cost(): biases must be a list or tuple with one tensor per layer, got generator"),
    "mlp integer input": (lambda: F.mlp(_t(5, 3, dtype=torch.int64), ws, bs), F.TensorTypeError,
                          "mlp(): input must have a floating-point dtype, got torch.int64"),
    "mlp weight dtype": (lambda: F.mlp(_t(5, 3), [ws[0], _t(2, 4, dtype=torch.float64)], bs), F.TensorTypeError,
                         "mlp(): weights[1] must have the same dtype as input (torch.float32), got torch.float64"),
    "mlp bias dtype": (lambda: F.mlp(_t(5, 3), ws, [_t(4, dtype=torch.float64), bs[1]]), F.TensorTypeError,
                       "mlp(): biases[0] must have the same dtype as input (torch.float32), got torch.float64"),
    # mlp_cost
    "mlp_cost cost": (lambda: F.mlp_cost(_t(5, 3), _t(5, 2), ws, bs, cost="hinge"), ValueError,
                      "mlp_cost(): cost must be one of ('quadratic', 'cross_entropy'), got 'hinge'"),
    "mlp_cost reduction": (lambda: F.mlp_cost(_t(5, 3), _t(5, 2), ws, bs, reduction="avg"), ValueError,
                           "mlp_cost(): reduction must be one of ('mean', 'sum', 'none'), got 'avg'"),
    "mlp_cost target None": (lambda: F.mlp_cost(_t(5, 3), None, ws, bs), TypeError,
                             "mlp_cost(): target must be a torch.Tensor, got NoneType"),
    "mlp_sgd_step cross entropy target None": (
        lambda: sgd.mlp_sgd_step(_t(5, 3), None, [_t(4, 3).requires_grad_(), _t(2, 4)], bs, 0.1, "cross_entropy"),
        TypeError, "mlp_sgd_step(): target must be a torch.Tensor, got NoneType"),
    "mlp_cost target shape": (lambda: F.mlp_cost(_t(5, 3), _t(5, 3), ws, bs), F.TensorValueError,
                              "mlp_cost(): target must have shape (5, 2) (the output's), got (5, 3)"),
    "mlp_cost cross entropy integer target": (
        lambda: F.mlp_cost(_t(5, 3), _t(5, 2, dtype=torch.int64), ws, bs, cost="cross_entropy"), F.TensorTypeError,
        "mlp_cost(): target must have a floating-point dtype, got torch.int64"),
    "mlp_cost cross entropy target dtype": (
        lambda: F.mlp_cost(_t(5, 3), _t(5, 2, dtype=torch.float64), ws, bs, cost="cross_entropy"), F.TensorTypeError,
        "mlp_cost(): target must have the same dtype as input (torch.float32), got torch.float64"),
    "mlp_cost input features": (lambda: F.mlp_cost(_t(5, 4), _t(5, 2), ws, bs), F.TensorValueError,
                                "mlp_cost(): input must have last dimension 3 (weights[0]'s in_features), "
                                "got shape (5, 4)"),
    # devices: "meta" against "cpu" needs no GPU; the message names both devices
    "linear weight device": (lambda: F.linear(_t(5, 3), _t(2, 3, device="meta")), F.TensorValueError,
                             "linear(): weight must be on the same device as input (cpu), got meta"),
    "linear bias device": (lambda: F.linear(_t(5, 3), w32, _t(2, device="meta")), F.TensorValueError,
                           "linear(): bias must be on the same device as input (cpu), got meta"),
    "linear input device": (lambda: F.linear(_t(5, 3, device="meta"), w32), F.TensorValueError,
                            "linear(): weight must be on the same device as input (meta), got cpu"),
    "quadratic device": (lambda: F.quadratic_cost(_t(4, 3), _t(4, 3, device="meta")), F.TensorValueError,
                         "quadratic_cost(): target must be on the same device as input (cpu), got meta"),
    "cross entropy device": (lambda: F.cross_entropy_cost(_t(4, 3, device="meta"), _t(4, 3)), F.TensorValueError,
                             "cross_entropy_cost(): target must be on the same device as input (meta), got cpu"),
    "mlp weight device": (lambda: F.mlp(_t(5, 3), [ws[0], _t(2, 4, device="meta")], bs), F.TensorValueError,
                          "mlp(): weights[1] must be on the same device as input (cpu), got meta"),
    "mlp_cost target device": (lambda: F.mlp_cost(_t(5, 3), _t(5, 2, device="meta"), ws, bs), F.TensorValueError,
                               "mlp_cost(): target must be on the same device as input (cpu), got meta"),
    # nested tensors, and the epoch by hand's samples dimension
    "linear strided nested input": (lambda: F.linear(torch.nested.nested_tensor([_t(2, 3), _t(4, 3)]), w32),
                                    F.TensorTypeError, "linear(): a nested input must have layout=torch.jagged, "
                                                       "got torch.strided"),
    # (strided nested tensors have no shape: read, it raised torch's "Internal error: ... doesn't support sizes")
    "quadratic strided nested input": (lambda: F.quadratic_cost(torch.nested.nested_tensor([_t(2, 3), _t(4, 3)]),
                                                                _t(6, 3)),
                                       F.TensorTypeError, "quadratic_cost(): a nested input must have "
                                                          "layout=torch.jagged, got torch.strided"),
    "cross entropy strided nested target": (lambda: F.cross_entropy_cost(
        _t(2, 3).sigmoid(), torch.nested.nested_tensor([_t(3).sigmoid(), _t(3).sigmoid()])), F.TensorTypeError,
        "cross_entropy_cost(): a nested target must have layout=torch.jagged, got torch.strided"),
    "mlp strided nested weight": (lambda: F.mlp(_t(5, 3), [torch.nested.nested_tensor([_t(2, 3), _t(2, 3)])]),
                                  F.TensorTypeError, "mlp(): a nested weights[0] must have layout=torch.jagged, "
                                                     "got torch.strided"),
    "mlp strided nested bias": (lambda: F.mlp(_t(5, 3), [_t(2, 3)], [torch.nested.nested_tensor([_t(1), _t(1)])]),
                                F.TensorTypeError, "mlp(): a nested biases[0] must have layout=torch.jagged, "
                                                   "got torch.strided"),
    "quadratic jagged": (lambda: F.quadratic_cost(*[torch.nested.as_nested_tensor([_t(2, 3), _t(4, 3)],
                                                                                   layout=torch.jagged)] * 2),
                         F.TensorValueError, "quadratic_cost(): input must be a dense tensor, got a nested one"),
    "mlp_sgd_epoch 1-D input": (
        lambda: sgd.mlp_sgd_epoch(_t(3), _t(2), [_t(4, 3).requires_grad_(), _t(2, 4)], bs, 0.1, 1),
        F.TensorValueError, "mlp_sgd_epoch(): input must have a leading samples dimension, (N, *, in_features), "
                            "got shape (3,)"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_bad_input_is_rejected_with_a_message(name):
    """Each bad argument raises the stated error whose message names the argument, expected and actual value;
    a bad tensor's error is a TensorValueError or TensorTypeError, RuntimeErrors too, as torch's ops raise."""
    call, error, message = BAD_INPUTS[name]
    with pytest.raises(error, match=re.escape(message)):
        call()


def test_valid_input_takes_the_one_cheap_check(monkeypatch):
    """Valid arguments pass through one cheap pass (_network_ok) and never reach the checks one by one, which
    cost microseconds on every call; the full checks run only to name what is wrong."""
    def full_check(*args, **kwargs):
        raise AssertionError("the full checks ran on valid input")

    monkeypatch.setattr(F, "_check_network_in_full", full_check)
    monkeypatch.setattr(F, "_check_tensor", full_check)
    x, ws, bs = torch.randn(5, 3), [torch.randn(4, 3), torch.randn(2, 4)], [torch.randn(4), torch.randn(2)]
    F.linear(x, ws[0], bs[0])
    F.mlp(x, ws, bs)
    F.mlp_cost(x, torch.rand(5, 2), ws, bs)


@pytest.mark.parametrize("shape", [(1, 3), (2, 1, 3), (3,)], ids=str)
def test_linear_with_a_1d_weight_drops_only_the_feature_dimension(shape):
    """A 1-D weight (one output feature): the output drops the last dimension only, as torch's does,
    even where other dimensions are 1. Values against torch.nn.functional.linear, 1e-12 in float64.
    The delta hook is called once in backward with δ = ∇_z C of the (*, 1) output: the gradient
    backpropagated, unsqueezed (exactly)."""
    torch.manual_seed(3)
    x, w = torch.randn(*shape, dtype=torch.float64), torch.randn(3, dtype=torch.float64, requires_grad=True)
    deltas = []
    out, expected = F.linear(x, w, delta_hook=deltas.append), TF.linear(x, w)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn(out.shape, dtype=torch.float64)
    out.backward(g)
    assert len(deltas) == 1 and torch.equal(deltas[0], g.unsqueeze(-1))


@pytest.mark.parametrize("bias_shape", [(4, 2), (4, 1)])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float32, torch.float64),
                                    (torch.float32, torch.complex64), (torch.complex64, torch.float32),
                                    (torch.float64, torch.float32)], ids=str)
def test_linear_under_autocast_with_a_broadcast_bias_takes_or_refuses_as_torch(dtypes, bias_shape):
    """Under CPU bfloat16 autocast a bias broadcast over the samples is cast like the rest where autocast casts
    it, and the output's dtype is torch's; a bias autocast leaves alone (float64, complex) of another dtype than
    the output is refused where torch's addmm refuses it (the sum once promoted silently). Oracle: F.linear;
    a bfloat16 output to one bfloat16 ulp of the largest |z| or output (2^-7 of it): torchbp rounds z = a W^T
    to bfloat16 before it adds the broadcast bias, where torch's addmm rounds once."""
    torch.manual_seed(17)
    input_dtype, bias_dtype = dtypes
    x, w = torch.randn(4, 3, dtype=input_dtype), torch.randn(2, 3, dtype=input_dtype)
    b = torch.randn(bias_shape, dtype=bias_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        try:
            expected = TF.linear(x, w, b)
        except RuntimeError:
            with pytest.raises(RuntimeError):
                F.linear(x, w, b)
        else:
            got = F.linear(x, w, b)
            assert got.dtype == expected.dtype
            largest = max(expected.abs().max().item(), (x.float() @ w.float().T).abs().max().item())
            double_rounding = 2**-7 * largest if expected.dtype == torch.bfloat16 else None
            torch.testing.assert_close(got, expected, **({} if double_rounding is None else
                                                         dict(rtol=0, atol=double_rounding)))


def test_mlp_cost_under_autocast_takes_a_target_of_another_dtype():
    """Under autocast the cost runs in float32 whatever the target's dtype (torch's losses take a bf16
    target with float32 inputs); oracle: torch's own ops, the activations under autocast (bf16) and the cost
    in float32 as autocast runs mse_loss, 1e-6."""
    torch.manual_seed(4)
    x, y = torch.randn(5, 3), torch.rand(5, 2)
    w, b = [torch.randn(4, 3), torch.randn(2, 4)], [torch.randn(4), torch.randn(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = F.mlp_cost(x, y.bfloat16(), w, b)[0]
        a = torch.sigmoid(TF.linear(torch.sigmoid(TF.linear(x, w[0], b[0])), w[1], b[1]))
    assert a.dtype == torch.bfloat16
    expected = oracle_cost(a.float(), y.bfloat16().float())
    assert c.dtype == torch.float32
    torch.testing.assert_close(c, expected, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------
# Rounding in half precision and in long sums, against a float64 truth
# --------------------------------------------------------------------------


def _relative_error(got: torch.Tensor, truth: torch.Tensor) -> float:
    return ((got.double() - truth).norm() / truth.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_blocked_fused_backward_in_half_precision_rounds_as_one_matmul(monkeypatch, dtype):
    """The fused backward's sums over blocks of samples are kept in float32 and rounded once, as one matmul
    over all the samples rounds: its gradients are as close to the float64 truth as torch's own autograd
    in the same dtype (within 1.5 times; rounded block by block, 200 blocks here, they were 5-50 times
    further)."""
    monkeypatch.setattr(F, "_BLOCK_ELEMENTS", 20 * 20)  # the widest layer is 20 wide: blocks of 20 samples
    gen = torch.Generator().manual_seed(15)
    sizes = [20, 8, 4]
    weights = [torch.randn(o, i, generator=gen) / i**0.5 for i, o in zip(sizes, sizes[1:])]
    biases = [torch.randn(o, generator=gen) for o in sizes[1:]]
    x, y = torch.rand(4000, 20, generator=gen), torch.rand(4000, 4, generator=gen)

    def gradients(fn, dtype):
        params = [p.to(dtype).requires_grad_() for p in (*weights, *biases)]
        fn(x.to(dtype), y.to(dtype), params[:2], params[2:]).backward()
        return [p.grad for p in params]

    fused = lambda x, y, w, b: F.mlp_cost(x, y, w, b, reduction="sum")[0]  # noqa: E731
    # the oracle: torch's own ops and autograd, in float64 for the truth, in `dtype` for torch's own rounding
    per_layer = lambda x, y, w, b: 0.5 * ((  # noqa: E731
        torch.sigmoid(TF.linear(torch.sigmoid(TF.linear(x, w[0], b[0])), w[1], b[1])) - y) ** 2).sum()
    truth = gradients(per_layer, torch.float64)
    for got, reference, exact in zip(gradients(fused, dtype), gradients(per_layer, dtype), truth):
        assert got.dtype == dtype
        assert _relative_error(got, exact) <= 1.5 * _relative_error(reference, exact)


def test_half_precision_cross_entropy_gradient_is_finite_as_torchs():
    """∇_a C = (a − y) / (a(1 − a)) overflowed float16 below a ≈ 1.5e-5 (and its 1e-12 guard is 0 there):
    computed in float32, as torch's kernels compute half types, it is finite and equals
    binary_cross_entropy's gradient to float16 rounding (rtol 2e-3)."""
    a = torch.sigmoid(torch.full((1024, 2), -13.0)).half().requires_grad_()  # a ≈ 2.3e-6: 1/a ≈ 4.4e5 > 65504
    y = torch.ones(1024, 2, dtype=torch.float16)
    F.cross_entropy_cost(a, y).backward()
    a_ref = a.detach().clone().requires_grad_()
    TF.binary_cross_entropy(a_ref, y, reduction="none").sum(-1).mean().backward()
    assert a.grad.dtype == torch.float16 and torch.isfinite(a.grad).all()
    torch.testing.assert_close(a.grad, a_ref.grad, rtol=2e-3, atol=0)


@pytest.mark.parametrize("elements", [16_384, 65_430])
def test_float32_quadratic_cost_of_a_large_batch_is_as_close_as_torchs(elements):
    """Over 4,096 elements the one-dot cost drifted from the float64 truth 3 times further than torch's
    pairwise sums (median over 20 draws); torch's reductions take over there. Oracle: the cost in float64;
    torchbp's median relative error at most 1.5 times that of 0.5 * ((a - y) ** 2).sum(-1).mean()."""
    ours, torchs = [], []
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        a, y = torch.rand(elements // 10, 10, generator=gen), torch.rand(elements // 10, 10, generator=gen)
        truth = oracle_cost(a.double(), y.double())
        ours.append(_relative_error(F.quadratic_cost(a, y), truth))
        torchs.append(_relative_error(oracle_cost(a, y), truth))
    ours.sort()
    torchs.sort()
    assert ours[10] <= 1.5 * torchs[10]
