"""Checkpoints written atomically and read back with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts
(model and optimizer state, RNG states, the arguments as a dict), so the
safe unpickler loads it; anything carrying pickled code is refused.
"""

from __future__ import annotations

import os
import pickle
import tempfile

import torch


class CheckpointError(Exception):
    """The checkpoint is missing, unreadable or not a safe checkpoint (the script exits 2)."""


def save(state: dict, path: str) -> None:
    """Write ``state`` to ``path`` atomically: a crash mid-write leaves the previous file intact.

    Temp file in the same folder (same filesystem, so the rename is atomic),
    flushed and fsync'ed, then ``os.replace``; the folder is fsync'ed too so the
    rename itself survives a power cut.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``; CheckpointError with a message on any problem."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses globals outside tensors and plain containers: pickled code
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain-data checkpoint (weights_only=True rejected it: {first}). "
            "Only load checkpoints you trust; this script never unpickles code."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not {"model", "args", "epoch"} <= state.keys():
        raise CheckpointError(f"{path} is not a train.mnist checkpoint (expected a dict with model, args, epoch)")
    return state
