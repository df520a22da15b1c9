"""python -m train.mnist end to end on the real MNIST files: runs, resume, signals, checkpoints, DDP.

Every run is a subprocess (``sys.executable -m train.mnist``, cwd = the
repository root) on a small ``--limit-train`` subset with a tiny hidden layer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import torchbp
from oracles import nn_sequential

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("TORCHBP_DATA_DIR")
pytestmark = pytest.mark.skipif(not DATA_DIR, reason="TORCHBP_DATA_DIR is not set")

# Adam + one-cycle (the fast recipe's optimizer and schedule, whose state a resume must restore),
# a tiny network, batches of 10: 300 steps per epoch, long enough to interrupt mid-run.
RESUME_RUN = ["--recipe", "fast", "--hidden", "16", "--batch-size", "10", "--limit-train", "3000",
              "--epochs", "3", "--log-every", "50", "--seed", "3"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "train.mnist", "--data-dir", DATA_DIR, *args]


def run(*args: str, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {path.name} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.01)


def sequential(state: dict) -> nn.Sequential:
    """The checkpoint's weights in a plain torch.nn network (Linear, Sigmoid, ...)."""
    net = nn_sequential(state["args"]["sizes"])
    net.load_state_dict(state["model"])
    return net


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


@pytest.fixture(autouse=True)
def event_files_numbered_as_in_a_fresh_process(monkeypatch):
    """Each test's in-process runs name their event files as a command-line run does, in a fresh process.

    TensorBoard numbers a process's event files with one counter, written into the names, which it reads
    in name order: ``<second>.<host>.<pid>.10`` comes before ``<second>.<host>.<pid>.9``. A short run
    resumed in the second it started, after tens of writers in the same process, then had its records
    read out of order, and TensorBoard dropped those whose step went back.
    """
    from tensorboard.summary.writer import event_file_writer

    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(0))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """Run A: RESUME_RUN from start to end, the reference of the resume tests."""
    logdir = tmp_path_factory.mktemp("uninterrupted")
    result = run(*RESUME_RUN, "--logdir", str(logdir))
    assert result.returncode == 0, result.stderr
    return logdir


def test_dry_run_trains_one_batch_and_writes_the_run_folder(tmp_path):
    """One step, which is a log step whatever --log-every says: the dry run tries the step logging too (the
    loss, lr, δ statistics and gradient norms at step 1; before, a dry run logged none of them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run("--dry-run", "--hidden", "8", "--logdir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["epochs"] == 1
    assert load(tmp_path / "checkpoint.pt")["step"] == 1
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    for tag in ("train/loss", "train/lr", "delta/norm/0", "delta/norm/2", "grad/weight_norm/0"):
        assert [e.step for e in events.Scalars(tag)] == [1], tag
    assert "log-every" not in result.stderr


def test_a_run_shorter_than_log_every_says_it_logs_no_step(tmp_path):
    """2 steps with --log-every 100: no step is a log step, and a note on stderr says so (the run itself is
    as before: each epoch's loss and accuracies)."""
    result = run("--hidden", "8", "--limit-train", "256", "--batch-size", "128", "--epochs", "1",
                 "--logdir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert ("note: --log-every 100 is more than this run's 2 steps: it logs no step's loss, δ statistics or "
            "gradient norms") in result.stderr
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 2


def test_short_run_metrics_checkpoint_and_tensorboard(tmp_path):
    """2 epochs of the nielsen recipe on 2,000 images; the oracle for accuracy is plain torch.nn."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torchvision import datasets

    result = run("--recipe", "nielsen", "--limit-train", "2000", "--epochs", "2", "--log-every", "20",
                 "--delta-hist-every", "100", "--logdir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    # stdout is not a terminal: one plain line per epoch, no progress bar
    lines = [l for l in result.stdout.splitlines() if l.startswith("epoch")]
    assert len(lines) == 2 and all("train loss" in l and "val acc" in l and "test acc" in l for l in lines)

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("test_accuracy", "best_val_accuracy", "epochs", "train_seconds", "steps_per_second", "args"):
        assert key in metrics
    assert metrics["epochs"] == 2 and metrics["steps"] == 2 * 200
    assert metrics["args"]["lr"] == 3.0 and metrics["args"]["sizes"] == [784, 30, 10]
    # The summary fields from the per-epoch history, as the README defines them
    history = metrics["history"]
    best = max(history, key=lambda h: h["val_accuracy"])
    assert metrics["best_val_accuracy"] == best["val_accuracy"]
    assert metrics["test_accuracy_at_best_val"] == best["test_accuracy"]
    assert metrics["best_test_accuracy"] == max(h["test_accuracy"] for h in history)
    assert metrics["test_accuracy"] == history[-1]["test_accuracy"]
    assert metrics["final_train_loss"] == history[-1]["train_loss"]

    # The checkpoint's weights in torch.nn.Sequential give the reported test accuracy, and the last epoch's
    # validation accuracy on training images 50,000-59,999 (pixels in [0, 1]).
    state = load(tmp_path / "checkpoint.pt")
    test = datasets.MNIST(DATA_DIR, train=False)
    with torch.no_grad():
        out = sequential(state)(test.data.reshape(-1, 784).float() / 255)
    accuracy = (out.argmax(1) == test.targets).double().mean().item()
    assert metrics["test_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert accuracy > 0.3, "it learns: chance is 10% (this run measured 57%)"
    training = datasets.MNIST(DATA_DIR, train=True)
    with torch.no_grad():
        val_out = sequential(state)(training.data[50_000:].reshape(-1, 784).float() / 255)
    val_accuracy = (val_out.argmax(1) == training.targets[50_000:]).double().mean().item()
    assert history[-1]["val_accuracy"] == pytest.approx(val_accuracy, abs=1e-9)

    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/lr", "accuracy/val", "accuracy/test", "epoch/train_loss",
                "delta/norm/0", "delta/norm/2", "delta/sample_norm/0", "grad/weight_norm/2", "hparam/test_accuracy"):
        assert tag in tags["scalars"], tag
    assert "test/misclassified" in tags["images"]
    assert "delta/hist/0" in tags["histograms"]
    assert "custom_scalars__config__" in tags["tensors"]
    assert [e.step for e in events.Scalars("train/loss")] == list(range(20, 401, 20))
    assert not [p for p in tmp_path.iterdir() if p.is_dir()], "hparams stay in the run folder"

    evaluation = subprocess.run(
        [sys.executable, "-m", "train.evaluate", str(tmp_path / "checkpoint.pt"), "--data-dir", DATA_DIR],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert evaluation.returncode == 0, evaluation.stderr
    assert f"({round(accuracy * 10000)}/10000)" in evaluation.stdout
    rows = [l.split() for l in evaluation.stdout.splitlines()[-10:]]
    matrix = torch.tensor([[int(v) for v in row[1:]] for row in rows])
    expected = torch.zeros(10, 10, dtype=torch.long)
    for t, p in zip(test.targets.tolist(), out.argmax(1).tolist()):
        expected[t, p] += 1
    assert torch.equal(matrix, expected)


@pytest.mark.parametrize("normalization", ["unit", "standard"])
def test_the_data_is_what_the_flags_say(normalization):
    """train.mnist's training data as its flags give it: --limit-train 300 the first 300 training images,
    their pixels as --normalization says, targets one-hot in --target-range; validation the images
    50,000-59,999, test the 10,000 test images. Oracle: torchvision's MNIST read here, normalised (by the
    mean and std of the first 50,000 training pixels for "standard") and one-hot by hand; 1e-5."""
    import argparse

    from torchvision import datasets

    import train.mnist

    args = argparse.Namespace(data_dir=DATA_DIR, download=False, normalization=normalization, limit_train=300,
                              batch_size=100, target_range=[0.1, 0.9], dry_run=False)
    _, batches, val, test = train.mnist.load_data(args, torch.device("cpu"), 0, 1)
    training, testing = datasets.MNIST(DATA_DIR, train=True), datasets.MNIST(DATA_DIR, train=False)

    def pixels(images):
        x = images.reshape(-1, 784).double() / 255
        if normalization == "standard":
            first = training.data[:50_000].double() / 255
            x = (x - first.mean()) / first.std()
        return x

    tol = dict(rtol=0, atol=1e-5)
    torch.testing.assert_close(batches.split.x.double(), pixels(training.data[:300]), **tol)
    targets = torch.full((300, 10), 0.1)
    targets[torch.arange(300), training.targets[:300]] = 0.9
    torch.testing.assert_close(batches.split.y, targets, rtol=0, atol=0)
    torch.testing.assert_close(val.x.double(), pixels(training.data[50_000:]), **tol)
    assert torch.equal(val.y, training.targets[50_000:])
    torch.testing.assert_close(test.x.double(), pixels(testing.data), **tol)
    assert torch.equal(test.y, testing.targets)


def test_resume_after_sigkill_gives_bitwise_equal_weights(tmp_path, uninterrupted):
    proc = subprocess.Popen(cli(*RESUME_RUN, "--logdir", str(tmp_path)), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = tmp_path / "checkpoint.pt"
    wait_for(ckpt, proc)
    proc.kill()
    proc.wait()
    killed_at = load(ckpt)["epoch"]
    assert killed_at < 3, "the run finished before it could be killed: make its epochs longer"

    result = run("--resume", str(ckpt), "--data-dir", DATA_DIR)
    assert result.returncode == 0, result.stderr
    final, reference = load(ckpt), load(uninterrupted / "checkpoint.pt")
    assert_same_weights(final["model"], reference["model"])
    assert final["step"] == reference["step"] == 900
    # same seed, same machine: the same metrics, epoch by epoch
    strip = lambda h: [(e["epoch"], e["train_loss"], e["val_accuracy"], e["test_accuracy"]) for e in h]
    assert strip(final["history"]) == strip(reference["history"])
    assert final["train_seconds"] >= final["history"][killed_at - 1]["train_seconds"]


def test_sigint_writes_a_mid_epoch_checkpoint_exits_130_and_resumes_bitwise(tmp_path, uninterrupted):
    proc = subprocess.Popen(cli(*RESUME_RUN, "--logdir", str(tmp_path)), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "checkpoint.pt"
    wait_for(ckpt, proc)
    time.sleep(0.1)
    assert proc.poll() is None, "the run finished before the signal: make its epochs longer"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stdout
    state = load(ckpt)
    assert state["step"] == state["epoch"] * 300 + state["batch_in_epoch"] < 900

    result = run("--resume", str(ckpt), "--data-dir", DATA_DIR)
    assert result.returncode == 0, result.stderr
    final, reference = load(ckpt), load(uninterrupted / "checkpoint.pt")
    assert_same_weights(final["model"], reference["model"])
    # The interrupted epoch's loss goes on adding to the same float32 sum: the metrics are equal, bit for bit.
    strip = lambda h: [(e["epoch"], e["train_loss"], e["val_accuracy"], e["test_accuracy"]) for e in h]
    assert strip(final["history"]) == strip(reference["history"])


def test_a_used_logdir_is_refused_and_a_resume_reads_the_runs_own_data(tmp_path, monkeypatch, capsys):
    """A second run into a run folder would overwrite its checkpoint and mix its events: exit 2, naming
    --logdir and how to continue that run. --resume without --data-dir finds the data where the run did."""
    import train.mnist

    monkeypatch.setattr(signal, "signal", lambda *a: None)  # main's Ctrl-C handler stays out of pytest
    # Nielsen's recipe (no schedule): a finished run that --epochs can extend, so the resume trains.
    args = ["--data-dir", os.path.abspath(DATA_DIR), "--recipe", "nielsen", "--limit-train", "100", "--epochs", "1",
            "--hidden", "8", "--logdir", str(tmp_path)]
    assert train.mnist.main(args) == 0
    ckpt = tmp_path / "checkpoint.pt"
    before = ckpt.read_bytes()
    with pytest.raises(SystemExit) as info:
        train.mnist.main(args)
    assert info.value.code == 2
    assert f"--logdir {tmp_path} is not empty; continue that run with --resume {ckpt}" in capsys.readouterr().err
    assert ckpt.read_bytes() == before
    monkeypatch.chdir(tmp_path)  # no ./data here: the data must come from the checkpoint's --data-dir
    assert train.mnist.main(["--resume", str(ckpt), "--epochs", "2"]) == 0
    assert load(ckpt)["epoch"] == 2
    import train.evaluate

    capsys.readouterr()
    assert train.evaluate.main([str(ckpt)]) == 0, capsys.readouterr().err  # the same for train.evaluate


def test_resume_with_more_epochs_continues_a_run_without_schedule_as_if_it_had_been_that_long(tmp_path, capsys,
                                                                                              monkeypatch):
    """Nielsen's recipe (constant η, no schedule): 1 epoch, then --resume --epochs 2, gives bit for bit the
    weights and epoch metrics of a 2-epoch run (oracle), and the longer run's checkpoint keeps epochs=2.
    A one-cycle run cannot be stretched, nor can a run be shortened below the epochs it has started."""
    import train.mnist

    args = ["--data-dir", DATA_DIR, "--recipe", "nielsen", "--hidden", "8", "--limit-train", "500",
            "--log-every", "25", "--threads", "1"]
    assert train.mnist.main([*args, "--epochs", "2", "--logdir", str(tmp_path / "two")]) == 0
    assert train.mnist.main([*args, "--epochs", "1", "--logdir", str(tmp_path / "one")]) == 0
    ckpt = tmp_path / "one" / "checkpoint.pt"
    finished = sorted((tmp_path / "one").glob("*.final"))
    # an extension that fails in its first epoch leaves the finished run as it was, its final records too
    with monkeypatch.context() as patch:
        patch.setattr(train.mnist, "train", lambda *args: sys.exit(1))
        with pytest.raises(SystemExit):
            train.mnist.main(["--resume", str(ckpt), "--epochs", "2", "--threads", "1"])
    assert sorted((tmp_path / "one").glob("*.final")) == finished and len(finished) == 1
    (tmp_path / "one" / ".checkpoint-0123456789abcdef.tmp").write_bytes(b"PK")  # a write killed midway
    assert train.mnist.main(["--resume", str(ckpt), "--epochs", "2", "--threads", "1"]) == 0
    assert not list((tmp_path / "one").glob("*.tmp")), "the resume removes what a killed write left"
    extended, oracle = load(ckpt), load(tmp_path / "two" / "checkpoint.pt")
    assert_same_weights(extended["model"], oracle["model"])
    assert extended["args"]["epochs"] == 2 and extended["epoch"] == 2
    strip = lambda history: [{k: v for k, v in h.items() if k != "train_seconds"} for h in history]  # noqa: E731
    assert strip(extended["history"]) == strip(oracle["history"])
    # TensorBoard shows the run as it ended: its HPARAMS (a run's first hparams record) say epochs=2, the
    # misclassified digits are the final model's; the 1-epoch run's final records are gone
    assert hparams_records(tmp_path / "one") == [(extended["step"], 2.0)]
    assert [step for step, _ in scalars(tmp_path / "one", "hparam/test_accuracy")] == [extended["step"]]
    assert [step for step, _ in images(tmp_path / "one", "test/misclassified")] == [extended["step"]]

    # the fast recipe: Adam under a one-cycle schedule
    assert train.mnist.main(["--data-dir", DATA_DIR, "--dry-run", "--hidden", "8", "--epochs", "1",
                             "--logdir", str(tmp_path / "fast")]) == 0
    for argv, message in (
        (["--resume", str(ckpt), "--epochs", "1"], "--epochs must be at least the 2 epochs this run has started, got 1"),
        (["--resume", str(tmp_path / "fast" / "checkpoint.pt"), "--epochs", "3"],
         "--epochs 3: this run's --schedule onecycle is laid out over its 1 epochs and cannot be stretched"),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            train.mnist.main(argv)
        assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--hidden", "30", "--sizes", "784", "30", "10"], "--hidden and --sizes both give the layer widths"),
    (["--optimizer", "adam", "--momentum", "0.9"], "--momentum is SGD's; --optimizer adam has none, got --momentum 0.9"),
    (["--recipe", "nielsen", "--momentum", "-1"], "--momentum must be a finite number >= 0, got -1.0"),
    (["--target-range", "1", "0"], "--target-range LOW HIGH must be finite float32 numbers with LOW < HIGH once "
                                   "rounded to float32, got 1.0 0.0"),
    # one number in float32, the targets' dtype: every target the same, nothing to learn
    (["--target-range", "0.5", "0.50000001"], "--target-range LOW HIGH must be finite float32 numbers with LOW < HIGH "
                                              "once rounded to float32, got 0.5 0.50000001"),
    # the targets are float32: a larger one failed in one_hot after the data had loaded
    (["--target-range", "0", "1e39"], "--target-range LOW HIGH must be finite float32 numbers with LOW < HIGH "
                                      "once rounded to float32, got 0.0 1e+39"),
    (["--hidden", "8", "0"], "--hidden widths must be positive, got [8, 0]"),
    # known from the flags: refused before the data loads, naming the flag that made the set small
    (["--limit-train", "100"], "--batch-size (128) exceeds the training set of --limit-train (100 images)"),
    (["--limit-train", "1", "--batch-size", "2"], "--batch-size (2) exceeds the training set of --limit-train (1 image)"),
    (["--target-range", "-1" + "0" * 39 + ".0", "0"], "--target-range LOW HIGH must be finite float32 numbers"),
    (["--no-monitor", "--delta-hist-every", "100"], "--delta-hist-every 100 needs the δ monitor that --no-monitor turns off"),
    (["--lr", "1e39"], "--lr must be a positive, finite float32 number (not 0 once rounded to float32), got 1e+39"),
    (["--lr", "0"], "--lr must be a positive, finite float32 number (not 0 once rounded to float32), got 0.0"),
    # 0 in float32, the weights' dtype: no parameter would ever move
    (["--lr", "1e-50"], "--lr must be a positive, finite float32 number (not 0 once rounded to float32), got 1e-50"),
    (["--log-every", "100", "--delta-hist-every", "150"],
     "--delta-hist-every must be 0 or a multiple of --log-every (100), got 150"),
    (["--resume", "x.pt", "--epochs", "20", "--lr", "1", "--seed", "2"],
     "--resume continues a run with the hyperparameters in its checkpoint; --lr, --seed cannot change them"),
    # given, a flag is refused at its default value too (it would be silently ignored)
    (["--resume", "x.pt", "--seed", "0", "--recipe", "fast", "--log-every", "100"],
     "--resume continues a run with the hyperparameters in its checkpoint; --recipe, --seed, --log-every cannot change them"),
    (["--resume", "x.pt", "--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--resume", "run/checkpoint.pt", "--threads", "0"], "--threads must be in 1..4096, got 0"),
    # the run would go on in backups/, overwriting the checkpoint.pt and metrics of whatever run is there
    (["--resume", "backups/run-a.pt"], "copy backups/run-a.pt into a folder of its own as checkpoint.pt"),
    (["--resume", "."], "--resume takes a run's checkpoint.pt, got the folder .; did you mean ./checkpoint.pt?"),
    (["--seed", str(2**64)], "argument --seed: must be in -9223372036854775808..18446744073709551615, got 18446744073709551616"),
    (["--logdir", ""], "argument --logdir: must be a folder path, got ''"),
])
def test_contradicting_or_impossible_flags_are_refused_by_name(argv, message, capsys):
    """Each would otherwise be ignored or break the run later (a traceback in the first step, or histograms
    at the least common multiple of the two intervals): argparse's exit 2 with the flag and the value."""
    import train.mnist

    with pytest.raises(SystemExit) as info:
        train.mnist.resolve_args(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


class Payload:
    """A class that a plain-data checkpoint must never contain."""


def test_a_checkpoint_with_pickled_code_is_refused(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "args": {}, "epoch": 0, "payload": Payload(), "hook": print}, bad)
    for command in (cli("--resume", str(bad)), [sys.executable, "-m", "train.evaluate", str(bad)]):
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and "refusing to load" in result.stderr


def nan_costs_after(steps: int, monkeypatch) -> None:
    """Every step's cost from the ``steps + 1``-th on turns NaN (in this process)."""
    calls = []

    def nan_after(real):
        # Steps go through MLP.sgd_epoch (plain SGD by hand, a cost per step, several steps a call)
        # and, on log steps, MLP.cost.
        def patched(self, *args, **kwargs):
            c = real(self, *args, **kwargs)
            first = len(calls)
            calls.extend([None] * c.numel())
            late = (torch.arange(first, first + c.numel()) >= steps).reshape(c.shape)
            # (no NaN at all on time: through where's backward it would still reach the gradients)
            return torch.where(late, c * float("nan"), c) if late.any() else c

        return patched

    monkeypatch.setattr(torchbp.MLP, "cost", nan_after(torchbp.MLP.cost))
    monkeypatch.setattr(torchbp.MLP, "sgd_epoch", nan_after(torchbp.MLP.sgd_epoch))


def run_diverging(tmp_path, monkeypatch, capsys, nan_after: int, epochs: int) -> tuple[int, str]:
    """train.mnist in-process (nielsen, 20 steps per epoch, a log step every 5) whose costs turn NaN after
    ``nan_after`` steps: (exit code, stderr)."""
    import train.mnist

    nan_costs_after(nan_after, monkeypatch)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as info:
            train.mnist.main(["--data-dir", DATA_DIR, "--recipe", "nielsen", "--hidden", "8", "--limit-train", "200",
                              "--epochs", str(epochs), "--log-every", "5", "--logdir", str(tmp_path)])
    finally:
        signal.signal(signal.SIGINT, sigint)
    return info.value.code, capsys.readouterr().err


def test_a_non_finite_loss_stops_the_run_with_exit_1_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """In-process: the cost turns NaN from the second epoch on."""
    code, err = run_diverging(tmp_path, monkeypatch, capsys, nan_after=20, epochs=3)
    assert code == 1 and "training loss is nan at step 25 (epoch 2)" in err
    state = load(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values())


def test_a_loss_non_finite_in_the_first_epoch_names_no_checkpoint(tmp_path, monkeypatch, capsys):
    """Diverged before the first epoch's checkpoint: the message says none was written (it once named a
    checkpoint.pt that did not exist)."""
    code, err = run_diverging(tmp_path, monkeypatch, capsys, nan_after=3, epochs=2)
    assert code == 1 and "training loss is nan at step 5 (epoch 1)" in err
    assert "No checkpoint was written" in err and not (tmp_path / "checkpoint.pt").exists()


def run_in_process(args: list[str]) -> None:
    import train.mnist

    sigint = signal.getsignal(signal.SIGINT)
    try:
        assert train.mnist.main(["--data-dir", DATA_DIR, *args]) == 0
    finally:
        signal.signal(signal.SIGINT, sigint)


@pytest.mark.parametrize("flags", [[], ["--no-monitor"]], ids=["monitor", "no-monitor"])
def test_plain_sgd_in_spans_of_steps_equals_one_step_at_a_time(tmp_path, monkeypatch, flags):
    """Oracle: the same run with every step a separate MLP.sgd_step call. Taking the steps between log
    steps in one MLP.sgd_epoch call must change nothing: same weights, bit for bit, and the same losses.

    30 steps per epoch, a log step every 7 (steps 7, 14, ..., 56). The monitor takes each log step
    through autograd on its own, so the spans end just before it; without the monitor they end at it.
    Either way a span ends at the epoch's end.
    """
    import train.mnist

    args = ["--recipe", "nielsen", "--hidden", "8", "--limit-train", "300", "--epochs", "2", "--log-every", "7",
            *flags]
    spans = []
    real_sgd_epoch = torchbp.MLP.sgd_epoch
    monkeypatch.setattr(torchbp.MLP, "sgd_epoch", lambda self, x, *a: spans.append(len(x)) or real_sgd_epoch(self, x, *a))
    run_in_process([*args, "--logdir", str(tmp_path / "spans")])
    # steps per span: 1-6, 8-13, 15-20, 22-27, 29-30 | 31-34, 36-41, 43-48, 50-55, 57-60 with the monitor
    expected = [6, 6, 6, 6, 2, 4, 6, 6, 6, 4] if not flags else [7, 7, 7, 7, 2, 5, 7, 7, 7, 4]
    assert spans == [10 * n for n in expected]

    real_make_steps = train.mnist.make_steps
    monkeypatch.setattr(train.mnist, "make_steps", lambda *a: (*real_make_steps(*a)[:2], None))
    run_in_process([*args, "--logdir", str(tmp_path / "one_at_a_time")])
    assert spans == [10 * n for n in expected], "the oracle run must not use sgd_epoch"
    spans_state, oracle_state = load(tmp_path / "spans" / "checkpoint.pt"), load(tmp_path / "one_at_a_time" / "checkpoint.pt")
    assert_same_weights(spans_state["model"], oracle_state["model"])
    for a, b in zip(spans_state["history"], oracle_state["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)  # float32 sums in another order
        assert a["test_accuracy"] == b["test_accuracy"]


def test_two_process_ddp_matches_the_single_process_run(tmp_path):
    """torchrun, 2 CPU processes (gloo), global batch 20: the same optimisation as one process with batch 20.

    Oracle: the single-process run of the same arguments; weights agree to float rounding
    (the ranks sum the batch in two halves), the ranks' weights are identical.
    """
    args = ["--recipe", "nielsen", "--hidden", "16", "--batch-size", "20", "--limit-train", "2000",
            "--epochs", "2", "--log-every", "25"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # No --logdir: rank 0 makes the default runs/<recipe>-<time> folder (here, in tmp_path) and tells rank 1
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "train.mnist", "--data-dir", DATA_DIR, *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
        env={**env, "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])},
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    (folder,) = (tmp_path / "runs").iterdir()  # one run folder, the ranks agreed on it
    folder.rename(tmp_path / "ddp")
    single = run(*args, "--logdir", str(tmp_path / "single"), env=env)
    assert single.returncode == 0, single.stderr

    ddp_metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp_metrics["world_size"] == 2 and ddp_metrics["ranks_identical_weights"] is True
    assert ddp_metrics["steps"] == 2 * 100
    a, b = load(tmp_path / "ddp" / "checkpoint.pt")["model"], load(tmp_path / "single" / "checkpoint.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-3, rtol=0)
    single_metrics = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert ddp_metrics["test_accuracy"] == pytest.approx(single_metrics["test_accuracy"], abs=0.005)
    # The train loss is the whole global batch's (the ranks' shard costs all-reduced), not rank 0's shard's.
    for d, s in zip(ddp_metrics["history"], single_metrics["history"]):
        assert d["train_loss"] == pytest.approx(s["train_loss"], rel=1e-4)
    losses = [scalars(tmp_path / name, "train/loss") for name in ("ddp", "single")]  # every log step's too
    assert [step for step, _ in losses[0]] == [step for step, _ in losses[1]] == list(range(25, 201, 25))
    assert [v for _, v in losses[0]] == pytest.approx([v for _, v in losses[1]], rel=1e-4)
    assert [p.name for p in (tmp_path / "ddp").iterdir()].count("checkpoint.pt") == 1
    # The "δ norm by layer" chart layout is written once per run, as by one process (not per log step).
    for name in ("ddp", "single"):
        assert layout_writes(tmp_path / name) == 1, name


def _ddp_rank(rank: int, port: int, argv: list[str], stop_at_step: int, report: str) -> None:
    """One of two ranks of train.mnist (what torchrun would start), stopped as by Ctrl-C at a log step if asked."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import train.mnist

    log_step = train.mnist.log_step

    def log_step_then_stop(run, progress, *args):
        if progress.step == stop_at_step and rank == 1:
            run.stop.requested = True  # what SIGINT's handler does; the ranks agree to stop at this log step
        return log_step(run, progress, *args)

    train.mnist.log_step = log_step_then_stop
    Path(report).write_text(str(train.mnist.main(argv)))


def run_two_ranks(tmp_path: Path, argv: list[str], stop_at_step: int = -1) -> list[int]:
    import socket

    from ranks import run_ranks

    with socket.socket() as s:  # a free port for the ranks' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reports = [tmp_path / f"rank{r}-{port}.txt" for r in range(2)]
    run_ranks(_ddp_rank, [(r, port, argv, stop_at_step, str(reports[r])) for r in range(2)])
    return [int(report.read_text()) for report in reports]


def test_two_process_run_stopped_mid_epoch_resumes_bitwise(tmp_path):
    """Two ranks stopped at a log step inside epoch 2, then resumed in two processes: the weights and every
    epoch's train loss equal the uninterrupted two-rank run's, bit for bit. Each rank goes on adding to its
    own loss sums (resumed from their mean, the ranks once rounded epoch 2's loss differently)."""
    args = ["--data-dir", DATA_DIR, "--recipe", "nielsen", "--hidden", "16", "--batch-size", "20",
            "--limit-train", "6000", "--epochs", "2", "--log-every", "25"]
    assert run_two_ranks(tmp_path, [*args, "--logdir", str(tmp_path / "whole")]) == [0, 0]
    assert run_two_ranks(tmp_path, [*args, "--logdir", str(tmp_path / "stopped")], stop_at_step=350) == [130, 130]
    state = load(tmp_path / "stopped" / "checkpoint.pt")
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 50)
    assert run_two_ranks(tmp_path, ["--resume", str(tmp_path / "stopped" / "checkpoint.pt")]) == [0, 0]
    final, reference = load(tmp_path / "stopped" / "checkpoint.pt"), load(tmp_path / "whole" / "checkpoint.pt")
    assert_same_weights(final["model"], reference["model"])
    assert [h["train_loss"] for h in final["history"]] == [h["train_loss"] for h in reference["history"]]


def scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every ``tag`` scalar in the event files of ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def hparams_records(logdir: Path) -> list[tuple[int, float]]:
    """(step, epochs) of every hparams session record in the event files of ``logdir``."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import metadata

    records = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == metadata.SESSION_START_INFO_TAG:
                    info = metadata.parse_session_start_info_plugin_data(value.metadata.plugin_data.content)
                    records.append((event.step, info.hparams["epochs"].number_value))
    return records


def images(logdir: Path, tag: str) -> list[tuple[int, bytes]]:
    """(step, encoded image) of every ``tag`` image in the event files of ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir), size_guidance={"images": 0})
    accumulator.Reload()
    return [(e.step, e.encoded_image_string) for e in accumulator.Images(tag)]


def layout_writes(logdir: Path) -> int:
    """How many custom-scalars layouts the event files of ``logdir`` hold."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return sum(
        value.tag == "custom_scalars__config__"
        for events in logdir.glob("events.out.tfevents.*")
        for event in EventFileLoader(str(events)).Load()
        for value in event.summary.value
    )


def test_threads_reaches_torch_and_is_checked(tmp_path, monkeypatch, capsys):
    """--threads N is handed to torch.set_num_threads; a count below 1 is refused (exit 2, naming the flag)."""
    import train.mnist

    with pytest.raises(SystemExit) as info:
        train.mnist.resolve_args(["--threads", "0"])
    assert info.value.code == 2 and "--threads must be in 1..4096, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # OpenMP stacks for 100,000 threads once ran the machine out of memory
        train.mnist.resolve_args(["--threads", "100000"])
    assert info.value.code == 2 and "--threads must be in 1..4096, got 100000" in capsys.readouterr().err
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    run_in_process(["--dry-run", "--hidden", "8", "--threads", "1", "--logdir", str(tmp_path)])
    assert calls == [1]


@pytest.mark.parametrize("momentum", [0.5, 0.9])
def test_sgd_momentum_under_onecycle_is_the_flags(momentum):
    """--momentum M with --schedule onecycle: the SGD step's momentum is M at the first and last steps and
    0.85/0.95 of M at the peak learning rate (OneCycleLR's own cycle, scaled); OneCycleLR's default 0.95
    once replaced M whatever it was. Oracle: the optimizer's param group read step by step, against the
    hand-computed values (1e-12)."""
    import train.mnist

    args = train.mnist.resolve_args(["--optimizer", "sgd", "--lr", "0.1", "--momentum", str(momentum),
                                     "--schedule", "onecycle"])
    optimizer = train.mnist.make_optimizer(args, [torch.zeros(1, requires_grad=True)], lr_tensor=False)
    scheduler = train.mnist.make_scheduler(args, optimizer, total_steps=100)
    seen = [optimizer.param_groups[0]["momentum"]]
    for _ in range(99):
        optimizer.step()
        scheduler.step()
        seen.append(optimizer.param_groups[0]["momentum"])
    assert seen[0] == seen[-1] == pytest.approx(momentum, abs=1e-12)
    assert min(seen) == pytest.approx(momentum * 0.85 / 0.95, abs=1e-12)
    assert max(seen) == pytest.approx(momentum, abs=1e-12)


def test_flags_at_their_bounds_are_taken():
    """The checks' bounds are inclusive where the values are valid: a hidden width of 1, the largest float32
    target."""
    import train.mnist

    assert train.mnist.resolve_args(["--hidden", "1"]).sizes == [784, 1, 10]
    largest = torch.finfo(torch.float32).max
    assert train.mnist.resolve_args(["--target-range", "0", repr(largest)]).target_range == [0.0, largest]


def test_resume_flags_given_are_read_from_the_real_command_line(monkeypatch, capsys):
    """python -m train.mnist parses sys.argv (argv=None): a hyperparameter given with --resume is refused
    there too, and --device, --threads and --compile left out are left to the checkpoint (None)."""
    import train.mnist

    monkeypatch.setattr(sys, "argv", ["train.mnist", "--resume", "run/checkpoint.pt", "--lr", "1"])
    with pytest.raises(SystemExit) as info:
        train.mnist.resolve_args()
    assert info.value.code == 2 and "--lr cannot change them" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["train.mnist", "--resume", "run/checkpoint.pt"])
    args = train.mnist.resolve_args()
    assert (args.device, args.threads, args.compile) == (None, None, None)


def test_resume_runs_with_the_runs_own_threads_device_and_compile_unless_given(tmp_path, monkeypatch):
    """--threads and --compile change float rounding, so a resume without them must run as the run ran
    (it once fell back to torch's default threads and eager mode: the weights then differed from the
    uninterrupted run's). Given anew, they apply."""
    import train.mnist

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the run's --threads 1 stays out of pytest
    run_in_process(["--dry-run", "--hidden", "8", "--threads", "1", "--device", "cpu", "--logdir", str(tmp_path)])
    ckpt = str(tmp_path / "checkpoint.pt")
    resumed, _ = train.mnist.resume_args(train.mnist.resolve_args(["--resume", ckpt]))
    assert (resumed.threads, resumed.device, resumed.compile) == (1, "cpu", False)
    resumed, _ = train.mnist.resume_args(train.mnist.resolve_args(["--resume", ckpt, "--threads", "2", "--compile",
                                                                   "--device", "auto"]))
    assert (resumed.threads, resumed.device, resumed.compile) == (2, "auto", True)
    state = torch.load(ckpt, weights_only=True)
    state["args"]["compile"] = True  # a compiled run resumes compiled, unless --no-compile
    torch.save(state, ckpt)
    resumed, _ = train.mnist.resume_args(train.mnist.resolve_args(["--resume", ckpt]))
    assert resumed.compile is True
    resumed, _ = train.mnist.resume_args(train.mnist.resolve_args(["--resume", ckpt, "--no-compile"]))
    assert resumed.compile is False
    # a checkpoint written before --threads existed (no such key): the flag's default, not an AttributeError
    del state["args"]["threads"]
    torch.save(state, ckpt)
    resumed, _ = train.mnist.resume_args(train.mnist.resolve_args(["--resume", ckpt]))
    assert resumed.threads is None


def test_a_cuda_run_resumed_without_cuda_says_which_flag_resumes_it_here(tmp_path, monkeypatch, capsys):
    """The run's --device cuda, taken from its checkpoint, on a machine without CUDA: exit 2 saying to give
    --device cpu (not an error about a --device cuda the user never typed)."""
    import train.mnist

    run_in_process(["--dry-run", "--hidden", "8", "--device", "cpu", "--logdir", str(tmp_path)])
    ckpt = tmp_path / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    state["args"]["device"] = "cuda"
    torch.save(state, ckpt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        train.mnist.resume_args(train.mnist.resolve_args(["--resume", str(ckpt)]))
    assert info.value.code == 2 and "give --device cpu to resume it on the CPU" in capsys.readouterr().err


def test_a_cuda_run_keeps_its_cuda_generator_in_the_checkpoint_and_sets_it_back(tmp_path, monkeypatch):
    """The CUDA branch of the checkpoint's RNG states, on the CPU with torch.cuda's generator calls recorded:
    a CUDA run saves its device's generator beside the CPU's, and a resume on CUDA sets it back on that
    device; a CPU run saves none, and a CUDA checkpoint resumed on the CPU leaves CUDA alone."""
    import types

    import train.mnist

    run_in_process(["--dry-run", "--hidden", "8", "--device", "cpu", "--logdir", str(tmp_path)])
    ckpt = str(tmp_path / "checkpoint.pt")
    assert torch.load(ckpt, weights_only=True)["cuda_rng_state"] is None
    args = train.mnist.resolve_args(["--hidden", "8", "--logdir", str(tmp_path)])
    model = train.mnist.build_model(args, torch.device("cpu"))
    optimizer = train.mnist.make_optimizer(args, model.parameters(), lr_tensor=False)
    cuda_state, device = torch.arange(16, dtype=torch.uint8), torch.device("cuda:1")
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: calls.append(("get", d)) or cuda_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: calls.append(("set", s, d)))
    run = types.SimpleNamespace(main_rank=True, model=model, optimizer=optimizer, scheduler=None, device=device,
                                world_size=1, args=args, ckpt_path=ckpt)
    train.mnist.save_checkpoint(run, train.mnist.Progress())
    saved = torch.load(ckpt, weights_only=True)
    assert calls == [("get", device)] and torch.equal(saved["cuda_rng_state"], cuda_state)
    calls.clear()
    train.mnist.restore(saved, ckpt, model, optimizer, None, device)
    assert [(c[0], c[2]) for c in calls] == [("set", device)] and torch.equal(calls[0][1], cuda_state)
    calls.clear()
    train.mnist.restore(saved, ckpt, model, optimizer, None, torch.device("cpu"))
    assert calls == []


def test_a_run_is_complete_only_with_the_final_metrics_of_its_checkpoints_epoch(tmp_path):
    """A run resumed for more epochs and killed after its last epoch's checkpoint, before its end, still has
    the shorter run's metrics.json: not complete (a resume then writes its end); nor with a damaged one."""
    import argparse

    import train.mnist

    args = argparse.Namespace(dry_run=False, epochs=2, logdir=str(tmp_path))
    metrics, state = tmp_path / "metrics.json", {"epoch": 2, "batch_in_epoch": 0}
    assert not train.mnist.run_complete(args, state)  # no metrics.json
    for written, complete in (({"epochs": 1}, False), ({"epochs": 2}, True), ([2], False)):
        metrics.write_text(json.dumps(written))
        assert train.mnist.run_complete(args, state) is complete, written
    metrics.write_text('{"test_accuracy": 0.9')  # cut short
    assert not train.mnist.run_complete(args, state)
    assert not train.mnist.run_complete(args, {"epoch": 1, "batch_in_epoch": 0})


def test_resuming_a_finished_dry_run_says_it_is_one_batch_long(tmp_path, monkeypatch, capsys):
    """A --dry-run run is complete after its one batch, whatever --epochs says; the message does not ask
    for the --epochs that was given."""
    import train.mnist

    run_in_process(["--dry-run", "--recipe", "nielsen", "--hidden", "8", "--logdir", str(tmp_path)])
    capsys.readouterr()
    assert train.mnist.main(["--resume", str(tmp_path / "checkpoint.pt"), "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "is complete" in out and "a --dry-run run is one batch long" in out and "give --epochs" not in out


@pytest.mark.parametrize("script", ["train.mnist", "train.vanishing"])
def test_a_logdir_that_cannot_be_created_is_refused_before_the_run(tmp_path, script, capsys):
    """A --logdir under a file: argparse's exit 2 naming the flag, not a traceback after training."""
    import importlib

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as info:
        importlib.import_module(script).main(["--data-dir", DATA_DIR, "--logdir", str(blocker / "run")])
    assert info.value.code == 2
    assert f"argument --logdir: cannot be created, {blocker} is a file" in capsys.readouterr().err


def test_resume_keeps_the_checkpoint_steps_events_and_a_finished_run_is_left_alone(tmp_path, capsys):
    """Events at the checkpoint's step were written before it: a resume keeps them (it purges only later
    steps). Resuming a finished run says so and changes nothing: same checkpoint, same events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalar_steps():
        events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
        events.Reload()
        return {tag: [e.step for e in events.Scalars(tag)] for tag in ("train/loss", "accuracy/val", "epoch/train_loss")}

    # 100 images in batches of 10: 10 steps an epoch, logs every 5
    run_in_process(["--recipe", "nielsen", "--hidden", "8", "--limit-train", "100", "--epochs", "1",
                    "--log-every", "5", "--logdir", str(tmp_path)])
    ckpt = tmp_path / "checkpoint.pt"
    run_in_process(["--resume", str(ckpt), "--epochs", "2"])
    expected = {"train/loss": [5, 10, 15, 20], "accuracy/val": [10, 20], "epoch/train_loss": [10, 20]}
    assert scalar_steps() == expected
    before, metrics = ckpt.read_bytes(), (tmp_path / "metrics.json").read_bytes()
    capsys.readouterr()
    run_in_process(["--resume", str(ckpt)])
    assert f"the run in {tmp_path} is complete (2 epochs, metrics.json written); nothing to do" in capsys.readouterr().out
    assert scalar_steps() == expected
    assert ckpt.read_bytes() == before and (tmp_path / "metrics.json").read_bytes() == metrics


def test_train_lr_is_the_lr_each_logged_step_used(tmp_path):
    """Oracle: torch's OneCycleLR over the run's 10 steps, its lr read before each step (the first is
    max_lr / 25, the last the schedule's end). The fast recipe's Adam, logged at every step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_in_process(["--hidden", "8", "--limit-train", "100", "--batch-size", "10", "--epochs", "1",
                    "--lr", "0.004", "--log-every", "1", "--no-monitor", "--logdir", str(tmp_path)])
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.004)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.004, total_steps=10)
    used = []
    for _ in range(10):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    logged = events.Scalars("train/lr")
    assert [e.step for e in logged] == list(range(1, 11))
    assert [e.value for e in logged] == pytest.approx(used, rel=1e-6)  # float32 in the event file


def test_runs_started_together_get_run_folders_of_their_own(tmp_path):
    """Three runs launched at once (a seed sweep) with the default --logdir: each its own runs/fast-<time>[-k]
    folder holding its own seed's metrics (they once shared one folder, events of all three in it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(cli("--dry-run", "--hidden", "8", "--seed", str(seed)), cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in range(3)]
    folders = {}
    for seed, proc in enumerate(procs):
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        folders[seed] = out.strip().rsplit("run folder ", 1)[1]
    assert len(set(folders.values())) == 3, folders
    for seed, folder in folders.items():
        assert folder.startswith(os.path.join("runs", "fast-"))
        assert json.loads((tmp_path / folder / "metrics.json").read_text())["args"]["seed"] == seed
        # events.out.tfevents.<time>.<host>.<pid>.<n>[.final]: one process wrote them all, this run
        writers = {p.name.removesuffix(".final").rsplit(".", 2)[1]
                   for p in (tmp_path / folder).glob("events.out.tfevents.*")}
        assert writers == {str(procs[seed].pid)}


def test_the_default_run_folder_is_made_only_when_the_run_writes(tmp_path, monkeypatch, capsys):
    """A run that fails before it writes (no data here) leaves no empty runs/<recipe>-<time> behind; a file
    named runs is refused before any work; RANK set without WORLD_SIZE (one process) still gets a folder."""
    import train.mnist

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    with pytest.raises(SystemExit) as info:
        train.mnist.main(["--data-dir", str(tmp_path / "no-data"), "--dry-run"])
    assert info.value.code == 2 and not (tmp_path / "runs").exists()
    (tmp_path / "runs").write_text("")
    with pytest.raises(SystemExit) as info:
        train.mnist.resolve_args([])
    assert info.value.code == 2
    assert "without --logdir the run folder goes under runs/, which must be a folder" in capsys.readouterr().err
    (tmp_path / "runs").unlink()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert train.mnist.main(["--data-dir", DATA_DIR, "--dry-run", "--hidden", "8"]) == 0
    (folder,) = (tmp_path / "runs").iterdir()
    assert (folder / "metrics.json").exists()


def test_seed_takes_the_range_torch_takes():
    """torch.manual_seed takes -2^63..2^64-1; so does --seed."""
    import train.mnist

    assert train.mnist.resolve_args(["--seed", "-1"]).seed == -1
    assert train.mnist.resolve_args(["--seed", str(2**64 - 1)]).seed == 2**64 - 1


def test_a_relative_data_dir_is_kept_absolute_for_resume_and_evaluate(tmp_path, monkeypatch, capsys):
    """The README's own --data-dir ../shared/data is relative: the checkpoint keeps it absolute, so --resume and
    train.evaluate run from another folder read the run's data (they looked for it relative to that folder)."""
    import train.evaluate
    import train.mnist

    data = Path(DATA_DIR).resolve()
    monkeypatch.chdir(data.parent)
    run_in_process_with(["--data-dir", os.path.relpath(data), "--recipe", "nielsen", "--limit-train", "100",
                         "--epochs", "1", "--hidden", "8", "--logdir", str(tmp_path / "run")])
    ckpt = tmp_path / "run" / "checkpoint.pt"
    assert load(ckpt)["args"]["data_dir"] == str(data)
    monkeypatch.chdir(tmp_path)
    run_in_process_with(["--resume", str(ckpt), "--epochs", "2"])
    assert load(ckpt)["epoch"] == 2
    capsys.readouterr()
    assert train.evaluate.main([str(ckpt)]) == 0, capsys.readouterr().err


def run_in_process_with(args: list[str]) -> None:
    """run_in_process without the --data-dir it adds."""
    import train.mnist

    sigint = signal.getsignal(signal.SIGINT)
    try:
        assert train.mnist.main(args) == 0
    finally:
        signal.signal(signal.SIGINT, sigint)


def test_resume_names_weights_that_do_not_fit_the_checkpoints_own_sizes(tmp_path, monkeypatch, capsys):
    """--resume of a checkpoint whose saved sizes were edited: one line and exit 2 naming the mismatched
    weights, as every other bad checkpoint (it was a load_state_dict traceback)."""
    import train.mnist
    from train import checkpoint

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    run_in_process(["--dry-run", "--hidden", "8", "--threads", "1", "--logdir", str(tmp_path)])
    ckpt = str(tmp_path / "checkpoint.pt")
    state = checkpoint.load(ckpt)
    state["args"]["sizes"] = [784, 9, 10]
    checkpoint.save(state, ckpt)
    (tmp_path / "metrics.json").unlink()  # as if it stopped before its end: a complete run is not resumed
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        train.mnist.main(["--resume", ckpt])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"train.mnist: error: {ckpt}: its weights do not fit the model its arguments describe: ")
    assert "size mismatch for 0.weight" in err


def test_ctrl_c_before_the_first_step_exits_at_once_and_writes_no_checkpoint(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the data load (or the download, or the model build) runs: Python's own KeyboardInterrupt is
    still the SIGINT handler then, and the run stops there with exit 130, one line, no traceback and no
    checkpoint, where it once went on to train a step and wrote a 1-step run."""
    import train.mnist

    handlers = []

    def interrupted_load(*args, **kwargs):
        handlers.append(signal.getsignal(signal.SIGINT))
        raise KeyboardInterrupt  # what SIGINT raises under Python's default handler

    monkeypatch.setattr(train.mnist, "load_data", interrupted_load)
    sigint = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a fresh process starts
    try:
        code = train.mnist.main(["--data-dir", DATA_DIR, "--dry-run", "--hidden", "8", "--logdir", str(tmp_path)])
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert code == 130 and handlers == [signal.default_int_handler]
    err = capsys.readouterr().err
    assert "interrupted before the first training step; no checkpoint was written" in err and "Traceback" not in err
    assert not (tmp_path / "checkpoint.pt").exists()


def test_resuming_in_another_number_of_processes_says_it_is_not_bit_for_bit(tmp_path, capsys):
    """A checkpoint keeps the number of processes it trained in; resumed in another number the run goes on (the
    same batches and updates) with a note that the rounding differs."""
    from train import checkpoint

    run_in_process(["--recipe", "nielsen", "--limit-train", "100", "--epochs", "1", "--hidden", "8",
                    "--logdir", str(tmp_path)])
    ckpt = tmp_path / "checkpoint.pt"
    state = load(ckpt)
    assert state["world_size"] == 1
    capsys.readouterr()
    run_in_process(["--resume", str(ckpt), "--epochs", "2"])
    assert "process(es)" not in capsys.readouterr().err
    checkpoint.save({**load(ckpt), "world_size": 2}, str(ckpt))  # as a two-process torchrun writes it
    run_in_process(["--resume", str(ckpt), "--epochs", "3"])
    err = capsys.readouterr().err
    assert "this run trained in 2 process(es) and goes on in 1" in err and "not bit for bit" in err
    assert load(ckpt)["epoch"] == 3


def test_a_dry_run_takes_the_first_learning_rate_of_its_runs_schedule(tmp_path):
    """--dry-run's one step of the fast recipe uses the lr a full run's first step uses, max_lr / 25 for
    OneCycleLR (oracle: torch's schedule), not the end of a one-step schedule (about 1e-8)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_in_process(["--dry-run", "--hidden", "8", "--lr", "0.004", "--log-every", "1", "--logdir", str(tmp_path)])
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.004)
    torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.004, total_steps=10 * 390)
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    (logged,) = events.Scalars("train/lr")
    assert logged.value == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-6)
    assert logged.value == pytest.approx(0.004 / 25, rel=1e-6)


def test_resuming_a_finished_onecycle_run_does_not_advise_the_epochs_it_refuses(tmp_path, capsys):
    """A complete fast-recipe run (one-cycle schedule): the message says its schedule ends with its epochs, not
    "give --epochs", which --resume refuses for a schedule; and "1 epoch", not "1 epochs"."""
    run_in_process(["--hidden", "8", "--limit-train", "100", "--batch-size", "10", "--epochs", "1",
                    "--logdir", str(tmp_path)])
    capsys.readouterr()
    run_in_process(["--resume", str(tmp_path / "checkpoint.pt")])
    out = capsys.readouterr().out
    assert "is complete (1 epoch, metrics.json written)" in out
    assert "its --schedule onecycle ends with its epochs" in out and "give --epochs" not in out


def test_a_relative_data_dir_given_to_resume_is_kept_absolute(tmp_path, monkeypatch):
    """--resume with a relative --data-dir: the checkpoint keeps it absolute too (oracle: Path.resolve)."""
    data = Path(DATA_DIR).resolve()
    run_in_process(["--recipe", "nielsen", "--limit-train", "100", "--epochs", "1", "--hidden", "8",
                    "--logdir", str(tmp_path / "run")])
    ckpt = tmp_path / "run" / "checkpoint.pt"
    monkeypatch.chdir(data.parent)
    run_in_process_with(["--resume", str(ckpt), "--epochs", "2", "--data-dir", os.path.relpath(data)])
    assert load(ckpt)["args"]["data_dir"] == str(data)


def test_threads_at_its_upper_bound_is_taken():
    """--threads 4096, the bound itself, is taken."""
    import train.mnist

    assert train.mnist.resolve_args(["--threads", "4096"]).threads == 4096


class _Loaded(Exception):
    """Raised in place of the data load: the run has got past its resume checks."""


@pytest.mark.parametrize("saved, rank, noted", [(None, 0, False), (1, 1, False), (1, 0, True)],
                         ids=["checkpoint-without-world_size", "rank-1", "rank-0"])
def test_the_resume_note_under_two_processes(tmp_path, monkeypatch, capsys, saved, rank, noted):
    """A stand-in for torchrun (init_distributed says 2 processes), stopped at the data load: a checkpoint
    written before world_size was kept gives no note (nor a KeyError), rank 1 prints none, rank 0 does."""
    import train.mnist
    from train import checkpoint

    run_in_process(["--recipe", "nielsen", "--limit-train", "100", "--epochs", "1", "--hidden", "8",
                    "--logdir", str(tmp_path)])
    ckpt = tmp_path / "checkpoint.pt"
    state = load(ckpt)
    if saved is None:
        del state["world_size"]
    else:
        state["world_size"] = saved
    checkpoint.save(state, str(ckpt))
    monkeypatch.setattr(train.mnist, "init_distributed", lambda device: (rank, 2, torch.device("cpu")))

    def loaded(*args, **kwargs):
        raise _Loaded

    monkeypatch.setattr(train.mnist, "load_data", loaded)
    capsys.readouterr()
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(_Loaded):
            train.mnist.main(["--resume", str(ckpt), "--epochs", "2"])
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert ("not bit for bit" in capsys.readouterr().err) == noted


def test_ddp_a_ctrl_c_after_the_epoch_end_agreement_waits_for_the_ranks_next_one(monkeypatch):
    """Under DDP a Ctrl-C this rank sees after the epoch-end all-reduce (during evaluation, say) must not make
    it leave alone (the other ranks would hang in their next collective): it goes into the next epoch, where
    train() stops all ranks together at the next log step (here a stand-in for train() that agrees so)."""
    import argparse
    import types

    import train.mnist

    calls = []

    def agreeing_train(run, progress, batches, generator):
        calls.append(progress.epoch)
        if run.stop.requested:
            return None, True  # the ranks agree at the next log step: stop mid-epoch
        progress.epoch += 1
        run.stop.requested = True  # Ctrl-C after this epoch's last agreement point
        return 1.0, False

    monkeypatch.setattr(train.mnist, "train", agreeing_train)
    for name in ("evaluate", "save_checkpoint", "finish"):
        monkeypatch.setattr(train.mnist, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(train.mnist, "interrupted_mid_epoch", lambda run, progress: 130)
    run = train.mnist.Run(args=argparse.Namespace(), model=None, optimizer=None, scheduler=None, train_step=None,
                          fast_step=None, writer=None, stop=types.SimpleNamespace(requested=False),
                          device=torch.device("cpu"), rank=1, world_size=2, epochs=3, steps_per_epoch=10,
                          log_every=10, interactive=False)
    progress = train.mnist.Progress(epoch_generator_state=torch.Generator().get_state())
    assert train.mnist.train_epochs(run, progress, None, None, None, None, None) == 130
    assert calls == [0, 1]


def test_a_dry_runs_schedule_is_the_full_runs(tmp_path):
    """--dry-run lays its one-cycle schedule out over the full run (the fast recipe's 10 epochs of 390 batches)."""
    run_in_process(["--dry-run", "--hidden", "8", "--logdir", str(tmp_path)])
    assert load(tmp_path / "checkpoint.pt")["scheduler"]["total_steps"] == 10 * 390
