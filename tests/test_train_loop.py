"""train.mnist's epoch loop in-process, on synthetic batches: no MNIST needed."""

from __future__ import annotations

import argparse
import types

import pytest
import torch
import torch.distributed as dist

import train.mnist
from train.data import Batches, Split


def _loop_run(step, stop, epochs, steps_per_epoch, log_every=1000, rank=0, world_size=1):
    """A Run of train.mnist's loop with no model: ``step(x, y)`` stands in for training (one process and no log
    step unless told otherwise)."""
    return train.mnist.Run(
        args=argparse.Namespace(log_every=log_every, no_monitor=True, delta_hist_every=0, logdir="run"), model=None,
        optimizer=None, scheduler=None, train_step=step, fast_step=step, writer=types.SimpleNamespace(close=lambda: None),
        stop=stop, device=torch.device("cpu"), rank=rank, world_size=world_size, epochs=epochs,
        steps_per_epoch=steps_per_epoch, log_every=log_every, interactive=False,
    )


def _ddp_epoch(stop_at_step: int, monkeypatch=None, other_rank_stops_at_log: int | None = None):
    """One epoch of train.mnist's loop as rank 1 of 2 (a one-process gloo group stands in for the ranks),
    10 steps of 2 samples, log steps 4 and 8; Ctrl-C on this rank during step ``stop_at_step`` (0: never),
    or on the other rank before log step ``other_rank_stops_at_log``. Returns (steps, loss, stopped, progress)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        batches = Batches(Split(torch.rand(40, 4), torch.rand(40, 2)), batch_size=4, rank=1, world_size=2)
        stop = types.SimpleNamespace(requested=False)
        steps = []

        def step(x, y):
            steps.append(x.shape[0])
            stop.requested = len(steps) == stop_at_step or stop.requested
            return torch.ones(())

        if monkeypatch is not None:  # the group of one stands in for both ranks: the other holds this one's sums
            gather = train.mnist.distributed.gather
            monkeypatch.setattr(train.mnist.distributed, "gather", lambda t, world_size: gather(t, 1).expand(
                world_size, *t.shape))
        if other_rank_stops_at_log is not None:
            any_rank = train.mnist.distributed.any_rank
            monkeypatch.setattr(train.mnist.distributed, "any_rank", lambda flag, *args: any_rank(
                flag or len(steps) >= other_rank_stops_at_log, *args))
        run = _loop_run(step, stop, 3, len(batches), log_every=4, rank=1, world_size=2)
        progress = train.mnist.Progress(epoch_generator_state=torch.Generator().manual_seed(0).get_state())
        train_loss, stopped = train.mnist.train(run, progress, batches, torch.Generator())
    finally:
        dist.destroy_process_group()
    return steps, train_loss, stopped, progress


def test_a_stop_on_another_rank_stops_this_one_at_the_next_log_step(monkeypatch):
    """The ranks agree at log steps: a Ctrl-C that only the other rank saw before log step 4 stops this rank
    there too (the loop leaves mid-epoch, with the position to resume from)."""
    steps, train_loss, stopped, progress = _ddp_epoch(0, monkeypatch, other_rank_stops_at_log=4)
    assert steps == [2] * 4 and stopped and train_loss is None
    assert (progress.epoch, progress.step, progress.batch_in_epoch) == (0, 4, 4)
    # every rank's own loss sums, each rank to go on from its own: 4 steps of cost 1, none since the log step
    assert progress.epoch_loss_sum.tolist() == [4.0, 4.0] and progress.loss_since_log.tolist() == [0.0, 0.0]


def test_ddp_ctrl_c_after_an_epochs_last_log_step_stops_at_its_end():
    """Under DDP the ranks agree on stopping at log steps and at the epoch end. A Ctrl-C that lands
    after an epoch's last log step must stop the run at that epoch's end (not a whole epoch later).

    In-process, no MNIST: a one-process gloo group stands in for the ranks (its all-reduce returns
    this rank's flag); 10 steps per epoch, log steps 4 and 8, Ctrl-C during step 9.
    """
    steps, train_loss, stopped, progress = _ddp_epoch(9)
    assert steps == [2] * 10, "each rank takes its half of every global batch of 4, all 10 steps"
    assert stopped and train_loss == 1.0
    assert (progress.epoch, progress.step, progress.batch_in_epoch) == (1, 10, 0)  # the epoch is complete


def test_two_runs_given_one_new_logdir_at_once_write_one_run(tmp_path, capsys):
    """Both passed --logdir's emptiness check, made before the data loads: the first to open its writer
    claims the folder (with a file of the mode any file the run writes has), the second stops there, naming
    it (both wrote into one folder: two runs' events mixed, one checkpoint.pt overwritten by the other)."""
    import os

    logdir = str(tmp_path / "run")
    writer = train.mnist.open_writer(logdir, None)
    try:
        with pytest.raises(SystemExit) as info:
            train.mnist.open_writer(logdir, None)
    finally:
        writer.close()
    assert info.value.code == 2
    assert (f"--logdir {logdir} was taken by another run started at the same time; give a new or empty folder"
            in capsys.readouterr().err)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(os.path.join(logdir, train.mnist.CLAIM)).st_mode & 0o777 == 0o666 & ~umask
    train.mnist.open_writer(logdir, 1).close()  # a resumed run goes on in its own folder


def test_a_logdir_holding_only_a_stale_claim_is_named_as_such(tmp_path, capsys):
    """A run's folder cleared with `rm folder/*` keeps the hidden claim file: the refusal says that it is all
    the folder holds and what to do (it said "not empty" of a folder ls shows empty). A file where the folder
    should be is not called another run's claim."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / train.mnist.CLAIM).touch()
    with pytest.raises(SystemExit):
        train.mnist.run_folder(argparse.Namespace(resume=None, logdir=str(folder)))
    assert (f"--logdir {folder} is not empty; it holds only {train.mnist.CLAIM}, the claim of a run that wrote "
            "nothing more or whose files were removed; remove it if no run is using the folder, or give a new or "
            "empty folder") in capsys.readouterr().err
    (tmp_path / "a-file").touch()
    with pytest.raises(SystemExit):
        train.mnist.open_writer(str(tmp_path / "a-file"), None)
    assert f"--logdir {tmp_path / 'a-file'} cannot be created: File exists" in capsys.readouterr().err


@pytest.mark.parametrize("width", [10**14, 2**61], ids=["past-the-address-space", "past-int64-bytes"])
def test_sizes_too_large_for_memory_stop_with_a_message(capsys, width):
    """--sizes whose parameters no machine can allocate stop with a message naming the flag and the size, not
    torch's traceback: 314 PB for the first layer's weight, past the 128 PiB of a process's largest address
    space (so that no overcommit setting grants it), and a width whose bytes overflow int64 (torch's
    "Storage size calculation overflowed")."""
    args = argparse.Namespace(sizes=[784, width, 10], init="default")
    with pytest.raises(SystemExit) as stopped:
        train.mnist.build_model(args, torch.device("cpu"))
    assert stopped.value.code == train.mnist.EXIT_DATA
    err = capsys.readouterr().err
    parameters = 785 * width + (width + 1) * 10  # each layer's weights and biases
    assert f"--sizes 784 {width} 10" in err and f"{parameters:,} parameters" in err
    assert "do not fit in the memory of cpu" in err and "Traceback" not in err


def test_each_epoch_takes_the_samples_in_an_order_of_its_own():
    """Two epochs of the loop on 12 numbered samples, batches of 4: epoch 1 takes them in the order of the
    first torch.randperm(12) drawn from the seeded batch generator, epoch 2 in that of the second (epochs that
    all reused the first order passed every run-against-run test). Oracle: torch.randperm on a generator
    seeded alike."""
    seen = []

    def step(x, y):
        seen.append(y.clone())
        return torch.ones(())

    batches = Batches(Split(torch.zeros(12, 1), torch.arange(12)), batch_size=4)
    run = _loop_run(step, types.SimpleNamespace(requested=False), 2, len(batches))
    progress = train.mnist.Progress(epoch_generator_state=torch.Generator().manual_seed(5).get_state())
    generator = torch.Generator()
    for _ in range(2):
        train.mnist.train(run, progress, batches, generator)
    oracle = torch.Generator().manual_seed(5)
    assert torch.equal(torch.cat(seen), torch.cat([torch.randperm(12, generator=oracle) for _ in range(2)]))


def test_ctrl_c_at_an_epochs_last_step_ends_the_run_with_130_after_that_epoch(monkeypatch, capsys):
    """A Ctrl-C during the last step of epoch 1 (of 3): the epoch completes, is evaluated and checkpointed,
    and the run exits with 130 (interrupted, as the module docstring promises), not 0 (finished)."""
    done = []
    monkeypatch.setattr(train.mnist, "evaluate", lambda run, progress, *args: done.append(("evaluate", progress.epoch)))
    monkeypatch.setattr(train.mnist, "save_checkpoint", lambda run, progress: done.append(("save", progress.epoch)))
    stop = types.SimpleNamespace(requested=False)
    steps = []

    def step(x, y):
        steps.append(x.shape[0])
        stop.requested = len(steps) == 3  # the epoch's last step
        return torch.ones(())

    batches = Batches(Split(torch.zeros(12, 1), torch.zeros(12, 2)), batch_size=4)
    run = _loop_run(step, stop, 3, len(batches))
    progress = train.mnist.Progress(epoch_generator_state=torch.Generator().manual_seed(0).get_state())
    assert train.mnist.train_epochs(run, progress, None, batches, torch.Generator(), None, None) == 130
    assert steps == [4, 4, 4] and done == [("evaluate", 1), ("save", 1)]
    assert (progress.epoch, progress.batch_in_epoch) == (1, 0)
    assert "interrupted after epoch 1; checkpoint written to run" in capsys.readouterr().out


def test_summary_takes_the_test_accuracy_at_the_best_validation_epoch():
    """metrics.json's figures from a history whose best validation accuracy (epoch 2) is not its last epoch
    nor its best test accuracy (epoch 3), values by hand."""
    history = [dict(epoch=1, train_loss=0.9, val_accuracy=0.90, test_accuracy=0.80),
               dict(epoch=2, train_loss=0.5, val_accuracy=0.95, test_accuracy=0.85),
               dict(epoch=3, train_loss=0.3, val_accuracy=0.93, test_accuracy=0.90)]
    assert train.mnist.summary(history) == dict(test_accuracy=0.90, test_accuracy_at_best_val=0.85,
                                                best_test_accuracy=0.90, final_train_loss=0.3, epochs=3)
