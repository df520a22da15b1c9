"""Time per training step with a DeltaMonitor attached vs without, MLP [784, 100, 10], batch 64, CPU.

One step is zero_grad, the quadratic cost (``model.cost``), backward and an
SGD step; with the monitor on, the monitor is popped once per repeat as a
training loop would at a logging step. Off, on and do-nothing hooks
alternate, in an order that rotates from repeat to repeat, so that load from
other processes hits all alike; the median of the per-repeat ratios is
reported, unfused and fused. Target: at most 1.05. Times are CPU time, which
other processes' load disturbs less than wall time: the calling thread's
(``time.thread_time``) with one torch thread, the default, and the whole
process's (``time.process_time``) with more, whose other threads do matmul work. The monitor's own work is
also timed alone: its hooks called directly with δ of the step's shapes.

    python -m benchmarks.monitor_overhead [--repeats 9] [--steps 200] [--threads 1] [--flush-every 32]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import torchbp


def _steps(model: torchbp.MLP, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, n: int) -> None:
    for _ in range(n):
        opt.zero_grad()
        model.cost(x, y, cost="quadratic").backward()
        opt.step()


def cpu_clock() -> Callable[[], float]:
    """The CPU-time clock that sees all of a step's work: the thread's with one torch thread, else the process's."""
    return time.thread_time if torch.get_num_threads() == 1 else time.process_time


def measure(
    fused: bool, repeats: int = 9, steps: int = 200, batch: int = 64, seed: int = 0, flush_every: int = 32
) -> dict:
    """Median seconds per step with the monitor (``DeltaMonitor(flush_every=...)``) off and on, and their ratio."""
    torch.manual_seed(seed)
    model = torchbp.MLP([784, 100, 10], fused=fused)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(batch, 784), torch.rand(batch, 10)
    _steps(model, opt, x, y, steps)  # warm-up
    clock = cpu_clock()
    times: dict[str, list[float]] = {"off": [], "on": [], "empty": []}
    modes = list(times)
    for r in range(repeats):
        # The order rotates (off on empty, on empty off, ...): each mode opens a repeat in turn.
        for mode in modes[r % 3 :] + modes[: r % 3]:
            monitor = torchbp.DeltaMonitor(model, flush_every=flush_every) if mode == "on" else None
            # "empty": do-nothing delta hooks, the cost of torchbp's hook mechanism alone
            handles = [m.register_delta_hook(lambda module, delta: None) for m in model.linears] if mode == "empty" else []
            start = clock()
            _steps(model, opt, x, y, steps)
            if monitor is not None:
                monitor.pop()
            times[mode].append((clock() - start) / steps)
            if monitor is not None:
                monitor.close()
            for handle in handles:
                handle.remove()
    off, on, empty = (statistics.median(times[mode]) for mode in modes)
    # Ratios within a repeat, then their median: the machine's drift between repeats cancels.
    ratio, empty_ratio = (
        statistics.median(t / o for t, o in zip(times[mode], times["off"])) for mode in ("on", "empty")
    )
    return {"fused": fused, "off_s": off, "on_s": on, "empty_s": empty, "ratio": ratio, "empty_ratio": empty_ratio}


def hook_cost(passes: int = 3200, batch: int = 64, flush_every: int = 32) -> float:
    """CPU seconds of the monitor's own work per backward pass, all layers of the MLP, pop included."""
    model = torchbp.MLP([784, 100, 10])
    deltas = [torch.rand(batch, m.out_features) for m in model.linears]  # δ^l: (N, out)
    monitor = torchbp.DeltaMonitor(model, flush_every=flush_every)
    hooks = [next(iter(m._delta_hooks.values())) for m in model.linears]
    clock = cpu_clock()
    start = clock()
    for _ in range(passes):
        for m, hook, delta in zip(model.linears, hooks, deltas):
            hook(m, delta)
    monitor.pop()
    seconds = (clock() - start) / passes
    monitor.close()
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.monitor_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9,
                        help="timings of each setting (monitor off, on, do-nothing hooks), interleaved (default: 9)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per timing (default: 200)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default: 1)")
    parser.add_argument("--flush-every", type=int, default=32,
                        help="DeltaMonitor's flush_every: passes held per batch of statistics (default: 32)")
    args = parser.parse_args(argv)
    for flag, value in (("--repeats", args.repeats), ("--steps", args.steps), ("--threads", args.threads),
                        ("--flush-every", args.flush_every)):
        if value < 1:
            raise SystemExit(f"{flag} must be >= 1, got {value}")
    torch.set_num_threads(args.threads)
    print(f"MLP [784, 100, 10], batch 64, CPU, {args.threads} thread(s), {args.repeats} x {args.steps} steps, "
          f"flush_every={args.flush_every}")
    print("| model | step, monitor off | step, monitor on | on / off (median of per-repeat ratios) | do-nothing hooks / off |")
    print("|---|---|---|---|---|")
    for fused in (False, True):
        r = measure(fused, args.repeats, args.steps, flush_every=args.flush_every)
        name = "fused" if fused else "unfused"
        print(f"| {name} | {r['off_s'] * 1e6:.0f} µs | {r['on_s'] * 1e6:.0f} µs | {r['ratio']:.3f} | {r['empty_ratio']:.3f} |")
    print(f"monitor's own work per backward pass (2 layers, hooks called directly): "
          f"{hook_cost(flush_every=args.flush_every) * 1e6:.1f} µs")


if __name__ == "__main__":
    main()
