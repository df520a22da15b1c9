"""MNIST as tensors on the training device, split like Nielsen's book, and index-drawn mini-batches.

The files are read by :class:`torchvision.datasets.MNIST` (torchvision's IDX
reader), then every split is turned into ONE float tensor on the device:
no per-sample PIL transform, no DataLoader worker. A mini-batch is an index
into that tensor, so an epoch of batches costs one ``randperm`` and one
gather, and each batch is then a view. ``python -m train.data --data-dir DIR``
measures that against torchvision's DataLoader with ``ToTensor``.

Split (Nielsen, "Neural Networks and Deep Learning", chapter 1): the first
50,000 training images train, the last 10,000 validate (model selection), the
10,000 test images give the final figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from collections.abc import Iterator

import torch
from torch import Tensor

from train.cli import int_in

N_TRAIN = 50_000  # the first 50,000 of the 60,000 training images; the rest validate
IMAGE_SHAPE = (28, 28)
N_CLASSES = 10
FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
EXPECTED_COUNT = {True: 60_000, False: 10_000}
NORMALIZATIONS = ("unit", "standard")
DATA_DIR = "./data"  # every script's --data-dir default

FILE_LIST = ", ".join(FILES[True] + FILES[False])
# How else to get the files, for a script with a --download flag; a script without one passes its own.
DOWNLOAD_HINT = "or run once with --download where the internet is reachable"


class DataError(Exception):
    """MNIST could not be loaded: the message says where, what and how to fix it (the script exits 2)."""


@dataclass
class Split:
    """One split on the device: images ``x`` (N, 784) normalised floats, labels ``y`` (N,) int64."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass
class MNIST:
    train: Split
    val: Split
    test: Split
    # pixel = x * std + mean recovers [0, 1] pixels (for images of misclassified digits)
    mean: float
    std: float


def _raw(root: str) -> str:
    return os.path.join(root, "MNIST", "raw")


def _missing(raw: str) -> list[str]:
    return [f for f in FILES[True] + FILES[False] if not os.path.isfile(os.path.join(raw, f))]


def _meant(root: str) -> str | None:
    """The DIR whose MNIST/raw holds the files where ``root`` is DIR/MNIST or DIR/MNIST/raw itself, else None."""
    root = os.path.realpath(root)  # (a link to DIR/MNIST: its parent is DIR's, not the link's)
    for up in (os.path.dirname(root), os.path.dirname(os.path.dirname(root))):
        if up != root and not _missing(_raw(up)):
            return up
    return None


def _folders_to_create(path: str) -> list[str]:
    """``path`` and those of its parents that do not exist yet, deepest first: what ``os.makedirs`` would make."""
    path, absent = os.path.abspath(path), []
    while not os.path.exists(path):
        absent.append(path)
        path = os.path.dirname(path)
    return absent


def _fetch(root: str) -> None:
    """Download the four files into root/MNIST/raw/ through torchvision unless they are all there; DataError if that fails.

    A failed attempt removes the folders it created and left empty, so that the
    next run reports missing files rather than finding an empty raw/ folder.
    """
    from torchvision import datasets

    raw = _raw(root)
    if not _missing(raw):
        return  # torchvision would skip the download too; bad files are reported when read
    created = _folders_to_create(raw)
    try:
        datasets.MNIST(root=root, train=True, download=True)
    # The network stack fails in many types (URLError, timeouts, http.client errors, torchvision's
    # RuntimeError naming each mirror); the files still missing afterwards is what marks a failed download.
    except Exception as e:
        if not _missing(raw):
            return  # downloaded, but unreadable: _read says how
        for folder in created:
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
        cause = " ".join(str(e).split()) or "no message"  # torchvision's message spans lines, one per mirror
        if isinstance(e, OSError) and e.filename:  # the file system, not the network
            fix = f"check that {os.path.abspath(root)} is a folder you can write to"
        else:
            fix = "check the internet connection"
        raise DataError(
            f"MNIST download into {os.path.abspath(raw)} failed ({cause}). "
            f"{fix.capitalize()}, or put the four IDX files ({FILE_LIST}) in {os.path.abspath(raw)} yourself."
        ) from None


def _read(root: str, train: bool, hint: str):
    """(images uint8 (N, 28, 28), labels int64 (N,)) through torchvision, or DataError."""
    from torchvision import datasets

    raw = _raw(root)
    split = "training" if train else "test"
    try:
        dataset = datasets.MNIST(root=root, train=train, download=False)
    except RuntimeError as e:
        if "Dataset not found" not in str(e):
            raise _corrupt(raw, split, e, hint) from None
        missing, meant = _missing(raw), _meant(root)
        raise DataError(
            f"MNIST files not found: looked in {os.path.abspath(raw)}, missing "
            f"{', '.join(missing) or '(unreadable files)'}. "
            + (f"They are in {_raw(meant)}: pass --data-dir {meant}, the folder that holds MNIST/raw/." if meant else
               f"Put the four IDX files ({FILE_LIST}) in DIR/MNIST/raw/ and pass --data-dir DIR"
               f"{', ' + hint if hint else ''}.")
        ) from None
    except (AssertionError, KeyError, TypeError, ValueError, IndexError, OSError) as e:
        # read_image_file / read_label_file: bad magic number (assert, typemap KeyError),
        # wrong dtype or rank (TypeError/ValueError), header cut short (IndexError/ValueError), unreadable (OSError)
        raise _corrupt(raw, split, e, hint) from None
    images, labels = dataset.data, dataset.targets
    n = EXPECTED_COUNT[train]
    if tuple(images.shape) != (n, *IMAGE_SHAPE) or images.dtype != torch.uint8:
        raise _corrupt(raw, split, f"images have shape {tuple(images.shape)} {images.dtype}, "
                                   f"expected ({n}, 28, 28) torch.uint8", hint)
    if tuple(labels.shape) != (n,):
        raise _corrupt(raw, split, f"labels have shape {tuple(labels.shape)}, expected ({n},)", hint)
    if labels.min() < 0 or labels.max() >= N_CLASSES:
        raise _corrupt(raw, split, f"labels span {int(labels.min())}..{int(labels.max())}, expected 0..9", hint)
    return images, labels


def _corrupt(raw: str, split: str, why: object, hint: str) -> DataError:
    # A download skips files that are there, so fresh copies come only after deleting these.
    return DataError(
        f"MNIST {split} files in {os.path.abspath(raw)} are corrupt or truncated "
        f"({type(why).__name__ + ': ' if isinstance(why, Exception) else ''}{why or 'malformed IDX file'}). "
        f"Delete them, then put fresh copies of the four IDX files ({FILE_LIST}) there{', ' + hint if hint else ''}."
    )


def read_mnist(root: str, train: bool, download: bool = False, *, hint: str = DOWNLOAD_HINT) -> tuple[Tensor, Tensor]:
    """One file pair of ``root/MNIST/raw/``, checked: (images uint8 (N, 28, 28), labels int64 (N,)) on the CPU.

    ``train`` picks the 60,000 training images, else the 10,000 test images;
    ``download`` fetches missing files first. ``hint`` ends the messages of
    missing or corrupt files with the script's other way to get them (its
    ``--download`` flag by default; "" for none). Raises :class:`DataError`.
    """
    if download:
        _fetch(root)
    return _read(root, train, hint)


def _unit(images: Tensor, device: torch.device | str) -> Tensor:
    """(N, 28, 28) uint8 -> (N, 784) float32 in [0, 1] on the device."""
    return images.to(device).reshape(len(images), -1).float().div_(255)


def _standard_stats(x_train: Tensor) -> tuple[float, float]:
    """Mean and std over the 50,000 training images' unit pixels ``(N_TRAIN, 784)``, for "standard"."""
    return x_train.mean().item(), x_train.std().item()


def load_mnist(
    root: str, device: torch.device | str = "cpu", normalization: str = "unit", download: bool = False,
    *, hint: str = DOWNLOAD_HINT,
) -> MNIST:
    """Load MNIST from ``root`` (holding ``MNIST/raw/``) as device tensors split 50,000/10,000/10,000.

    ``normalization`` is ``"unit"`` (pixels in [0, 1], as in Nielsen's book) or
    ``"standard"`` (zero mean, unit variance over the 50,000 training pixels).
    Raises :class:`DataError` for missing or corrupt files or a failed download
    (``hint``: see :func:`read_mnist`).
    """
    _check_normalization("load_mnist", normalization)
    train_images, train_labels = read_mnist(root, True, download, hint=hint)
    test_images, test_labels = read_mnist(root, False, hint=hint)
    x, x_test = _unit(train_images, device), _unit(test_images, device)
    mean, std = 0.0, 1.0
    if normalization == "standard":
        mean, std = _standard_stats(x[:N_TRAIN])
        x, x_test = (x - mean) / std, (x_test - mean) / std
    y, y_test = train_labels.to(device), test_labels.to(device)
    return MNIST(
        train=Split(x[:N_TRAIN], y[:N_TRAIN]),
        val=Split(x[N_TRAIN:], y[N_TRAIN:]),
        test=Split(x_test, y_test),
        mean=mean,
        std=std,
    )


def load_test(
    root: str, device: torch.device | str = "cpu", normalization: str = "unit", download: bool = False,
    *, hint: str = DOWNLOAD_HINT,
) -> tuple[Split, float, float]:
    """(test split, mean, std) exactly as :func:`load_mnist` gives them, without building the other splits.

    "unit" reads only the test files; "standard" also reads the training images,
    for the statistics the test images are normalised with.
    """
    _check_normalization("load_test", normalization)
    test_images, test_labels = read_mnist(root, False, download, hint=hint)
    x_test, mean, std = _unit(test_images, device), 0.0, 1.0
    if normalization == "standard":
        train_images, _ = read_mnist(root, True, hint=hint)
        mean, std = _standard_stats(_unit(train_images[:N_TRAIN], device))
        x_test = (x_test - mean) / std
    return Split(x_test, test_labels.to(device)), mean, std


def _check_normalization(caller: str, normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"{caller}(): normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


def one_hot(labels: Tensor, low: float = 0.0, high: float = 1.0) -> Tensor:
    """Targets y for the quadratic cost: ``high`` at the label, ``low`` elsewhere. (N,) -> (N, 10)."""
    y = torch.full((labels.shape[0], N_CLASSES), low, device=labels.device)
    return y.scatter_(1, labels[:, None], high)


class Batches:
    """Shuffled mini-batches ``(x, y)`` of ``split``, epoch by epoch.

    The permutation is drawn from a CPU ``torch.Generator``, so saving its state
    before an epoch and the number of batches done lets a run resume mid-epoch.
    Each epoch gathers the split ONCE, in permuted order, into buffers allocated
    once, and every batch is a slice (a view) of them: no per-step gather, and
    no fresh 150 MB allocation per epoch (page faults dominate a plain copy).
    The last incomplete batch is dropped (DataLoader's ``drop_last=True``):
    every step has ``batch_size`` samples and every rank an equal shard.
    With ``world_size > 1`` all ranks draw the same permutation (same seed)
    and rank ``r`` takes the r-th contiguous slice of each global batch.
    """

    def __init__(self, split: Split, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ValueError(f"Batches: batch_size ({batch_size}) must be divisible by world_size ({world_size})")
        if not 0 < batch_size <= len(split):
            raise ValueError(f"Batches: batch_size must be in 1..{len(split)} (the split's size), got {batch_size}")
        self.split, self.batch_size = split, batch_size
        self.rank, self.shard = rank, batch_size // world_size
        self.n_batches = len(split) // batch_size
        self._x = torch.empty_like(split.x)
        self._y = torch.empty_like(split.y)

    def __len__(self) -> int:
        return self.n_batches

    def epoch(self, generator: torch.Generator, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """The epoch's batches from ``start`` on; draws the permutation from ``generator`` at once."""
        self.shuffle(generator)
        return self._slices(start)

    def shuffle(self, generator: torch.Generator) -> None:
        """Start an epoch: draw its permutation from ``generator``; :meth:`span` then gives its batches."""
        perm = torch.randperm(len(self.split), generator=generator).to(self._x.device)
        # (N, 784) gathered in the epoch's order, into the buffers of the previous epoch
        torch.index_select(self.split.x, 0, perm, out=self._x)
        torch.index_select(self.split.y, 0, perm, out=self._y)

    def span(self, first: int, count: int = 1) -> tuple[Tensor, Tensor]:
        """Batches ``first .. first + count - 1`` of the current epoch as one view ``(count * batch_size, ...)``.

        This rank's shard of batch ``first`` when ``count`` is 1; several batches at once only in one
        process, where they lie next to each other (a rank's shards do not).
        """
        if count > 1 and self.shard != self.batch_size:
            raise ValueError(f"Batches.span: count must be 1 when the batches are sharded across ranks, got {count}")
        i = first * self.batch_size + self.rank * self.shard
        j = i + (count - 1) * self.batch_size + self.shard
        return self._x[i:j], self._y[i:j]

    def _slices(self, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        for step in range(start, self.n_batches):
            yield self.span(step)


def _benchmark(root: str, batch_size: int, repeats: int, download: bool) -> None:
    """Time one epoch of the 50,000 training images: DataLoader+ToTensor against index batches."""
    from torchvision import datasets, transforms
    from torch.utils.data import DataLoader, Subset

    data = load_mnist(root, download=download)  # first: DataError for missing or bad files
    torch.manual_seed(0)
    dataset = datasets.MNIST(root=root, train=True, transform=transforms.ToTensor())
    loader = DataLoader(Subset(dataset, range(N_TRAIN)), batch_size=batch_size, shuffle=True)
    generator = torch.Generator().manual_seed(0)
    batches = Batches(data.train, batch_size)

    def dataloader_epoch():
        for x, y in loader:
            x.view(len(x), -1)

    def tensor_epoch():
        for x, y in batches.epoch(generator):
            pass

    times = {"dataloader": [], "tensor": []}
    for _ in range(repeats):  # interleaved A B A B: the machine's load hits both alike
        for name, epoch in (("dataloader", dataloader_epoch), ("tensor", tensor_epoch)):
            t0 = time.perf_counter()
            epoch()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"one epoch of {N_TRAIN} images, batch {batch_size}, median of {repeats}:")
    print(f"  DataLoader + ToTensor : {med['dataloader']:.3f} s")
    print(f"  index into tensor     : {med['tensor']:.4f} s")
    print(f"  speed-up              : {med['dataloader'] / med['tensor']:.0f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.data",
        description="Measure the loader: DataLoader+ToTensor against index batches from a device tensor.",
    )
    parser.add_argument("--data-dir", default=DATA_DIR, help=f"folder holding MNIST/raw/ (default: {DATA_DIR})")
    parser.add_argument("--download", action="store_true", help="download MNIST into --data-dir if missing (default: off)")
    parser.add_argument("--batch-size", type=int_in(1, N_TRAIN), default=128, metavar="N",
                        help=f"mini-batch size, 1..{N_TRAIN} (default: 128)")
    parser.add_argument("--repeats", type=int_in(1), default=3, metavar="N",
                        help="epochs timed per loader (median) (default: 3)")
    args = parser.parse_args(argv)
    try:
        _benchmark(args.data_dir, args.batch_size, args.repeats, args.download)
    except DataError as e:
        print(f"train.data: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
