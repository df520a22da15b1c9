"""δ dashboards in TensorBoard: per-layer scalars, δ histograms and one "δ norm by layer" chart.

It writes to a ``SummaryWriter`` you pass (which needs the ``tensorboard``
package) and imports nothing of tensorboard itself; import it explicitly
(``import torchbp.tensorboard``), ``import torchbp`` never does.
One call per logging step writes everything a :class:`~torchbp.DeltaMonitor`
recorded since the last one, into the writer's own run folder (never
``add_scalars``, which makes one run folder per key). Tags are named by layer:
give each monitored model a writer (a run folder) of its own, and TensorBoard
compares the models' charts side by side; or, for two models in one run (a
GAN's generator and discriminator), a ``prefix`` each (``"G/"``, ``"D/"``)::

    from torch.utils.tensorboard import SummaryWriter
    import torchbp
    from torchbp.tensorboard import log_deltas

    model = torchbp.MLP([784, 30, 30, 10])
    writer = SummaryWriter("runs/mlp")
    with torchbp.DeltaMonitor(model, keep_last=True) as monitor:
        for step, (x, y) in enumerate(batches):
            opt.zero_grad(); model.cost(x, y).backward(); opt.step()
            if step % 100 == 0:
                log_deltas(writer, monitor, step, model=model, hist_every=1000)
    writer.close()   # then: tensorboard --logdir runs  (CUSTOM SCALARS tab: δ norm by layer)

Tags, per layer name ``<layer>`` (the qualified module name), after the
``prefix``: ``delta/norm/<layer>``, ``delta/sample_norm/<layer>``,
``delta/max_abs/<layer>`` (see :class:`~torchbp.DeltaMonitor`),
``grad/weight_norm/<layer>`` (‖∇_W C‖ of the weight's ``.grad`` at the logging
step) and ``delta/hist/<layer>``.

The custom-scalars layout (the "δ norm by layer" charts) is one per run in
TensorBoard, the last one written: ``log_deltas`` writes it on its first call
for a writer (again, merged, when a new ``prefix`` comes). A script that writes
a layout of its own adds ``delta_layout()``'s category to it and passes
``layout=False``.
"""

from __future__ import annotations

import numbers
import re

import torch
from torch import nn

from torchbp.monitor import STATS, DeltaMonitor, named_linears, to_host

__all__ = ["log_deltas", "delta_layout", "write_layout"]

# Kept on a writer: the prefixes whose charts its layout holds, and per prefix the step of the last
# log_deltas call, for the histograms' cadence.
_LAYOUT_PREFIXES = "_torchbp_delta_layout_prefixes"
_LAST_STEP = "_torchbp_delta_last_step"

_CHARTS = (
    ("δ norm by layer", "delta/norm"),
    ("mean per-sample ‖δ‖ by layer", "delta/sample_norm"),
    ("max |δ| by layer", "delta/max_abs"),
    ("weight gradient norm by layer", "grad/weight_norm"),
)


def _tag(prefix: str, layer: str) -> str:
    return f"{prefix}/{layer or 'model'}"  # the model itself may be the Linear: its name is ""


def _check_prefix(fn: str, prefix: object) -> None:
    if not isinstance(prefix, str):
        raise TypeError(f"{fn}(): prefix must be a str, got {type(prefix).__name__}")


def delta_layout(prefix: str = "") -> dict:
    """The custom-scalars layout: one category, one multiline chart per statistic, every layer a line.

    Chart tags are regular expressions in TensorBoard: each chart takes every
    tag under its statistic (``^delta/norm/``), whatever the layers are called.
    So every run writes the same layout, and TensorBoard, which merges the runs'
    layouts and drops identical charts, shows each chart once for runs of any
    depth side by side. With a ``prefix`` the category and its tags carry it.
    """
    _check_prefix("delta_layout", prefix)
    category = f"torchbp δ by layer{f' ({prefix})' if prefix else ''}"
    charts = {title: ["Multiline", [f"^{re.escape(prefix + stat)}/"]] for title, stat in _CHARTS}
    return {category: charts}


def write_layout(writer, prefix: str = "") -> None:
    """Write :func:`delta_layout` to ``writer``, with the charts of every prefix written to it before.

    ``log_deltas`` does this by itself, on its first call for a writer and prefix.
    """
    _check_prefix("write_layout", prefix)
    prefixes = getattr(writer, _LAYOUT_PREFIXES, [])
    prefixes = prefixes + [prefix] if prefix not in prefixes else prefixes
    layout = {}
    for p in prefixes:
        layout.update(delta_layout(p))
    writer.add_custom_scalars(layout)
    setattr(writer, _LAYOUT_PREFIXES, prefixes)


def log_deltas(
    writer, monitor: DeltaMonitor, step: int, model: nn.Module | None = None, hist_every: int = 0,
    prefix: str = "", layout: bool = True,
) -> dict:
    """Write what ``monitor`` recorded since the last call at ``step``; returns the popped statistics.

    Writes ``delta/{norm,sample_norm,max_abs}/<layer>`` from :meth:`DeltaMonitor.pop`;
    with ``model``, ``grad/weight_norm/<layer>`` of every torchbp Linear's
    ``weight.grad`` (none for a parametrized weight, whose gradient is on
    the parametrization's tensors); with ``hist_every > 0``, histograms ``delta/hist/<layer>``
    of the last δ (of |δ| for a complex layer) of every layer with a pass since the last call (needs
    ``DeltaMonitor(..., keep_last=True)``) whenever a multiple of
    ``hist_every`` lies between the last call's step (excluded) and ``step``
    (the first call, or a step at or before the last one: at ``step``
    itself): for ``hist_every=1000``, at steps 0, 1000, 2000, ... when
    logging every 100 steps, and at 1099, 2099, ... when logging at 99, 199,
    ...; and, on the first call for this writer and prefix, the
    custom-scalars layout (:func:`delta_layout`). Every argument is checked
    before anything is popped or written.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter``
        monitor: the :class:`~torchbp.DeltaMonitor` attached to the model
        step: the global step for every value written
        model: the monitored model, for the weight-gradient norms (optional)
        hist_every: write histograms about every this many steps; 0 (default) never
        prefix: put before every tag (``"G/"``: ``G/delta/norm/<layer>``), to
            tell apart models logged to one writer. Default: ``""``
        layout: write the layout on the first call. Default: ``True``; ``False``
            where the script writes a custom-scalars layout of its own (see
            the module's docstring)
    """
    # Every argument is checked before monitor.pop(): a bad one must not lose the popped statistics.
    for method in ("add_scalar", "add_histogram", "add_custom_scalars"):
        if not callable(getattr(writer, method, None)):
            raise TypeError(
                f"log_deltas(): writer must be a SummaryWriter (with {method}()), got {type(writer).__name__}"
            )
    if not isinstance(monitor, DeltaMonitor):
        raise TypeError(f"log_deltas(): monitor must be a torchbp.DeltaMonitor, got {type(monitor).__name__}")
    if not isinstance(step, numbers.Integral) or isinstance(step, bool):
        raise TypeError(f"log_deltas(): step must be an int, got {type(step).__name__}")
    step = int(step)  # np.int64 and other integers, as SummaryWriter takes them
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"log_deltas(): model must be a torch.nn.Module or None, got {type(model).__name__}")
    if not isinstance(hist_every, numbers.Integral) or isinstance(hist_every, bool) or hist_every < 0:
        raise ValueError(f"log_deltas(): hist_every must be an int >= 0, got {hist_every!r}")
    hist_every = int(hist_every)
    if hist_every and not monitor.keep_last:
        raise ValueError("log_deltas(): hist_every > 0 needs DeltaMonitor(..., keep_last=True), got keep_last=False")
    _check_prefix("log_deltas", prefix)
    if not isinstance(layout, bool):
        raise TypeError(f"log_deltas(): layout must be a bool, got {layout!r}")
    if layout and prefix not in getattr(writer, _LAYOUT_PREFIXES, []):
        write_layout(writer, prefix)
    last_steps = getattr(writer, _LAST_STEP, None)
    if last_steps is None:
        last_steps = {}
        setattr(writer, _LAST_STEP, last_steps)
    last = last_steps.get(prefix)  # None on the first call
    last_steps[prefix] = step

    stats = monitor.pop()
    for layer, values in stats.items():
        for stat in STATS:
            writer.add_scalar(_tag(f"{prefix}delta/{stat}", layer), values[stat], step)

    if model is not None:
        # m._parameters: a parametrized weight (weight_norm, ...) is computed at each access, a non-leaf with no
        # .grad (its gradient is on the parametrization's own tensors): no norm for it, and no warning
        weights = {name: m._parameters.get("weight") for name, m in named_linears(model).items()}
        grads = {name: w.grad for name, w in weights.items() if w is not None and w.grad is not None}
        if grads:
            # ‖∇_W C‖ per layer, all read at once (at logging steps only)
            norms = to_host({name: torch.linalg.vector_norm(g) for name, g in grads.items()})
            for name, norm in norms.items():
                writer.add_scalar(_tag(f"{prefix}grad/weight_norm", name), norm, step)

    # A multiple of hist_every in (last, step]: the steps logged need not be multiples themselves. The
    # first call, and a step at or before the last (a rollback, a repeat), count the step alone.
    due = False
    if hist_every:
        fresh = last is None or step <= last
        due = step % hist_every == 0 if fresh else step // hist_every > last // hist_every
    if due:
        # Only layers with a pass since the last call: an older δ is not this step's.
        for layer, delta in monitor.last_delta.items():
            if layer in stats:
                values = delta.abs() if delta.is_complex() else delta  # complex: |δ|
                # float32 for numpy (which has no bfloat16), float64 kept: its finite values stay finite
                values = values.to(torch.promote_types(values.dtype, torch.float32)).cpu()
                values = values[values.isfinite()]  # a diverged run's nan/inf: the histogram takes none
                if values.numel():
                    writer.add_histogram(_tag(f"{prefix}delta/hist", layer), values, step)
    return stats
