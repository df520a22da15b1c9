"""train.evaluate and train.checkpoint on small made-up files: messages, permissions, what is read."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

import torchbp
from train import checkpoint, evaluate

from test_data import _truncate, _write_mnist


def _state(data_dir: str = "./data", normalization: str = "unit") -> dict:
    """A checkpoint as train.mnist writes it, cut down to what train.evaluate reads."""
    torch.manual_seed(0)
    model = torchbp.MLP([784, 10], fused=True)
    return {"model": model.state_dict(), "epoch": 3,
            "args": {"sizes": [784, 10], "normalization": normalization, "data_dir": data_dir}}


# ------------------------------------------------------------------ checkpoint.save


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_a_saved_checkpoint_has_the_permissions_a_plain_open_gives(tmp_path, umask):
    """Oracle: a file made by open(path, "w") under the same umask."""
    old = os.umask(umask)
    try:
        checkpoint.save({"x": torch.ones(2)}, str(tmp_path / "checkpoint.pt"))
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "checkpoint.pt").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "plain"], "no temp file is left"


def test_a_write_that_fails_midway_leaves_the_previous_file_and_no_temp_file(tmp_path):
    """metrics.json as checkpoint.pt: a write that fails after its first bytes (as a kill would) leaves the
    file that was there, whole, and removes its temp file."""
    path = tmp_path / "metrics.json"
    checkpoint.write_atomically(str(path), lambda f: f.write(b'{"test_accuracy": 0.98}'))

    def half_then_fail(f):
        f.write(b'{"test_acc')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_atomically(str(path), half_then_fail)
    assert json.loads(path.read_text()) == {"test_accuracy": 0.98}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_the_temp_files_of_a_killed_write_are_removed_and_nothing_else(tmp_path):
    """What a SIGKILL mid-write leaves (the temp file, never renamed) goes; other files stay, dot files too."""
    kept = ["checkpoint.pt", "metrics.json", ".checkpoint.pt.bak", ".notes-1.tmp", "events.out.tfevents.1.x",
            ".checkpoint-backup-before-edit.tmp", ".metrics-notes.tmp", ".checkpoint-0123456789abcdef0.tmp"]
    left = [".checkpoint-80aacef831c230cd.tmp", ".metrics-0123456789abcdef.tmp"]
    for name in kept + left:
        (tmp_path / name).write_bytes(b"x")
    checkpoint.remove_leftovers(str(tmp_path), ("checkpoint.pt", "metrics.json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


# ------------------------------------------------------------------ checkpoint.load


def _load_error(path) -> str:
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load(str(path))
    return str(info.value)


def test_a_file_that_is_no_checkpoint_is_named_as_such(tmp_path):
    """Not 'weights_only rejected it' (which suggests pickled code): the file is not a checkpoint at all."""
    (tmp_path / "metrics.json").write_text(json.dumps({"test_accuracy": 0.98}))
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, what in (("metrics.json", "it starts with b'{\"test_a'"), ("empty.pt", "it is empty")):
        message = _load_error(tmp_path / name)
        assert message == f"{tmp_path / name} is not a checkpoint: train.mnist writes checkpoint.pt with torch.save, and {what}"


def test_a_folder_is_named_as_such_and_its_checkpoint_suggested(tmp_path):
    assert _load_error(tmp_path) == f"{tmp_path} is a folder, not a checkpoint file (a run folder holds checkpoint.pt)"
    checkpoint.save(_state(), str(tmp_path / "checkpoint.pt"))
    assert _load_error(tmp_path) == f"{tmp_path} is a folder, not a checkpoint file; did you mean {tmp_path / 'checkpoint.pt'}?"
    assert _load_error(tmp_path / "nothing.pt") == f"checkpoint not found: {tmp_path / 'nothing.pt'}"


class Payload:
    """A class that a plain-data checkpoint must never contain."""


def test_pickled_code_is_still_refused_and_a_truncated_checkpoint_is_named(tmp_path):
    torch.save({"model": {}, "args": {}, "epoch": 0, "payload": Payload()}, tmp_path / "code.pt")
    assert _load_error(tmp_path / "code.pt").startswith(f"refusing to load {tmp_path / 'code.pt'}: it is not a plain-data checkpoint")
    checkpoint.save(_state(), str(tmp_path / "checkpoint.pt"))
    whole = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    assert "it is truncated, damaged or not written by torch.save" in _load_error(tmp_path / "cut.pt")
    assert checkpoint.load(str(tmp_path / "checkpoint.pt"))["epoch"] == 3  # the control


# ------------------------------------------------------------------ python -m train.evaluate


def test_evaluate_reads_only_the_test_files_for_a_unit_checkpoint(tmp_path, capsys):
    """Truncated training images do not matter. Oracle: blank images give one constant prediction, and the made-up
    labels are i % 10, so exactly 1000 of the 10,000 are right, whichever digit the model picks."""
    _truncate(_write_mnist(tmp_path))
    checkpoint.save(_state(), str(tmp_path / "checkpoint.pt"))
    assert evaluate.main([str(tmp_path / "checkpoint.pt"), "--data-dir", str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "epoch 3, sizes [784, 10]" in out and "test accuracy 10.00% (1000/10000)" in out
    # A checkpoint from a Ctrl-C mid-epoch says how far into the next epoch it is (it said "epoch 3" alone)
    for steps, said in ((7, "7 steps"), (1, "1 step")):
        checkpoint.save({**_state(), "batch_in_epoch": steps}, str(tmp_path / "checkpoint.pt"))
        assert evaluate.main([str(tmp_path / "checkpoint.pt"), "--data-dir", str(tmp_path), "--device", "cpu"]) == 0
        assert f"epoch 3 and {said} of epoch 4, sizes [784, 10]" in capsys.readouterr().out


def test_evaluate_without_the_files_advises_what_it_can_do(tmp_path, capsys):
    """train.evaluate has no --download; the run's own --data-dir is the likely place of the files."""
    checkpoint.save(_state(data_dir="/data/of/the/run"), str(tmp_path / "checkpoint.pt"))
    assert evaluate.main([str(tmp_path / "checkpoint.pt"), "--data-dir", str(tmp_path / "none"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.evaluate: error: MNIST files not found") and err.count("\n") == 1
    assert "--download" not in err and err.endswith(
        "and pass --data-dir DIR, or pass --data-dir /data/of/the/run, the folder its run trained on.\n")


def test_evaluate_names_a_json_file_and_a_folder_for_what_they_are(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text("{}")
    for path, says in ((tmp_path / "metrics.json", "is not a checkpoint"), (tmp_path, "is a folder, not a checkpoint file")):
        assert evaluate.main([str(path), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"train.evaluate: error: {path} {says}") and "weights_only" not in err
    torch.save({"model": {}, "args": {}, "epoch": 0}, tmp_path / "other.pt")  # plain data, but not train.mnist's
    assert evaluate.main([str(tmp_path / "other.pt"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (f"train.evaluate: error: {tmp_path / 'other.pt'} is not a train.mnist checkpoint "
                                       "(its args lack sizes or normalization)\n")


def test_evaluate_names_weights_that_do_not_fit_the_checkpoints_own_sizes(tmp_path, capsys):
    """A checkpoint edited by hand (its sizes [784, 30, 10], its weights [784, 10]'s): one line and exit 2,
    naming the mismatched weights, as every other bad checkpoint; it was a traceback."""
    state = _state()
    state["args"]["sizes"] = [784, 30, 10]
    checkpoint.save(state, str(tmp_path / "checkpoint.pt"))
    assert evaluate.main([str(tmp_path / "checkpoint.pt"), "--data-dir", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"train.evaluate: error: {tmp_path / 'checkpoint.pt'}: its weights do not fit the model "
                          "its arguments describe: ") and err.count("\n") == 1
    assert "size mismatch for 0.weight" in err and "Missing key(s)" in err


def test_evaluate_help_names_the_module_and_gives_each_default_once(capsys):
    with pytest.raises(SystemExit) as info:
        evaluate.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal's width
    assert info.value.code == 0 and out.startswith("usage: python -m train.evaluate ")
    for default in ("(default: the run's own --data-dir)", "(default: auto)"):
        assert out.count(default) == 1, (default, out)
