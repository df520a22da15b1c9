"""The benchmark scripts run, and the CPU memory figure counts what a step must hold.

Timings are not asserted (they are the benchmarks' job, and this machine is
shared); what is checked is that every variant runs, the table and JSON hold
every figure, and the memory walk sees the buffers the notes' backward needs.
"""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

from benchmarks import memory, monitor_overhead, step


def test_step_benchmark_times_every_variant_and_writes_json(tmp_path, capsys):
    """A tiny run of `python -m benchmarks.step`: every variant and the epoch get a positive median and a ratio."""
    variants = ["nn", "bp", "fused", "fused_cost", "sgd_step", "network_py"]
    out = step.main(["--models", "784-30-10@10", "--variants", ",".join(variants), "--repeats", "2",
                     "--steps", "2", "--warmup", "1", "--epoch-variants", "nn,sgd_step,sgd_epoch", "--json",
                     str(tmp_path / "bench.json")])
    timings = out["steps"]["784-30-10@10"]
    assert list(timings) == variants
    assert all(len(t["seconds_per_step"]) == 2 and min(t["seconds_per_step"]) > 0 for t in timings.values())
    assert set(out["epoch"]) == {"nn", "sgd_step", "sgd_epoch"}
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written["steps"] == out["steps"] and written["baseline"] == "nn"
    # the medians and per-repeat ratios, recomputed from the raw timings
    for variant, t in timings.items():
        s = written["summary"]["784-30-10@10"][variant]
        assert s["median_s"] == pytest.approx(sorted(t["seconds_per_step"])[0] / 2 + sorted(t["seconds_per_step"])[1] / 2)
        ratios = [a / b for a, b in zip(t["seconds_per_step"], timings["nn"]["seconds_per_step"])]
        assert s["ratio"] == pytest.approx(sum(ratios) / 2)
    assert set(written["epoch_summary"]) == {"nn", "sgd_step", "sgd_epoch"} and written["epoch_baseline"] == "nn"
    assert written["command"].startswith("python -m benchmarks.step --models 784-30-10@10 ")
    printed = capsys.readouterr().out
    for variant in variants:
        assert f"| 784-30-10@10 | {variant} |" in printed


@pytest.mark.parametrize("mode", ["compile", "graphs"])
def test_compiled_variants_train_as_the_eager_one(mode):
    """make_step's compiled branch, which the CUDA-graph variants (+graphs: mode="reduce-overhead") take on a
    GPU, on the CPU: three steps move the parameters as the eager variant's do (float32; 1e-5, as the
    compiler reorders arithmetic), from the same initial weights."""
    torch._dynamo.reset()
    sizes, cpu = [20, 8, 4], torch.device("cpu")
    x, y = step.data(16, sizes, cpu)
    eager, compiled = (step.make_step(v, sizes, cpu, {}) for v in ("fused_cost", f"fused_cost+{mode}"))
    params = [[p for group in s.optimizer.param_groups for p in group["params"]] for s in (eager, compiled)]
    assert all(torch.equal(p, q) for p, q in zip(*params))
    initial = [p.detach().clone() for p in params[0]]
    for _ in range(3):
        eager(x, y)
        compiled(x, y)
    assert not any(torch.equal(p, i) for p, i in zip(params[0], initial))  # the steps moved every one
    for p, q in zip(*params):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_without_nn_the_ratios_are_to_the_first_variant_and_say_so(capsys):
    """No nn in --variants: the first variant is the baseline, named in the ratio column's title (a column
    titled "× nn eager" held ratios to another variant)."""
    out = step.main(["--models", "784-30-10@10", "--variants", "fused,bp", "--repeats", "2", "--steps", "2",
                     "--warmup", "1", "--no-epoch"])
    printed = capsys.readouterr().out
    assert "| model | variant | ms / step (median) | × fused |" in printed and "× nn eager" not in printed
    assert out["baseline"] == "fused" and out["summary"]["784-30-10@10"]["fused"]["ratio"] == 1.0


def test_step_benchmark_refuses_an_epoch_only_variant_per_step():
    """sgd_epoch trains on a block of mini-batches: the epoch table takes it, the per-step table refuses it."""
    with pytest.raises(SystemExit, match="--variants: unknown 'sgd_epoch' for cpu"):
        step.main(["--models", "784-30-10@10", "--variants", "nn,sgd_epoch"])


@pytest.mark.parametrize("argv, message", [
    (["--json", "/nonexistent-folder/bench.json"], "--json: the folder /nonexistent-folder of /nonexistent-folder/bench.json does not exist"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--json", "/"], "--json takes a file to write, got the folder /"),
    (["--target-s", "-5"], "--target-s must be > 0 and at most 3600, got -5.0"),
    (["--target-s", "inf"], "--target-s must be > 0 and at most 3600, got inf"),  # it crashed after the warm-up
    (["--epoch-variants", "bogus"], "--epoch-variants: unknown 'bogus' for cpu"),
    (["--epoch-variants", "nn", "--no-epoch"], "--epoch-variants nn has no epoch to time with --no-epoch"),
    (["--variants", ""], '--variants "" names no variant (to time the epoch only, give --models "")'),
    (["--epoch-variants", ""], '--epoch-variants "" names no variant'),
])
def test_step_benchmark_refuses_bad_flags_before_timing_anything(argv, message, monkeypatch):
    """A run is minutes long: a --json it cannot write, or a count torch would refuse, stops it before the first timing."""
    monkeypatch.setattr(step, "bench_model", lambda *a: pytest.fail("timed before checking the flags"))
    with pytest.raises(SystemExit, match=re.escape(message)):
        step.main(["--models", "784-30-10@10", "--variants", "nn", *argv])


@pytest.mark.parametrize("main, argv, message", [
    ("step", ["--device", "gpu"], "argument --device: must be cpu, cuda or cuda:N, got 'gpu'"),
    ("memory", ["--device", "mps"], "argument --device: must be cpu, cuda or cuda:N, got 'mps'"),
    ("memory", ["--sizes", "784,800,abc"], "argument --sizes: must be comma-separated integers, e.g. 784,800,10, "
                                           "got '784,800,abc'"),
    ("memory", ["--sizes", "784"], "argument --sizes: must be at least two positive widths, got '784'"),
    ("memory", ["--batch", "-3"], "argument --batch: must be a positive int, got '-3'"),
])
def test_benchmarks_refuse_a_bad_device_or_sizes_by_name(main, argv, message, capsys):
    """argparse's exit 2 naming the flag, not a traceback from torch.device or int()."""
    with pytest.raises(SystemExit) as info:
        {"step": step.main, "memory": memory.main}[main](argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_memory_benchmark_checks_its_json_path_before_measuring(monkeypatch):
    monkeypatch.setattr(memory.subprocess, "run", lambda *a, **k: pytest.fail("measured before checking --json"))
    with pytest.raises(SystemExit, match="--json: the folder /nonexistent-folder of"):
        memory.main(["--json", "/nonexistent-folder/m.json"])


def test_memory_benchmark_runs_end_to_end_and_prints_its_table(tmp_path, capsys):
    """python -m benchmarks.memory as a user runs it (each variant in its own process), on a small network:
    the table's ratio is the step peak over nn's, the JSON holds the same figures."""
    out = tmp_path / "memory.json"
    results = memory.main(["--sizes", "16,64,4", "--batch", "512", "--variants", "nn,fused", "--json", str(out)])
    assert [r["variant"] for r in results] == ["nn", "fused"] and json.loads(out.read_text()) == results
    nn_bytes, fused_bytes = (r["peak_extra_bytes"] for r in results)
    assert nn_bytes > 0 and fused_bytes > 0
    printed = capsys.readouterr().out
    assert f"| nn | {nn_bytes / memory.MIB:.1f} | 1.00 |" in printed
    assert f"| fused | {fused_bytes / memory.MIB:.1f} | {fused_bytes / nn_bytes:.2f} |" in printed


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_monitor_overhead_benchmark_times_every_mode(fused):
    """A tiny run of benchmarks.monitor_overhead.measure: positive times for off, on and empty hooks, and ratios."""
    r = monitor_overhead.measure(fused, repeats=3, steps=2)
    assert r["fused"] is fused
    assert min(r["off_s"], r["on_s"], r["empty_s"]) > 0 and r["ratio"] > 0 and r["empty_ratio"] > 0
    assert monitor_overhead.hook_cost(passes=4) > 0


def test_monitor_overhead_benchmark_runs_end_to_end(capsys, monkeypatch):
    """python -m benchmarks.monitor_overhead as a user runs it, a tiny run: both rows and the hooks' own cost."""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # leave the test process's threads alone
    monitor_overhead.main(["--repeats", "1", "--steps", "2", "--flush-every", "1"])
    printed = capsys.readouterr().out
    assert "1 x 2 steps, flush_every=1" in printed, printed
    assert re.search(r"^\| unfused \| \d+ µs \| \d+ µs \| \d+\.\d{3} \| \d+\.\d{3} \|$", printed, re.M), printed
    assert re.search(r"^\| fused \| \d+ µs \| \d+ µs \| \d+\.\d{3} \| \d+\.\d{3} \|$", printed, re.M), printed
    assert re.search(r"monitor's own work per backward pass \(2 layers, hooks called directly\): [\d.]+ µs", printed)
    with pytest.raises(SystemExit, match=re.escape("--repeats must be >= 1, got 0")):
        monitor_overhead.main(["--repeats", "0"])
    with pytest.raises(SystemExit, match=re.escape("--flush-every must be >= 1, got 0")):
        monitor_overhead.main(["--flush-every", "0"])


def test_cpu_memory_peak_counts_the_buffers_backward_needs():
    """Oracle, by hand: [16, 256, 4] at batch 8192, counted in (8192, 256) float32 buffers, plus small tensors.

    torch.nn peaks in the first sigmoid's backward, with a^1, ∇_{a^1} C and δ^1 live: three. The
    fused node holds z^1 and a^1 in the forward, and runs its backward on blocks of 4096 samples
    (2^20 elements of the widest layer): a^1 and a block's (W^2)^T δ^2 and δ^1, two. MLP.sgd_step frees each a^l
    and δ^l once its layer is done and forms δ^1 over (W^2)^T δ^2: two (z^1 and a^1 in the
    forward; a^1 and (W^2)^T δ^2 in the backward). Everything else (δ^2, the gradients, the cost)
    is under a quarter of one.
    """
    buffer = 8192 * 256 * 4
    for variant, buffers in (("nn", 3), ("fused", 2), ("sgd_step", 2)):
        peak = memory.measure(variant, [16, 256, 4], 8192, torch.device("cpu"))["peak_extra_bytes"]
        assert buffers * buffer <= peak < (buffers + 0.25) * buffer, (variant, peak / buffer)


def test_step_benchmark_rotates_the_order_and_pairs_the_ratios():
    """interleaved() starts each repeat one run later; summary() takes the median of per-repeat ratios, by hand."""
    order: list[str] = []
    runs = {name: (lambda name=name: order.append(name)) for name in "ABC"}
    times = step.interleaved(runs, 4, iter(range(100)).__next__)  # a clock that ticks 1 per call
    assert order == list("ABC" "BCA" "CAB" "ABC")
    assert times == {name: [1, 1, 1, 1] for name in "ABC"}
    # The baseline's slow second repeat cancels in the paired ratios (2/2), not in a ratio of medians.
    by_variant = {"nn": {"s": [1.0, 2.0, 1.0]}, "fused": {"s": [0.9, 2.0, 1.2]}}
    assert step.summary(by_variant, "s", "nn") == {"nn": (1.0, 1.0), "fused": (1.2, 1.0)}
    assert step.summary(by_variant, "s", "bp") == {"nn": (1.0, None), "fused": (1.2, None)}


def test_benchmarks_take_a_numbered_cuda_device():
    """--device cuda:1 as torch.device spells it (the runs use only its type and index)."""
    assert step.parse_args(["--device", "cuda:1"]).device == "cuda:1"


class _FakeCuda:
    """torch.cuda's calls the benchmarks make, recorded, with a caching allocator that counts bytes: the CUDA
    branches run on a CPU machine (the order of the calls is what a GPU run depends on)."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple] = []
        self.allocated = self.peak = 0
        for name in ("synchronize", "memory_allocated", "reset_peak_memory_stats", "max_memory_allocated"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))

    def synchronize(self, device):
        self.calls.append(("synchronize", device))

    def memory_allocated(self, device):
        self.calls.append(("memory_allocated", device))
        return self.allocated

    def reset_peak_memory_stats(self, device):
        self.calls.append(("reset_peak_memory_stats", device))
        self.peak = self.allocated

    def max_memory_allocated(self, device):
        self.calls.append(("max_memory_allocated", device))
        return self.peak

    def alloc(self, nbytes: int) -> None:
        self.allocated += nbytes
        self.peak = max(self.peak, self.allocated)


def test_the_cuda_timer_waits_for_the_queued_kernels_before_each_reading(monkeypatch):
    """On CUDA a reading of the clock comes after torch.cuda.synchronize: kernels run asynchronously, and
    a clock read at once would time the launches only."""
    assert step.timer(torch.device("cpu")) is time.perf_counter  # the CPU's ops are synchronous
    cuda, device = _FakeCuda(monkeypatch), torch.device("cuda:1")
    monkeypatch.setattr(time, "perf_counter", lambda: cuda.calls.append(("perf_counter",)) or len(cuda.calls))
    now = step.timer(device)
    assert now() == 2 and now() == 4
    assert cuda.calls == [("synchronize", device), ("perf_counter",)] * 2


def test_the_cuda_memory_figure_is_the_steps_peak_over_what_was_allocated_before(monkeypatch):
    """The CUDA branch of benchmarks.memory: the peak counts from the allocation before the step (the model,
    the data), reset after it is read, with the queue drained on both sides of the step."""
    cuda, device = _FakeCuda(monkeypatch), torch.device("cuda")
    cuda.alloc(1000)  # the weights and the batch, live before the step
    cuda.peak = 5000  # an earlier step's peak, which the figure must not count

    def fake_step(x, y):
        cuda.alloc(300)  # a^1 ... saved for backward
        cuda.alloc(200)  # the gradients
        cuda.alloc(-300)  # the activations freed after backward

    assert memory._cuda_step_peak(fake_step, None, None, device) == 500
    assert [name for name, _ in cuda.calls] == [
        "synchronize", "memory_allocated", "reset_peak_memory_stats", "synchronize", "max_memory_allocated"]
    assert all(d == device for _, d in cuda.calls)
