"""The vanishing-gradient experiment (train.vanishing): its norms against torch's autograd, and the book's shape on MNIST."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch import nn

from train import vanishing

from oracles import nn_sequential
from test_data import assert_download_failure, go_offline


def oracle_bias_grad_norms(sizes, images, targets, seed, init):
    """‖∇_{b^l} C‖ of every hidden layer from torch.nn + torch.autograd, seeded and initialised like the experiment."""
    torch.manual_seed(seed)
    model = nn_sequential(sizes, dtype=torch.float64)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    if init == "gaussian-scaled":
        with torch.no_grad():
            for m in linears:
                m.weight.normal_(0.0, 1.0 / math.sqrt(m.in_features))
                m.bias.normal_(0.0, 1.0)
    a = model(images)
    # The book's cross-entropy, summed over outputs, mean over samples.
    c = -(targets * torch.log(a) + (1 - targets) * torch.log(1 - a)).sum(-1).mean()
    grads = torch.autograd.grad(c, [m.bias for m in linears[:-1]])
    return [g.norm().item() for g in grads]


@pytest.mark.parametrize("init", vanishing.INITS)
def test_norms_on_synthetic_data_match_autograd(init):
    """No MNIST needed: random 'images' in [0, 1], one-hot targets; the experiment's norms equal torch's, rel 1e-9."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(50, 20, generator=gen, dtype=torch.float64)
    targets = nn.functional.one_hot(torch.randint(0, 4, (50,), generator=gen), 4).to(torch.float64)
    sizes = [20, 6, 6, 6, 4]
    got = vanishing.hidden_delta_norms(sizes, images, targets, seed=3, cost="cross_entropy", init=init)
    expected = oracle_bias_grad_norms(sizes, images, targets, seed=3, init=init)
    assert len(got) == 3
    assert got == pytest.approx(expected, rel=1e-9)


def test_summary_and_table():
    """summarise: mean/std/min/max over seeds per layer; the table has one row per network."""
    results = {"784-30-30-10": [[1.0, 4.0], [3.0, 8.0]]}
    summary = vanishing.summarise(results)
    assert summary["784-30-30-10"] == {"mean": [2.0, 6.0], "std": [math.sqrt(2), math.sqrt(8)], "min": [1.0, 4.0], "max": [3.0, 8.0]}
    table = vanishing.markdown_table(summary, seeds=2)
    assert "| [784, 30, 30, 10] | 2 ± 1.4, 6 ± 2.8 |" in table
    assert "book" not in table and "0.07" not in table
    assert "| 0.333 | 0.07, 0.31 |" in vanishing.markdown_table(summary, seeds=2, book=True)


@pytest.fixture
def synthetic_mnist(monkeypatch):
    """Random 'images' in [0, 1] stand in for MNIST, so main() runs in a second: (samples, 784), one-hot (samples, 10)."""
    def load_mnist(data_dir, download, samples):
        gen = torch.Generator().manual_seed(0)
        images = torch.rand(samples, 784, generator=gen, dtype=torch.float64)
        return images, nn.functional.one_hot(torch.randint(0, 10, (samples,), generator=gen), 10).to(torch.float64)

    monkeypatch.setattr(vanishing, "load_mnist", load_mnist)


@pytest.mark.parametrize("flags, book", [
    ([], False),
    (["--cost", "cross-entropy"], False),
    (["--cost", "cross-entropy", "--init", "gaussian-scaled", "--samples", "20"], False),
    (["--cost", "cross-entropy", "--init", "gaussian-scaled"], True),
])
def test_the_books_figures_appear_only_beside_a_run_in_the_books_setting(flags, book, synthetic_mnist, tmp_path, capsys):
    """The book's setting (ch. 5): cross-entropy cost, N(0, 1/n_in) weights, the first 1000 training images."""
    argv = ["--seeds", "1", "--logdir", os.fspath(tmp_path / "run")] + (flags if "--samples" in flags else flags + ["--samples", "1000"])
    assert vanishing.main(argv) == 0
    out = capsys.readouterr().out
    assert ("book (ch. 5)" in out) == book and ("0.003, 0.017, 0.07, 0.285" in out) == book
    assert ("hold for --cost cross-entropy --init gaussian-scaled --samples 1000; this run's settings differ" in out) != book


def test_an_output_that_cannot_be_written_is_named_in_one_line(synthetic_mnist, tmp_path, capsys, monkeypatch):
    """What the flags' checks cannot see ahead (a full disk, /proc): exit 2 naming the path and the reason,
    no traceback, for the JSON file and for the TensorBoard folder alike."""
    import errno

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", os.fspath(tmp_path / "run"))

    monkeypatch.setattr(vanishing, "write_tensorboard", no_space)
    assert vanishing.main(["--seeds", "1", "--samples", "10", "--logdir", os.fspath(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"train.vanishing: error: cannot write {tmp_path / 'run'}: No space left on device\n"
    # a write that fails names no file: the path being written (it printed "cannot write None")
    assert vanishing.main(["--seeds", "1", "--samples", "10", "--json", "/dev/full"]) == 2
    assert capsys.readouterr().err == "train.vanishing: error: cannot write /dev/full: No space left on device\n"


@pytest.mark.parametrize("argv, says", [
    (["--samples", "70000"], "argument --samples: must be in 1..60000, got 70000"),
    (["--samples", "0"], "argument --samples: must be in 1..60000, got 0"),
    (["--seeds", "0"], "argument --seeds: must be >= 1, got 0"),
    (["--seeds", "1.5"], "argument --seeds: must be an integer >= 1, got '1.5'"),
    (["--json", "/nonexistent/dir/x.json"], "argument --json: must be in an existing folder, got /nonexistent/dir/x.json"),
])
def test_bad_flags_fail_before_the_run_naming_flag_range_and_value(argv, says, capsys, monkeypatch):
    monkeypatch.setattr(vanishing, "load_mnist", lambda *a: pytest.fail("the data was loaded before the flags were checked"))
    with pytest.raises(SystemExit) as info:
        vanishing.main(argv)
    assert info.value.code == 2 and says in capsys.readouterr().err


def test_json_and_logdir_must_be_a_file_and_a_new_or_empty_folder(tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    for argv, says in ((["--json", os.fspath(tmp_path)], f"argument --json: must be a file to write, got the folder {tmp_path}"),
                       (["--logdir", os.fspath(tmp_path / "taken")], "argument --logdir: must be a folder, got the file"),
                       # another experiment's curves would share the charts with this one's
                       (["--logdir", os.fspath(tmp_path)], f"--logdir must be a new or empty folder, got {tmp_path} (not empty)")):
        with pytest.raises(SystemExit) as info:
            vanishing.main(argv)
        assert info.value.code == 2 and says in capsys.readouterr().err


def test_download_offline_reports_the_download_and_leaves_no_empty_folder(tmp_path, monkeypatch, capsys):
    """It was run with --download: the advice is the network or the files by hand, not --download again."""
    go_offline(monkeypatch)
    assert vanishing.main(["--data-dir", os.fspath(tmp_path / "data"), "--download", "--seeds", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.vanishing: error: ") and err.count("\n") == 1
    assert_download_failure(err, tmp_path / "data" / "MNIST" / "raw")
    assert list(tmp_path.iterdir()) == []


def test_missing_mnist_exits_2_with_one_message(tmp_path, capsys):
    assert vanishing.main(["--data-dir", os.fspath(tmp_path), "--seeds", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert os.fspath(tmp_path / "MNIST" / "raw") in err and "train-images-idx3-ubyte" in err and "--download" in err


@pytest.fixture
def data_dir():
    path = os.environ.get("TORCHBP_DATA_DIR")
    if not path:
        pytest.skip("TORCHBP_DATA_DIR is not set")
    return path


@pytest.mark.slow
def test_book_setting_on_mnist_reproduces_the_vanishing_gradient(data_dir, tmp_path):
    """200 MNIST images, 2 seeds, cross-entropy + gaussian-scaled init: each hidden layer learns slower than the next.

    The book's ratios between consecutive hidden layers are ~4-6 (0.07/0.31,
    0.012/0.060/0.283, 0.003/0.017/0.070/0.285); we accept 2-12 per step and
    the first hidden layer of the deepest net 30-300 times slower than its last.
    """
    out = tmp_path / "norms.json"
    code = vanishing.main([
        "--data-dir", data_dir, "--samples", "200", "--seeds", "2", "--cost", "cross-entropy",
        "--init", "gaussian-scaled", "--json", os.fspath(out), "--logdir", os.fspath(tmp_path / "run"),
    ])
    assert code == 0
    norms = json.loads(out.read_text())
    assert set(norms) == set(vanishing.BOOK)
    for arch, book in vanishing.BOOK.items():
        got = norms[arch]
        assert len(got) == len(book)
        for earlier, later in zip(got, got[1:]):
            assert 2 < later / earlier < 12, (arch, got)
        assert got[-1] == pytest.approx(book[-1], rel=0.5), (arch, got)
    deepest = norms["784-30-30-30-30-10"]
    assert 30 < deepest[-1] / deepest[0] < 300
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))


def test_a_file_named_runs_is_refused_before_the_experiment(tmp_path, monkeypatch, capsys):
    """Without --logdir the folder goes under runs/: a file there is refused up front (it was a traceback
    after the whole experiment)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("")
    monkeypatch.setattr(vanishing, "experiment", lambda *a, **k: pytest.fail("ran before checking runs/"))
    with pytest.raises(SystemExit) as info:
        vanishing.main(["--data-dir", os.fspath(tmp_path)])
    assert info.value.code == 2
    assert "without --logdir the run folder goes under runs/, which must be a folder, got the file runs" in capsys.readouterr().err


@pytest.mark.parametrize("seeds, says", [(1, "over 1 seed)"), (3, "over 3 seeds)")])
def test_the_table_counts_its_seeds_in_words(seeds, says):
    """The header says "1 seed", not "1 seeds"."""
    summary = vanishing.summarise({"[784, 30, 30, 10]": [[0.1, 0.2]] * seeds})
    assert says in vanishing.markdown_table(summary, seeds)
