"""Test accuracy and confusion matrix of a ``train.mnist`` checkpoint.

    python -m train.evaluate runs/fast-20250101-120000/checkpoint.pt [--data-dir /path/to/data]

The model is rebuilt from the checkpoint's arguments, its inputs normalised
as in training; the checkpoint is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import sys

import torch

import torchbp
from train import checkpoint
from train.cli import counted
from train.data import DATA_DIR, N_CLASSES, DataError, load_test


def confusion_matrix(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(10, 10) counts: row = true digit, column = predicted digit."""
    return torch.bincount(target * N_CLASSES + predicted, minlength=N_CLASSES**2).reshape(N_CLASSES, N_CLASSES)


def format_confusion(matrix: torch.Tensor) -> str:
    width = max(5, len(str(int(matrix.max()))) + 1)
    lines = ["true\\pred" + "".join(f"{j:>{width}}" for j in range(N_CLASSES))]
    for i, row in enumerate(matrix.tolist()):
        lines.append(f"{i:>9}" + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.evaluate",
        description="Print the MNIST test accuracy and confusion matrix of a train.mnist checkpoint.",
    )
    parser.add_argument("checkpoint", help="path to checkpoint.pt")
    parser.add_argument("--data-dir", help="folder holding MNIST/raw/ (default: the run's own --data-dir)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available (default: auto)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    try:
        state = checkpoint.load(args.checkpoint, map_location=device)
        run_args = state["args"]
        if not {"sizes", "normalization"} <= run_args.keys():
            raise checkpoint.CheckpointError(
                f"{args.checkpoint} is not a train.mnist checkpoint (its args lack sizes or normalization)")
        # This script has no --download: the files to point at are those the run trained on.
        trained_on = run_args.get("data_dir")
        data_dir = args.data_dir or trained_on or DATA_DIR
        hint = ""
        if trained_on not in (None, data_dir):
            hint = f"or pass --data-dir {trained_on}, the folder its run trained on"
        model = torchbp.MLP(run_args["sizes"], fused=True, device=device)
        checkpoint.load_model(model, state, args.checkpoint)
        test, _, _ = load_test(data_dir, device, run_args["normalization"], hint=hint)
    except (checkpoint.CheckpointError, DataError) as e:
        print(f"train.evaluate: error: {e}", file=sys.stderr)
        return 2
    with torch.no_grad():
        predicted = model(test.x).argmax(1)  # (10000, 784) -> (10000, 10) -> (10000,)
    matrix = confusion_matrix(predicted, test.y).cpu()
    correct = int(matrix.trace())
    into = state.get("batch_in_epoch", 0)  # a checkpoint written mid-epoch (Ctrl-C): the steps of the next
    when = f"epoch {state['epoch']}" + (f" and {counted(into, 'step')} of epoch {state['epoch'] + 1}" if into else "")
    print(f"checkpoint {args.checkpoint}: {when}, sizes {run_args['sizes']}")
    print(f"test accuracy {correct / len(test):.2%} ({correct}/{len(test)})")
    print("confusion matrix (rows: true digit, columns: predicted digit)")
    print(format_confusion(matrix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
