"""Per-layer δ statistics, recorded in backward through :meth:`torchbp.Linear.register_delta_hook`.

δ^l = ∇_{z^l} C is what the notes' recursion carries from layer to layer; its
size per layer shows whether early layers learn as fast as late ones (the
vanishing gradient of Nielsen's *Neural Networks and Deep Learning*, ch. 5).

Usage::

    monitor = torchbp.DeltaMonitor(model)          # hooks every torchbp Linear
    for step, (x, y) in enumerate(loader):
        opt.zero_grad()
        model.cost(x, y).backward()                # δ statistics recorded here
        opt.step()
        if step % 100 == 0:
            stats = monitor.pop()                  # {"0": {"norm": ..., ...}, "2": {...}}
    monitor.close()                                # or: with torchbp.DeltaMonitor(model) as monitor:

Cost while attached: no host-device synchronisation per step. The hook only
keeps a reference to δ; every ``flush_every`` backward passes (or once the
held δ reach ``max_held_bytes``) the statistics of all held passes are computed
in a handful of batched ops and added to one small device accumulator per
layer; :meth:`DeltaMonitor.pop` reads them with one copy per device. Without a
monitor no hook exists and torchbp does no extra work.

What is recorded where:

- ``torch.no_grad()``: no autograd backward pass, nothing recorded; but the
  steps by hand (:meth:`torchbp.MLP.sgd_step`, :meth:`torchbp.MLP.sgd_epoch`)
  run their backward anyway, and every step's δ is recorded.
- ``torch.func`` transforms (``grad``, ``jacrev``, ``vmap`` over them, and the
  backward of a forward run under ``vmap``, whose δ is batched too): the hooks
  do run, on functorch's wrapped tensors; the monitor skips those passes, with
  a warning the first time (recording from inside a transform would mutate a
  captured tensor, which functorch refuses). ``torch.func.vjp``'s backward
  runs outside the transform and is recorded.
- ``torch.compile``, ``torch.export``, ``torch.jit.trace``: a traced forward
  passes no hook to its backward (a Python call would break the graph), so
  nothing is recorded, and nothing warns.
- ``torch.autograd.gradcheck`` / ``gradgradcheck``: their backward passes are
  real and are recorded; wrap them in ``with monitor.paused():`` to skip them.
- ``backward(create_graph=True)``: recorded; δ is detached first. The
  backward of a gradient penalty then formed runs every Linear's backward
  again: a second pass, whose δ is the penalty's ∂/∂z, counted alongside.
- A Linear applied k times in one forward gets k δ per backward pass; each
  counts as one pass in the averages.
- A backward asked for some parameters only (``torch.autograd.grad(C, params)``,
  ``backward(inputs=...)``): per-layer nodes the engine does not need never
  run, so only the layers on the way report; a fused MLP's node runs its
  whole recursion, and every layer reports.
- ``torch.amp.GradScaler``: the backward runs on the scaled cost, so every
  statistic is the scale factor times the unscaled one (divide by
  ``scaler.get_scale()``, or log where the loss is not scaled).
- Gradient accumulation over k micro-batches: each micro-batch's backward is
  a pass of its own, with its own N; ``norm`` is then a micro-batch's
  ‖∇_b C‖ scaled as the cost you backpropagate, not the accumulated step's.
- Copies of the model (``copy.deepcopy``, pickle) are not monitored; a
  monitor records the modules it was given. A copy of the monitor holds
  what it had recorded, closed.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import numbers
import threading
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch._C._functorch import is_functorch_wrapped_tensor
from torch._subclasses.fake_tensor import FakeTensor

from torchbp.nn import Linear

__all__ = ["DeltaMonitor"]

REDUCTIONS = ("mean", "sum")
STATS = ("norm", "sample_norm", "max_abs")


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / torch.compile wrappers.

    Layer names then match between a rank's log and a single-process run.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def to_host(tensors: dict[str, Tensor]) -> dict[str, float | list]:
    """``tensors``' values as Python floats (lists for non-scalars), in float64, with one copy per device.

    Tensors of one device must share a shape: they are stacked and read at once, the only
    host-device synchronisation.
    """
    by_device: dict[torch.device, list[str]] = {}
    for name, t in tensors.items():
        by_device.setdefault(t.device, []).append(name)
    values: dict[str, float | list] = {}
    for names in by_device.values():
        values.update(zip(names, torch.stack([tensors[name].double() for name in names]).tolist()))
    return {name: values[name] for name in tensors}


def named_linears(model: nn.Module) -> dict[str, Linear]:
    """Every torchbp Linear inside ``model`` by qualified name, wrappers (DDP, compile) unwrapped."""
    return {name: m for name, m in _unwrap(model).named_modules() if isinstance(m, Linear)}


class DeltaMonitor:
    r"""Records ‖δ^l‖ statistics of every torchbp :class:`~torchbp.Linear` in ``model`` on every backward pass.

    Per layer (named by its qualified module name, as ``model.named_modules()``
    gives it; DistributedDataParallel, DataParallel and ``torch.compile``
    wrappers are looked through, so names are those of the inner model, though
    a compiled forward's pass is not recorded, nor those of DataParallel's
    replicas on several devices, each a part of the batch) and per
    backward pass, with δ of shape ``(*, out_features)`` read as ``N`` samples
    (all leading dimensions flattened) of ``out_features`` each:

    - ``norm``: :math:`\|\sum_n \delta^l_n\|_2 = \|\nabla_{b^l} C\|_2`, the norm of the
      bias gradient (the "speed of learning" Nielsen plots per layer, ch. 5);
    - ``sample_norm``: the mean over samples of :math:`\|\delta^l_n\|_2`, with the
      batch-size factor of a mean-reduced cost removed: for ``reduction="mean"``
      each δ_n carries a factor 1/N, so the mean is multiplied by N (i.e. it is
      :math:`\sum_n \|\delta^l_n\|_2`); for ``reduction="sum"`` no factor;
      either way it is the per-sample δ of the notes;
    - ``max_abs``: :math:`\max |\delta^l|` over all entries.

    :meth:`pop` returns each statistic averaged over the passes since the last
    pop (``max_abs`` too: the mean of the per-pass maxima). A pass with no
    samples (an empty δ) is not counted. Each δ is held by reference until its
    statistics are computed, up to ``flush_every`` passes later: a gradient
    that reaches a Linear unchanged (``linear(x).backward(g)``) must not be
    modified in place before then.

    Args:
        model: any module holding torchbp Linear layers (an :class:`~torchbp.MLP`,
            fused or not, a :func:`torchbp.convert`-ed model, nested containers,
            a DistributedDataParallel-wrapped model)
        reduction: the reduction of the cost that is backpropagated, ``"mean"``
            (default) or ``"sum"``; only ``sample_norm`` depends on it
        keep_last: keep the last δ of every layer (detached) in
            :attr:`last_delta`, e.g. for histograms. Default: ``False``
        flush_every: how many passes' δ are held before their statistics are
            computed together (fewer, larger ops; 1 computes them every pass).
            Default: 32
        max_held_bytes: compute earlier once a layer's held δ take this many
            bytes. Default: 32 MiB

    Use as a context manager, or call :meth:`close`, to remove the hooks.
    """

    def __init__(
        self, model: nn.Module, reduction: str = "mean", keep_last: bool = False,
        flush_every: int = 32, max_held_bytes: int = 32 * 2**20,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"DeltaMonitor: model must be a torch.nn.Module, got {type(model).__name__}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"DeltaMonitor: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not isinstance(keep_last, bool):
            raise TypeError(f"DeltaMonitor: keep_last must be a bool, got {keep_last!r}")
        for name, value in (("flush_every", flush_every), ("max_held_bytes", max_held_bytes)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DeltaMonitor: {name} must be a positive int, got {value!r}")
        linears = named_linears(model)
        if not linears:
            raise ValueError(
                f"DeltaMonitor: model ({type(model).__name__}) holds no torchbp.Linear; "
                "build it from torchbp modules or pass it through torchbp.convert() first (which converts "
                "torch.nn.Linear layers, not subclasses of it: parametrized ones, MultiheadAttention's projection)"
            )
        self.reduction = reduction
        self.keep_last = keep_last
        self.flush_every = int(flush_every)  # numpy's integers as plain ints
        self.max_held_bytes = int(max_held_bytes)
        self.layer_names: tuple[str, ...] = tuple(linears)
        #: The last δ of every layer (detached), filled while ``keep_last`` is True.
        self.last_delta: dict[str, Tensor] = {}
        self._paused = 0  # paused() blocks open now, in any thread
        self._warned: set[str] = set()  # the kinds of pass skipped with a warning so far
        # Backward passes may run in several threads at once (DataParallel's devices, a user's threads): a
        # pass's δ is held without a lock (a deque's append is atomic), and the held ones are reduced and
        # counted one thread at a time, each flush taking those held when it starts. Reentrant: the garbage
        # collector may end a paused() block (a generator left inside one) in the middle of a flush.
        self._lock = threading.RLock()
        self._held: dict[str, collections.deque[Tensor]] = {name: collections.deque() for name in linears}
        self._held_bytes: dict[str, int] = dict.fromkeys(linears, 0)
        # Per layer: sums of (norm, sample_norm, max_abs) over passes, on δ's device; passes as ints.
        self._sums: dict[str, Tensor] = {}
        self._passes: dict[str, int] = dict.fromkeys(linears, 0)
        self._handles = [m.register_delta_hook(self._hook(name)) for name, m in linears.items()]

    # ---------------------------------------------------------------- backward

    def _hook(self, name: str):
        held = self._held[name]

        def hook(module: Linear, delta: Tensor) -> None:
            if delta.is_nested:
                delta = delta.values()  # variable-length sequences: their rows, packed, are the samples
            if self._paused or not self._handles:
                return  # paused, or closed since the forward
            if is_functorch_wrapped_tensor(delta):
                self._skip("transform", "a backward pass under a torch.func transform (grad, jacrev, vmap, or of "
                           "a forward run under vmap) is not recorded")
                return
            # (its δ holds that replica's samples only; read from __dict__: nn.Module's getattr of a missing
            # attribute raises and catches an AttributeError, µs on every pass)
            if module.__dict__.get("_is_replica", False):
                self._skip("replica", "the replicas of an nn.DataParallel on several devices each see a part of "
                           "the batch, which is no pass of its own, and are not recorded (DistributedDataParallel "
                           "is: each process its own)")
                return
            nbytes = delta.nbytes
            if nbytes == 0 or delta.is_meta or isinstance(delta, FakeTensor):
                return  # a pass with no samples, or with no values (meta, FakeTensorMode): no δ to measure
            if delta.requires_grad:  # backward(create_graph=True): keep no graph alive
                delta = delta.detach()
            if self.keep_last:
                self.last_delta[name] = delta
            # Only a reference here, no op: the statistics are computed for many passes at once.
            held.append(delta)
            self._held_bytes[name] += nbytes  # (threads may race on it: a flush then comes a pass early or late)
            if len(held) >= self.flush_every or self._held_bytes[name] >= self.max_held_bytes:
                with self._lock:
                    self._flush(name)

        return hook

    def _skip(self, kind: str, what: str) -> None:
        """Skip a pass, but not silently: a warning the first time one of this ``kind`` is skipped."""
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"DeltaMonitor: {what}; this one and any like it are skipped", stacklevel=3)

    def _flush(self, name: str) -> None:
        """Add the statistics of the held passes of layer ``name`` to its accumulator (under the lock).

        Those held when it starts: another thread's backward may hold one more meanwhile, for the next flush.
        Taken out before they are reduced: the passes a reduction fails on are dropped, or every later
        backward would fail on the same δ.
        """
        held = self._held[name]
        passes = [held.popleft() for _ in range(len(held))]
        self._held_bytes[name] = 0
        if passes:
            # A pop() inside torch.inference_mode() (logging in an eval block) must not make the
            # accumulator an inference tensor: a later flush, outside, could not add to it.
            with torch.inference_mode(False):
                self._reduce(name, passes)

    def _reduce(self, name: str, held: list[Tensor]) -> None:
        # Passes of the same shape, dtype and device are stacked and reduced together: (K, N, out).
        # (A model moved by .to() between pops gives δ of both kinds in one window.)
        groups: dict[tuple, list[Tensor]] = {}
        for delta in held:
            groups.setdefault((delta.shape, delta.dtype, delta.device), []).append(delta)
        for deltas in groups.values():
            out = deltas[0].shape[-1]
            delta = torch.stack(deltas).reshape(len(deltas), -1, out)  # (K, *, out) -> (K, N, out)
            n = delta.shape[1]
            # Sums over N samples in at least float32: a float16 Σ overflows at 65504, bf16 rounds.
            dtype = torch.promote_types(delta.dtype, torch.float32)
            # ∇_b C = Σ_n δ_n per pass: (K, N, out) -> (K, out) -> (K,) norms
            norm = torch.linalg.vector_norm(delta.sum(1, dtype=dtype), dim=1)
            # Σ_n ‖δ_n‖ per pass: (K, N, out) -> (K, N) -> (K,); with a mean-reduced cost, N · mean_n ‖δ_n‖
            sample_norm = torch.linalg.vector_norm(delta, dim=2, dtype=dtype).sum(1)
            if self.reduction == "sum":
                sample_norm = sample_norm / n
            # max |δ| per pass: (K, N·out) -> (K,) (max(max, −min): much faster on CPU than the
            # inf-norm; exact in δ's own dtype)
            flat = delta.reshape(len(deltas), -1)
            if flat.is_complex():  # complex δ has no order: the largest modulus
                max_abs = flat.abs().amax(1)
            else:
                max_abs = flat.amax(1).maximum(flat.amin(1).neg_())
            # (3, K) -> (3,): each statistic summed over the passes (real: complex δ has real norms)
            sums = torch.stack([norm, sample_norm, max_abs.to(norm.dtype)]).sum(1)
            self._accumulator(name, sums.dtype, delta.device).add_(sums)
            self._passes[name] += len(deltas)  # counted with their sums: a later group's failure leaves them be

    def _accumulator(self, name: str, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Layer ``name``'s sums of (norm, sample_norm, max_abs), wide enough for ``dtype``, on ``device``.

        Follows the model when it changes dtype (``.double()``) or device (``.to("cuda")``)
        between pops: the sums so far are converted, not lost.
        """
        acc = self._sums.get(name)
        if acc is None:
            acc = torch.zeros(3, dtype=dtype, device=device)
        elif acc.device != device or torch.promote_types(acc.dtype, dtype) != acc.dtype:
            acc = acc.to(device=device, dtype=torch.promote_types(acc.dtype, dtype))
        self._sums[name] = acc
        return acc

    # ---------------------------------------------------------------- public

    def pop(self) -> dict[str, dict[str, float]]:
        """``{layer: {"norm", "sample_norm", "max_abs"}}`` averaged over the passes since the last pop; resets.

        Layers without a backward pass since the last pop are left out. The
        only host-device synchronisation of the monitor: one copy per device.
        """
        with self._lock:
            for name in self.layer_names:
                self._flush(name)
            names = [name for name in self.layer_names if self._passes[name]]
            sums = to_host({name: self._sums[name] for name in names})  # (3,) per layer
            result = {name: {stat: value / self._passes[name] for stat, value in zip(STATS, sums[name])}
                      for name in names}
            for name in names:
                self._sums[name].zero_()
                self._passes[name] = 0
        return result

    @contextlib.contextmanager
    def paused(self) -> Iterator[DeltaMonitor]:
        """Within this block backward passes are not recorded (e.g. around ``gradcheck``).

        Those of every thread: a backward may run in another thread than its caller's (autograd runs
        a CUDA backward in a thread of the device's own). Blocks may nest and overlap across threads;
        recording resumes when the last one ends.
        """
        with self._lock:
            self._paused += 1
        try:
            yield self
        finally:
            with self._lock:
                self._paused -= 1

    def close(self) -> None:
        """Remove the hooks. What was recorded so far can still be popped.

        A backward after ``close()`` records nothing, even that of a forward run before it (where a plain
        delta hook removed in between still sees that backward).
        """
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> DeltaMonitor:
        if not self._handles:  # a closed monitor would record nothing in the block, silently
            raise RuntimeError("DeltaMonitor: closed, its hooks are removed; create a new DeltaMonitor(model)")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __copy__(self) -> DeltaMonitor:
        # What it had recorded, its own: a shallow copy would share (and add to) the original's sums.
        return copy.deepcopy(self)

    def __getstate__(self) -> dict:
        # A copy (copy.deepcopy, pickle) holds what was recorded, closed: the hooks stay with the original
        # monitor, which alone records into it (a copy that said it was attached recorded nothing).
        # A lock is neither copied nor pickled: a copy gets a lock of its own.
        # Another thread's backward may add to the containers while they are copied (a held δ, a layer's
        # first sums or last δ): each is taken as it is now, by one call that lets no other thread in.
        state = {key: value.copy() if isinstance(value, (dict, set)) else value
                 for key, value in self.__dict__.items() if key != "_lock"}
        state["_handles"] = []
        state["_held"] = {name: list(held) for name, held in self._held.items()}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        # deques, also from a monitor pickled when the held δ were lists
        self._held = {name: collections.deque(held) for name, held in self._held.items()}

    def __repr__(self) -> str:
        return (
            f"DeltaMonitor(layers={list(self.layer_names)}, reduction={self.reduction!r}, "
            f"keep_last={self.keep_last}, attached={bool(self._handles)})"
        )
