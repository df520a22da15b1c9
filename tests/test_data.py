"""train/data.py: loading MNIST through torchvision, the 50,000/10,000/10,000 split, batches, bad files."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from train import data as data_module
from train.data import Batches, DataError, Split, load_mnist, load_test, one_hot

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("TORCHBP_DATA_DIR")
needs_data = pytest.mark.skipif(not DATA_DIR, reason="TORCHBP_DATA_DIR is not set")

# Published label counts (LeCun, Cortes and Burges), digits 0..9.
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ------------------------------------------------------------------ real files


@needs_data
def test_split_sizes_and_label_counts_match_the_published_ones():
    data = load_mnist(DATA_DIR)
    assert (len(data.train), len(data.val), len(data.test)) == (50_000, 10_000, 10_000)
    assert data.train.x.shape == (50_000, 784) and data.train.x.dtype == torch.float32
    train_labels = torch.cat([data.train.y, data.val.y])
    assert torch.bincount(train_labels, minlength=10).tolist() == TRAIN_COUNTS
    assert torch.bincount(data.test.y, minlength=10).tolist() == TEST_COUNTS


@needs_data
def test_validation_is_the_last_10000_training_images_as_torchvision_reads_them():
    """Oracle: torchvision's own per-sample path (PIL image -> ToTensor) at indices 0, 49,999, 50,000, 59,999."""
    from torchvision import datasets, transforms

    data = load_mnist(DATA_DIR)
    train = datasets.MNIST(DATA_DIR, train=True, transform=transforms.ToTensor())
    test = datasets.MNIST(DATA_DIR, train=False, transform=transforms.ToTensor())
    for ours, (image, label) in [
        ((data.train, 0), train[0]), ((data.train, 49_999), train[49_999]),
        ((data.val, 0), train[50_000]), ((data.val, 9_999), train[59_999]), ((data.test, 123), test[123]),
    ]:
        split, i = ours
        assert torch.equal(split.x[i], image.reshape(784)), "pixels in [0, 1] exactly as ToTensor gives them"
        assert split.y[i].item() == label


@needs_data
def test_standard_normalization_has_zero_mean_unit_std_on_the_training_images():
    data = load_mnist(DATA_DIR, normalization="standard")
    assert abs(data.train.x.mean().item()) < 1e-4
    assert abs(data.train.x.std().item() - 1) < 1e-4
    # and it is invertible back to the [0, 1] pixels (used for the misclassified-digit images)
    unit = load_mnist(DATA_DIR)
    torch.testing.assert_close(data.test.x * data.std + data.mean, unit.test.x, atol=1e-5, rtol=0)


@needs_data
@pytest.mark.parametrize("normalization", ["unit", "standard"])
def test_load_test_gives_exactly_load_mnists_test_split_and_statistics(normalization):
    """Oracle: load_mnist, which builds every split; the test images, labels, mean and std are bit for bit the same."""
    full = load_mnist(DATA_DIR, normalization=normalization)
    test, mean, std = load_test(DATA_DIR, normalization=normalization)
    assert torch.equal(test.x, full.test.x) and torch.equal(test.y, full.test.y)
    assert (mean, std) == (full.mean, full.std)


# ------------------------------------------------------------------ batches


def test_batches_are_a_permutation_drawn_from_the_generator_dropping_the_last_incomplete_batch():
    """Oracle: torch.randperm with the same seed, applied by hand."""
    n, b = 103, 10
    split = Split(torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3), torch.arange(n))
    batches = Batches(split, b)
    got = list(batches.epoch(torch.Generator().manual_seed(7)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7))
    assert len(got) == len(batches) == 10
    for k, (x, y) in enumerate(got):
        assert torch.equal(y, perm[k * b : (k + 1) * b])
        assert torch.equal(x, split.x[perm[k * b : (k + 1) * b]])


def test_batches_resume_mid_epoch_and_shard_across_ranks():
    n, b = 64, 8
    split = Split(torch.randn(n, 5), torch.arange(n))
    gen_state = torch.Generator().manual_seed(3).get_state()

    def epoch(start=0, rank=0, world=1):
        g = torch.Generator()
        g.set_state(gen_state)
        return [y.clone() for _, y in Batches(split, b, rank, world).epoch(g, start)]

    full = epoch()
    assert [torch.equal(a, c) for a, c in zip(epoch(start=3), full[3:])] == [True] * 5
    rank0, rank1 = epoch(rank=0, world=2), epoch(rank=1, world=2)
    for global_batch, r0, r1 in zip(full, rank0, rank1):
        assert torch.equal(torch.cat([r0, r1]), global_batch)


def test_a_span_of_batches_is_those_batches_back_to_back_in_one_process_only():
    """Oracle: the epoch's batches one by one. span(i, k) holds batches i..i+k-1; sharded ranks get single batches."""
    split = Split(torch.randn(50, 3), torch.arange(50))
    batches = Batches(split, 6)
    one_by_one = [(x.clone(), y.clone()) for x, y in batches.epoch(torch.Generator().manual_seed(5))]
    batches.shuffle(torch.Generator().manual_seed(5))
    x, y = batches.span(2, 4)
    assert torch.equal(x, torch.cat([b[0] for b in one_by_one[2:6]]))
    assert torch.equal(y, torch.cat([b[1] for b in one_by_one[2:6]]))
    assert torch.equal(batches.span(7)[1], one_by_one[7][1])
    sharded = Batches(split, 6, rank=1, world_size=2)
    sharded.shuffle(torch.Generator().manual_seed(5))
    assert torch.equal(sharded.span(7)[1], one_by_one[7][1][3:])  # rank 1's half of batch 7
    with pytest.raises(ValueError, match=r"Batches.span: count must be 1 when the batches are sharded across ranks, got 2"):
        sharded.span(0, 2)


def test_batches_reject_a_batch_size_the_ranks_cannot_share():
    split = Split(torch.randn(10, 2), torch.arange(10))
    with pytest.raises(ValueError, match="divisible"):
        Batches(split, 5, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        Batches(split, 11)


def test_one_hot_targets_put_high_at_the_label_and_low_elsewhere():
    y = one_hot(torch.tensor([2, 0]), 0.05, 0.95)
    expected = torch.full((2, 10), 0.05)
    expected[0, 2] = expected[1, 0] = 0.95
    assert torch.equal(y, expected)


# ------------------------------------------------------------------ bad files


def _idx(path: Path, magic: int, dims: list[int], payload: bytes) -> None:
    """An IDX file as LeCun describes it: big-endian magic (0x08 = ubyte, then rank), dims, data."""
    path.write_bytes(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + payload)


def _write_mnist(root: Path, n_train: int = 60_000, n_test: int = 10_000) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", 0x0803, [n, 28, 28], bytes(n * 784))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", 0x0801, [n], bytes(i % 10 for i in range(n)))
    return raw


def test_well_formed_small_files_load(tmp_path):
    """The control for the cases below: files written by _write_mnist are valid."""
    _write_mnist(tmp_path)
    data = load_mnist(str(tmp_path))
    assert len(data.train) == 50_000 and data.test.y[:3].tolist() == [0, 1, 2]


def _truncate(raw: Path) -> None:
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[: 16 + 1000 * 784])  # header says 60,000 images, 1,000 follow


def _bad_magic(raw: Path) -> None:
    path = raw / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x00\x00" + path.read_bytes()[4:])


def _missing(raw: Path) -> None:
    (raw / "t10k-labels-idx1-ubyte").unlink()


@pytest.mark.parametrize(
    "damage, says",
    [(_truncate, "corrupt or truncated"), (_bad_magic, "corrupt or truncated"), (_missing, "t10k-labels-idx1-ubyte")],
    ids=["truncated", "wrong-magic", "missing"],
)
def test_bad_files_raise_data_error_naming_the_folder(tmp_path, damage, says):
    raw = _write_mnist(tmp_path)
    damage(raw)
    with pytest.raises(DataError) as info:
        load_mnist(str(tmp_path))
    message = str(info.value)
    assert says in message and str(raw) in message and "--download" in message


def test_load_test_reads_the_training_files_only_for_the_standard_statistics(tmp_path):
    """Truncated training images: "unit" needs only the test files, "standard" needs the training pixels' mean/std."""
    raw = _write_mnist(tmp_path)
    _truncate(raw)
    test, mean, std = load_test(str(tmp_path))
    assert len(test) == 10_000 and (mean, std) == (0.0, 1.0) and test.y[:3].tolist() == [0, 1, 2]
    with pytest.raises(DataError, match="training files .* corrupt or truncated"):
        load_test(str(tmp_path), normalization="standard")
    with pytest.raises(DataError, match="training files .* corrupt or truncated"):
        load_mnist(str(tmp_path))


def test_a_script_without_download_gets_its_own_hint(tmp_path):
    """hint="" (train.evaluate has no --download): the message advises only what that script can do."""
    _missing(_write_mnist(tmp_path))
    with pytest.raises(DataError) as info:
        load_test(str(tmp_path), hint="")
    message = str(info.value)
    assert "t10k-labels-idx1-ubyte" in message and "--download" not in message
    assert message.endswith("in DIR/MNIST/raw/ and pass --data-dir DIR.")


def test_wrong_image_count_is_refused(tmp_path):
    """A well-formed IDX file with 100 training images is not MNIST."""
    _write_mnist(tmp_path, n_train=100)
    with pytest.raises(DataError, match=r"\(100, 28, 28\).*expected \(60000, 28, 28\)"):
        load_mnist(str(tmp_path))


def test_cli_exits_2_with_one_message_and_no_traceback(tmp_path):
    """The script's boundary: DataError (tested above for each case) becomes exit 2 and one line."""
    _missing(_write_mnist(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "train.mnist", "--data-dir", str(tmp_path), "--logdir", str(tmp_path / "run")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("error:") == 1 and str(tmp_path / "MNIST" / "raw") in result.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ download, offline


def go_offline(monkeypatch) -> list[str]:
    """Every URL torchvision opens fails as it does without a network; returns the URLs tried."""
    tried = []

    def urlopen(request, *args, **kwargs):
        tried.append(request.full_url if isinstance(request, urllib.request.Request) else request)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return tried


def assert_download_failure(message: str, raw: Path) -> None:
    """torchvision's own message (which file, which mirror, why), and what to do: no 'corrupt', no '--download'."""
    assert "MNIST download into" in message and "failed" in message and str(raw) in message
    assert "Error downloading train-images-idx3-ubyte.gz" in message
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/" in message and "name resolution" in message
    assert "Check the internet connection, or put the four IDX files" in message and "yourself" in message
    assert "corrupt" not in message and "--download" not in message


def test_a_failed_download_says_so_and_removes_only_the_folders_it_created_empty(tmp_path, monkeypatch):
    tried = go_offline(monkeypatch)
    root = tmp_path / "new" / "data"  # neither exists: the attempt creates new/, data/, MNIST/ and raw/
    with pytest.raises(DataError) as info:
        load_mnist(str(root), download=True)
    assert tried, "the download went through torchvision's urlopen"
    assert_download_failure(str(info.value), root / "MNIST" / "raw")
    assert list(tmp_path.iterdir()) == []

    # MNIST/ was there before (and stays); raw/ was not (and goes)
    (tmp_path / "MNIST").mkdir()
    with pytest.raises(DataError):
        load_mnist(str(tmp_path), download=True)
    assert [p.name for p in tmp_path.rglob("*")] == ["MNIST"]

    # a folder holding a file stays as it is
    (tmp_path / "MNIST" / "raw").mkdir()
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(DataError):
        load_mnist(str(tmp_path), download=True)
    assert [p.name for p in (tmp_path / "MNIST" / "raw").iterdir()] == ["train-images-idx3-ubyte"]


def test_train_mnist_download_offline_exits_2_reporting_the_download(tmp_path, monkeypatch, capsys):
    import train.mnist

    go_offline(monkeypatch)
    with pytest.raises(SystemExit) as info:
        train.mnist.main(["--data-dir", str(tmp_path / "data"), "--download", "--logdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("train.mnist: error: ") and err.count("\n") == 1
    assert_download_failure(err, tmp_path / "data" / "MNIST" / "raw")
    assert list(tmp_path.iterdir()) == []


def _download_as_rank(rank: int, store: str, data_dir: str, report: str) -> None:
    """One of two torchrun ranks (one node) running train.mnist's data loading with --download, offline."""
    import contextlib
    import io
    import json

    import torch.distributed as dist

    import train.mnist

    tried = []

    def urlopen(request, *args, **kwargs):  # go_offline's, without pytest's monkeypatch in this process
        tried.append(request)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    urllib.request.urlopen = urlopen
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            train.mnist.read_data(train.mnist.resolve_args(["--data-dir", data_dir, "--download"]),
                                  torch.device("cpu"), world_size=2)
            code = 0
        except SystemExit as e:
            code = e.code
    dist.destroy_process_group()
    Path(report).write_text(json.dumps({"code": code, "tried": len(tried), "err": err.getvalue()}))


def test_under_torchrun_one_rank_per_node_downloads_and_a_failure_stops_all_quietly(tmp_path):
    """Two ranks, --download, offline: local rank 0 alone tries the mirrors (two ranks fetching into one
    folder would overwrite each other's files); rank 1 waits for it, then exits 2 without a message
    of its own, since rank 0 has said why. Nobody hangs."""
    import json

    from ranks import run_ranks

    run_ranks(_download_as_rank,
              [(r, str(tmp_path / "store"), str(tmp_path / "data"), str(tmp_path / f"rank{r}.json")) for r in range(2)])
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert first["code"] == 2 and first["tried"] > 0
    assert_download_failure(first["err"], tmp_path / "data" / "MNIST" / "raw")
    assert second == {"code": 2, "tried": 0, "err": ""}


# ------------------------------------------------------------------ python -m train.data


def test_data_cli_without_the_files_exits_2_with_one_message(tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    assert data_module.main(["--data-dir", str(missing), "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.data: error: MNIST files not found") and err.count("\n") == 1
    assert str(missing / "MNIST" / "raw") in err and "--download" in err and not missing.exists()


@pytest.mark.parametrize("given", ["data/MNIST", "data/MNIST/raw", "link"])
def test_data_dir_given_inside_the_folder_names_the_folder_meant(tmp_path, capsys, given):
    """--data-dir DIR/MNIST or DIR/MNIST/raw, or a link to DIR/MNIST, where the files are (file names only:
    never read), is answered with the --data-dir meant, DIR."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in data_module.FILES[True] + data_module.FILES[False]:
        (raw / name).touch()
    (tmp_path / "link").symlink_to(tmp_path / "data" / "MNIST")
    assert data_module.main(["--data-dir", str(tmp_path / given), "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.data: error: MNIST files not found") and err.count("\n") == 1
    data = os.path.realpath(tmp_path / "data")
    assert f"They are in {os.path.join(data, 'MNIST', 'raw')}: pass --data-dir {data}," in err


def test_data_cli_download_offline_exits_2_reporting_the_download(tmp_path, monkeypatch, capsys):
    go_offline(monkeypatch)
    assert data_module.main(["--data-dir", str(tmp_path / "data"), "--download"]) == 2
    assert_download_failure(capsys.readouterr().err, tmp_path / "data" / "MNIST" / "raw")
    assert list(tmp_path.iterdir()) == []


def test_data_cli_help_names_the_module_and_gives_each_default_once(capsys):
    with pytest.raises(SystemExit) as info:
        data_module.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal's width
    assert info.value.code == 0 and out.startswith("usage: python -m train.data ")
    for default in ("(default: ./data)", "(default: 128)", "(default: 3)", "(default: off)"):
        assert out.count(default) == 1, (default, out)


@pytest.mark.parametrize("argv, says", [
    (["--batch-size", "0"], "argument --batch-size: must be in 1..50000, got 0"),
    (["--batch-size", "50001"], "argument --batch-size: must be in 1..50000, got 50001"),
    (["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    (["--repeats", "two"], "argument --repeats: must be an integer >= 1, got 'two'"),
])
def test_data_cli_refuses_bad_numbers_by_name(argv, says, capsys):
    with pytest.raises(SystemExit) as info:
        data_module.main(argv)
    assert info.value.code == 2 and says in capsys.readouterr().err


def test_data_cli_reports_the_median_of_an_even_number_of_epochs(tmp_path, monkeypatch, capsys):
    """With --repeats 2 the median is the mean of the two epochs (statistics.median, the oracle), not the larger:
    a clock that makes the DataLoader's epochs 1 s and 3 s and the tensor's 0.1 s and 0.3 s gives 2 s, 0.2 s, 10x."""
    import itertools
    import types

    import torch.utils.data

    _write_mnist(tmp_path)
    monkeypatch.setattr(torch.utils.data, "DataLoader", lambda *args, **kwargs: [])  # its epochs take no time here
    ticks = itertools.accumulate([0.0, 1.0, 0.0, 0.1, 0.0, 3.0, 0.0, 0.3])  # start, end of each epoch in turn
    monkeypatch.setattr(data_module, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    assert data_module.main(["--data-dir", str(tmp_path), "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "DataLoader + ToTensor : 2.000 s" in out and "index into tensor     : 0.2000 s" in out
    assert "speed-up              : 10x" in out
