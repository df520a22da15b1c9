"""Peak memory of one training step, [784, 800, 800, 10] at mini-batch 4096: torch.nn eager vs torchbp.

The step is the one of ``benchmarks.step`` (forward, quadratic cost, backward,
SGD). Every variant runs in a fresh subprocess, so that nothing one variant
allocated or cached counts against another. The figure is the memory the
step adds on top of what is live before it (model, optimizer, data):

- CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()``
  around a step, after one warm-up step; the caching allocator's exact count
  of bytes held by tensors.
- CPU: torch keeps no allocator statistics for the CPU, but its profiler
  records every allocation and free of a tensor buffer
  (``profile_memory=True``); walking that timeline gives the bytes that the
  step allocated and still holds at its worst moment, as exactly as the CUDA
  count.

On both devices the previous step's gradients are freed before the step
(``zero_grad(set_to_none=True)``, as the step's own first call does): what
is live before it is the same for every variant, and the step's own frees of
older buffers do not lower its figure.

    python -m benchmarks.memory [--device cuda] [--sizes 784,800,800,10] [--batch 4096]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from benchmarks.step import KINDS, check_json_path, data, device_arg, make_step, ratio

VARIANTS = [*KINDS, "sgd_step"]

MIB = 2**20


def _cpu_step_peak(step, x, y) -> int:
    """Peak bytes of the tensors ``step`` allocates, from the profiler's allocation timeline."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfile  # what export_memory_timeline uses

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step(x, y)
    live = peak = 0
    for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def _cuda_step_peak(step, x, y, device: torch.device) -> int:
    """Peak bytes ``step`` adds on ``device`` over what is allocated before it, from the caching allocator's
    statistics (after the queued kernels: CUDA runs them asynchronously)."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(x, y)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure(variant: str, sizes: list[int], batch: int, device: torch.device) -> dict:
    """Bytes the step adds over what is live before it, for ``variant``, in this process."""
    x, y = data(batch, sizes, device)
    step = make_step(variant, sizes, device, {})
    step(x, y)  # warm-up: the optimizer's state, library workspaces and the like
    optimizer = getattr(step, "optimizer", None)  # (sgd_step has none, and no gradients)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        return {"variant": variant, "method": "torch.cuda.max_memory_allocated",
                "peak_extra_bytes": _cuda_step_peak(step, x, y, device)}
    return {"variant": variant, "method": "torch.profiler allocation timeline",
            "peak_extra_bytes": _cpu_step_peak(step, x, y)}


def _sizes(text: str) -> list[int]:
    """An argparse ``type`` for --sizes: comma-separated positive widths, at least two."""
    try:
        sizes = [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, e.g. 784,800,10, got {text!r}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"must be at least two positive widths, got {text!r}")
    return sizes


def _positive(text: str) -> int:
    """An argparse ``type`` for --batch: a positive int."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n")[0])
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--sizes", type=_sizes, default="784,800,800,10", help="layer widths, input first (default: 784,800,800,10)")
    p.add_argument("--batch", type=_positive, default=4096, help="mini-batch size (default: 4096)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS} (default: all)")
    p.add_argument("--json", default=None, help="write the figures to this file (default: none)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one variant, in this process
    args = p.parse_args(argv)
    sizes = args.sizes
    device = torch.device(args.device)
    if args.child:
        print(json.dumps(measure(args.child, sizes, args.batch, device)))
        return []
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown {v!r}; known: {VARIANTS}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    check_json_path(args.json)
    results = []
    for v in variants:  # each in a fresh process: nothing one variant cached counts against another
        command = [sys.executable, "-m", "benchmarks.memory", "--device", args.device, "--sizes", ",".join(map(str, sizes)),
                   "--batch", str(args.batch), "--child", v]
        child = subprocess.run(command, capture_output=True, text=True)
        if child.returncode != 0:  # (out of memory, say): its own error, not a CalledProcessError
            raise SystemExit(f"benchmarks.memory: the {v} step failed (exit {child.returncode}):\n"
                             f"{child.stderr.strip()[-2000:]}")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    base = next((r["peak_extra_bytes"] for r in results if r["variant"] == "nn"), None)
    print(f"Peak memory of one training step, {sizes} at mini-batch {args.batch}, {device.type} "
          f"({results[0]['method']}), one fresh process per variant:\n")
    print("| variant | step peak over live (MiB) | × nn eager |\n|---|---:|---:|")
    for r in results:
        times_nn = None if base is None else r["peak_extra_bytes"] / base
        print(f"| {r['variant']} | {r['peak_extra_bytes'] / MIB:.1f} | {ratio(times_nn)} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
