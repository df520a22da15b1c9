"""Plain SGD with the notes' backpropagation done by hand: no autograd graph, no ``.grad``, no optimizer.

Nielsen's ``update_mini_batch`` and ``SGD`` epoch on the sigmoid network of
:func:`torchbp.functional.mlp`: the forward keeps a^0..a^L, the backward is
the notes' recursion

    δ^L       = ∇_a C ∘ φ'(z^L)
    δ^{l-1}   = φ'(z^{l-1}) ∘ (W^l)^T δ^l

and then every parameter moves, ``W^l ← W^l − η δ^l (a^{l-1})^T`` and
``b^l ← b^l − η δ^l`` (summed over the mini-batch), all in one in-place op in
eager mode. :class:`torchbp.MLP` offers them as
:meth:`~torchbp.MLP.sgd_step` and :meth:`~torchbp.MLP.sgd_epoch`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from torchbp.functional import (
    DeltaHook,
    TensorValueError,
    _activations,
    _as,
    _check_hook,
    _check_network_cost,
    _cost,
    _output_delta,
    _per_sample_weight,
    _reduce,
    _reduced_cost,
    _rows,
)

__all__ = ["mlp_sgd_step", "mlp_sgd_epoch"]


def _sigmoid_backward_(grad: Tensor, a: Tensor) -> Tensor:
    """φ'(z) = a(1 − a) times ``grad``, written over ``grad`` (aten's sigmoid_backward): no graph records it here."""
    return torch.ops.aten.sigmoid_backward.grad_input(grad, a, grad_input=grad)


def _check_sgd(
    fn: str, input: Tensor, target: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None] | None,
    lr: float, cost: str, reduction: str, delta_hook: DeltaHook | None,
) -> tuple[Tensor, Tensor, list[Tensor | None], list[bool], float]:
    """(x, target, [W^1, b^1, ..., W^L, b^L], which of them train, lr) for the steps by hand; raises on bad input.

    The quadratic cost's target comes back in the wider of its and the network's dtypes, as
    :func:`torchbp.functional.mlp_cost` promotes it (:func:`torchbp.functional._check_network_cost`).

    A parameter trains if it requires grad: one that does not is frozen, as autograd and an optimizer
    leave it. The parameters come back detached: under no_grad a tensor that requires grad still costs
    every op autograd's bookkeeping, its detached alias does not, and updating the alias in place (same
    storage, same version counter) updates the parameter.
    """
    if not isinstance(lr, numbers.Real) or isinstance(lr, bool):
        raise TypeError(f"{fn}(): lr must be a real number >= 0 (not a tensor), got {type(lr).__name__} {lr!r}")
    if not lr >= 0:
        raise ValueError(f"{fn}(): lr must be a real number >= 0, got {lr!r}")
    _check_hook(fn, delta_hook, "delta_hook(l, delta)")
    x, target, params, autocast_dtype = _check_network_cost(fn, input, target, weights, biases, cost, reduction)
    if autocast_dtype is not None:
        raise RuntimeError(
            f"{fn}(): autocast is enabled for {input.device.type}; the step updates the parameters in their "
            "own dtype, so run it outside autocast (or use mlp_cost(...).backward() with an optimizer)"
        )
    dtype = params[0].dtype
    # A Python float from here on: numpy's float32 would cast float64's max to inf here, and round lr/N to
    # float32 in the step.
    lr = float(lr)
    if not lr <= torch.finfo(dtype).max:
        # lr scales every update as the alpha of an add_, a number of the parameters' dtype
        raise ValueError(f"{fn}(): lr must be finite and at most {torch.finfo(dtype).max:.4g} (the largest "
                         f"{dtype}, the parameters' dtype), got {lr!r}")
    trains = [p is not None and p.requires_grad for p in params]
    # (tensor hooks and addresses are checked in eager calls: while torch.compile traces, no part of a graph.
    # Whether a non-leaf views a parameter it cannot tell from a computed tensor: the graph breaks there,
    # and fullgraph=True refuses it)
    eager = not torch.compiler.is_compiling()
    for i, (p, train) in enumerate(zip(params, trains)):
        if train and not (p.is_leaf or p._is_view() and p._base.is_leaf):
            # the step moves it in place: a view of a parameter (a flat parameter buffer) moves the
            # parameter, a computed tensor (a parametrization's weight, say) is a temporary and would not
            raise ValueError(f"{fn}(): {_param_name(i)} must be a parameter or a "
                             f"view of one to be trained in place, got one computed by {type(p.grad_fn).__name__}")
        if train and eager and _overlaps_itself(p):
            # an update in place would add to one element twice, or fail partway (foreach refuses it)
            raise ValueError(f"{fn}(): {_param_name(i)} has elements that are one in memory (shape "
                             f"{tuple(p.shape)}, strides {p.stride()}: expand() or as_strided() made it), which a "
                             "step in place cannot update; "
                             "train it with mlp_cost(...).backward() and an optimizer, which update its base")
        if train and eager and any(_grad_hooks(t) for t in (p, p._base) if t is not None):
            raise ValueError(f"{fn}(): {_param_name(i)} has gradient hooks (Tensor.register_hook, "
                             "register_post_accumulate_grad_hook), which a step by hand, forming no gradient, "
                             "would not run; train it with mlp_cost(...).backward() and an optimizer")
    if not any(trains):
        # As mlp_cost(...).backward() would: a cost that depends on nothing trainable has no gradient.
        raise ValueError(f"{fn}(): no weight or bias requires grad, so there is nothing to train")
    first: dict[int, int] = {}  # id -> the first index it is passed at
    for j, p in enumerate(params):
        i = first.setdefault(id(p), j) if p is not None else j
        if i != j:
            # Its gradient is the sum over its uses, which the step forms for no parameter.
            raise ValueError(f"{fn}(): weights and biases must be distinct tensors, got {_param_name(i)} passed "
                             f"again as {_param_name(j)} (tied weights); train those with mlp_cost(...).backward() "
                             "and an optimizer")
    n = len(params)
    while eager:
        shared = _shared_memory([*params, x, target], [*trains, False, False])
        if shared is None:
            break
        i, j = shared
        if j < n:  # tied through .data or one storage: the same hazard as a tensor passed twice
            raise ValueError(f"{fn}(): {_param_name(i)} and {_param_name(j)} share memory (tied weights); "
                             "train those with mlp_cost(...).backward() and an optimizer")
        # An input or target in a trained parameter's memory would be read after a step has moved it (an
        # epoch's later steps read theirs): the steps read a copy, as autograd forms every gradient before an
        # optimizer moves anything.
        if j == n:
            x = x.clone()
        else:
            target = target.clone()
    return x, target, [None if p is None else p.detach() for p in params], trains, lr


def _grad_hooks(t: Tensor) -> bool:
    """Whether autograd would call hooks of ``t``'s own with its gradient, or after accumulating it."""
    return bool(t._backward_hooks or getattr(t, "_post_accumulate_grad_hooks", None))


def _param_name(i: int) -> str:
    """weights[l] or biases[l] for the i-th of (W^1, b^1, ..., W^L, b^L)."""
    return f"{'biases' if i % 2 else 'weights'}[{i // 2}]"


def _shared_memory(params: Sequence[Tensor | None], trains: Sequence[bool]) -> tuple[int, int] | None:
    """Two of ``params`` (by index), one of them trained, that share an element; or None.

    Views of one flat parameter buffer, side by side or interleaved (column blocks), share none; a
    weight tied to another through ``.data`` does. Frozen tensors may alias each other: nothing
    writes them.
    """
    spans = []
    for i, p in enumerate(params):
        n = 0 if p is None or p.is_meta else p.numel()
        if n:
            # [first, last] byte the tensor can touch, as addresses: tensors of distinct storages never meet
            extent = n if p.is_contiguous() else sum((s - 1) * d for s, d in zip(p.shape, p.stride())) + 1
            first = p.data_ptr()
            spans.append((first, first + extent * p.element_size() - 1, i))
    spans.sort()
    for n, (_, last, i) in enumerate(spans):
        for first, _, j in spans[n + 1 :]:
            if first > last:
                break  # sorted: no later span starts inside this one
            if (trains[i] or trains[j]) and _share_an_element(params[i], params[j]):
                return min(i, j), max(i, j)
    return None


def _share_an_element(p: Tensor, q: Tensor) -> bool:
    """Whether two tensors whose spans of memory overlap have an element in common (exact, by address)."""
    if p.is_contiguous() and q.is_contiguous():
        return True  # a contiguous span is every one of its elements
    return bool(torch.isin(_addresses(p), _addresses(q)).any())


def _overlaps_itself(p: Tensor) -> bool:
    """Whether two elements of ``p`` are one in memory: a stride 0 (``expand``), or ``as_strided`` windows."""
    if p.is_meta:
        return False
    overlap = torch._debug_has_internal_overlap(p)  # 0: no, 1: yes, 2: the strides alone cannot tell
    if overlap != 2:
        return overlap == 1
    # Cheap and sufficient: dimensions by stride, each stride past the span of those below it (column
    # blocks, step slices); only odd as_strided windows are left to the addresses
    span = 0
    for stride, size in sorted((st, sz) for sz, st in zip(p.shape, p.stride()) if sz > 1):
        if stride <= span:
            return len(_addresses(p).unique()) < p.numel()
        span += (size - 1) * stride
    return False


def _addresses(t: Tensor) -> Tensor:
    """The address of every element of ``t``, (numel,)."""
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride()):  # (…) -> (…, size): each dimension's steps added
        offsets = offsets.unsqueeze(-1) + torch.arange(size) * stride
    return t.data_ptr() + offsets.flatten() * t.element_size()


@torch.no_grad()
def mlp_sgd_step(
    input: Tensor, target: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None] | None,
    lr: float, cost: str = "quadratic", reduction: str = "mean", delta_hook: DeltaHook | None = None,
) -> Tensor:
    r"""One step of plain SGD on the network, backpropagation by hand and no autograd at all.

    Nielsen's ``update_mini_batch``: the forward keeps a^0..a^L, the backward
    is the notes' recursion from δ^L = ∇_a C ∘ φ'(z^L), and then every
    parameter moves in place by ``−lr · ∇C``. No graph is built and no
    ``.grad`` is touched: each layer's ∇_W C = δ^T a and ∇_b C live only until
    the step's ``p ← p − lr ∇_p C`` (one foreach op in eager mode, each parameter
    rounded once, as torch.optim.SGD rounds it). Returns the cost before the step. Equal to
    ``torchbp.functional.mlp_cost(...)[0].backward()`` (``.sum().backward()``
    with ``reduction="none"``) followed by ``torch.optim.SGD(params, lr=lr).step()``:
    a weight or bias that does not require grad stays as it is, as a frozen
    parameter does there. A tensor passed twice, or two sharing memory (tied
    weights), is refused: its gradient would be the sum over its uses, which
    the step does not form; so is a trained view whose elements share memory
    (``expand()``, ``as_strided()`` windows). An input or target in a trained parameter's memory
    is read as it was before the step. Eager or ``torch.compile``
    (``delta_hook`` in eager mode only; compiled, the memory is not checked:
    addresses are no part of a graph, so tensors sharing memory are not
    refused; a weight or bias that views a parameter, as in a flat parameter
    buffer, breaks the graph where the step checks it, which
    ``fullgraph=True`` refuses: compile those without it); not under autocast.

    Shape:
        - input: ``(*, in_features)``; target: ``(*, out_features)``
        - output: ``C``, scalar (or ``(*)`` with ``reduction="none"``, whose sum is minimised)
    """
    x, target, params, trains, lr = _check_sgd(
        "mlp_sgd_step", input, target, weights, biases, lr, cost, reduction, delta_hook
    )
    a_L, diff = _sgd_step(x, target, params, trains, lr, cost, reduction, delta_hook, math.prod(x.shape[:-1]))
    return _reduced_cost(cost, a_L, target, reduction, diff)


@torch.no_grad()
def mlp_sgd_epoch(
    input: Tensor, target: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None] | None,
    lr: float, batch_size: int, cost: str = "quadratic", reduction: str = "mean",
    delta_hook: DeltaHook | None = None,
) -> Tensor:
    r"""Plain SGD through ``input`` one mini-batch of ``batch_size`` samples at a time: Nielsen's ``SGD`` epoch.

    The steps of :func:`mlp_sgd_step` on ``input[0:batch_size]``, then
    ``input[batch_size:2 * batch_size]``, and so on, in that order: shuffle
    beforehand, as ``SGD`` does (``perm = torch.randperm(len(x))``, then
    ``x[perm]``, ``y[perm]``). A last, smaller mini-batch takes a step of its
    own, as in Nielsen's network.py. The steps are those of :func:`mlp_sgd_step`, bit
    for bit, but the arguments are checked once for all of them, so each step
    costs only its tensor ops: at Nielsen's mini-batch of 10 the checks and
    calls of a separate :func:`mlp_sgd_step` per mini-batch are a third of the
    step's time or more. Returns every step's cost before its step, with no
    host sync on the way. The costs are formed once, after the last step,
    from each step's a^L (kept until then: one tensor the size of ``target``),
    and equal :func:`mlp_sgd_step`'s to rounding.

    Shape:
        - input: ``(N, *, in_features)``; target: ``(N, *, out_features)``
        - output: ``(steps,)``, ``steps = ceil(N / batch_size)``; ``(N, *)`` with ``reduction="none"``
    """
    fn = "mlp_sgd_epoch"
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool):
        raise TypeError(f"{fn}(): batch_size must be a positive int, got {type(batch_size).__name__} {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"{fn}(): batch_size must be a positive int, got {batch_size!r}")
    batch_size = int(batch_size)  # a numpy integer, say, as a plain int
    x, target, params, trains, lr = _check_sgd(
        fn, input, target, weights, biases, lr, cost, reduction, delta_hook
    )
    if x.dim() < 2:
        raise TensorValueError(f"{fn}(): input must have a leading samples dimension, (N, *, in_features), "
                               f"got shape {tuple(x.shape)}")
    per_row = math.prod(x.shape[1:-1])  # samples in each of input's rows: 1 for (N, in_features)
    outputs = []  # each step's a^L, from the parameters before its update
    # Every mini-batch as a view, all made in one call: (N, *, in) -> (B, *, in), B = batch_size but for
    # a shorter last one. (No samples, no mini-batch: split would still give one empty chunk.)
    batches = zip(x.split(batch_size), target.split(batch_size)) if len(x) else ()
    for x_batch, y_batch in batches:
        outputs.append(_sgd_step(x_batch, y_batch, params, trains, lr, cost, reduction, delta_hook,
                                 len(x_batch) * per_row)[0])
    if not outputs:
        return x.new_empty(x.shape[:-1] if reduction == "none" else 0)
    # The costs wait for the end: a few ops over the whole epoch instead of a reduction in every step.
    c = _cost(cost, torch.cat(outputs), target)  # each sample's C before its step: (N, *)
    if reduction == "none":
        return c
    # (N, *) -> (steps,): the whole mini-batches as the rows of one tensor, then the shorter last one
    whole = len(x) // batch_size * batch_size
    per_step = c[:whole].reshape(whole // batch_size, batch_size * per_row)  # (whole steps, B samples)
    per_step = per_step.mean(1) if reduction == "mean" else per_step.sum(1)
    if whole == len(x):
        return per_step
    return torch.cat((per_step, _reduce(c[whole:], reduction).reshape(1)))


def _update(params: list[Tensor], grads: list[Tensor], step: float) -> None:
    """``p ← p − step · g`` in place for every parameter ``p`` and its sum over samples ``g``, formed beforehand.

    Each parameter is rounded once, as torch.optim.SGD's step rounds it (eager, the same foreach op): an
    addmm_ or addmv_ into the parameter itself (as this step once did) adds the samples block by block on
    the CPU, rounding the parameter each time, and a small step moved it less or not at all (float32,
    65,536 samples: a bias left unmoved by an update of 8 ulps). Compiled, each update is a product and a
    sub_: Dynamo pins a float alpha to its value (one graph per lr of a schedule), where a tensor times lr
    leaves lr an input of the graph.
    """
    if torch.compiler.is_compiling():
        for p, g in zip(params, grads):
            p.sub_(g * step)
    else:
        torch._foreach_add_(params, grads, alpha=-step)


def _sgd_step(
    x: Tensor, target: Tensor, params: Sequence[Tensor | None], trains: Sequence[bool], lr: float, cost: str,
    reduction: str, delta_hook: DeltaHook | None, n: int,
) -> tuple[Tensor, Tensor]:
    """:func:`mlp_sgd_step` on checked arguments, under ``torch.no_grad()``; ``n`` counts the samples.

    Only the parameters that ``trains`` marks move; the recursion goes down as far as the lowest of them.

    Returns a^L, the output before the step, and a^L − y: the caller forms the cost from them (an
    epoch forms all its steps' costs at once, after the last).
    """
    # a^0..a^L, each a^l written over its z^l; a^0..a^{L-1} are dropped as their layers finish
    a = [x, *_activations(x, params, overwrite_z=True)]
    a_L = a[-1]  # goes back to the caller, for the cost
    # dC/dC_n multiplies every δ^l, so it rides on the step size instead of costing an op per step; but
    # float16 cannot hold a sum of many samples' δ (65,504 at most: it overflowed, and the parameters with
    # it), so there it scales δ^L itself, as mlp_cost's backward does, and the sums are the gradient.
    weight = _per_sample_weight(n, reduction)
    scaled = weight != 1 and a_L.dtype == torch.float16
    # δ^L per sample, from ∇_a C = a^L − y (the cost's dtype is the target's, promoted: a float64 target of a
    # float32 network gives a float64 a^L − y, and δ^L goes down in the network's dtype, as in mlp_cost's backward)
    a_y = _as(a_L, target.dtype)
    diff = a_y - target
    delta = _as(_output_delta(cost, a_y, diff * weight if scaled else diff), a_L.dtype)
    step = lr if scaled else lr * weight if n else 0.0  # no samples, no step (the mean's weight is nan)
    # The parameters move together at the end, in one op: each layer's (W^l)^T δ^l is taken first anyway.
    moving, grads = [], []
    for l in range(len(params) // 2, 0, -1):  # l = L, ..., 1
        weight_l, bias_l = params[2 * l - 2], params[2 * l - 1]
        if delta_hook is not None:
            delta_hook(l - 1, delta if scaled else delta * weight)  # the δ^l of the reduced cost, as autograd sees it
        # (W^l)^T δ^l, taken before W^l moves, where a layer below trains: (*, out) @ (out, in) -> (*, in)
        back = delta @ weight_l if any(trains[: 2 * l - 2]) else None
        if trains[2 * l - 2]:
            # W^l ← W^l − η δ^l (a^{l-1})^T, summed over samples: (out, N) @ (N, in) -> (out, in)
            moving.append(weight_l)
            grads.append(_rows(delta).mT @ _rows(a[l - 1]))
        if trains[2 * l - 1]:
            # b^l ← b^l − η δ^l, summed over samples: (N, out) -> (out,)
            moving.append(bias_l)
            grads.append(_rows(delta).sum(0))
        delta = None  # δ^l is spent
        if back is None:
            break  # no layer below trains
        # δ^{l-1} = φ'(z^{l-1}) ∘ (W^l)^T δ^l, written over (W^l)^T δ^l: no graph needs it
        delta = _sigmoid_backward_(back, a[l - 1])
        a[l - 1] = None  # a^{l-1} is spent too: layer l-1 holds a^0..a^{l-2}, δ^{l-1} and its (W^{l-1})^T δ^{l-1}
    _update(moving, grads, step)
    return a_L, diff
