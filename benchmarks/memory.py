"""Peak memory of one training step, [784, 800, 800, 10] at mini-batch 4096: torch.nn eager vs torchbp.

The step is the one of ``benchmarks.step`` (forward, quadratic cost, backward,
SGD). Every variant runs in a fresh subprocess, so that nothing one variant
allocated or cached counts against another. The figure is the memory the
step adds on top of what is live before it (model, optimizer, data):

- CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()``
  around a step, after one warm-up step; the caching allocator's exact count
  of bytes held by tensors.
- CPU: torch has no CPU allocator statistics, so the process's resident set:
  the peak ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the first step
  minus the resident size just before it (``/proc/self/statm``). The child
  runs with ``MALLOC_MMAP_THRESHOLD_=65536``: every tensor buffer is then
  mmap-ed and given back on free (glibc otherwise raises the threshold after
  the first free and keeps later buffers in its heap), so the resident set
  follows the live tensors. It also counts a few MiB of one-time library
  buffers, the same for every variant. Median of ``--runs`` fresh processes (3).

    python -m benchmarks.memory [--device cuda] [--sizes 784,800,800,10] [--batch 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

import torch

from benchmarks.step import KINDS, data, make_step

MIB = 2**20


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(variant: str, sizes: list[int], batch: int, device: torch.device) -> dict:
    """Bytes the step adds over what is live before it, for ``variant``, in this process."""
    x, y = data(batch, sizes, device)
    step = make_step(variant, sizes, device, {})
    if device.type == "cuda":
        step(x, y)  # warm-up: cuBLAS workspaces and the like
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(x, y)
        torch.cuda.synchronize(device)
        return {"variant": variant, "method": "torch.cuda.max_memory_allocated",
                "before_bytes": before, "peak_extra_bytes": torch.cuda.max_memory_allocated(device) - before}
    before = _resident_bytes()
    step(x, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"variant": variant, "method": "ru_maxrss - resident before", "before_bytes": before,
            "peak_extra_bytes": peak - before}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--sizes", default="784,800,800,10", help="layer widths, input first (default: 784,800,800,10)")
    p.add_argument("--batch", type=int, default=4096, help="mini-batch size (default: 4096)")
    p.add_argument("--variants", default="nn,bp,fused,fused_cost", help=f"comma-separated, from {list(KINDS)} (default: nn,bp,fused,fused_cost)")
    p.add_argument("--runs", type=int, default=None,
                   help="fresh processes per variant, the median reported (default: 3 on CPU, 1 on CUDA: exact)")
    p.add_argument("--json", default=None, help="write the figures to this file (default: none)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one variant, in this process
    args = p.parse_args(argv)
    sizes = [int(n) for n in args.sizes.split(",")]
    device = torch.device(args.device)
    if args.child:
        print(json.dumps(measure(args.child, sizes, args.batch, device)))
        return []
    variants = args.variants.split(",")
    for v in variants:
        if v not in KINDS:
            raise SystemExit(f"--variants: unknown {v!r}; known: {list(KINDS)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    n_runs = args.runs if args.runs is not None else (1 if device.type == "cuda" else 3)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(n_runs):
        for v in variants:  # interleaved, like the timings
            command = [sys.executable, "-m", "benchmarks.memory", "--device", args.device, "--sizes", args.sizes,
                       "--batch", str(args.batch), "--child", v]
            out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
            runs[v].append(json.loads(out.strip().splitlines()[-1]))
    results = []
    for v, rs in runs.items():
        peaks = [r["peak_extra_bytes"] for r in rs]
        results.append({**rs[0], "peak_extra_bytes": statistics.median(peaks), "runs_bytes": peaks})
    base = next((r["peak_extra_bytes"] for r in results if r["variant"] == "nn"), None)
    print(f"Peak memory of one training step, {sizes} at mini-batch {args.batch}, {device.type} "
          f"({results[0]['method']}), median of {n_runs} fresh processes per variant:\n")
    print("| variant | step peak over live (MiB) | × nn eager |\n|---|---:|---:|")
    for r in results:
        ratio = f"{r['peak_extra_bytes'] / base:.2f}" if base else "–"
        print(f"| {r['variant']} | {r['peak_extra_bytes'] / MIB:.1f} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
