"""Checkpoints written atomically and read back with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts
(model and optimizer state, RNG states, the arguments as a dict), so the
safe unpickler loads it; anything carrying pickled code is refused.
"""

from __future__ import annotations

import os
import pickle
import re
import secrets
from collections.abc import Callable
from typing import BinaryIO

import torch

# What torch.save writes: a zip archive (since torch 1.6), or a bare pickle (the legacy format, protocol >= 2).
TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")


class CheckpointError(Exception):
    """The checkpoint is missing, unreadable or not a safe checkpoint (the script exits 2)."""


def save(state: dict, path: str) -> None:
    """Write ``state`` with torch.save to ``path``, atomically (:func:`write_atomically`)."""
    write_atomically(path, lambda f: torch.save(state, f))


def write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
    """``write(file)`` into ``path`` atomically: a crash mid-write leaves the previous file intact.

    Temp file in the same folder (same filesystem, so the rename is atomic),
    flushed and fsync'ed, then ``os.replace``; the folder is fsync'ed too so the
    rename itself survives a power cut. Temp files a killed process left behind
    (``.<name>-<hex>.tmp``) are removed by :func:`remove_leftovers`.
    """
    folder, name = os.path.split(os.path.abspath(path))
    # open(..., "xb") rather than mkstemp: the file gets the permissions a plain open() gives
    # (0o666 less the umask), where mkstemp's 0o600 would hide checkpoints from the user's group.
    tmp = os.path.join(folder, f".{_stem(name)}-{secrets.token_hex(8)}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
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


def remove_leftovers(folder: str, names: tuple[str, ...]) -> None:
    """Remove the temp files of :func:`write_atomically` for ``names`` that a killed process left in ``folder``:
    ``.<stem>-<16 hex digits>.tmp``, and nothing else."""
    ours = re.compile("|".join(rf"\.{re.escape(_stem(name))}-[0-9a-f]{{16}}\.tmp" for name in names))
    for entry in os.listdir(folder):
        if ours.fullmatch(entry):
            os.remove(os.path.join(folder, entry))


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]  # checkpoint.pt -> checkpoint, as the temp files were always named


def load(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``; CheckpointError with a message on any problem."""
    if os.path.isdir(path):
        inside = os.path.join(path, "checkpoint.pt")
        hint = f"; did you mean {inside}?" if os.path.isfile(inside) else " (a run folder holds checkpoint.pt)"
        raise CheckpointError(f"{path} is a folder, not a checkpoint file{hint}")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not head.startswith(TORCH_FILE_STARTS):
        what = "it is empty" if not head else f"it starts with {head!r}"
        raise CheckpointError(
            f"{path} is not a checkpoint: train.mnist writes checkpoint.pt with torch.save, and {what}"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # A torch.save file that weights_only refuses holds globals beyond tensors and plain containers: pickled code
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain-data checkpoint (weights_only=True rejected it: {first}). "
            "Only load checkpoints you trust; this script never unpickles code."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is truncated, damaged or not written by torch.save ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state, dict) or not {"model", "args", "epoch"} <= state.keys() or not isinstance(state["args"], dict):
        raise CheckpointError(f"{path} is not a train.mnist checkpoint (expected a dict with model, args (a dict), epoch)")
    return state


def load_model(model: torch.nn.Module, state: dict, path: str) -> None:
    """``state["model"]`` into ``model``; a CheckpointError, in one line, where it does not fit (an edited file)."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # torch's message: a title line, then one line per mismatched key
        details = "; ".join(line.strip() for line in str(e).splitlines()[1:]) or str(e)
        raise CheckpointError(f"{path}: its weights do not fit the model its arguments describe: {details}") from None
