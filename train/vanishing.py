"""The vanishing gradient at initialisation (Nielsen, *Neural Networks and Deep Learning*, ch. 5).

For sigmoid networks [784, 30, ..., 30, 10] at initialisation this measures
the "speed of learning" of every hidden layer, ‖δ^l‖ = ‖∇_{b^l} C‖, with C the
mean cost over the first ``--samples`` MNIST training images (pixels in [0, 1],
one-hot targets), averaged over ``--seeds`` initialisations, and prints it as
a markdown table next to the book's numbers. The book's setting is
``--cost cross-entropy --init gaussian-scaled``; there the first hidden layer
of [784, 30, 30, 30, 30, 10] learns ~100 times slower than the last.

    python -m train.vanishing --data-dir ../shared/data --cost cross-entropy --init gaussian-scaled
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence

import torch
from torch import Tensor

import torchbp

ARCHITECTURES = ([784, 30, 30, 10], [784, 30, 30, 30, 10], [784, 30, 30, 30, 30, 10])
# The book's table (ch. 5, cross-entropy cost, N(0, 1/n_in) weights, N(0, 1) biases).
BOOK = {
    "784-30-30-10": [0.07, 0.31],
    "784-30-30-30-10": [0.012, 0.060, 0.283],
    "784-30-30-30-30-10": [0.003, 0.017, 0.070, 0.285],
}
COSTS = {"quadratic": "quadratic", "cross-entropy": "cross_entropy"}  # flag -> torchbp's name
INITS = ("default", "gaussian-scaled")
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class MNISTNotFound(Exception):
    """The MNIST files are not where they were looked for."""


def arch_name(sizes: Sequence[int]) -> str:
    return "-".join(str(n) for n in sizes)


def load_mnist(data_dir: str, download: bool, samples: int) -> tuple[Tensor, Tensor]:
    """The first ``samples`` training images as (samples, 784) float64 in [0, 1] and one-hot (samples, 10) targets."""
    from torchvision.datasets import MNIST

    raw = os.path.join(data_dir, "MNIST", "raw")
    try:
        dataset = MNIST(root=data_dir, train=True, download=download)
    except Exception as error:  # missing files, or a download that failed
        missing = [f for f in MNIST_FILES if not os.path.isfile(os.path.join(raw, f))]
        raise MNISTNotFound(
            f"MNIST not found: looked in {os.path.abspath(raw)}, missing {', '.join(missing) or 'nothing'} "
            f"({type(error).__name__}: {error}). Get the files with --download, or point --data-dir at the "
            "folder that holds MNIST/raw/."
        ) from None
    if not 1 <= samples <= len(dataset.data):
        raise ValueError(f"--samples must be in [1, {len(dataset.data)}], got {samples}")
    # Pixels scaled to [0, 1] as in the book, no other normalisation: (n, 28, 28) -> (n, 784)
    images = dataset.data[:samples].reshape(samples, -1).to(torch.float64) / 255
    targets = torch.nn.functional.one_hot(dataset.targets[:samples], 10).to(torch.float64)
    return images, targets


def init_gaussian_scaled_(model: torchbp.MLP) -> None:
    """The book's network2 default: weights N(0, 1/n_in), biases N(0, 1)."""
    with torch.no_grad():
        for linear in model.linears:
            linear.weight.normal_(0.0, 1.0 / math.sqrt(linear.in_features))
            if linear.bias is not None:
                linear.bias.normal_(0.0, 1.0)


def hidden_delta_norms(
    sizes: Sequence[int], images: Tensor, targets: Tensor, seed: int, cost: str = "quadratic", init: str = "default",
) -> list[float]:
    """‖∇_{b^l} C‖ for every hidden layer l (first to last) of a fresh MLP(sizes), C the mean cost over the images.

    ``cost`` is torchbp's name (``"quadratic"`` or ``"cross_entropy"``),
    ``init`` one of ``"default"`` (torch.nn.Linear's) and ``"gaussian-scaled"``.
    """
    if init not in INITS:
        raise ValueError(f"hidden_delta_norms(): init must be one of {INITS}, got {init!r}")
    torch.manual_seed(seed)
    model = torchbp.MLP(sizes, dtype=images.dtype, device=images.device)
    if init == "gaussian-scaled":
        init_gaussian_scaled_(model)
    with torchbp.DeltaMonitor(model) as monitor:
        model.cost(images, targets, cost=cost).backward()
        stats = monitor.pop()
    layers = monitor.layer_names[:-1]  # the hidden layers: every Linear but the output one
    return [stats[name]["norm"] for name in layers]


def experiment(
    images: Tensor, targets: Tensor, seeds: int, cost: str = "quadratic", init: str = "default",
    architectures: Sequence[Sequence[int]] = ARCHITECTURES,
) -> dict[str, list[list[float]]]:
    """``{arch: [per seed: ‖δ^l‖ per hidden layer]}`` for seeds 0..seeds-1."""
    return {
        arch_name(sizes): [hidden_delta_norms(sizes, images, targets, seed, cost, init) for seed in range(seeds)]
        for sizes in architectures
    }


def summarise(results: dict[str, list[list[float]]]) -> dict[str, dict[str, list[float]]]:
    """Mean, standard deviation (0 for one seed), min and max over seeds, per hidden layer."""
    summary = {}
    for arch, runs in results.items():
        layers = list(zip(*runs))  # per hidden layer: its norm in every seed
        summary[arch] = {
            "mean": [statistics.fmean(v) for v in layers],
            "std": [statistics.stdev(v) if len(v) > 1 else 0.0 for v in layers],
            "min": [min(v) for v in layers],
            "max": [max(v) for v in layers],
        }
    return summary


def markdown_table(summary: dict[str, dict[str, list[float]]], seeds: int) -> str:
    lines = [
        f"| network | ‖δ^l‖ per hidden layer, first to last (mean ± std over {seeds} seeds) "
        "| min – max over seeds | first/last | book (ch. 5) |",
        "|---|---|---|---|---|",
    ]
    for arch, s in summary.items():
        mean = ", ".join(f"{m:.3g} ± {d:.2g}" for m, d in zip(s["mean"], s["std"]))
        spread = ", ".join(f"{lo:.3g} – {hi:.3g}" for lo, hi in zip(s["min"], s["max"]))
        ratio = s["mean"][0] / s["mean"][-1]
        book = ", ".join(str(v) for v in BOOK.get(arch, []))
        lines.append(f"| [{arch.replace('-', ', ')}] | {mean} | {spread} | {ratio:.3g} | {book} |")
    return "\n".join(lines)


def write_tensorboard(logdir: str, summary: dict[str, dict[str, list[float]]], table: str) -> None:
    """``vanishing/<arch>`` with the hidden layer (1 = first) as the step, and the table as text."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(logdir)
    for arch, s in summary.items():
        for layer, norm in enumerate(s["mean"], start=1):
            writer.add_scalar(f"vanishing/{arch}", norm, layer)
    writer.add_text("vanishing/table", table)
    writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.vanishing", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data-dir", default="./data", help="folder holding MNIST/raw/ (default: ./data)")
    parser.add_argument("--download", action="store_true", help="download MNIST into --data-dir if missing (default: off)")
    parser.add_argument("--seeds", type=int, default=5, help="initialisations averaged, seeds 0..N-1 (default: 5)")
    parser.add_argument("--samples", type=int, default=1000, help="first training images the cost averages over (default: 1000)")
    parser.add_argument("--cost", choices=tuple(COSTS), default="quadratic",
                        help="quadratic (the notes) or cross-entropy (the book's) (default: quadratic)")
    parser.add_argument("--init", choices=INITS, default="default",
                        help="default (torch.nn.Linear's) or gaussian-scaled (N(0, 1/n_in) weights, N(0, 1) biases, "
                             "the book's) (default: default)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="write {network: [mean ‖δ‖ per hidden layer, first to last]} here (default: none)")
    parser.add_argument("--logdir", default=None,
                        help="TensorBoard run folder (default: runs/vanishing-<timestamp>)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.samples < 1:
        parser.error(f"--samples must be >= 1, got {args.samples}")

    try:
        images, targets = load_mnist(args.data_dir, args.download, args.samples)
    except MNISTNotFound as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results = experiment(images, targets, args.seeds, COSTS[args.cost], args.init)
    summary = summarise(results)
    table = markdown_table(summary, args.seeds)
    print(f"cost={args.cost}, init={args.init}, {args.samples} MNIST training images, seeds 0..{args.seeds - 1}\n")
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({arch: s["mean"] for arch, s in summary.items()}, f, indent=2)
    logdir = args.logdir or os.path.join("runs", f"vanishing-{time.strftime('%Y%m%d-%H%M%S')}")
    write_tensorboard(logdir, summary, table)
    print(f"\nTensorBoard: tensorboard --logdir {logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
