"""train.mnist's epoch loop in-process, on synthetic batches: no MNIST needed."""

from __future__ import annotations

import argparse
import types

import torch
import torch.distributed as dist

import train.mnist
from train.data import Batches, Split


def test_ddp_ctrl_c_after_an_epochs_last_log_step_stops_at_its_end():
    """Under DDP the ranks agree on stopping at log steps and at the epoch end. A Ctrl-C that lands
    after an epoch's last log step must stop the run at that epoch's end (not a whole epoch later).

    In-process, no MNIST: a one-process gloo group stands in for the ranks (its all-reduce returns
    this rank's flag); 10 steps per epoch, log steps 4 and 8, Ctrl-C during step 9.
    """
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        batches = Batches(Split(torch.rand(40, 4), torch.rand(40, 2)), batch_size=4, rank=1, world_size=2)
        stop = types.SimpleNamespace(requested=False)
        steps = []

        def step(x, y):
            steps.append(x.shape[0])
            stop.requested = len(steps) == 9 or stop.requested
            return torch.ones(())

        run = train.mnist.Run(
            args=argparse.Namespace(log_every=4, no_monitor=True, delta_hist_every=0), model=None, optimizer=None,
            scheduler=None, train_step=step, fast_step=step, writer=None, stop=stop, device=torch.device("cpu"),
            rank=1, world_size=2, epochs=3, steps_per_epoch=len(batches), interactive=False,
        )
        progress = train.mnist.Progress(epoch_generator_state=torch.Generator().manual_seed(0).get_state())
        train_loss, stopped = train.mnist.train(run, progress, batches, torch.Generator())
    finally:
        dist.destroy_process_group()
    assert steps == [2] * 10, "each rank takes its half of every global batch of 4, all 10 steps"
    assert stopped and train_loss == 1.0
    assert (progress.epoch, progress.step, progress.batch_in_epoch) == (1, 10, 0)  # the epoch is complete
