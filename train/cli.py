"""Command-line helpers shared by the training scripts: argparse types that refuse bad flags before any
work, the default run folder, and counts in words."""

from __future__ import annotations

import argparse
import os
import time


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural but for one: "1 epoch", "3 epochs"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def int_in(low: int, high: int | None = None):
    """An argparse ``type``: an int in low..high (no upper bound for None), else argparse's error naming the flag."""
    def parse(text: str) -> int:
        span = f"in {low}..{high}" if high is not None else f">= {low}"
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer {span}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value
    return parse


def writable_file(path: str) -> str:
    """An argparse ``type`` for an output file in an existing folder, refused before the run rather than after."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"must be a file to write, got the folder {path}")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"must be in an existing folder, got {path} ({folder} does not exist)")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"must be in a folder you can write to, got {path}")
    return path


def logdir_arg(path: str) -> str:
    """An argparse ``type`` for --logdir: a folder that exists or can be created (TensorBoard writes into it).

    Checked without creating anything: the nearest existing ancestor must be a
    folder this user can write to.
    """
    if not path:
        raise argparse.ArgumentTypeError("must be a folder path, got ''")
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise argparse.ArgumentTypeError(f"must be a folder, got the file {path}")
        return path
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"cannot be created, {parent} is a file: got {path}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot be created, no write permission in {parent}: got {path}")
    return path


def check_default_root(parser: argparse.ArgumentParser, root: str = "runs") -> None:
    """Exit through ``parser.error`` now if the default run folders' ``root`` cannot hold them."""
    try:
        logdir_arg(root)
    except argparse.ArgumentTypeError as e:
        parser.error(f"without --logdir the run folder goes under {root}/, which {e}; give --logdir")


def new_run_folder(name: str, root: str = "runs") -> str:
    """Create and return ``root/<name>-<timestamp>``, or ``...-2``, ``-3``, ... if that exists.

    Created here, atomically, so that runs started in the same second (a sweep launched in parallel)
    each get a folder of their own. Raises OSError if ``root`` cannot be written.
    """
    base = os.path.join(root, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(root, exist_ok=True)
    path, k = base, 1
    while True:
        try:
            os.mkdir(path)  # fails if another process made it first
            return path
        except FileExistsError:
            k += 1
            path = f"{base}-{k}"
