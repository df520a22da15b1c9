"""Time one training step of the notes' sigmoid network: torch.nn eager against torchbp.

One step is forward, quadratic cost, backward and an SGD update, on tensors
already in memory. Variants:

    nn          nn.Sequential(nn.Linear, nn.Sigmoid, ...), cost 0.5 * ((a - y) ** 2).sum(-1).mean()
    bp          torchbp.MLP(sizes) + torchbp.QuadraticCost(): one autograd node per layer
    fused       torchbp.MLP(sizes, fused=True) + QuadraticCost(): the network is one node
    fused_cost  torchbp.MLP(sizes, fused=True).cost(x, y): network and cost are one node
    sgd_step    torchbp.MLP(sizes).sgd_step(x, y, lr): the whole step by hand, no autograd,
                no optimizer object
    network_py  the book's network.py step in numpy, one sample at a time (CPU; not in the
                default list: name it, e.g. --epoch-variants nn,sgd_step,network_py)
    sgd_epoch   (epoch only) torchbp.MLP(sizes).sgd_epoch(x, y, lr, batch_size): the steps of
                sgd_step over a whole block of mini-batches in one call, arguments checked once

and each of them with a suffix:

    +compile       torch.compile(fullgraph=True) of forward + cost; backward and
                   optimizer.step() stay eager (they run the compiled backward graph);
                   sgd_step+compile compiles the whole hand-written step
    +compile_step  torch.compile of the whole step function, backward and
                   optimizer.step() included (Dynamo splits the graph at backward)
    +graphs        (CUDA only) +compile with mode="reduce-overhead": CUDA graphs

Timings are interleaved (every variant once per repeat, in an order that
rotates: A B C, B C A, C A B, ...) after a warm-up that also compiles; the
table gives the median per step and the median of its per-repeat ratios to
``nn`` (each ratio of two timings taken moments apart, so that the machine's
slow spells cancel). The "epoch" section is the Nielsen recipe,
[784, 30, 10] at mini-batch 10: 5,000 steps walking through 50,000 in-memory
samples, timed as interleaved blocks of 1,000 steps; seconds per epoch =
5 x the median block.

    python -m benchmarks.step                               # everything, CPU
    python -m benchmarks.step --models 784-100-10@64 --variants nn,bp,fused
    python -m benchmarks.step --device cuda --json bench_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import torchbp

# name -> (sizes, mini-batch)
MODELS: dict[str, tuple[list[int], int]] = {
    "784-30-10@10": ([784, 30, 10], 10),
    "784-100-10@64": ([784, 100, 10], 64),
    "784-800-10@128": ([784, 800, 10], 128),
    "784-100-100-100-10@64": ([784, 100, 100, 100, 10], 64),
    "784-800-800-10@4096": ([784, 800, 800, 10], 4096),
}
KINDS = ("nn", "bp", "fused", "fused_cost")
MODES = ("", "+compile", "+compile_step", "+graphs")
CPU_VARIANTS = [k + m for m in MODES[:3] for k in KINDS] + ["sgd_step", "sgd_step+compile"]
CUDA_VARIANTS = CPU_VARIANTS + [k + "+graphs" for k in KINDS]
LEARNING_RATE = 0.1
MAX_TARGET_S = 3600.0  # an hour per timing: past that, a typo
EPOCH_SAMPLES, EPOCH_BLOCK = 50_000, 1_000

Step = Callable[[Tensor, Tensor], None]


def nn_model(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.Sigmoid()]
    return nn.Sequential(*layers)


def make_step(variant: str, sizes: list[int], device: torch.device, sgd: dict) -> Step:
    """A fresh model of ``variant`` and its training step. Every variant's weights are drawn on the CPU from
    one seed, then moved: the same initial weights on CUDA too, whose generator draws other numbers."""
    kind, _, mode = variant.partition("+")
    torch.manual_seed(0)
    if kind == "nn":
        model = nn_model(sizes).to(device)

        def cost(x: Tensor, y: Tensor) -> Tensor:
            a = model(x)
            return 0.5 * ((a - y) ** 2).sum(-1).mean()  # the notes' C = ½‖a − y‖², mean over samples

    elif kind in ("bp", "fused"):
        model = torchbp.MLP(sizes, fused=kind == "fused").to(device)
        quadratic = torchbp.QuadraticCost()

        def cost(x: Tensor, y: Tensor) -> Tensor:
            return quadratic(model(x), y)

    elif kind == "fused_cost":
        model = torchbp.MLP(sizes, fused=True).to(device)
        cost = model.cost
    elif kind == "network_py" and not mode and device.type == "cpu":
        from benchmarks.network_py import Network

        init = torchbp.MLP(sizes)  # the same initial weights as every other variant
        net = Network([m.weight for m in init.linears], [m.bias for m in init.linears])
        return lambda x, y: net.update_mini_batch(x.numpy(), y.numpy(), LEARNING_RATE)
    elif kind == "sgd_step" and mode in ("", "compile"):
        model = torchbp.MLP(sizes).to(device)
        sgd_step = torch.compile(model.sgd_step, fullgraph=True) if mode else model.sgd_step
        return lambda x, y: sgd_step(x, y, LEARNING_RATE)
    else:
        raise ValueError(f"unknown variant {variant!r}; known: {CUDA_VARIANTS}")
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, **sgd)

    if mode in ("compile", "graphs"):
        compile_mode = "reduce-overhead" if mode == "graphs" else None
        cost = torch.compile(cost, fullgraph=True, mode=compile_mode)
    elif mode not in ("", "compile_step"):
        raise ValueError(f"unknown variant {variant!r}; known: {CUDA_VARIANTS}")

    def step(x: Tensor, y: Tensor) -> None:
        optimizer.zero_grad()
        cost(x, y).backward()
        optimizer.step()

    step = torch.compile(step) if mode == "compile_step" else step
    step.optimizer = optimizer  # (benchmarks.memory frees the gradients before it measures)
    return step


def data(n: int, sizes: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
    """n random inputs in [0, 1) and one-hot targets, like MNIST's."""
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(n, sizes[0], generator=generator)
    y = nn.functional.one_hot(torch.randint(sizes[-1], (n,), generator=generator), sizes[-1]).float()
    return x.to(device), y.to(device)


def timer(device: torch.device) -> Callable[[], float]:
    if device.type == "cuda":
        def now() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return now
    return time.perf_counter


def interleaved(runs: dict[str, Callable[[], None]], repeats: int, now: Callable[[], float]) -> dict[str, list[float]]:
    """Seconds per call of every run, each once per repeat, ``repeats`` times.

    The order rotates (A B C, B C A, C A B, ...): each run opens a repeat in turn, so none always
    runs first (after the previous repeat's last run) or last. (The cyclic order stays: B follows A
    in every repeat but the one B opens.)
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = now()
            runs[name]()
            times[name].append(now() - start)
    return times


def bench_model(
    name: str, variants: list[str], device: torch.device, sgd: dict, repeats: int, steps: int | None,
    target_s: float, warmup: int,
) -> dict:
    sizes, batch = MODELS[name]
    torch.compiler.reset()  # a fresh Dynamo cache per model: no recompile limit reached across models
    x, y = data(batch, sizes, device)
    now = timer(device)
    steps_fns = {}
    for variant in variants:
        step = make_step(variant, sizes, device, sgd)
        start = now()
        for _ in range(warmup):
            step(x, y)
        print(f"  {name} {variant}: warm-up {now() - start:.1f} s", file=sys.stderr)
        steps_fns[variant] = step
    if steps is None:
        # Steps per timing such that the first variant takes about target_s.
        first = steps_fns[variants[0]]
        start = now()
        for _ in range(5):
            first(x, y)
        steps = max(1, round(target_s / ((now() - start) / 5)))

    def block(step: Step) -> Callable[[], None]:
        def run() -> None:
            for _ in range(steps):
                step(x, y)
        return run

    times = interleaved({v: block(s) for v, s in steps_fns.items()}, repeats, now)
    return {v: {"steps": steps, "seconds_per_step": [t / steps for t in ts]} for v, ts in times.items()}


def make_steps(variant: str, sizes: list[int], device: torch.device, sgd: dict, batch: int) -> Step:
    """A fresh model of ``variant`` and a function that trains it on consecutive mini-batches of ``(x, y)``."""
    if variant == "sgd_epoch":
        torch.manual_seed(0)
        model = torchbp.MLP(sizes).to(device)
        return lambda x, y: model.sgd_epoch(x, y, LEARNING_RATE, batch)
    step = make_step(variant, sizes, device, sgd)

    def steps(x: Tensor, y: Tensor) -> None:
        for i in range(0, len(x), batch):
            step(x[i : i + batch], y[i : i + batch])

    return steps


def bench_epoch(variants: list[str], device: torch.device, sgd: dict, repeats: int, warmup: int) -> dict:
    """The Nielsen recipe: [784, 30, 10], mini-batch 10, 5,000 steps over 50,000 in-memory samples."""
    sizes, batch = [784, 30, 10], 10
    torch.compiler.reset()
    x, y = data(EPOCH_SAMPLES, sizes, device)
    now = timer(device)
    samples = EPOCH_BLOCK * batch  # per timed block
    blocks = EPOCH_SAMPLES // samples
    runs = {}
    for variant in variants:
        steps = make_steps(variant, sizes, device, sgd, batch)
        steps(x[: warmup * batch], y[: warmup * batch])
        position = [0]  # the next block of the epoch this variant runs

        def run(steps: Step = steps, position: list[int] = position) -> None:
            first = position[0] * samples
            position[0] = (position[0] + 1) % blocks
            steps(x[first : first + samples], y[first : first + samples])

        runs[variant] = run
    times = interleaved(runs, repeats, now)
    return {v: {"seconds_per_epoch": [t * blocks for t in ts]} for v, ts in times.items()}


def summary(by_variant: dict, key: str, baseline: str) -> dict[str, tuple[float, float | None]]:
    """Per variant: the median of ``key``, and the median of its per-repeat ratios to the baseline.

    A ratio within a repeat compares timings taken moments apart, so a slow
    spell of the machine (other processes' load) that spans a repeat cancels;
    None when the baseline was not run.
    """
    base = by_variant.get(baseline, {}).get(key)
    return {
        variant: (statistics.median(r[key]), None if base is None else statistics.median(
            t / b for t, b in zip(r[key], base)))
        for variant, r in by_variant.items()
    }


def ratio(value: float | None) -> str:
    """A table's ratio cell; a dash without a baseline."""
    return "–" if value is None else f"{value:.2f}"


def baseline_of(variants: list[str]) -> str:
    """The variant the ratios are to: nn wherever it runs, else the first."""
    return "nn" if "nn" in variants else variants[0]


def ratio_title(baseline: str) -> str:
    return "× nn eager" if baseline == "nn" else f"× {baseline}"  # the baseline is nn wherever nn ran


def table(results: dict, baseline: str) -> str:
    lines = [f"| model | variant | ms / step (median) | {ratio_title(baseline)} |", "|---|---|---:|---:|"]
    for model, by_variant in results.items():
        lines += [f"| {model} | {v} | {1e3 * median:.3f} | {ratio(r)} |"
                  for v, (median, r) in summary(by_variant, "seconds_per_step", baseline).items()]
    return "\n".join(lines)


def epoch_table(results: dict, baseline: str) -> str:
    lines = [f"| variant | s / epoch (median) | {ratio_title(baseline)} |", "|---|---:|---:|"]
    lines += [f"| {v} | {median:.3f} | {ratio(r)} |"
              for v, (median, r) in summary(results, "seconds_per_epoch", baseline).items()]
    return "\n".join(lines)


def device_arg(text: str) -> str:
    """An argparse ``type`` for --device: a CPU or CUDA device as torch.device spells it."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    return text


def check_json_path(path: str | None) -> None:
    """``--json PATH`` must be writable where it is asked, before minutes of timing, not after."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SystemExit(f"--json: the folder {folder} of {path} does not exist")
    if os.path.isdir(path):
        raise SystemExit(f"--json takes a file to write, got the folder {path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step", description=__doc__.split("\n")[0])
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)} (default: all)")
    p.add_argument("--variants", default=None, help="comma-separated (default: all for the device)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timings per variant (default: 5)")
    p.add_argument("--steps", type=int, default=None, help="steps per timing of the models (the epoch is timed in "
                   "blocks of 1,000 steps) (default: enough for ~--target-s of the first variant)")
    p.add_argument("--target-s", type=float, default=0.15,
                   help=f"seconds per timing of the models when --steps is unset, at most {MAX_TARGET_S:g} "
                        "(default: 0.15)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compiles) (default: 5)")
    p.add_argument("--sgd", choices=("default", "foreach", "fused"), default="default",
                   help="torch.optim.SGD implementation for every variant with an optimizer (sgd_step, sgd_epoch "
                        "and network_py have none) (default: torch's choice)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--epoch", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the Nielsen epoch ([784, 30, 10] at mini-batch 10, 5,000 steps) (default: on)")
    p.add_argument("--epoch-variants", default=None, help="comma-separated, sgd_epoch among them "
                   "(default: --variants, plus sgd_epoch when --variants is unset)")
    p.add_argument("--json", default=None,
                   help="write the raw timings, medians and ratios to this file (default: none)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # Everything checked before anything is timed: a typo must not cost a whole run.
    for flag, value, least in (("--repeats", args.repeats, 1), ("--threads", args.threads, 1),
                               ("--steps", args.steps, 1), ("--warmup", args.warmup, 0)):
        if value is not None and value < least:
            raise SystemExit(f"{flag} must be >= {least}, got {value}")
    if not 0 < args.target_s <= MAX_TARGET_S:  # (nan and inf too: a step count is computed from it)
        raise SystemExit(f"--target-s must be > 0 and at most {MAX_TARGET_S:g}, got {args.target_s}")
    for flag, value in (("--variants", args.variants), ("--epoch-variants", args.epoch_variants)):
        if value == "":
            raise SystemExit(f'{flag} "" names no variant (to time the epoch only, give --models "")')
    if args.epoch_variants is not None and not args.epoch:
        raise SystemExit(f"--epoch-variants {args.epoch_variants} has no epoch to time with --no-epoch")
    check_json_path(args.json)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    known = CUDA_VARIANTS if device.type == "cuda" else CPU_VARIANTS
    named_only = [] if device.type == "cuda" else ["network_py"]  # too slow for the default list
    epoch_only = ["sgd_epoch"]  # trains on a block of mini-batches, not on one
    variants = args.variants.split(",") if args.variants is not None else known
    epoch_variants = (args.epoch_variants.split(",") if args.epoch_variants is not None
                      else variants if args.variants is not None else variants + epoch_only)
    models = [m for m in args.models.split(",") if m]  # --models "" times the epoch only
    for flag, names, allowed in (("--variants", variants, known + named_only),
                                 ("--epoch-variants", epoch_variants, known + named_only + epoch_only)):
        for v in names:
            if v not in allowed:
                raise SystemExit(f"{flag}: unknown {v!r} for {device.type}; known: {allowed}")
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"--models: unknown {m!r}; known: {list(MODELS)}")
    if not models and not args.epoch:
        raise SystemExit("--models \"\" with --no-epoch leaves nothing to time")
    sgd = {} if args.sgd == "default" else {args.sgd: True}
    baseline, epoch_baseline = baseline_of(variants), baseline_of(epoch_variants)

    header = (
        f"torch {torch.__version__}, {device.type}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads")
        + f", python {platform.python_version()}, SGD {args.sgd}, {args.repeats} rotated repeats, medians (ratios: of per-repeat ratios)"
    )
    print(header, file=sys.stderr)
    results = {}
    for m in models:
        results[m] = bench_model(m, variants, device, sgd, args.repeats, args.steps, args.target_s, args.warmup)
    command = shlex.join(["python", "-m", "benchmarks.step", *(sys.argv[1:] if argv is None else argv)])
    out = {"header": header, "command": command, "steps": results, "baseline": baseline,
           "summary": {m: {v: dict(zip(("median_s", "ratio"), s))
                           for v, s in summary(r, "seconds_per_step", baseline).items()}
                       for m, r in results.items()}}
    if results:
        print(f"\n{header}\n\n{table(results, baseline)}")
    if args.epoch:
        epoch = bench_epoch(epoch_variants, device, sgd, args.repeats, args.warmup)
        out["epoch"], out["epoch_baseline"] = epoch, epoch_baseline
        out["epoch_summary"] = {v: dict(zip(("median_s", "ratio"), s))
                                for v, s in summary(epoch, "seconds_per_epoch", epoch_baseline).items()}
        print(f"\nEpoch, [784, 30, 10] at mini-batch 10 (5,000 steps):\n\n{epoch_table(epoch, epoch_baseline)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
