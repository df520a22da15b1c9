"""log_deltas writes what TensorBoard reads back: tags, steps, values, histograms, the custom-scalars layout, one run.

Checked twice: offline with tensorboard's EventAccumulator, and live against a
real ``tensorboard`` server's HTTP API. Expected values come from an
independent computation (torch.autograd.grad on the equivalent torch.nn model,
``weight.grad`` norms by torch); float32 in the event files, so rel 1e-5.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import torchbp

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing import event_accumulator  # noqa: E402
from tensorboard.plugins.custom_scalar import layout_pb2  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from torchbp.tensorboard import log_deltas  # noqa: E402

from oracles import Unsorted, nn_deltas, nn_sequential  # noqa: E402

DT = torch.float64
SIZES = [6, 5, 4, 3]
LAYERS = ("0", "2", "4")
STATS = ("norm", "sample_norm", "max_abs")


def write_run(logdir, steps=(0, 1, 2, 3), hist_every=2):
    """Train-like loop: one backward per step, log_deltas at every step; returns the expected scalars
    {(tag, step): value} and histograms {(layer, step): (min, max, sum) of δ}."""
    torch.manual_seed(0)
    ref = nn_sequential(SIZES, dtype=DT)
    model = torchbp.MLP(SIZES, dtype=DT)
    model.load_state_dict(ref.state_dict())
    expected, histograms = {}, {}
    writer = SummaryWriter(os.fspath(logdir))
    with torchbp.DeltaMonitor(model, keep_last=True) as monitor:
        for step in steps:
            x, y = torch.randn(8, 6, dtype=DT), torch.rand(8, 3, dtype=DT)
            deltas = nn_deltas(ref, x, y)
            model.zero_grad()
            model.cost(x, y).backward()
            for name, delta in deltas.items():
                expected[f"delta/norm/{name}", step] = delta.sum(0).norm().item()
                expected[f"delta/sample_norm/{name}", step] = (delta.norm(dim=1) * len(x)).mean().item()
                expected[f"delta/max_abs/{name}", step] = delta.abs().max().item()
                expected[f"grad/weight_norm/{name}", step] = model.get_submodule(name).weight.grad.norm().item()
                histograms[name, step] = (delta.min().item(), delta.max().item(), delta.sum().item())
            log_deltas(writer, monitor, step, model=model, hist_every=hist_every)
    writer.close()
    return expected, histograms


@pytest.mark.parametrize("hist_every", [2, np.int64(2)], ids=["int", "numpy-int"])
def test_event_files_hold_tags_steps_values_histograms_layout_in_one_run(tmp_path, hist_every):
    expected, histograms = write_run(tmp_path, hist_every=hist_every)
    runs = {os.path.dirname(os.path.relpath(p, tmp_path)) for p in map(str, tmp_path.rglob("events.out.tfevents.*"))}
    assert runs == {""}, f"expected one run folder (the logdir itself), got {runs}"

    acc = event_accumulator.EventAccumulator(os.fspath(tmp_path), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert set(tags["scalars"]) == {tag for tag, _ in expected}
    for (tag, step), value in expected.items():
        (event,) = [e for e in acc.Scalars(tag) if e.step == step]
        assert event.value == pytest.approx(value, rel=1e-5, abs=1e-12), (tag, step)

    # Histograms at steps 0 and 2 (hist_every=2), of that step's δ: its count is N · out, its min, max and
    # sum those of autograd's δ (histograms hold float64 sums, 1e-9)
    assert set(tags["histograms"]) == {f"delta/hist/{n}" for n in LAYERS}
    for name, out in zip(LAYERS, SIZES[1:]):
        hists = acc.Histograms(f"delta/hist/{name}")
        assert [h.step for h in hists] == [0, 2]
        assert all(h.histogram_value.num == 8 * out for h in hists)
        for h in hists:
            got = (h.histogram_value.min, h.histogram_value.max, h.histogram_value.sum)
            assert got == pytest.approx(histograms[name, h.step], rel=1e-9, abs=1e-12), (name, h.step)

    # The layout, once: one category, a multiline chart per statistic whose tag regex takes exactly that
    # statistic's tags, every layer's (as TensorBoard matches them: re.search).
    (layout_event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(layout_event.tensor_proto.string_val[0])
    (category,) = layout.category
    charts = {chart.title: list(chart.multiline.tag) for chart in category.chart}
    for title, stat in (("δ norm by layer", "delta/norm"), ("max |δ| by layer", "delta/max_abs"),
                        ("weight gradient norm by layer", "grad/weight_norm")):
        (regex,) = charts[title]
        assert {t for t in tags["scalars"] if re.search(regex, t)} == {f"{stat}/{n}" for n in LAYERS}, title


def test_histograms_need_keep_last(tmp_path):
    model = torchbp.MLP([3, 2])
    with torchbp.DeltaMonitor(model) as monitor, SummaryWriter(os.fspath(tmp_path)) as writer:
        with pytest.raises(ValueError, match="keep_last=True"):
            log_deltas(writer, monitor, 0, hist_every=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_live_tensorboard_serves_the_delta_tags(tmp_path):
    """A real `tensorboard` process serves the δ tags, their values and the custom-scalars layout.

    Beside the three-layer run, a one-layer one: TensorBoard merges the runs' layouts, and each
    statistic's chart must appear once (charts that listed each run's layers appeared once per depth).
    """
    run = tmp_path / "mlp"
    expected, _ = write_run(run, steps=(0, 1), hist_every=0)
    shallow = torchbp.MLP([6, 3])
    with torchbp.DeltaMonitor(shallow) as monitor, SummaryWriter(os.fspath(tmp_path / "shallow")) as writer:
        shallow.cost(torch.randn(8, 6), torch.rand(8, 3)).backward()
        log_deltas(writer, monitor, 0)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", os.fspath(tmp_path), "--host", "127.0.0.1",
         "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        tags, deadline = {}, time.monotonic() + 60
        while time.monotonic() < deadline:
            assert server.poll() is None, f"tensorboard exited: {server.stderr.read().decode()[-2000:]}"
            try:
                tags = _get(f"{base}/data/plugin/scalars/tags")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                tags = {}
            if "delta/norm/4" in tags.get("mlp", {}):
                break
            time.sleep(0.5)
        assert "mlp" in tags, f"no run 'mlp' served within 60 s: {tags}"
        assert set(tags["mlp"]) == {tag for tag, _ in expected}

        query = urllib.parse.urlencode({"tag": "delta/norm/0", "run": "mlp"})
        points = _get(f"{base}/data/plugin/scalars/scalars?{query}")  # [[wall_time, step, value], ...]
        assert [p[1] for p in points] == [0, 1]
        for _, step, value in points:
            assert value == pytest.approx(expected["delta/norm/0", step], rel=1e-5)

        layout = {}
        while time.monotonic() < deadline and len(layout.get("category", [{}])[0].get("chart", [])) != 4:
            layout = _get(f"{base}/data/plugin/custom_scalars/layout")  # both runs' layouts, merged
            time.sleep(0.5)
        (category,) = layout["category"]
        titles = [c["title"] for c in category["chart"]]
        assert sorted(titles) == sorted(["δ norm by layer", "mean per-sample ‖δ‖ by layer", "max |δ| by layer",
                                         "weight gradient norm by layer"]), titles
        chart = next(c for c in category["chart"] if c["title"] == "δ norm by layer")
        (regex,) = chart["multiline"]["tag"]
        served = {tag for run_tags in tags.values() for tag in run_tags}
        assert {t for t in served if re.search(regex, t)} == {f"delta/norm/{n}" for n in LAYERS}
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_histograms_only_for_layers_with_a_pass_since_the_last_call(tmp_path):
    """A log step with no recorded pass (all inside monitor.paused()) writes no δ scalars and no stale histogram."""
    model = torchbp.MLP([4, 3, 2])
    x, y = torch.randn(5, 4), torch.rand(5, 2)
    with torchbp.DeltaMonitor(model, keep_last=True) as monitor, SummaryWriter(os.fspath(tmp_path)) as writer:
        model.cost(x, y).backward()
        log_deltas(writer, monitor, 0, hist_every=1)
        with monitor.paused():
            model.cost(x, y).backward()
        assert log_deltas(writer, monitor, 1, hist_every=1) == {}
    acc = event_accumulator.EventAccumulator(os.fspath(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    for layer in ("0", "2"):
        assert [e.step for e in acc.Scalars(f"delta/norm/{layer}")] == [0]
        assert [h.step for h in acc.Histograms(f"delta/hist/{layer}")] == [0]


def test_a_float64_histogram_keeps_finite_values_float32_cannot_hold(tmp_path):
    """A float64 δ's finite entries beyond float32's range (1e39, -1e40) stay in its histogram; they were
    cast to float32 first, became inf and were dropped as a diverged run's. Oracle: the δ given, by hand."""
    layer = torchbp.Linear(2, 3, dtype=torch.float64)
    delta = torch.tensor([[1e39, 2.0, -1e40], [1e-50, 3.0, 4.0]], dtype=torch.float64)
    with torchbp.DeltaMonitor(layer, keep_last=True) as monitor, SummaryWriter(os.fspath(tmp_path)) as writer:
        layer(torch.randn(2, 2, dtype=torch.float64)).backward(delta)
        log_deltas(writer, monitor, 0, hist_every=1)
    (histogram,) = _read(tmp_path).Histograms("delta/hist/model")
    h = histogram.histogram_value
    assert (h.num, h.max, h.min) == (6, 1e39, -1e40)


def test_bad_arguments_fail_before_anything_is_popped(tmp_path):
    """A bad writer or model raises before monitor.pop(): the recorded statistics stay in the monitor."""
    model = torchbp.MLP([4, 3, 2])
    x, y = torch.randn(5, 4), torch.rand(5, 2)
    with torchbp.DeltaMonitor(model) as monitor, SummaryWriter(os.fspath(tmp_path)) as writer:
        model.cost(x, y).backward()
        with pytest.raises(TypeError, match="writer must be a SummaryWriter .*got NoneType"):
            log_deltas(None, monitor, 0)
        with pytest.raises(TypeError, match="model must be a torch.nn.Module or None, got str"):
            log_deltas(writer, monitor, 0, model="model")
        with pytest.raises(TypeError, match="step must be an int, got float"):
            log_deltas(writer, monitor, 1.0)
        # Integers other than int (numpy's, as a loop over np.arange gives) are steps too.
        np = pytest.importorskip("numpy")
        assert set(log_deltas(writer, monitor, np.int64(3))) == {"0", "2"}
    acc = event_accumulator.EventAccumulator(os.fspath(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("delta/norm/0")] == [3]


def test_a_single_linear_model_is_tagged_model(tmp_path):
    """The monitored model may be one torchbp.Linear, whose qualified name is "": its tags end in "model"."""
    layer = torchbp.Linear(3, 2)
    with torchbp.DeltaMonitor(layer) as monitor, SummaryWriter(os.fspath(tmp_path)) as writer:
        torchbp.QuadraticCost()(layer(torch.randn(4, 3)), torch.rand(4, 2)).backward()
        log_deltas(writer, monitor, 0, model=layer)
    acc = event_accumulator.EventAccumulator(os.fspath(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"delta/norm/model", "delta/sample_norm/model", "delta/max_abs/model",
                                          "grad/weight_norm/model"}


@pytest.mark.parametrize("prefix", ["", "G[1]/"], ids=["no-prefix", "regex-characters"])
def test_each_chart_takes_its_statistic_and_no_other(prefix):
    """A chart's regex is the statistic's tag prefix with its slash: delta/norm/ takes delta/norm/<layer>,
    not delta/norm_x/<layer> nor delta/sample_norm/<layer>. A prefix is taken literally, regex characters
    too: "G[1]/" charts take G[1]/delta/norm/<layer> (the tag log_deltas writes), not G1/delta/norm/<layer>."""
    from torchbp.tensorboard import delta_layout

    (charts,) = delta_layout(prefix).values()
    (regex,) = charts["δ norm by layer"][1]
    tags = [prefix + t for t in ("delta/norm/0", "delta/norm_x/0", "delta/sample_norm/0")]
    tags += ["x/" + prefix + "delta/norm/0", "G1/delta/norm/0"]
    assert [t for t in tags if re.search(regex, t)] == [prefix + "delta/norm/0"]


def _read(logdir) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(os.fspath(logdir), size_guidance={"scalars": 0, "histograms": 0,
                                                                              "tensors": 0})
    acc.Reload()
    return acc


def _layout_categories(acc) -> list[list[str]]:
    """The categories of every custom-scalars layout written, in order (TensorBoard shows the last)."""
    return [[c.title for c in layout_pb2.Layout.FromString(e.tensor_proto.string_val[0]).category]
            for e in acc.Tensors("custom_scalars__config__")]


def _one_pass(model, seed=0):
    torch.manual_seed(seed)
    model.zero_grad()
    model.cost(torch.randn(8, SIZES[0], dtype=DT), torch.rand(8, SIZES[-1], dtype=DT)).backward()


def test_two_models_on_one_writer_with_a_prefix_each(tmp_path):
    """A GAN-like pair on one writer, logged in turn at steps 0 and 1: prefix "G/" and "D/" keep every tag
    apart (scalars, weight-gradient norms, histograms at both steps for both), each with its own model's
    values (oracle: each monitor's own pop, taken from a twin monitor), and the last layout written holds
    both models' categories, each chart's regex taking its own prefix's tags only."""
    g, d = torchbp.MLP(SIZES, dtype=DT), torchbp.MLP(SIZES, dtype=DT)
    expected = {"G/": [], "D/": []}
    with SummaryWriter(os.fspath(tmp_path)) as writer, torchbp.DeltaMonitor(g, keep_last=True) as mg, \
            torchbp.DeltaMonitor(d, keep_last=True) as md, torchbp.DeltaMonitor(g) as og, \
            torchbp.DeltaMonitor(d) as od:
        for step in (0, 1):
            _one_pass(g, 1 + step)
            _one_pass(d, 3 + step)
            log_deltas(writer, mg, step, model=g, hist_every=1, prefix="G/")
            log_deltas(writer, md, step, model=d, hist_every=1, prefix="D/")
            expected["G/"].append(og.pop())
            expected["D/"].append(od.pop())
    acc = _read(tmp_path)
    for prefix, per_step in expected.items():
        for layer in LAYERS:
            events = acc.Scalars(f"{prefix}delta/norm/{layer}")
            assert [e.value for e in events] == pytest.approx([s[layer]["norm"] for s in per_step], rel=1e-6)
            assert [e.step for e in acc.Scalars(f"{prefix}grad/weight_norm/{layer}")] == [0, 1]
            assert [h.step for h in acc.Histograms(f"{prefix}delta/hist/{layer}")] == [0, 1]
    assert all(t.startswith(("G/", "D/")) for kind in ("scalars", "histograms") for t in acc.Tags()[kind])
    categories = _layout_categories(acc)
    assert sorted(categories[-1]) == ["torchbp δ by layer (D/)", "torchbp δ by layer (G/)"]
    from torchbp.tensorboard import delta_layout

    (charts,) = delta_layout("G/").values()
    (regex,) = charts["δ norm by layer"][1]
    assert [t for t in ("G/delta/norm/0", "D/delta/norm/0", "delta/norm/0") if re.search(regex, t)] == \
        ["G/delta/norm/0"]


def test_a_scripts_own_layout_is_kept_with_layout_false(tmp_path):
    """TensorBoard shows a run's last layout: log_deltas(layout=False) writes none, so a script's own layout,
    with delta_layout()'s category merged in, is the one shown (log_deltas once replaced it silently)."""
    from torchbp.tensorboard import delta_layout

    model = torchbp.MLP(SIZES, dtype=DT)
    with SummaryWriter(os.fspath(tmp_path)) as writer, torchbp.DeltaMonitor(model) as monitor:
        writer.add_custom_scalars({"Losses": {"loss": ["Multiline", ["^loss/"]]}, **delta_layout()})
        for step in range(3):
            _one_pass(model, step)
            log_deltas(writer, monitor, step, layout=False)
    assert _layout_categories(_read(tmp_path)) == [["Losses", "torchbp δ by layer"]]


def test_histograms_come_every_hist_every_steps_when_the_logged_steps_are_not_multiples(tmp_path):
    """Logging at steps 9, 19, ..., 99 with hist_every=20: histograms at the first logged step past each
    multiple of 20 (29, 49, 69, 89), not never (the steps logged are no multiples of 20)."""
    model = torchbp.MLP(SIZES, dtype=DT)
    with SummaryWriter(os.fspath(tmp_path)) as writer, torchbp.DeltaMonitor(model, keep_last=True) as monitor:
        for step in range(9, 100, 10):
            _one_pass(model, step)
            log_deltas(writer, monitor, step, hist_every=20)
    assert [h.step for h in _read(tmp_path).Histograms("delta/hist/0")] == [29, 49, 69, 89]


def test_a_histogram_leaves_out_infinite_values(tmp_path):
    """An infinite target element makes one δ^L entry −inf: the histogram holds the 23 finite entries of
    the last layer's 8 × 3 δ (an inf would make its range infinite)."""
    model = torchbp.MLP(SIZES, dtype=DT)
    y = torch.rand(8, SIZES[-1], dtype=DT)
    y[0, 0] = float("inf")
    with SummaryWriter(os.fspath(tmp_path)) as writer, torchbp.DeltaMonitor(model, keep_last=True) as monitor:
        model.cost(torch.randn(8, SIZES[0], dtype=DT), y).backward()
        log_deltas(writer, monitor, 0, hist_every=1)
    (hist,) = _read(tmp_path).Histograms("delta/hist/4")
    assert hist.histogram_value.num == 23
    assert math.isfinite(hist.histogram_value.min) and math.isfinite(hist.histogram_value.max)


def test_a_bad_prefix_or_layout_is_refused_before_anything_is_popped(tmp_path):
    """prefix must be a str and layout a bool; the checks come before monitor.pop(), so nothing is lost."""
    model = torchbp.MLP(SIZES, dtype=DT)
    with SummaryWriter(os.fspath(tmp_path)) as writer, torchbp.DeltaMonitor(model) as monitor:
        _one_pass(model)
        with pytest.raises(TypeError, match=r"log_deltas\(\): prefix must be a str, got NoneType"):
            log_deltas(writer, monitor, 0, prefix=None)
        with pytest.raises(TypeError, match=r"log_deltas\(\): layout must be a bool, got 'no'"):
            log_deltas(writer, monitor, 0, layout="no")
        assert set(monitor.pop()) == set(LAYERS)


def test_two_prefixes_on_one_writer_keep_their_own_histogram_cadence(tmp_path):
    """"G/" and "D/" logged in turn to one writer at steps 99 and 199, hist_every=100: each prefix's last step
    is its own, so both get their histograms at 199 (the first logged step past 100), neither at 99 (by hand:
    the multiples of 100 in (99, 199] and at the first call, 99, none)."""
    g, d = torchbp.MLP(SIZES, dtype=DT), torchbp.MLP(SIZES, dtype=DT)
    with SummaryWriter(os.fspath(tmp_path)) as writer, torchbp.DeltaMonitor(g, keep_last=True) as mg, \
            torchbp.DeltaMonitor(d, keep_last=True) as md:
        for step in (99, 199):
            _one_pass(g, step)
            log_deltas(writer, mg, step, hist_every=100, prefix="G/")
            _one_pass(d, step + 1)
            log_deltas(writer, md, step, hist_every=100, prefix="D/")
    acc = _read(tmp_path)
    for prefix in ("G/", "D/"):
        for layer in LAYERS:
            assert [h.step for h in acc.Histograms(f"{prefix}delta/hist/{layer}")] == [199], (prefix, layer)


def test_weight_gradient_norms_go_to_their_layer_when_names_are_not_in_sorted_order(tmp_path):
    """Layers registered as z_hidden then a_out (sorted order is the reverse): grad/weight_norm/<layer> is that
    layer's ‖∇_W C‖ (oracle: torch's norm of each weight.grad, values ~10x apart; float32 events, rel 1e-5)."""
    torch.manual_seed(16)
    model = torchbp.convert(Unsorted(DT))
    with torch.no_grad():
        model.a_out.weight.mul_(0.1)  # the hidden layer's δ, and its weight gradient, an order of magnitude smaller
    with SummaryWriter(os.fspath(tmp_path)) as writer, torchbp.DeltaMonitor(model) as monitor:
        torchbp.QuadraticCost()(model(torch.randn(6, 4, dtype=DT)), torch.rand(6, 3, dtype=DT)).backward()
        log_deltas(writer, monitor, 0, model=model)
    expected = {name: getattr(model, name).weight.grad.norm().item() for name in ("z_hidden", "a_out")}
    assert expected["a_out"] > 5 * expected["z_hidden"]
    acc = _read(tmp_path)
    for name, norm in expected.items():
        (event,) = acc.Scalars(f"grad/weight_norm/{name}")
        assert event.value == pytest.approx(norm, rel=1e-5), name


def test_histograms_after_the_steps_go_back_come_at_the_multiples_again(tmp_path):
    """One writer whose steps roll back (0, 100, 200, 300, then 100, 200, 300 again, then 300 once more),
    hist_every=100: every step that is a multiple gets its histogram, the repeated ones too."""
    model = torchbp.MLP(SIZES, dtype=DT)
    steps = [0, 100, 200, 300, 100, 200, 300, 300]
    with SummaryWriter(os.fspath(tmp_path)) as writer, torchbp.DeltaMonitor(model, keep_last=True) as monitor:
        for n, step in enumerate(steps):
            _one_pass(model, n)
            log_deltas(writer, monitor, step, hist_every=100)
    acc = event_accumulator.EventAccumulator(os.fspath(tmp_path), size_guidance={"histograms": 0},
                                             purge_orphaned_data=False)
    acc.Reload()
    assert [h.step for h in acc.Histograms("delta/hist/0")] == steps


def test_a_diverged_run_logs_its_scalars_and_skips_an_all_nan_histogram(tmp_path):
    """Weights gone nan (a diverged run): every δ is nan, add_histogram would raise on it and end the
    training loop; log_deltas writes the (nan) scalars and leaves the histogram out."""
    model = torchbp.MLP(SIZES, dtype=DT)
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    with SummaryWriter(os.fspath(tmp_path)) as writer, torchbp.DeltaMonitor(model, keep_last=True) as monitor:
        _one_pass(model)
        stats = log_deltas(writer, monitor, 0, hist_every=1)
    assert all(np.isnan(s["norm"]) for s in stats.values())
    acc = _read(tmp_path)
    assert "delta/norm/0" in acc.Tags()["scalars"] and not acc.Tags()["histograms"]


def test_a_complex_layer_logs_real_norms_and_a_histogram_of_the_moduli(tmp_path):
    """A complex layer (converted nn.Linear): the scalars are real numbers and the δ histogram is of |δ|, with
    N · out values whose largest is max |δ| from torch.autograd.grad on the nn layer (float32 events, 1e-5)."""
    torch.manual_seed(13)
    reference = nn.Linear(4, 3, dtype=torch.cdouble)
    x = torch.randn(5, 4, dtype=torch.cdouble)
    z = reference(x)
    (expected,) = torch.autograd.grad(z.abs().pow(2).sum(), z)
    model = torchbp.convert(reference)
    with SummaryWriter(tmp_path) as writer, torchbp.DeltaMonitor(model, keep_last=True) as monitor:
        model(x).abs().pow(2).sum().backward()
        log_deltas(writer, monitor, 0, model=model, hist_every=1)
    acc = _read(tmp_path)
    (hist,) = acc.Histograms("delta/hist/model")
    assert hist.histogram_value.num == 5 * 3
    assert hist.histogram_value.min >= 0
    assert hist.histogram_value.max == pytest.approx(expected.abs().max().item(), rel=1e-5)
    (norm,) = acc.Scalars("delta/norm/model")
    assert norm.value == pytest.approx(expected.sum(0).abs().norm().item(), rel=1e-5)


def test_a_real_layers_histogram_keeps_the_sign_of_delta(tmp_path):
    """A real layer's δ histogram is of δ itself, negative values included (only a complex δ is taken as |δ|):
    its smallest value is torch's ∂L/∂z's smallest, from torch.autograd.grad on the nn layer (float32, 1e-5)."""
    torch.manual_seed(14)
    reference = nn.Linear(4, 3, dtype=DT)
    x = torch.randn(5, 4, dtype=DT)
    z = reference(x)
    (expected,) = torch.autograd.grad(z.pow(2).sum(), z)
    assert expected.min() < 0
    model = torchbp.convert(reference)
    with SummaryWriter(tmp_path) as writer, torchbp.DeltaMonitor(model, keep_last=True) as monitor:
        model(x).pow(2).sum().backward()
        log_deltas(writer, monitor, 0, model=model, hist_every=1)
    (hist,) = _read(tmp_path).Histograms("delta/hist/model")
    assert hist.histogram_value.min == pytest.approx(expected.min().item(), rel=1e-5)
    assert hist.histogram_value.max == pytest.approx(expected.max().item(), rel=1e-5)


def test_a_parametrized_layer_gets_no_weight_gradient_norm_and_no_warning(tmp_path):
    """weight_norm on layer 0: its weight is computed at each access, a non-leaf whose .grad is None (torch warns on
    reading it). The tag is left out for that layer without a warning; layer 2's is torch's ‖∇_W C‖ (1e-5)."""
    torch.manual_seed(15)
    model = torchbp.MLP([5, 4, 2], dtype=DT)
    nn.utils.parametrizations.weight_norm(model[0])
    with SummaryWriter(tmp_path) as writer, torchbp.DeltaMonitor(model) as monitor:
        model.cost(torch.randn(3, 5, dtype=DT), torch.rand(3, 2, dtype=DT)).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            log_deltas(writer, monitor, 0, model=model)
    acc = _read(tmp_path)
    assert {t for t in acc.Tags()["scalars"] if t.startswith("grad/")} == {"grad/weight_norm/2"}
    (norm,) = acc.Scalars("grad/weight_norm/2")
    assert norm.value == pytest.approx(model[2].weight.grad.norm().item(), rel=1e-5)


def test_a_frozen_layer_gets_no_weight_gradient_norm(tmp_path):
    """A layer whose weight has no gradient (frozen) gets no grad/weight_norm tag; the trained layer's is torch's
    ‖∇_W C‖ (float32 events, 1e-5)."""
    torch.manual_seed(15)
    model = torchbp.MLP([5, 4, 2], dtype=DT)
    model[0].weight.requires_grad_(False)
    with SummaryWriter(tmp_path) as writer, torchbp.DeltaMonitor(model) as monitor:
        model.cost(torch.randn(3, 5, dtype=DT), torch.rand(3, 2, dtype=DT)).backward()
        log_deltas(writer, monitor, 0, model=model)
    acc = _read(tmp_path)
    assert {t for t in acc.Tags()["scalars"] if t.startswith("grad/")} == {"grad/weight_norm/2"}
    (norm,) = acc.Scalars("grad/weight_norm/2")
    assert norm.value == pytest.approx(model[2].weight.grad.norm().item(), rel=1e-5)
