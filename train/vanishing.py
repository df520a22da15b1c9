"""The vanishing gradient at initialisation (Nielsen, *Neural Networks and Deep Learning*, ch. 5).

For sigmoid networks [784, 30, ..., 30, 10] at initialisation this measures
the "speed of learning" of every hidden layer, ‖δ^l‖ = ‖∇_{b^l} C‖, with C the
mean cost over the first ``--samples`` MNIST training images (pixels in [0, 1],
one-hot targets), averaged over ``--seeds`` initialisations, and prints it as
a markdown table. The book's setting is ``--cost cross-entropy --init
gaussian-scaled --samples 1000``; only there does the table show the book's
numbers beside the run's (the first hidden layer of [784, 30, 30, 30, 30, 10]
learns about 127 times slower than the last).

    python -m train.vanishing --data-dir ../shared/data --cost cross-entropy --init gaussian-scaled
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections.abc import Sequence

import torch
from torch import Tensor

import torchbp
from train.cli import check_default_root, counted, int_in, logdir_arg, new_run_folder, writable_file
from train.data import DATA_DIR, EXPECTED_COUNT, DataError, read_mnist

ARCHITECTURES = ([784, 30, 30, 10], [784, 30, 30, 30, 10], [784, 30, 30, 30, 30, 10])
# The book's table (ch. 5, cross-entropy cost, N(0, 1/n_in) weights, N(0, 1) biases, the first 1000 training images).
BOOK = {
    "784-30-30-10": [0.07, 0.31],
    "784-30-30-30-10": [0.012, 0.060, 0.283],
    "784-30-30-30-30-10": [0.003, 0.017, 0.070, 0.285],
}
BOOK_SETTING = {"cost": "cross-entropy", "init": "gaussian-scaled", "samples": 1000}  # flag -> the book's value
COSTS = {"quadratic": "quadratic", "cross-entropy": "cross_entropy"}  # flag -> torchbp's name
INITS = ("default", "gaussian-scaled")
N_IMAGES = EXPECTED_COUNT[True]  # the MNIST training images --samples draws from


def arch_name(sizes: Sequence[int]) -> str:
    return "-".join(str(n) for n in sizes)


def load_mnist(data_dir: str, download: bool, samples: int) -> tuple[Tensor, Tensor]:
    """The first ``samples`` training images as (samples, 784) float64 in [0, 1] and one-hot (samples, 10) targets.

    Raises :class:`train.data.DataError` for missing or bad files or a failed download.
    """
    if not 1 <= samples <= N_IMAGES:
        raise ValueError(f"load_mnist(): samples must be in 1..{N_IMAGES}, got {samples}")
    images, labels = read_mnist(data_dir, train=True, download=download)
    # Pixels scaled to [0, 1] as in the book, no other normalisation: (n, 28, 28) -> (n, 784)
    images = images[:samples].reshape(samples, -1).to(torch.float64) / 255
    targets = torch.nn.functional.one_hot(labels[:samples], 10).to(torch.float64)
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


def markdown_table(summary: dict[str, dict[str, list[float]]], seeds: int, book: bool = False) -> str:
    """One row per network; with ``book`` a column of the book's figures (only for a run in the book's setting)."""
    lines = [
        f"| network | ‖δ^l‖ per hidden layer, first to last (mean ± std over {counted(seeds, 'seed')}) "
        "| min – max over seeds | first/last |" + (" book (ch. 5) |" if book else ""),
        "|---|---|---|---|" + ("---|" if book else ""),
    ]
    for arch, s in summary.items():
        mean = ", ".join(f"{m:.3g} ± {d:.2g}" for m, d in zip(s["mean"], s["std"]))
        spread = ", ".join(f"{lo:.3g} – {hi:.3g}" for lo, hi in zip(s["min"], s["max"]))
        ratio = s["mean"][0] / s["mean"][-1]
        row = f"| [{arch.replace('-', ', ')}] | {mean} | {spread} | {ratio:.3g} |"
        if book:
            row += " " + ", ".join(str(v) for v in BOOK.get(arch, [])) + " |"
        lines.append(row)
    return "\n".join(lines)


def book_setting(args: argparse.Namespace) -> bool:
    """Whether the run's settings are the book's, so that its figures compare with the run's."""
    return all(getattr(args, flag) == value for flag, value in BOOK_SETTING.items())


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
    )
    parser.add_argument("--data-dir", default=DATA_DIR, help=f"folder holding MNIST/raw/ (default: {DATA_DIR})")
    parser.add_argument("--download", action="store_true", help="download MNIST into --data-dir if missing (default: off)")
    parser.add_argument("--seeds", type=int_in(1), default=5, metavar="N",
                        help="initialisations averaged, seeds 0..N-1 (default: 5)")
    parser.add_argument("--samples", type=int_in(1, N_IMAGES), default=BOOK_SETTING["samples"], metavar="N",
                        help=f"first training images the cost averages over, 1..{N_IMAGES} (default: 1000)")
    parser.add_argument("--cost", choices=tuple(COSTS), default="quadratic",
                        help="quadratic (the notes) or cross-entropy (the book's) (default: quadratic)")
    parser.add_argument("--init", choices=INITS, default="default",
                        help="default (torch.nn.Linear's) or gaussian-scaled (N(0, 1/n_in) weights, N(0, 1) biases, "
                             "the book's) (default: default)")
    parser.add_argument("--json", metavar="PATH", type=writable_file, default=None,
                        help="write {network: [mean ‖δ‖ per hidden layer, first to last]} here (default: none)")
    parser.add_argument("--logdir", type=logdir_arg, default=None,
                        help="TensorBoard run folder (default: runs/vanishing-<timestamp>)")
    args = parser.parse_args(argv)
    if args.logdir and os.path.isdir(args.logdir) and os.listdir(args.logdir):
        # another experiment's curves would be interleaved with this one's in the same charts
        parser.error(f"--logdir must be a new or empty folder, got {args.logdir} (not empty)")
    if args.logdir is None:
        check_default_root(parser)

    try:
        images, targets = load_mnist(args.data_dir, args.download, args.samples)
    except DataError as error:
        print(f"train.vanishing: error: {error}", file=sys.stderr)
        return 2
    results = experiment(images, targets, args.seeds, COSTS[args.cost], args.init)
    summary = summarise(results)
    book = book_setting(args)
    table = markdown_table(summary, args.seeds, book)
    print(f"cost={args.cost}, init={args.init}, {args.samples} MNIST training images, seeds 0..{args.seeds - 1}\n")
    print(table)
    if not book:
        flags = " ".join(f"--{flag} {value}" for flag, value in BOOK_SETTING.items())
        print(f"\n(The book's figures, ch. 5, hold for {flags}; this run's settings differ, so the table leaves them out.)")
    writing = args.json  # what is being written, for an error that names no file (a failed write or close)
    try:
        if args.json:
            with open(args.json, "w") as f:
                json.dump({arch: s["mean"] for arch, s in summary.items()}, f, indent=2)
        # a folder of its own, even for parallel runs
        logdir = writing = args.logdir or new_run_folder("vanishing")
        write_tensorboard(logdir, summary, table)
    except OSError as error:  # what the flags' checks cannot see ahead (a read-only mount, /proc, a full disk)
        print(f"train.vanishing: error: cannot write {error.filename or writing}: {error.strerror}", file=sys.stderr)
        return 2
    print(f"\nTensorBoard: tensorboard --logdir {logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
