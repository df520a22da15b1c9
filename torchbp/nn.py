"""Drop-in ``torch.nn`` modules built on torchbp's hand-written Functions.

:class:`Linear` and :class:`Sigmoid` match :class:`torch.nn.Linear` and
:class:`torch.nn.Sigmoid` (signature, parameters, initialisation, ``repr`` and
``state_dict`` keys), so state_dicts load both ways. :class:`MLP` is the notes'
network; :func:`convert` swaps torchbp's modules into any existing model.
"""

from __future__ import annotations

import copy
import numbers
import operator
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from torchbp import functional as F
from torchbp import sgd
from torchbp.functional import cross_entropy_cost, linear, mlp, mlp_cost, quadratic_cost, sigmoid

# torch.fx traces into the forward of every module but torch.nn's own; through these the forwards below
# each leave one call in its graph (torchvision's create_feature_extractor; FX quantization traces them, and
# leaves the calls in float) instead of torchbp's argument checks meeting a Proxy. fx.wrap takes names of this
# module's globals.
for _name in ("linear", "sigmoid", "quadratic_cost", "cross_entropy_cost", "mlp", "mlp_cost"):
    torch.fx.wrap(_name)
del _name

__all__ = ["Linear", "Sigmoid", "QuadraticCost", "CrossEntropyCost", "MLP", "convert"]

# is_fx_symbolic_tracing where torch has it: is_fx_tracing, the older one, is true under torch.export too,
# and newer versions log a warning when it is called
_fx_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", torch.fx._symbolic_trace.is_fx_tracing)


# While an fx Tracer runs it patches nn.Module.__call__ (to decide which modules are leaves): a cheaper first
# test than fx's flag, a thread-local read that raises and catches an AttributeError when unset (µs a step).
_module_call = nn.Module.__call__


def _tracing() -> bool:
    """Whether torch.compile, torch.export, torch.fx or torch.jit.trace traces this forward: a δ hook, a
    Python call in backward, stays out of the graph.

    (Asked of fx's own flag: a layer's input need not be a Proxy while fx traces, a buffer's is not.)
    """
    return (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or nn.Module.__call__ is not _module_call and _fx_tracing())


# hook(module, delta): called in backward with δ = ∇_z C of the Linear ``module``.
DeltaHook = Callable[["Linear", Tensor], None]


class Linear(nn.Linear):
    r"""Applies an affine linear transformation to the incoming data: :math:`y = xA^T + b`.

    The notes' ``z^l = W^l a^{l-1} + b^l`` with rows as samples. A subclass of
    :class:`torch.nn.Linear`: its parameters, initialisation (``reset_parameters``),
    ``repr`` and ``state_dict`` are nn.Linear's own, and ``isinstance(m, nn.Linear)``
    holds, so init loops and other code that looks for nn.Linear find it. The
    forward differs: it runs :class:`torchbp.functional.LinearFunction`, whose
    backward is the notes' ``∇_a = (W^l)^T δ^l``, ``∇_W C = δ^l (a^{l-1})^T``,
    ``∇_b C = δ^l``; and :meth:`register_delta_hook` lets hooks see that backward's δ^l.

    Args:
        in_features: size of each input sample
        out_features: size of each output sample
        bias: If set to ``False``, the layer will not learn an additive bias.
            Default: ``True``

    Shape:
        - Input: :math:`(*, H_{in})` where :math:`*` means any number of
          dimensions including none and :math:`H_{in} = \text{in\_features}`.
        - Output: :math:`(*, H_{out})` where all but the last dimension
          are the same shape as the input and :math:`H_{out} = \text{out\_features}`.

    Attributes:
        weight: the learnable weights of the module of shape
            :math:`(\text{out\_features}, \text{in\_features})`, initialised from
            :math:`\mathcal{U}(-\sqrt{k}, \sqrt{k})`, where :math:`k = \frac{1}{\text{in\_features}}`
        bias: the learnable bias of the module of shape :math:`(\text{out\_features})`,
            initialised from :math:`\mathcal{U}(-\sqrt{k}, \sqrt{k})` if ``bias`` is ``True``

    Examples::

        >>> m = torchbp.Linear(20, 30)
        >>> m(torch.randn(128, 20)).size()
        torch.Size([128, 30])
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._delta_hooks: OrderedDict[int, DeltaHook] = OrderedDict()

    def forward(self, input: Tensor) -> Tensor:
        # LinearFunction's backward hands its grad_output, δ^l, to the hooks; none while none is registered.
        return linear(input, self.weight, self.bias, delta_hook=self._backward_delta_hook())

    def register_delta_hook(self, hook: DeltaHook) -> RemovableHandle:
        """Call ``hook(module, delta)`` in every backward pass with δ = ∇_z C, shape ``(*, out_features)``.

        A backward calls the hooks registered when its forward ran (as
        :meth:`~torch.nn.Module.register_full_backward_hook` does). The hook
        must not modify ``delta``. Costs nothing while no hook is
        registered. A copy of the module (``copy.deepcopy``, pickle) has none.
        Eager mode only: a forward traced by ``torch.compile``, ``torch.export``,
        ``torch.fx`` or ``torch.jit.trace`` passes no hook to the backward (a
        Python call would break the graph, or stay in it after ``remove()``).
        Returns a handle whose ``remove()`` unregisters it.
        """
        if not callable(hook):  # (it is called only in backward: a bad one would fail there)
            raise TypeError(f"register_delta_hook(): hook must be a function called as hook(module, delta), "
                            f"got {type(hook).__name__}")
        handle = RemovableHandle(self._delta_hooks)
        self._delta_hooks[handle.id] = hook
        return handle

    def _backward_delta_hook(self) -> Callable[[Tensor], None] | None:
        """The delta hooks registered now, as one call for the backward of this forward; None if none.

        As for nn.Module's full backward hooks, the hooks that see a backward are those registered
        when its forward ran: one registered later waits for the next forward, one removed later
        still sees this backward.
        """
        if not self._delta_hooks or _tracing():
            return None
        hooks = tuple(self._delta_hooks.values())

        def call_delta_hooks(delta: Tensor) -> None:
            for hook in hooks:
                hook(self, delta)

        return call_delta_hooks

    def __getstate__(self):
        # A copy (copy.deepcopy, pickle, torch.save(model)) carries no δ hook: a hook belongs to
        # the module it was registered on, whose handle alone can remove it; a DeltaMonitor's
        # hook in a copy would record the copy under the original's names, after close() too.
        state = super().__getstate__()  # a copy of __dict__, less what nn.Module leaves out
        state["_delta_hooks"] = OrderedDict()
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_delta_hooks", OrderedDict())

    def __deepcopy__(self, memo):
        # What deepcopy does by itself, through the state above; defined so that torch's parametrize gives
        # a parametrized layer no __deepcopy__ of its own, which would copy __dict__ as it is, hooks included.
        # Its parametrized class's __getstate__ refuses pickling: the state is then the layer's own class's.
        own = type(self).__bases__[0] if parametrize.is_parametrized(self) else type(self)
        replica = self.__new__(type(self))
        memo[id(self)] = replica
        replica.__setstate__(copy.deepcopy(own.__getstate__(self), memo))
        return replica


class Sigmoid(nn.Sigmoid):
    r"""Applies the Sigmoid function element-wise: :math:`\text{Sigmoid}(x) = \sigma(x) = \frac{1}{1 + \exp(-x)}`.

    The notes' ``φ``; its backward is ``φ' = φ(1 − φ)`` from the saved output
    (:class:`torchbp.functional.SigmoidFunction`). A subclass of :class:`torch.nn.Sigmoid`
    whose forward runs that Function.

    Shape:
        - Input: :math:`(*)`, where :math:`*` means any number of dimensions.
        - Output: :math:`(*)`, same shape as the input.
    """

    def forward(self, input: Tensor) -> Tensor:
        return sigmoid(input)


class _Cost(nn.Module):
    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        F._check_reduction(type(self).__name__, reduction)
        self.reduction = reduction

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class QuadraticCost(_Cost):
    r"""The notes' cost :math:`C = \frac{1}{2}\|a - y\|^2` per sample, averaged over samples.

    Backward: ``∇_a C = a − y`` (:class:`torchbp.functional.QuadraticCostFunction`).
    The per-sample cost sums over the last dimension; ``reduction`` is
    ``"mean"`` over samples (default), ``"sum"`` or ``"none"``. Note
    ``QuadraticCost()(a, y) == 0.5 * ((a - y) ** 2).sum(-1).mean()``, which is
    not :class:`torch.nn.MSELoss` (that one averages over every element).
    As MSELoss, ``a`` and ``y`` of two floating dtypes give the cost in the
    wider one (a float64 target of a float32 network: a float64 cost).

    Shape:
        - Input a: :math:`(*, C)`; target y: :math:`(*, C)`, the same shape.
        - Output: scalar; :math:`(*)` with ``reduction="none"``.
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return quadratic_cost(input, target, self.reduction)


class CrossEntropyCost(_Cost):
    r"""The cross-entropy cost :math:`C = -\sum_j [y_j \ln a_j + (1 - y_j) \ln(1 - a_j)]` per sample.

    With a sigmoid output its δ^L is ``a − y``. Reduced like :class:`QuadraticCost`.
    As :class:`torch.nn.BCELoss`, ``a`` and ``y`` must have the same dtype.

    Shape:
        - Input a: :math:`(*, C)` in [0, 1]; target y: :math:`(*, C)`, the same shape.
        - Output: scalar; :math:`(*)` with ``reduction="none"``.
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy_cost(input, target, self.reduction)


# The layers MLP.__init__ builds, in turn: Linear, Sigmoid, Linear, ...
_BUILT = (Linear, Sigmoid)


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs forward (pre-)hooks or backward hooks of its own."""
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks)


def _global_hooks() -> bool:
    """Whether calling any module runs hooks registered for all of them (``register_module_forward_hook``...)."""
    return bool(_module._global_forward_pre_hooks or _module._global_forward_hooks
                or getattr(_module, "_global_backward_pre_hooks", None) or _module._global_backward_hooks)


class MLP(nn.Module):
    r"""The notes' sigmoid network: :math:`a^l = \varphi(W^l a^{l-1} + b^l)` for every layer.

    For ``sizes=[784, 30, 10]``: ``Linear(784, 30) → Sigmoid → Linear(30, 10) → Sigmoid``,
    the sigmoid on the output layer too, as in the notes. Children are named
    ``"0"``, ``"1"``, ... as in :class:`torch.nn.Sequential`, so the state_dict
    loads into ``nn.Sequential(nn.Linear(784, 30), nn.Sigmoid(), nn.Linear(30, 10),
    nn.Sigmoid())`` and back.

    Args:
        sizes: the width of every layer, input first: at least two positive ints
        bias: If set to ``False``, no layer learns a bias. Default: ``True``
        fused: If ``True``, the whole network is one autograd node
            (:class:`torchbp.functional.MLPFunction`) whose backward runs the
            notes' recursion over all layers in one call; same parameters and
            gradients, less overhead and, where the input needs no gradient and
            no delta hook is attached, less memory (the backward then runs on
            blocks of samples; not under torch.compile or torch.func transforms).
            While hooks must see the layers (forward or backward hooks on a
            layer, or registered for every module) it runs layer by layer.
            Default: ``False``
        device, dtype: as for :class:`torch.nn.Linear`; a floating-point
            ``dtype`` only: the network and its costs are the notes', real

    Shape:
        - Input: :math:`(*, \text{sizes}[0])`
        - Output: :math:`(*, \text{sizes}[-1])`

    Attributes:
        sizes: the widths the network was built with, a tuple; a layer replaced
            later (``model[0] = ...``) does not change them
    """

    def __init__(
        self, sizes: Sequence[int], bias: bool = True, fused: bool = False, device=None, dtype=None
    ) -> None:
        super().__init__()
        if not isinstance(fused, bool):
            raise TypeError(f"MLP: fused must be a bool, got {fused!r}")
        try:
            sizes = tuple(sizes)
        except TypeError:
            raise TypeError(f"MLP: sizes must be a sequence of ints (input first), got {sizes!r}") from None
        if len(sizes) < 2 or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > 0
                                     for n in sizes):
            raise ValueError(f"MLP: sizes must be at least two positive ints (input first), got {list(sizes)}")
        sizes = tuple(int(n) for n in sizes)  # numpy integers, say, as plain ints
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"MLP: dtype must be a torch.dtype or None, got {dtype!r}")
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            # the notes' network and its costs are real; Linear and Sigmoid take complex tensors by themselves
            raise TypeError(f"MLP: dtype must be a floating-point dtype (for a complex network, put torchbp.Linear "
                            f"and torchbp.Sigmoid in an nn.Sequential), got {dtype}")
        self.sizes = sizes
        self.fused = fused
        for l, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            self.add_module(str(2 * l), Linear(n_in, n_out, bias=bias, device=device, dtype=dtype))
            self.add_module(str(2 * l + 1), Sigmoid())

    @property
    def linears(self) -> list[Linear]:
        """The Linear layers W^1..W^L, input side first."""
        return list(self._modules.values())[0::2]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())

    def __getitem__(self, idx: int | slice) -> nn.Module:
        """Layer ``idx``; a slice is an nn.Sequential of those layers under their own names, as nn.Sequential's."""
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return self._modules[self._name(idx)]

    def __setitem__(self, idx: int, module: nn.Module) -> None:
        """Replace layer ``idx``, as in nn.Sequential: ``model[1] = nn.ReLU()`` (then it runs layer by layer)."""
        setattr(self, self._name(idx), module)

    def __delitem__(self, idx: int | slice) -> None:
        # (without it Python's `del model[i]` fails with a bare AttributeError: __delitem__)
        raise TypeError("MLP does not support deleting layers (nn.Sequential does); replace a layer with "
                        "model[idx] = module, or build the layers you want in an nn.Sequential")

    def _name(self, idx: int) -> str:
        """The name of layer ``idx``, counted from the end if negative; IndexError past the ends, as nn.Sequential."""
        size, idx = len(self._modules), operator.index(idx)
        if not -size <= idx < size:
            raise IndexError(f"index {idx} is out of range")
        return list(self._modules)[idx]

    def _per_layer(self) -> bool:
        """Whether the network must run layer by layer: not fused, a child replaced, or a child with hooks.

        The fused node computes Linear, Sigmoid, Linear, ... and never calls its children, so a
        replaced child (``model[1] = nn.ReLU()``) would not be computed, and forward (pre-)hooks and
        backward hooks would not run: nn.utils.spectral_norm, weight_norm and prune hooks among them,
        and hooks registered for every module (``torch.nn.modules.module.register_module_forward_hook``
        and its kin).
        """
        return (not self.fused or _global_hooks() or self._replaced() is not None
                or any(map(_has_hooks, self._modules.values())))

    def _replaced(self) -> str | None:
        """What differs from the Linear, Sigmoid, Linear, ... that __init__ built, or None if nothing does.

        Exact types: a subclass's forward may differ.
        """
        modules = self._modules
        if len(modules) != 2 * (len(self.sizes) - 1):
            return f"it has {len(modules)} layers where it was built with {2 * (len(self.sizes) - 1)}"
        for i, (name, m) in enumerate(modules.items()):
            built = _BUILT[i % 2]
            if type(m) is not built:
                got = f"{type(m).__module__}.{type(m).__qualname__}"
                return f"layer {name} is a {got} where it was built with a torchbp.{built.__name__}"
            if "forward" in m.__dict__:  # (patched on the instance, as tools that wrap layers do)
                return f"layer {name} has a forward of its own, set on the instance"
        return None

    def _forward_overridden(self) -> bool:
        """Whether a subclass or the instance has its own forward, which the fused cost and the steps by hand
        would skip."""
        return type(self).forward is not MLP.forward or "forward" in self.__dict__

    def forward(self, input: Tensor) -> Tensor:
        if self._per_layer():
            for module in self._modules.values():
                input = module(input)
            return input
        weights, biases, hook = self._params()
        return mlp(input, weights, biases, delta_hook=hook)

    def cost(self, input: Tensor, target: Tensor, cost: str = "quadratic", reduction: str = "mean") -> Tensor:
        """The cost of the network's output against ``target``: ``quadratic_cost(self(input), target)``.

        With ``fused=True`` network and cost are one autograd node whose
        backward starts at ``δ^L = (a^L − y) ∘ φ'(z^L)``; otherwise it is the
        per-layer composition. ``cost`` is ``"quadratic"`` (the notes) or
        ``"cross_entropy"``; ``reduction`` as in :func:`torchbp.functional.quadratic_cost`.
        The two paths differ only where a cross-entropy output saturates: see
        :func:`torchbp.functional.mlp_cost`.
        """
        if self._per_layer() or _has_hooks(self) or self._forward_overridden():
            # the MLP's own hooks and a subclass's forward run only when it is called: self(input), then the cost
            F._check_cost("MLP.cost", cost)
            F._check_reduction("MLP.cost", reduction)  # before the forward, as the fused path checks it
            fn = quadratic_cost if cost == "quadratic" else cross_entropy_cost
            a = self(input)
            if (isinstance(a, Tensor) and isinstance(target, Tensor) and not (a.is_nested or target.is_nested)
                    and target.shape != a.shape):  # (the cost's message would call the output its input)
                raise F.TensorValueError(f"MLP.cost(): target must have shape {tuple(a.shape)} (the output's), "
                                         f"got {tuple(target.shape)}")
            return fn(a, target, reduction)
        weights, biases, hook = self._params()
        return mlp_cost(input, target, weights, biases, cost, reduction, delta_hook=hook)[0]

    def sgd_step(
        self, input: Tensor, target: Tensor, lr: float, cost: str = "quadratic", reduction: str = "mean"
    ) -> Tensor:
        """One plain SGD step by hand: forward, the notes' backward, ``p ← p − lr ∇_p C``; returns C.

        Nielsen's ``update_mini_batch`` without autograd or an optimizer object
        (:func:`torchbp.sgd.mlp_sgd_step`): the parameters change in place,
        their ``.grad`` is left alone, delta hooks see every δ^l. The same
        update as ``self.cost(input, target).backward()`` then
        ``torch.optim.SGD(self.parameters(), lr).step()``, in a fraction of the time
        (that of a fused MLP's cost: an unfused one's differs where a
        cross-entropy output saturates, see :func:`torchbp.functional.mlp_cost`).

        No module is called, so the step refuses a network whose layers or
        itself have forward or backward hooks, a layer whose weight or bias
        is derived from other tensors (``parametrize``, ``prune``,
        ``weight_norm``, ``spectral_norm``): their parameters are not the ones
        the step would move, a layer replaced since the MLP was built, or a
        subclass's own ``forward``. Train those with :meth:`cost` and an optimizer.
        """
        weights, biases, hook = self._params(by_hand="MLP.sgd_step")
        return sgd.mlp_sgd_step(input, target, weights, biases, lr, cost, reduction, delta_hook=hook)

    def sgd_epoch(
        self, input: Tensor, target: Tensor, lr: float, batch_size: int, cost: str = "quadratic",
        reduction: str = "mean",
    ) -> Tensor:
        """:meth:`sgd_step` on every mini-batch of ``batch_size`` samples of ``input``, in order; returns each step's C.

        Nielsen's ``SGD`` epoch on data the caller has shuffled
        (:func:`torchbp.sgd.mlp_sgd_epoch`): the arguments are checked
        once, then every step runs only its tensor ops, with no host sync. A last,
        smaller mini-batch takes a step of its own. Output shape ``(steps,)``,
        or ``(N, *)`` with ``reduction="none"``. Refuses what :meth:`sgd_step` refuses.
        """
        weights, biases, hook = self._params(by_hand="MLP.sgd_epoch")
        return sgd.mlp_sgd_epoch(input, target, weights, biases, lr, batch_size, cost, reduction, delta_hook=hook)

    def _params(self, by_hand: str = "") -> tuple[list[Tensor], list[Tensor | None], F.DeltaHook | None]:
        """W^1..W^L, b^1..b^L and, while any layer has a delta hook, the hook for the fused backward.

        An autograd backward runs only with grad mode on, so the hook goes along only then;
        the steps by hand (``by_hand``, the caller's name) run their backward under ``torch.no_grad()``
        too, and refuse what they would get wrong silently.
        """
        linears = self.linears
        if by_hand:
            self._check_by_hand(by_hand)
        weights, biases, hooked = [], [], False
        for m in linears:
            # m._parameters[...] is m.weight without nn.Module.__getattr__'s detour (µs on every call);
            # a parametrized weight is a property instead, found by getattr.
            params = m._parameters
            weights.append(params["weight"] if "weight" in params else m.weight)
            biases.append(params["bias"] if "bias" in params else m.bias)
            hooked = hooked or bool(m._delta_hooks)
        if not (hooked and (by_hand or torch.is_grad_enabled())) or _tracing():
            return weights, biases, None
        # The hooks registered now, layer by layer, as Linear._backward_delta_hook takes them.
        hooks = [tuple(m._delta_hooks.values()) for m in linears]

        def call_delta_hooks(l: int, delta: Tensor) -> None:
            module = linears[l]
            for hook in hooks[l]:
                hook(module, delta)

        return weights, biases, call_delta_hooks

    def _check_by_hand(self, fn: str) -> None:
        """Refuse what a step by hand, which calls no module, would silently get wrong."""
        advice = "train it with MLP.cost(...).backward() and an optimizer"
        if _has_hooks(self) or _global_hooks():
            raise RuntimeError(f"{fn}(): the MLP has forward or backward hooks (of its own, or registered for "
                               f"every module), which a step by hand would not run; {advice}")
        if self._forward_overridden():
            whose = type(self).__name__ if "forward" not in self.__dict__ else "the instance's forward"
            raise RuntimeError(f"{fn}(): {whose} overrides MLP.forward, which a step by hand would not run; {advice}")
        for name, m in self._modules.items():
            if _has_hooks(m):
                raise RuntimeError(f"{fn}(): layer {name} ({type(m).__name__}) has forward or backward hooks "
                                   f"(prune, weight_norm and spectral_norm add one), which a step by hand would "
                                   f"not run; {advice}")
            if isinstance(m, Linear) and not ("weight" in m._parameters and "bias" in m._parameters):
                raise RuntimeError(f"{fn}(): layer {name}'s weight or bias is computed from other tensors "
                                   f"(a parametrization: torch.nn.utils.parametrize, "
                                   f"parametrizations.weight_norm, ...), so a step by hand would move a copy and "
                                   f"leave the parameters as they are; {advice}")
        replaced = self._replaced()  # after the checks above, which name a parametrized layer's cause
        if replaced is not None:
            raise RuntimeError(f"{fn}(): {replaced}, and a step by hand computes the network as built; {advice}")

    def extra_repr(self) -> str:
        return f"sizes={list(self.sizes)}, fused={self.fused}"


def _swap(module: nn.Module) -> None:
    """Turn an ``nn.Linear`` or ``nn.Sigmoid`` into torchbp's twin in place; leave anything else alone.

    Only the class changes, as torch's lazy modules change theirs once initialised: parameters (the
    same objects, so an optimizer built on them keeps working), hooks, training mode and any other
    attribute stay, and a module shared by several parents stays one module.
    """
    # Exact types only: a subclass's forward may differ from nn.Linear's (parametrized layers are subclasses).
    if type(module) is nn.Linear:
        module.__class__ = Linear
        module._delta_hooks = OrderedDict()
    elif type(module) is nn.Sigmoid:
        module.__class__ = Sigmoid


def convert(module: nn.Module, inplace: bool = False) -> nn.Module:
    """Make every :class:`torch.nn.Linear` and :class:`torch.nn.Sigmoid` inside ``module`` torchbp's.

    Works through any nesting (Sequential, ModuleList, ModuleDict, custom
    modules) and on ``module`` itself. Each layer keeps everything it had:
    its parameters (their values, dtype and device), its hooks, training mode
    and attributes, and a layer shared by several parents stays shared; the
    model then computes the same results and gradients through torchbp's
    hand-written backward. Subclasses of the two (parametrized layers among
    them), whose forward may differ, are left as they are.

    With ``inplace=False`` (default) ``module`` is deep-copied first: the
    result has Parameter objects of its own, so build the optimizer (and the
    DeltaMonitor) on the converted model, not on ``module``. With
    ``inplace=True`` the layers change class in place and keep their
    Parameter objects: an optimizer built on ``module`` goes on training it.

    Tools that find layers by their exact type rather than ``isinstance``
    (``torch.ao.quantization.quantize_dynamic(model, {nn.Linear})``) pass
    torchbp's layers by; run them before converting.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert(): module must be a torch.nn.Module, got {type(module).__name__}")
    for name, m in module.named_modules():  # all checked before any changes: no half-converted model
        _check_convertible(name, m)
    if not inplace:
        module = copy.deepcopy(module)
    for m in module.modules():  # each module once, however many parents share it
        _swap(m)
    return module


def _check_convertible(name: str, module: nn.Module) -> None:
    """Refuse a layer that convert() cannot turn into torchbp's, which it would otherwise leave as it is."""
    where = f"module {name!r}" if name else "the module"
    if isinstance(module, nn.LazyLinear):
        raise ValueError(f"convert(): {where} is a {type(module).__name__} with uninitialized parameters; run one "
                         "forward pass before converting")
    if type(module) in (nn.Linear, nn.Sigmoid) and "forward" in module.__dict__:
        raise TypeError(f"convert(): {where} is an nn.{type(module).__name__} with a forward of its own, set on the "
                        "instance (as tools that wrap layers do), which would still run instead of torchbp's; convert "
                        "the model before wrapping its layers")
    if isinstance(module, torch.jit.ScriptModule) and getattr(module, "original_name", None) in ("Linear", "Sigmoid"):
        raise TypeError(f"convert(): {where} is a TorchScript {module.original_name} (torch.jit.script), whose class "
                        "cannot change; convert the model before scripting it (torchbp's layers cannot be scripted)")
