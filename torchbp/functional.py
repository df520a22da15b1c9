"""The notes' backpropagation as custom ``torch.autograd.Function`` subclasses.

Notation follows ``docs/notes.md``: layer ``l`` takes the activation ``a^{l-1}``,
forms the weighted input ``z^l = W^l a^{l-1} + b^l`` and outputs
``a^l = φ(z^l)``. The gradient of the cost with respect to ``z^l`` is
``δ^l``. Every backward below is one of the notes' formulas:

    δ^L       = ∇_a C ∘ φ'(z^L)                 (output layer)
    δ^{l-1}   = φ'(z^{l-1}) ∘ (W^l)^T δ^l         (the recursion)
    ∇_{W^l} C = δ^l (a^{l-1})^T
    ∇_{b^l} C = δ^l
    φ'(z)     = φ(z) (1 − φ(z))
    ∇_a C     = a − y                            (quadratic cost)

Batches are rows, as in ``torch.nn.functional.linear``: a batch of
activations is ``(*, features)``, so the notes' column-vector ``W a`` is
``a @ W.T`` here and ``(W^l)^T δ^l`` is ``δ @ W``.

Each Function is written in the ``forward`` + ``setup_context`` style with
``generate_vmap_rule = True`` (so ``torch.func.vmap`` works) and a ``jvp``
(so forward-mode AD works). Dynamo refuses to trace a Function that defines
``jvp``, so every public Function subclasses a ``_...`` twin without it, and
the wrapper function picks the twin while ``torch.compile`` traces: forward
AD in eager mode, ``fullgraph=True`` under compile, one backward for both.
Plain eager calls go to a third twin, ``_...Classic``, the same Function
with the classic ``forward(ctx, ...)``: ``apply`` then skips the argument
binding it does for the setup_context style (see :func:`_classic`).
Backwards are built from differentiable torch ops, so double backward works.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "LinearFunction",
    "SigmoidFunction",
    "QuadraticCostFunction",
    "CrossEntropyCostFunction",
    "MLPFunction",
    "MLPCostFunction",
    "linear",
    "sigmoid",
    "quadratic_cost",
    "cross_entropy_cost",
    "mlp",
    "mlp_cost",
    "REDUCTIONS",
    "COSTS",
    "TensorValueError",
    "TensorTypeError",
]

REDUCTIONS = ("mean", "sum", "none")
COSTS = ("quadratic", "cross_entropy")

# A delta hook, ``hook(l, delta)``, is called during backward with δ^l, of shape (*, out_features), of
# layer l (0 for the first): the fused network's backward and the steps by hand (torchbp.sgd) call it.
DeltaHook = Callable[[int, Tensor], None]


def _check_hook(fn: str, hook: object, call: str) -> None:
    """A delta hook is checked where it is given: called only in backward, a bad one would fail there."""
    if hook is not None and not callable(hook):
        raise TypeError(f"{fn}(): delta_hook must be a function called as {call}, got {type(hook).__name__}")


class TensorValueError(ValueError, RuntimeError):
    """A tensor argument of the wrong shape, size or device, or a nested one where a dense one is needed.

    Also a RuntimeError, which torch's own ops raise for these (``nn.Linear`` given the wrong
    ``in_features``, say), so that code catching RuntimeError around a layer keeps working.
    """


class TensorTypeError(TypeError, RuntimeError):
    """A tensor argument of the wrong dtype, or nested in the older strided layout; also a RuntimeError, as
    torch's ops raise."""


# --------------------------------------------------------------------------
# Boundary checks: fail before any compute, naming argument, expected, actual.
# --------------------------------------------------------------------------


def _check_tensor(fn: str, name: str, t: object, min_dim: int = 0, complex_ok: bool = False) -> None:
    """``complex_ok``: a complex dtype too (linear and sigmoid take them, as torch's; the costs and the
    network functions, which sum real costs, do not)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}(): {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_nested and t.layout != torch.jagged:  # the older, strided nested tensors have no shape to check
        raise TensorTypeError(f"{fn}(): a nested {name} must have layout=torch.jagged, got {t.layout}")
    if not (t.is_floating_point() or complex_ok and t.is_complex()):
        kind = "floating-point or complex" if complex_ok else "floating-point"
        raise TensorTypeError(f"{fn}(): {name} must have a {kind} dtype, got {t.dtype}")
    if t.dim() < min_dim:
        raise TensorValueError(
            f"{fn}(): {name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}"
        )


def _check_same(fn: str, ref_name: str, ref: Tensor, name: str, t: Tensor, dtype: bool = True) -> None:
    if t.device != ref.device:
        raise TensorValueError(
            f"{fn}(): {name} must be on the same device as {ref_name} ({ref.device}), got {t.device}"
        )
    if dtype and t.dtype != ref.dtype:
        raise TensorTypeError(
            f"{fn}(): {name} must have the same dtype as {ref_name} ({ref.dtype}), got {t.dtype}"
        )


def _check_reduction(fn: str, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}(): reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_cost(fn: str, cost: str) -> None:
    if cost not in COSTS:
        meant = cost.replace("-", "_") if isinstance(cost, str) else None  # "cross-entropy", as a flag spells it
        hint = f"; did you mean {meant!r}?" if meant in COSTS else ""
        raise ValueError(f"{fn}(): cost must be one of {COSTS}, got {cost!r}{hint}")


def _check_layer(fn: str, i: int, input: Tensor, a_features: int, weight: object, bias: object) -> None:
    """Layer i's weight is (out, in) with in == the width before it; its bias is (out,).

    ``i = -1`` names the arguments of linear(): ``weight``, ``bias``; otherwise
    ``weights[i]``, ``biases[i]`` of the network functions.
    """
    wname, bname = ("weight", "bias") if i < 0 else (f"weights[{i}]", f"biases[{i}]")
    _check_tensor(fn, wname, weight, complex_ok=i < 0)
    if i < 0 and weight.dim() == 1:
        # As torch.nn.functional.linear: a 1-D weight (in,) is one output feature, dropped from the output
        if weight.shape[0] != a_features:
            raise TensorValueError(
                f"{fn}(): input must have last dimension {weight.shape[0]} (weight's in_features), "
                f"got shape {tuple(input.shape)}"
            )
        if bias is not None:  # torch takes a 0-D one for some inputs only (1-D, 3-D or more; not a 2-D batch)
            raise TensorValueError(f"{fn}(): bias must be None for a 1-D weight, got shape {tuple(bias.shape)}")
        return
    if weight.dim() != 2:
        expected = "2-D (out_features, in_features)"
        expected = "1-D (in_features,) or " + expected if i < 0 else expected
        raise TensorValueError(f"{fn}(): {wname} must be {expected}, got shape {tuple(weight.shape)}")
    if i <= 0 and weight.shape[1] != a_features:
        raise TensorValueError(
            f"{fn}(): input must have last dimension {weight.shape[1]} ({wname}'s in_features), "
            f"got shape {tuple(input.shape)}"
        )
    if weight.shape[1] != a_features:
        raise TensorValueError(
            f"{fn}(): {wname} must have {a_features} columns (out_features of weights[{i - 1}]), "
            f"got shape {tuple(weight.shape)}"
        )
    if bias is not None:
        _check_tensor(fn, bname, bias, complex_ok=i < 0)
        if i < 0 and bias.dim() > 1:
            # As torch.nn.functional.linear: a bias added to z, broadcast to the output's shape, (N, out) say;
            # a 1-D input is a batch of one there, (1, out), dropped from the output
            out = (*input.shape[:-1], weight.shape[0]) if input.dim() > 1 else (1, weight.shape[0])
            if not _broadcasts_to(tuple(bias.shape), out):
                what = "the output's shape" if input.dim() > 1 else "a 1-D input's output as a batch of one,"
                raise TensorValueError(f"{fn}(): bias must broadcast to {what} {out}, got {tuple(bias.shape)}")
            return
        # linear() also takes what torch.nn.functional.linear broadcasts: a bias of shape () or (1,)
        shapes = ((weight.shape[0],), (), (1,)) if i < 0 else ((weight.shape[0],),)
        if tuple(bias.shape) not in shapes:
            expected = f"({weight.shape[0]},) ({wname}'s out_features)" + (", (1,) or ()" if i < 0 else "")
            raise TensorValueError(f"{fn}(): {bname} must have shape {expected}, got {tuple(bias.shape)}")


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` without changing it."""
    return len(shape) <= len(target) and all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


def _sized(seq: object) -> bool:
    """A sequence of per-layer tensors: not a generator (read once, no len), one tensor (its rows), a set (no
    order), a dict (its keys) nor a string."""
    if type(seq) in (list, tuple):  # the common case, without the isinstance test of an abstract class (µs a call)
        return True
    return (hasattr(seq, "__len__") and hasattr(seq, "__getitem__")
            and not isinstance(seq, (Tensor, Mapping, str, bytes)))


_NO_TARGET = object()  # _network_ok's "no target to check" (None is a bad target, to be named as such)


def _network_ok(
    x: object, weights: Sequence[object], biases: Sequence[object] | None, target: object = _NO_TARGET
) -> bool:
    """The common case in one cheap pass: layers chained by shape, one floating dtype, one device,
    and the ``target``, if given, shaped like the output.

    Stricter than the full checks of :func:`linear` and :func:`_check_network_in_full`
    (it refuses mixed dtypes, which autocast accepts) and never more lenient, so
    a False only sends the call through the full checks, which name what is wrong.
    """
    if not (isinstance(x, Tensor) and x.is_floating_point() and x.dim() >= 1 and _sized(weights) and len(weights) > 0
            and not (x.is_nested and x.layout != torch.jagged)
            and (biases is None or _sized(biases) and len(biases) == len(weights))):
        return False
    dtype, device, features = x.dtype, x.device, x.shape[-1]
    for weight, bias in zip(weights, biases or [None] * len(weights)):
        if not (isinstance(weight, Tensor) and weight.dtype == dtype and weight.device == device
                and not weight.is_nested):
            return False
        shape = weight.shape  # (read once: each read builds a torch.Size)
        if len(shape) != 2 or shape[1] != features:
            return False
        features = shape[0]
        if bias is not None and not (isinstance(bias, Tensor) and bias.dtype == dtype and bias.device == device
                                     and not bias.is_nested and bias.shape == (features,)):
            return False
    return target is _NO_TARGET or (isinstance(target, Tensor) and target.dtype == dtype and target.device == device
                                    and target.shape == (*x.shape[:-1], features))


# --------------------------------------------------------------------------
# Autocast: cast at the boundary, run the Function with autocast off.
# --------------------------------------------------------------------------
# torch.amp.custom_fwd/custom_bwd assume the old ctx-in-forward style (pytorch
# issue 132388). Instead the wrappers do what autocast does for F.linear and
# the losses: matmuls in the autocast dtype, costs in float32. The casts are
# ordinary differentiable ops, so gradients reach float32 parameters in float32
# exactly as they do for torch.nn under autocast, and the Function itself sees
# one dtype in forward and backward.


# One call that says whether autocast is on for any device; a False spares the per-device queries.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast_dtype(t: Tensor) -> torch.dtype | None:
    if not _any_autocast():
        return None
    device_type = t.device.type
    if device_type not in ("cpu", "cuda", "xpu", "mps") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``; no call at all when it already is (a no-op ``.to`` still costs µs)."""
    return t if t.dtype == dtype else t.to(dtype)


def _cast(dtype: torch.dtype, *tensors: Tensor | None) -> list[Tensor | None]:
    """``tensors`` in ``dtype``, as autocast casts an op's arguments: float64, complex and None as they are."""
    return [t if t is None or t.dtype == torch.float64 or not t.is_floating_point() else _as(t, dtype)
            for t in tensors]


def _no_autocast(t: Tensor) -> torch.autocast:
    return torch.autocast(t.device.type, enabled=False)


def _classic(function: type) -> type:
    """``function`` with the classic ``forward(ctx, *inputs)``: its forward, saving, backward and jvp.

    ``apply`` on a Function that defines ``setup_context`` binds its arguments
    against ``inspect.signature(forward)`` at every call, which costs more
    than a small layer's matmul on CPU; the classic style skips that.
    functorch transforms (vmap, grad, jvp) accept only the setup_context
    style, so :func:`_pick` gives them ``function`` itself.
    """

    def forward(ctx, *inputs):
        output = function.forward(*inputs)
        function.setup_context(ctx, inputs, output)
        return output

    # Inheriting the base class's setup_context is what marks the classic style.
    namespace = {"forward": staticmethod(forward), "setup_context": torch.autograd.Function.setup_context}
    return type(function.__name__, (function,), namespace)


def _pick(function: type, classic: type, traced: type) -> type:
    """The twin for this call: jvp-free under Dynamo, setup_context style under functorch, else classic."""
    if torch.compiler.is_compiling():
        return traced  # Dynamo refuses Functions that define jvp
    if torch._C._are_functorch_transforms_active():
        return function
    return classic


# grad * a * (1 − a): φ'(z) = φ(z)(1 − φ(z)) times the incoming gradient, from the
# saved output a = φ(z), as one differentiable aten op (torch.sigmoid's own backward).
_sigmoid_backward = torch.ops.aten.sigmoid_backward


def _rows(t: Tensor) -> Tensor:
    """(*, features) -> (N, features): samples as rows for the sums over samples."""
    if t.is_nested:  # (not t.layout: torch.compile refuses reading it in a backward)
        return t.values()  # variable-length sequences (jagged): their rows, packed, are the samples
    # a 2-D batch already is; the count of rows spelled out, as -1 is ambiguous with 0 features
    return t if t.dim() == 2 else t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


# --------------------------------------------------------------------------
# Linear: z = a W^T + b
# --------------------------------------------------------------------------


class _Linear(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(input: Tensor, weight: Tensor, bias: Tensor | None, delta_hook: Callable | None) -> Tensor:
        # z^l = W^l a^{l-1} + b^l, batched as rows: (*, in) @ (in, out) + (out,) -> (*, out)
        return torch.nn.functional.linear(input, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, delta_hook = inputs
        ctx.delta_hook = delta_hook
        # Save only what the requested gradients read: ∇_W needs a^{l-1}, ∇_a needs W. Under torch.func
        # transforms both: the generated vmap rule of grad(vmap(...)) batches every saved tensor, None too.
        every = torch._C._are_functorch_transforms_active()
        ctx.save_for_backward(
            input if every or ctx.needs_input_grad[1] else None,
            weight if every or ctx.needs_input_grad[0] else None,
        )
        ctx.save_for_forward(input, weight)

    @staticmethod
    def backward(ctx, delta: Tensor):
        input, weight = ctx.saved_tensors
        if ctx.delta_hook is not None:
            ctx.delta_hook(delta)  # the grad_output here is δ^l = ∇_{z^l} C
        grad_input = grad_weight = grad_bias = None
        # (.conj(): complex layers take torch's conjugate gradients; for real ones it returns the tensor itself)
        if ctx.needs_input_grad[0]:
            # (W^l)^T δ^l, the recursion's step back before φ': (*, out) @ (out, in) -> (*, in)
            grad_input = delta @ weight.conj()
        if ctx.needs_input_grad[1]:
            # ∇_{W^l} C = δ^l (a^{l-1})^T, summed over samples: (out, N) @ (N, in) -> (out, in)
            grad_weight = _rows(delta).mT @ _rows(input).conj()
        if ctx.needs_input_grad[2]:
            # ∇_{b^l} C = δ^l, summed over samples: (N, out) -> (out,)
            grad_bias = _rows(delta).sum(0)
        return grad_input, grad_weight, grad_bias, None


class LinearFunction(_Linear):
    """``z = a W^T + b``; backward: the notes' ``(W^l)^T δ^l``, ``δ^l (a^{l-1})^T`` and ``δ^l``."""

    @staticmethod
    def jvp(ctx, input_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None, _) -> Tensor:
        input, weight = ctx.saved_tensors
        return _linear_tangent(input, weight, input_t, weight_t, bias_t)


def _linear_tangent(
    a: Tensor, weight: Tensor, a_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None
) -> Tensor:
    """Forward-mode AD of z = a W^T + b: z_t = a_t W^T + a W_t^T + b_t, the product rule; (*, out)."""
    z_t = torch.zeros((*a.shape[:-1], weight.shape[0]), dtype=a.dtype, device=a.device)
    if a_t is not None:
        z_t = z_t + a_t @ weight.mT  # (*, in) @ (in, out) -> (*, out)
    if weight_t is not None:
        z_t = z_t + a @ weight_t.mT
    if bias_t is not None:
        z_t = z_t + bias_t
    return z_t


_LinearClassic = _classic(LinearFunction)


def linear(
    input: Tensor, weight: Tensor, bias: Tensor | None = None, delta_hook: Callable[[Tensor], None] | None = None
) -> Tensor:
    r"""``z = a W^T + b`` through :class:`LinearFunction`, like :func:`torch.nn.functional.linear`.

    ``delta_hook(delta)``, if given, is called in backward with δ = ∇_z C,
    the gradient that reaches this layer, of shape ``(*, out_features)``:
    ``(*, 1)`` for a 1-D weight, whose output drops that dimension (eager
    mode only; it must not modify δ).
    Complex tensors are taken as torch takes them; the backward then gives
    torch's conjugate gradients, δ conj(W) and δ^T conj(a).

    Shape:
        - input: ``(*, in_features)``
        - weight: ``(out_features, in_features)``, or ``(in_features,)`` (then no bias) for one output feature
        - bias: ``(out_features,)``, or ``None``; or, as torch broadcasts it, ``()``, ``(1,)``
          or any shape that broadcasts to the output's, ``(*, out_features)`` (then added after the Function)
        - output: ``(*, out_features)``, or ``(*)`` for a 1-D weight
    """
    _check_hook("linear", delta_hook, "delta_hook(delta)")
    if not _network_ok(input, (weight,), (bias,)):  # the common case in one cheap pass
        _check_tensor("linear", "input", input, min_dim=1, complex_ok=True)
        _check_layer("linear", -1, input, input.shape[-1], weight, bias)
        # Under autocast the dtypes may differ (all are cast below); the device may not.
        dtypes = _autocast_dtype(input) is None
        _check_same("linear", "input", input, "weight", weight, dtype=dtypes)
        if bias is not None:
            _check_same("linear", "input", input, "bias", bias, dtype=dtypes)
        # The Function takes the notes' shapes only, W (out, in) and b (out,); these views give them,
        # and autograd sums a broadcast bias's gradient back to its shape.
        if weight.dim() == 1:
            return linear(input, weight.unsqueeze(0), None, delta_hook).squeeze(-1)  # (*, 1) -> (*)
        if bias is not None and bias.dim() > 1:
            # z = a W^T, then + b broadcast over the samples: (*, out) + (..., out) -> (*, out)
            z, dtype = linear(input, weight, None, delta_hook), _autocast_dtype(input)
            if dtype is not None:
                (bias,) = _cast(dtype, bias)
                # as torch's addmm under autocast: a bias it leaves uncast (float64, complex) must match z
                _check_same("linear", "the output under autocast", z, "bias", bias)
            return z + bias if input.dim() > 1 else (z + bias).reshape(z.shape)  # (1, out) -> (out,)
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            bias = bias.expand(weight.shape[0])  # () or (1,) -> (out,)
    dtype = _autocast_dtype(input)
    if dtype is not None:
        # Autocast runs F.linear in its lower precision: input, weight and bias all cast.
        input, weight, bias = _cast(dtype, input, weight, bias)
    function = _pick(LinearFunction, _LinearClassic, _Linear)
    if dtype is None:
        return function.apply(input, weight, bias, delta_hook)
    with _no_autocast(input):
        return function.apply(input, weight, bias, delta_hook)


# --------------------------------------------------------------------------
# Sigmoid: a = φ(z) = 1 / (1 + e^{-z})
# --------------------------------------------------------------------------


class _Sigmoid(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor) -> Tensor:
        # φ(z) = 1 / (1 + e^{-z})
        return torch.sigmoid(z)

    @staticmethod
    def setup_context(ctx, inputs, output):
        # φ' = φ(1 − φ) needs only the output: no second exp in backward.
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad_a: Tensor) -> Tensor:
        (a,) = ctx.saved_tensors
        # δ = ∇_a C ∘ φ'(z), with φ'(z) = φ(z)(1 − φ(z)): aten's sigmoid_backward is
        # exactly grad_a * a * (1 − a), in one kernel instead of three
        return _sigmoid_backward(grad_a, a)


class SigmoidFunction(_Sigmoid):
    """``a = φ(z)``; backward: ``grad ∘ φ(z)(1 − φ(z))`` from the saved output."""

    @staticmethod
    def jvp(ctx, z_t: Tensor) -> Tensor:
        (a,) = ctx.saved_tensors
        # a_t = φ'(z) z_t = z_t ∘ a(1 − a); for complex z sigmoid_backward conjugates φ' (a gradient's
        # convention), which the forward mode's holomorphic product does not: the conj()s undo it
        return _sigmoid_backward(z_t.conj(), a).conj()


_SigmoidClassic = _classic(SigmoidFunction)


def sigmoid(input: Tensor) -> Tensor:
    r"""``φ(z) = 1 / (1 + e^{-z})`` elementwise through :class:`SigmoidFunction`, like :func:`torch.sigmoid`.

    ``input`` is the notes' weighted input ``z`` (named as torch names it).

    Shape:
        - input: ``(*)``; output: ``(*)``, same shape. An integer or bool ``input``
          is promoted to the default float dtype first, as ``torch.sigmoid`` does;
          a complex one is taken as torch takes it (backward: torch's conjugate gradient).
    """
    if isinstance(input, Tensor) and not input.is_floating_point() and not input.is_complex():
        input = input.to(torch.get_default_dtype())  # (no gradient flows to an integer tensor anyway)
    _check_tensor("sigmoid", "input", input, complex_ok=True)
    return _pick(SigmoidFunction, _SigmoidClassic, _Sigmoid).apply(input)


# --------------------------------------------------------------------------
# Costs: C per sample over the last dimension, then reduced over samples.
# --------------------------------------------------------------------------


# The cross-entropy's guards, torch's binary_cross_entropy's: ln a clamped at −100 in the cost, and
# a(1 − a) at 1e-12 in the denominator of its gradient.
_LOG_MIN, _EPS = -100.0, 1e-12


def _cost(cost: str, a: Tensor, y: Tensor) -> Tensor:
    """One cost per sample: (*, features) -> (*)."""
    if cost == "quadratic":
        # C = ½‖a − y‖²
        diff = a - y
        return 0.5 * (diff * diff).sum(-1)
    # C = −Σ_j [y_j ln a_j + (1 − y_j) ln(1 − a_j)], each ln clamped at −100 as in torch's
    # binary_cross_entropy: finite where a float output saturates at exactly 0 or 1
    return -(y * torch.log(a).clamp(min=_LOG_MIN) + (1 - y) * torch.log1p(-a).clamp(min=_LOG_MIN)).sum(-1)


def _per_sample_weight(n: int, reduction: str) -> float:
    """dC/dC_n of each of ``n`` samples: 1/N for a mean, 1 for a sum or for per-sample costs (their sum is
    minimised). With no samples the mean's is nan, as torch's mean of nothing."""
    return (1.0 / n if n else math.nan) if reduction == "mean" else 1.0


# Above this many elements the dot's float32 sum drifts from the pairwise sums of torch's reductions
# (median relative error over 20 draws 1.1e-7 at 16,384 elements, 1.3e-7 at 65,430, 3e-6 at 600,000,
# against 4e-8 for torch's; 5.8e-8 against 4.6e-8 at 4,096): they take over there.
_DOT_ELEMENTS = 2**12


def _reduced_cost(cost: str, a: Tensor, y: Tensor, reduction: str, diff: Tensor | None = None) -> Tensor:
    """``_reduce(_cost(cost, a, y), reduction)``, the reduced quadratic cost in fewer ops.

    Σ_n ½‖a_n − y_n‖² = ½ (a − y)·(a − y) over all elements: one ``dot`` instead of a square,
    a sum per sample and their reduction; equal to rounding up to _DOT_ELEMENTS elements. ``diff``
    is a − y where the caller has it.
    """
    if cost != "quadratic" or reduction == "none" or a.element_size() < 4 or a.numel() > _DOT_ELEMENTS:
        # float16's whole-batch sum before the 1/N may overflow (65504) where the mean does not
        return _reduce(_cost(cost, a, y), reduction)
    flat = (a - y if diff is None else diff).reshape(-1)
    return torch.dot(flat, flat) * (0.5 * _per_sample_weight(math.prod(a.shape[:-1]), reduction))


def _cost_grad_a(cost: str, a: Tensor, y: Tensor) -> Tensor:
    """∇_a C per element; the cross-entropy's in at least float32, as torch's kernels compute float16 and
    bfloat16: a(1 − a) and its 1e-12 guard underflow in float16, and 1/a overflows it below a ≈ 1.5e-5."""
    if cost == "quadratic":
        return a - y  # ∇_a C = a − y
    wide = torch.promote_types(a.dtype, torch.float32)
    a, y = _as(a, wide), _as(y, wide)
    return (a - y) / (a * (1 - a)).clamp(min=_EPS)  # ∇_a C = (a − y) / (a(1 − a))


def _cost_grad_y(cost: str, a: Tensor, y: Tensor) -> Tensor:
    if cost == "quadratic":
        return y - a  # ∇_y C = −(a − y)
    return torch.log1p(-a) - torch.log(a)  # ∇_y C = ln(1 − a) − ln a


def _reduce(c: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return c.mean()
    if reduction == "sum":
        return c.sum()
    return c


def _sample_weight(grad_c: Tensor, a: Tensor, reduction: str) -> Tensor:
    """dC_reduced/dC_n for every sample n, shaped to broadcast over a's last dimension."""
    if reduction == "none":
        return grad_c.unsqueeze(-1)  # (*) -> (*, 1)
    if reduction == "mean":
        # C = (1/N) Σ_n C_n: each sample enters with weight 1/N
        return grad_c / math.prod(a.shape[:-1])
    return grad_c


def _cost_tangent(cost: str, a: Tensor, y: Tensor, a_t: Tensor | None, y_t: Tensor | None) -> Tensor:
    """Forward-mode AD of the per-sample cost: Σ_j ∂C/∂a_j a_t,j + ∂C/∂y_j y_t,j."""
    c_t = torch.zeros_like(a)
    if a_t is not None:
        c_t = c_t + _cost_grad_a(cost, a, y) * a_t
    if y_t is not None:
        c_t = c_t + _cost_grad_y(cost, a, y) * y_t
    return _as(c_t.sum(-1), a.dtype)  # (summed in float32 for a half-precision cross-entropy)


def _check_dense(fn: str, input: Tensor, target: Tensor) -> None:
    """A cost sums over a sample's features and reduces over samples, which a nested tensor's rows are not."""
    for name, t in (("input", input), ("target", target)):
        if t.is_nested:
            raise TensorValueError(f"{fn}(): {name} must be a dense tensor, got a nested one; pass the packed "
                                   "rows of input and target (.values() of a jagged tensor)")


def _check_cost_args(fn: str, a: Tensor, y: Tensor, reduction: str) -> None:
    """The costs' ``input`` (the notes' a) and ``target`` (y), named in messages as torch's losses name them."""
    _check_tensor(fn, "input", a, min_dim=1)
    _check_tensor(fn, "target", y, min_dim=1)
    if a.is_nested or y.is_nested:
        _check_dense(fn, a, y)
    if a.shape != y.shape:
        raise TensorValueError(f"{fn}(): target must have the shape of input {tuple(a.shape)}, got {tuple(y.shape)}")
    _check_reduction(fn, reduction)


def _assert_unit_interval(fn: str, name: str, t: Tensor, what: str) -> None:
    """As binary_cross_entropy: an element of ``t`` outside [0, 1] fails rather than giving nan or a wrong cost.

    An async assert, so no host sync: on CPU it raises here, on CUDA the kernel asserts. vmap has no
    rule for it, so under functorch transforms nothing is checked.
    """
    if torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active():
        torch._assert_async(((t >= 0) & (t <= 1)).all(),
                            f"{fn}(): every element of {name} must lie in [0, 1] ({what}), got one outside")


def _float_target(cost: str, ref: object, target: object) -> object:
    """The quadratic cost's integer or bool target (``one_hot(labels)``) in ``ref``'s floating dtype, as
    mse_loss promotes it; anything else as it is (binary_cross_entropy refuses an integer target)."""
    if (cost == "quadratic" and isinstance(target, Tensor) and isinstance(ref, Tensor) and ref.is_floating_point()
            and not target.is_floating_point() and not target.is_complex()):
        return target.to(ref.dtype)
    return target


def _apply_cost(
    fn: str, function: type, classic: type, traced: type, a: Tensor, y: Tensor, reduction: str,
    unit_interval: bool = False,
) -> Tensor:
    # The common case in one cheap pass: dense tensors of one shape, floating dtype and device
    common = (isinstance(a, Tensor) and isinstance(y, Tensor) and a.dtype == y.dtype and a.is_floating_point()
              and a.device == y.device and not (a.is_nested or y.is_nested) and a.dim() >= 1 and a.shape == y.shape
              and reduction in REDUCTIONS)
    if not common:
        if not unit_interval:
            y = _float_target("quadratic", a, y)
        _check_cost_args(fn, a, y, reduction)
        if not unit_interval and a.dtype != y.dtype:
            # As mse_loss: a and y of two floating dtypes promote to the wider one (binary_cross_entropy,
            # the cross-entropy's twin, refuses them; the check below says so)
            dtype = torch.promote_types(a.dtype, y.dtype)
            a, y = _as(a, dtype), _as(y, dtype)
    if unit_interval:  # the cross-entropy's a (logits, say, would give nan) and y (labels, pixels)
        _assert_unit_interval(fn, "input", a, "a sigmoid's output")
        _assert_unit_interval(fn, "target", y, "a probability")
    # Autocast computes losses in float32 (mse_loss is on its float32 list, binary_cross_entropy on the
    # CPU's; CUDA's refuses binary_cross_entropy as unsafe, which this float32 computation is not).
    autocast = _autocast_dtype(a) is not None
    if autocast:
        a, y = _cast(torch.float32, a, y)
    if not common:
        _check_same(fn, "input", a, "target", y)
    function = _pick(function, classic, traced)
    if not autocast:
        return function.apply(a, y, reduction)
    with _no_autocast(a):
        return function.apply(a, y, reduction)


class _QuadraticCost(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(a: Tensor, y: Tensor, reduction: str) -> Tensor:
        return _reduced_cost("quadratic", a, y, reduction)  # C = ½‖a − y‖² per sample, reduced

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, y, reduction = inputs
        ctx.save_for_backward(a, y)
        ctx.save_for_forward(a, y)
        ctx.reduction = reduction

    @staticmethod
    def backward(ctx, grad_c: Tensor):
        a, y = ctx.saved_tensors
        weight = _sample_weight(grad_c, a, ctx.reduction)
        grad_a = grad_y = None
        if ctx.needs_input_grad[0]:
            grad_a = _cost_grad_a("quadratic", a, y) * weight  # ∇_a C = a − y
        if ctx.needs_input_grad[1]:
            grad_y = _cost_grad_y("quadratic", a, y) * weight  # ∇_y C = −(a − y)
        return grad_a, grad_y, None


class QuadraticCostFunction(_QuadraticCost):
    """``C = ½‖a − y‖²`` per sample, reduced; backward: ``∇_a C = a − y``."""

    @staticmethod
    def jvp(ctx, a_t: Tensor | None, y_t: Tensor | None, _) -> Tensor:
        a, y = ctx.saved_tensors
        return _reduce(_cost_tangent("quadratic", a, y, a_t, y_t), ctx.reduction)


_QuadraticCostClassic = _classic(QuadraticCostFunction)


def quadratic_cost(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    r"""The notes' cost ``C = ½‖a − y‖²`` of the output activation ``a = input`` and ``y = target``.

    Through :class:`QuadraticCostFunction`; the arguments are named as
    :func:`torch.nn.functional.mse_loss` names them. The cost of one sample
    sums over the last dimension; ``reduction`` then averages over samples
    (``"mean"``, the default), sums (``"sum"``) or keeps one cost per sample
    (``"none"``). Unlike :class:`torch.nn.MSELoss`, the mean is over samples
    only, not over elements, and the notes' ½ is kept:
    ``quadratic_cost(a, y) == 0.5 * ((a - y) ** 2).sum(-1).mean()``. As
    mse_loss, ``input`` and ``target`` of two floating dtypes are promoted:
    the cost is in the wider one, each gradient in its own tensor's dtype;
    an integer or bool ``target`` (``one_hot(labels)``) is taken in ``input``'s.

    Shape:
        - input, target: ``(*, features)``, the same shape
        - output: scalar, or ``(*)`` with ``reduction="none"``
    """
    return _apply_cost(
        "quadratic_cost", QuadraticCostFunction, _QuadraticCostClassic, _QuadraticCost, input, target, reduction
    )


class _CrossEntropyCost(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(a: Tensor, y: Tensor, reduction: str) -> Tensor:
        # C = −Σ_j [y_j ln a_j + (1 − y_j) ln(1 − a_j)] per sample
        return _reduced_cost("cross_entropy", a, y, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, y, reduction = inputs
        # A missing tangent stays None, not zeros: the jvp's ∇_y C · y_t would be ±∞ · 0 = nan wherever
        # an output a saturates at exactly 0 or 1, even with no tangent on y at all
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(a, y)
        ctx.save_for_forward(a, y)
        ctx.reduction = reduction

    @staticmethod
    def backward(ctx, grad_c: Tensor | None):
        if grad_c is None:
            return None, None, None
        a, y = ctx.saved_tensors
        weight = _sample_weight(grad_c, a, ctx.reduction)
        grad_a = grad_y = None
        if ctx.needs_input_grad[0]:
            # ∇_a C = (a − y) / (a(1 − a)); times φ'(z^L) = a(1 − a) this makes δ^L = a − y
            grad_a = _as(_cost_grad_a("cross_entropy", a, y) * weight, a.dtype)
        if ctx.needs_input_grad[1]:
            grad_y = _cost_grad_y("cross_entropy", a, y) * weight  # ∇_y C = ln(1 − a) − ln a
        return grad_a, grad_y, None


class CrossEntropyCostFunction(_CrossEntropyCost):
    """``C = −Σ[y ln a + (1 − y) ln(1 − a)]``; backward: ``∇_a C = (a − y) / (a(1 − a))``."""

    @staticmethod
    def jvp(ctx, a_t: Tensor | None, y_t: Tensor | None, _) -> Tensor:
        a, y = ctx.saved_tensors
        return _reduce(_cost_tangent("cross_entropy", a, y, a_t, y_t), ctx.reduction)


_CrossEntropyCostClassic = _classic(CrossEntropyCostFunction)


def cross_entropy_cost(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    r"""The cross-entropy cost ``C = −Σ_j [y_j ln a_j + (1 − y_j) ln(1 − a_j)]``, ``a = input``, ``y = target``.

    With a sigmoid output layer its ``δ^L = a − y``: the ``φ'(z^L)`` that slows
    the quadratic cost down cancels. Reduced like :func:`quadratic_cost` (one
    sample's cost sums over the last dimension); ``input`` and ``target`` must
    lie in ``[0, 1]`` and, as for binary_cross_entropy, have the same dtype.
    Equal to :func:`torch.nn.functional.binary_cross_entropy` summed over
    features and averaged over samples, guards included: each ln is clamped
    at −100 and the gradient's a(1 − a) at 1e-12, so an output saturated at
    exactly 0 or 1 gives a finite cost and gradient (in float32 and float64;
    in float16 the guard's 1/a(1 − a) overflows: the gradient there is ±inf,
    or 0 where a = y, where torch's is ±inf or nan).

    Shape:
        - input, target: ``(*, features)``, the same shape
        - output: scalar, or ``(*)`` with ``reduction="none"``
    """
    return _apply_cost(
        "cross_entropy_cost", CrossEntropyCostFunction, _CrossEntropyCostClassic, _CrossEntropyCost,
        input, target, reduction, unit_interval=True,
    )


# --------------------------------------------------------------------------
# The whole network in one node: the notes' recursion in a single backward.
# --------------------------------------------------------------------------
# Inputs are (x, ..., *params) with params = (W^1, b^1, ..., W^L, b^L), a b
# possibly None. The forward returns every activation a^1..a^L: a^L is the
# result, the hidden ones are outputs only so that setup_context can save
# them (it sees inputs and outputs, nothing else). They stay differentiable:
# in double backward a gradient reaches them through those saved tensors, and
# the backward adds it in. Saved: a^0..a^L (a^0 where W^1 trains) and each W^l where (W^l)^T δ^l reaches
# something that asks for a gradient, never z, since φ'(z) = a(1 − a).


def _activations(x: Tensor, params: Sequence[Tensor | None], overwrite_z: bool = False) -> list[Tensor]:
    """a^1..a^L, with a^l = φ(W^l a^{l-1} + b^l) and a^0 = x.

    ``overwrite_z`` writes each a^l over its z^l, for the steps by hand, which record no graph. A Function's
    forward keeps z^l: no one needs it afterwards, but a selective checkpoint may have cached the matmul's
    output, and torch.func.linearize replays the ops, and both refuse a z^l changed in place.
    """
    sigmoid = torch.sigmoid_ if overwrite_z else torch.sigmoid
    activations, a = [], x
    for weight, bias in zip(params[0::2], params[1::2]):
        # z^l = W^l a^{l-1} + b^l: (*, in) -> (*, out); a^l = φ(z^l)
        a = sigmoid(torch.nn.functional.linear(a, weight, bias))
        activations.append(a)
    return activations


# Samples per block in _backprop: the widest (B, width) buffer holds 2^20 elements, 4 MiB in float32
# (smaller blocks cost speed: each adds its sums into the whole ∇_W C).
_BLOCK_ELEMENTS = 2**20


def _backprop(
    grad_a: Sequence[Tensor | None], a: Sequence[Tensor], weights: Sequence[Tensor],
    needs: Sequence[bool], hook: DeltaHook | None, delta_L: Tensor | None = None,
) -> list[Tensor | None]:
    """From layer L down to layer 1: the gradients of (a^0, W^1, b^1, ..., W^L, b^L).

    ``grad_a`` holds the gradients reaching a^1..a^L from outside the network
    (None where none does: in a first backward only a^L's is set), ``delta_L``
    the δ^L a cost already formed, ``a`` the activations a^0..a^L, ``weights``
    W^1..W^L and ``needs`` the needs_input_grad flags of (a^0, W^1, b^1, ...).
    Differentiable ops only, so that double backward works.

    A sample's δ^l depends on that sample alone; only ∇_W C and ∇_b C sum over
    samples, as the notes' mini-batch update sums the gradients of single
    examples. So unless the input's gradient or a delta hook asks for whole
    δ^l, the recursion runs on a block of samples at a time and the blocks'
    parameter gradients are added up: no (N, width) buffer of δ^l or
    (W^l)^T δ^l ever exists, and the backward holds little beyond the saved
    activations, where autograd's per-layer nodes hold a^{l-1}, (W^l)^T δ^l
    and δ^{l-1} at once.
    """
    # (compiled, all samples at once too: a Python loop over blocks would fix the batch size in the graph,
    # one recompile per size; the compiler plans the graph's memory itself. Under torch.func transforms
    # too: vmap has no batching rule for the blocks' addmm_, and falls back to a loop over the batch)
    whole = (needs[0] or hook is not None or torch.compiler.is_compiling()
             or torch._C._are_functorch_transforms_active())
    samples = 0 if whole else len(_rows(a[1]))  # (a jagged batch's packed rows: its count is a plain int)
    # (a^0 is None where W^1 is frozen: saved only for ∇_{W^1} C)
    block = max(1, _BLOCK_ELEMENTS // max(1, *(t.shape[-1] for t in a if t is not None)))
    if whole or samples <= block:
        return _backprop_block(grad_a, a, weights, needs, hook, delta_L, [None] * (1 + 2 * len(weights)))
    # Every per-sample tensor as its blocks of samples: (*, width) -> views (B, width), B = block or fewer
    a_blocks = [None if t is None else _rows(t).split(block) for t in a]
    grad_blocks = [None if g is None else _rows(g).split(block) for g in grad_a]
    delta_L_blocks = None if delta_L is None else _rows(delta_L).split(block)
    grads: list[Tensor | None] = [None] * (1 + 2 * len(weights))
    # float16 and bfloat16 sums over blocks in float32, rounded once at the end, as one matmul over all
    # the samples accumulates and rounds (rounded block by block they drifted 25-50 times further)
    dtype = a[1].dtype
    sum_dtype = torch.float32 if dtype.is_floating_point and a[1].element_size() < 4 else None
    for i in range(len(a_blocks[1])):  # each block adds its sums over samples to grads
        _backprop_block(
            [None if g is None else g[i] for g in grad_blocks], [None if t is None else t[i] for t in a_blocks],
            weights, needs, None, None if delta_L_blocks is None else delta_L_blocks[i], grads, sum_dtype,
        )
    return grads if sum_dtype is None else [None if g is None else g.to(dtype) for g in grads]


def _backprop_block(
    grad_a: Sequence[Tensor | None], a: Sequence[Tensor], weights: Sequence[Tensor],
    needs: Sequence[bool], hook: DeltaHook | None, delta_L: Tensor | None, grads: list[Tensor | None],
    sum_dtype: torch.dtype | None = None,
) -> list[Tensor | None]:
    """:func:`_backprop` over all the samples of ``a`` at once, its sums added to ``grads`` (None: nothing yet),
    kept in ``sum_dtype`` if given."""
    n_layers = len(weights)
    back = None  # (W^{l+1})^T δ^{l+1}, the gradient layer l+1 sends down to a^l
    for l in range(n_layers, 0, -1):  # l = L, ..., 1
        g = grad_a[l - 1] if back is None else back if grad_a[l - 1] is None else back + grad_a[l - 1]
        # δ^l = ∇_{a^l} C ∘ φ'(z^l), with φ'(z^l) = a^l(1 − a^l): the output layer's
        # formula at l = L, the recursion δ^{l-1} = φ'(z^{l-1}) ∘ (W^l)^T δ^l below it
        delta = None if g is None else _sigmoid_backward(g, a[l])
        if l == n_layers and delta_L is not None:
            delta = delta_L if delta is None else delta + delta_L
        g = back = None  # only δ^l is needed from here on: free ∇_{a^l} C before the next matmul
        if delta is None:
            continue  # no gradient reaches layer l
        if hook is not None:
            hook(l - 1, delta)
        rows, w, b = _rows(delta), grads[2 * l - 1], grads[2 * l]
        if needs[2 * l - 1]:
            # ∇_{W^l} C = δ^l (a^{l-1})^T, summed over samples: (out, N) @ (N, in) -> (out, in)
            if w is None:
                w = rows.mT @ _rows(a[l - 1])
                grads[2 * l - 1] = w if sum_dtype is None else w.to(sum_dtype)
            elif sum_dtype is None:
                w.addmm_(rows.mT, _rows(a[l - 1]))  # the next block's sum, added in place
            else:  # the block's product rounded to δ's dtype, the sum over blocks kept wide
                w.add_(rows.mT @ _rows(a[l - 1]))
        if needs[2 * l]:
            # ∇_{b^l} C = δ^l, summed over samples: (N, out) -> (out,)
            total = rows.sum(0, dtype=sum_dtype)
            grads[2 * l] = total if b is None else b.add_(total)
        if l == 1:
            if needs[0]:
                grads[0] = delta @ weights[0]  # ∇_x C = (W^1)^T δ^1: (*, out) @ (out, in) -> (*, in)
        elif any(needs[: 2 * l - 1]):
            back = delta @ weights[l - 1]  # (W^l)^T δ^l: (*, out) @ (out, in) -> (*, in)
        else:
            break  # nothing below layer l asks for a gradient
        delta = rows = None  # free δ^l before δ^{l-1} is formed: two (N, width) buffers at a time, as autograd
    return grads


def _tangents(
    a: Sequence[Tensor], params: Sequence[Tensor | None], tangents: Sequence[Tensor | None]
) -> tuple[list[Tensor], Tensor]:
    """Forward-mode AD through the network: a_t^1..a_t^L from (x_t, W_t^1, b_t^1, ...), and z_t^L."""
    out, a_t = [], tangents[0]
    for l in range(1, len(a)):
        z_t = _linear_tangent(a[l - 1], params[2 * l - 2], a_t, tangents[2 * l - 1], tangents[2 * l])
        a_t = _sigmoid_backward(z_t, a[l])  # a_t = φ'(z) z_t = z_t ∘ a(1 − a)
        out.append(a_t)
    return out, z_t


def _output_delta(cost: str, a_L: Tensor, diff: Tensor) -> Tensor:
    """δ^L of the output layer for ``cost`` from ``diff`` = a^L − y, each sample's row scaled by dC/dC_n."""
    if cost == "quadratic":
        # δ^L = ∇_a C ∘ φ'(z^L) = (a^L − y) ∘ a^L(1 − a^L)
        return _sigmoid_backward(diff, a_L)
    # δ^L = (a^L − y) / (a^L(1 − a^L)) ∘ a^L(1 − a^L) = a^L − y: φ' cancels
    return diff


def _save_network(
    ctx, x: Tensor, params: Sequence[Tensor | None], a: Sequence[Tensor], *extra: Tensor, needs: Sequence[bool]
) -> None:
    """Save a^0..a^L (``a`` is a^1..a^L), W^1..W^L and ``extra`` for backward and jvp.

    ``needs`` are the needs_input_grad flags of (x, W^1, b^1, ..., W^L, b^L). The backward reads
    a^0 = x only for ∇_{W^1} C = δ^1 x^T, and W^l only for (W^l)^T δ^l, which goes down to a layer
    (or x) that asks for a gradient: where none is asked, it keeps none, as nn.Linear's node keeps no
    input for a frozen weight and no weight where its input needs no gradient (the tensor may then
    change in place before the backward). Under torch.func transforms it keeps all: their vmap rule
    batches every saved tensor.
    """
    ctx.set_materialize_grads(False)
    ctx.n_layers = len(params) // 2
    every = torch._C._are_functorch_transforms_active()
    weights = [w if every or any(needs[: 2 * l + 1]) else None for l, w in enumerate(params[0::2])]
    ctx.save_for_backward(x if every or needs[1] else None, *a, *weights, *extra)
    ctx.save_for_forward(x, *a, *params[0::2], *extra)


def _saved_network(ctx) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], tuple[Tensor, ...]]:
    """(a^0..a^L, W^1..W^L, extra) from what _save_network saved.

    ctx.saved_tensors is read once: under non-reentrant checkpointing each read unpacks (recomputes)
    the saved tensors, and a second read raises.
    """
    saved = ctx.saved_tensors
    n = ctx.n_layers
    return saved[: n + 1], saved[n + 1 : 2 * n + 1], saved[2 * n + 1 :]


class _MLP(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, hook: DeltaHook | None, *params: Tensor | None) -> tuple[Tensor, ...]:
        activations = _activations(x, params)
        return (activations[-1], *activations[:-1])  # a^L first: the result

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, hook, *params = inputs
        needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:])
        _save_network(ctx, x, params, (*output[1:], output[0]), needs=needs)
        ctx.hook = hook

    @staticmethod
    def backward(ctx, grad_a: Tensor | None, *grad_hidden: Tensor | None):
        # The hidden activations are outputs only to be saved; a gradient reaches
        # them only in double backward, through those saved tensors.
        a, weights, _ = _saved_network(ctx)
        needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:])
        grads = _backprop((*grad_hidden, grad_a), a, weights, needs, ctx.hook)
        return grads[0], None, *grads[1:]


class MLPFunction(_MLP):
    """The sigmoid network ``a^l = φ(W^l a^{l-1} + b^l)`` with the notes' whole recursion as one backward."""

    @staticmethod
    def jvp(ctx, x_t, _, *params_t):
        a, weights, _ = _saved_network(ctx)
        params = [p for w in weights for p in (w, None)]
        t, _ = _tangents(a, params, (x_t, *params_t))
        return (t[-1], *t[:-1])


_MLPClassic = _classic(MLPFunction)


class _MLPCost(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor, y: Tensor, cost: str, reduction: str, hook: DeltaHook | None, *params: Tensor | None
    ) -> tuple[Tensor, ...]:
        activations = _activations(x, params)
        # The cost in the target's dtype: float32 under autocast, as for torch's losses.
        return (_reduced_cost(cost, _as(activations[-1], y.dtype), y, reduction), *activations)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, cost, reduction, hook, *params = inputs
        _save_network(ctx, x, params, output[1:], y, needs=(ctx.needs_input_grad[0], *ctx.needs_input_grad[5:]))
        ctx.cost, ctx.reduction, ctx.hook = cost, reduction, hook

    @staticmethod
    def backward(ctx, grad_c: Tensor | None, *grad_a: Tensor | None):
        a, weights, (y,) = _saved_network(ctx)
        delta = weight = None
        a_L = _as(a[-1], y.dtype)  # the cost's dtype
        if grad_c is not None:
            weight = _sample_weight(grad_c, y, ctx.reduction)
            delta = _as(_output_delta(ctx.cost, a_L, (a_L - y) * weight), a[-1].dtype)  # in the network's dtype
        needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[5:])
        grads = _backprop(grad_a, a, weights, needs, ctx.hook, delta_L=delta)
        grad_y = None
        if ctx.needs_input_grad[1] and weight is not None:
            grad_y = _cost_grad_y(ctx.cost, a_L, y) * weight
        return grads[0], grad_y, None, None, None, *grads[1:]


class MLPCostFunction(_MLPCost):
    """The network and its cost in one node: the backward starts at δ^L = ∇_a C ∘ φ'(z^L)."""

    @staticmethod
    def jvp(ctx, x_t, y_t, _cost_arg, _reduction, _hook, *params_t):
        a, weights, (y,) = _saved_network(ctx)
        params = [p for w in weights for p in (w, None)]
        t, z_t = _tangents(a, params, (x_t, *params_t))
        a_L = _as(a[-1], y.dtype)
        # C_t = δ^L · z_t^L + ∇_y C · y_t per sample, δ^L = ∂C/∂z^L formed as the backward forms it: for the
        # cross-entropy a^L − y exactly, where ∇_a C · a_t^L would go through a(1 − a) and its clamp
        delta = _output_delta(ctx.cost, a_L, a_L - y)
        c_t = (delta * _as(z_t, y.dtype)).sum(-1) + _cost_tangent(ctx.cost, a_L, y, None, y_t)
        return (_reduce(c_t, ctx.reduction), *t)


_MLPCostClassic = _classic(MLPCostFunction)


def _check_network(fn: str, x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None] | None):
    """(x, [W^1, b^1, ..., W^L, b^L], autocast dtype or None), cast for autocast; raises on bad input."""
    if not _network_ok(x, weights, biases):  # the common case in one cheap pass
        _check_network_in_full(fn, x, weights, biases)
    return _network_params(x, weights, biases)


def _network_params(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None] | None):
    """(x, [W^1, b^1, ..., W^L, b^L], autocast dtype or None), cast for autocast."""
    params = [p for wb in zip(weights, biases or [None] * len(weights)) for p in wb]
    dtype = _autocast_dtype(x)
    if dtype is not None:
        x, *params = _cast(dtype, x, *params)
    return x, params, dtype


def _check_network_in_full(
    fn: str, x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None] | None
) -> None:
    """_check_network's checks one at a time, each failure naming the argument, expected and actual value."""
    _check_tensor(fn, "input", x, min_dim=1)
    for name, seq in (("weights", weights), ("biases", biases)):
        if seq is not None and not _sized(seq):
            raise TypeError(f"{fn}(): {name} must be a list or tuple with one tensor per layer, "
                            f"got {type(seq).__name__}")
    if len(weights) == 0:
        raise ValueError(f"{fn}(): weights must hold at least one layer's weight, got none")
    if biases is None:
        biases = [None] * len(weights)
    if len(biases) != len(weights):
        raise ValueError(f"{fn}(): biases must have one entry per weight ({len(weights)}), got {len(biases)}")
    features = x.shape[-1]
    for i, (weight, bias) in enumerate(zip(weights, biases)):
        _check_layer(fn, i, x, features, weight, bias)
        features = weight.shape[0]
    # Under autocast the dtypes may differ (every linear runs cast to its lower precision); the device may not.
    dtypes = _autocast_dtype(x) is None
    for i, (weight, bias) in enumerate(zip(weights, biases)):
        _check_same(fn, "input", x, f"weights[{i}]", weight, dtype=dtypes)
        if bias is not None:
            _check_same(fn, "input", x, f"biases[{i}]", bias, dtype=dtypes)


def _check_network_cost(
    fn: str, x: Tensor, target: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None] | None,
    cost: str, reduction: str,
):
    """_check_network, plus the cost's arguments: (x, target, [W^1, b^1, ...], autocast dtype or None).

    The target must be shaped like the output, on its device. The cross-entropy's has the input's dtype
    too, as binary_cross_entropy wants, except under autocast; the quadratic cost's may have any floating
    dtype, or be integer or bool, as mse_loss's. It comes back in the cost's dtype: the wider of its and
    the network's, each taken as autocast takes torch's losses (in float32, float64 left as it is).
    """
    target = _float_target(cost, x, target)
    if isinstance(x, Tensor) and isinstance(target, Tensor) and (x.is_nested or target.is_nested):
        _check_dense(fn, x, target)
    if not (cost in COSTS and reduction in REDUCTIONS and _network_ok(x, weights, biases, target)):
        _check_cost(fn, cost)
        _check_reduction(fn, reduction)
        _check_network_in_full(fn, x, weights, biases)
        _check_tensor(fn, "target", target, min_dim=1)
        expected = (*x.shape[:-1], weights[-1].shape[0])
        if tuple(target.shape) != expected:
            raise TensorValueError(
                f"{fn}(): target must have shape {expected} (the output's), got {tuple(target.shape)}"
            )
        _check_same(fn, "input", x, "target", target, dtype=cost == "cross_entropy" and _autocast_dtype(x) is None)
    if cost == "cross_entropy":
        _assert_unit_interval(fn, "target", target, "a probability")  # a^L is a sigmoid's: in [0, 1]
    x, params, dtype = _network_params(x, weights, biases)
    a_dtype = x.dtype  # a^L's, as the cost takes it
    if dtype is not None:
        # Autocast runs torch's losses in float32, float64 left as it is: a^L and the target both cast so
        a_dtype = torch.float64 if a_dtype == torch.float64 else torch.float32
        (target,) = _cast(torch.float32, target)
        if cost == "cross_entropy" and target.dtype != a_dtype:  # as binary_cross_entropy refuses two dtypes
            raise TensorTypeError(f"{fn}(): target must have the same dtype as the output a^L under autocast "
                                  f"({a_dtype}), got {target.dtype}")
    # The cost is computed in the wider of the two dtypes, as mse_loss promotes (a float64 target of a
    # float32 network: in float64), and δ^L goes down the network in the network's own.
    return x, _as(target, torch.promote_types(a_dtype, target.dtype)), params, dtype


def mlp(
    input: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None] | None = None,
    delta_hook: DeltaHook | None = None,
) -> Tensor:
    r"""The notes' sigmoid network ``a^l = φ(W^l a^{l-1} + b^l)`` as one autograd node.

    Equal to ``sigmoid(linear(... sigmoid(linear(input, weights[0], biases[0])) ...))``
    with a single backward that runs the recursion
    ``δ^{l-1} = φ'(z^{l-1}) ∘ (W^l)^T δ^l`` over all layers.
    ``delta_hook(layer_index, delta)``, if given, is called with each δ^l
    during backward (eager mode only).

    Shape:
        - input: ``(*, in_features)``; weights[l]: ``(out_l, in_l)``; biases[l]: ``(out_l,)`` or None
        - output: ``(*, out_features)`` of the last layer
    """
    _check_hook("mlp", delta_hook, "delta_hook(l, delta)")
    x, params, dtype = _check_network("mlp", input, weights, biases)
    function = _pick(MLPFunction, _MLPClassic, _MLP)
    if dtype is None:
        return function.apply(x, delta_hook, *params)[0]
    with _no_autocast(x):
        return function.apply(x, delta_hook, *params)[0]


def mlp_cost(
    input: Tensor, target: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None] | None = None,
    cost: str = "quadratic", reduction: str = "mean", delta_hook: DeltaHook | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The network and its cost as one autograd node: ``(C, a^L)``.

    ``C`` equals ``quadratic_cost(mlp(input, ...), target, reduction)`` (or
    :func:`cross_entropy_cost` with ``cost="cross_entropy"``); its backward
    starts the recursion at ``δ^L = ∇_a C ∘ φ'(z^L)`` itself, so the cost adds
    no autograd node of its own. ``a^L`` comes along for accuracy and the like.

    With ``cost="cross_entropy"`` the backward starts at ``δ^L = a^L − y``,
    the notes' cancellation done exactly, as
    :func:`torch.nn.functional.binary_cross_entropy_with_logits` differentiates.
    The composition ``cross_entropy_cost(mlp(...))`` goes through ``∇_a C``,
    whose ``a(1 − a)`` torch's guard clamps at 1e-12: where an output
    saturates (in float32 a = 1 past z ≈ 17, and a(1 − a) < 1e-12 below
    z ≈ −28, a = 0 past z ≈ −88) its δ^L shrinks to 0 (in float16, where
    the guard's 1/a(1 − a) overflows, it is nan) and that output stops
    learning, while here it still gets ``a^L − y``.
    Elsewhere the two agree to rounding; the cost's value is the same.
    Forward-mode AD (``torch.func.jvp``) takes the same δ^L.

    Shape:
        - input: ``(*, in_features)``; target: ``(*, out_features)``
        - output: ``C`` scalar, or ``(*)`` with ``reduction="none"``; ``a^L``: ``(*, out_features)``
    """
    _check_hook("mlp_cost", delta_hook, "delta_hook(l, delta)")
    x, target, params, dtype = _check_network_cost("mlp_cost", input, target, weights, biases, cost, reduction)
    function = _pick(MLPCostFunction, _MLPCostClassic, _MLPCost)
    if dtype is None:
        c, *activations = function.apply(x, target, cost, reduction, delta_hook, *params)
    else:
        # The cost runs in float32 under autocast, as torch's losses do (the target is cast); the network in x.dtype.
        with _no_autocast(x):
            c, *activations = function.apply(x, target, cost, reduction, delta_hook, *params)
    return c, activations[-1]
