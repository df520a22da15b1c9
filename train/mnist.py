"""Train the notes' sigmoid network on MNIST through torchbp's hand-written backward.

    python -m train.mnist --data-dir /path/to/data            # the fast recipe
    python -m train.mnist --recipe nielsen --data-dir ...     # the book's chapter 1 run
    tensorboard --logdir runs

Every epoch logs the train loss, validation and test accuracy; every
``--log-every`` steps the loss, learning rate, each layer's δ statistics
(:class:`torchbp.DeltaMonitor`, attached for that step only, its forward and
backward, so the steps in between run at full speed) and weight-gradient norms go to
TensorBoard.
The run folder (``--logdir``) holds the events, ``checkpoint.pt`` (after every
epoch, atomically), ``metrics.json`` and ``.claimed``, the empty file by which
a run takes a folder before it writes there.

Recipes (every field can be overridden by its flag):

``nielsen``: chapter 1 of Nielsen's book, as network.py runs it: [784, 30, 10],
weights and biases drawn from N(0, 1), plain SGD with η = 3.0 on mini-batches
of 10, 30 epochs, the quadratic cost (network.py averages the per-sample
gradients over the mini-batch: torchbp's mean-reduced QuadraticCost is that
exactly), pixels in [0, 1], one-hot 0/1 targets. Plain SGD in one process
runs by hand (no autograd graph, no optimizer object): the steps between two
log steps are one :meth:`torchbp.MLP.sgd_epoch` call, Nielsen's
``update_mini_batch`` on each mini-batch in turn, with the arguments checked
once; the same updates, bit for bit, as one :meth:`torchbp.MLP.sgd_step` per
mini-batch, and over 3 times as fast as autograd with an optimizer.

``fast`` (default): the best test accuracy in the least time for the same kind
of network (sigmoid on every layer, output included, quadratic cost):

- one wide hidden layer, [784, 400, 10], for 10 epochs at peak η = 4e-3: on
  two CPU cores a wide shallow layer costs less time per accuracy point than a
  deeper net (sigmoid stacks train slowly: vanishing δ, the notes' own point).
  Measured on the test set (seeds 0-2): 400 × 10 at 4e-3 gave 98.11, 98.15
  and 98.22% in 13-14 s; 512 × 10 at 4e-3 98.21, 98.20, 98.26% but in 12-16 s,
  too close to 15 s on a loaded machine; 512 × 12 at 3e-3 98.20% in 17.5 s;
  512 × 9 at 3e-3 97.91-98.08%; 384 × 12 at 3e-3 97.98%; 256 × 16 97.95%;
  800 × 12 at 2e-3 98.24-98.30% for 1.5x the time of 512;
- targets 0.05/0.95 instead of 0/1 (LeCun et al., "Efficient BackProp"): a 0/1
  target pushes a sigmoid output towards z = ±∞, where φ' = a(1 − a) and so
  δ^L vanish and the weights keep growing; targets inside the range keep δ^L
  alive and the net stops saturating on the easy examples. Worth about 0.5
  points of test accuracy here;
- inputs standardised (zero mean, unit variance over the training pixels):
  centred inputs keep the first layer's z away from the flat ends of φ;
- Adam with a one-cycle schedule (warm-up to ``--lr`` = 4e-3, then cosine
  annealing to almost 0): large steps early, small steps for the last epochs,
  so a fixed short budget of epochs ends at a converged point;
- batch 128: fast steps on a CPU while still many updates per epoch;
- PyTorch's default (Kaiming-uniform) initialisation, ``MLP(fused=True)`` and
  ``model.cost(x, y)``: network and cost are one autograd node.

Determinism: the same seed on the same machine, with the same ``--threads``
(and ``--compile``), gives the same weights and metrics (all randomness comes
from the seeded CPU RNG and the batch generator). With ``--recipe nielsen`` the
logging flags count too: its log steps run through autograd and the optimizer,
the steps between them by hand, and the two round float32 differently (weights
a few 1e-6 apart after an epoch between ``--log-every 50`` and ``100``). A run killed after
epoch k and resumed with ``--resume`` in as many processes ends with the same weights and
metrics, bit for bit, as the uninterrupted run (the losses add up in float32 on the device,
and the checkpoint keeps the partial sums as they were); in another number of processes, the
same updates, rounded differently, and a note says so. ``--resume`` takes every
hyperparameter from the checkpoint (a flag that would change one is refused, even
at its default value), and ``--device``, ``--threads`` and ``--compile`` too unless given,
the data from the run's ``--data-dir`` unless given again, and goes on in the
checkpoint's folder (so it takes a file named ``checkpoint.pt``), keeping the
events up to the checkpoint's step; a finished run with its metrics.json is
left as it is. A new run refuses a ``--logdir`` that already holds files.

Host syncs: a step never reads a value back from the device. The loss is
accumulated as a device tensor and read at log steps and at the end of an
epoch; that is also where a non-finite loss is detected (so a NaN is caught
up to ``--log-every`` steps late; the last checkpoint, from the end of the
previous epoch, stays good).

Ctrl-C finishes the current step (with ``--recipe nielsen``, the steps by hand
up to the next log step, which run as one call), writes the checkpoint with the position
inside the epoch (resume continues from the next step, with the same batch
order), flushes TensorBoard and exits 130; before the first step (loading the
data, building the model) it stops at once and writes no checkpoint. Under torchrun the ranks agree on
stopping at the next log step or epoch end (one all-reduce there, not per step)
and checkpoint there; torchrun itself then reports the signal (a
SignalException traceback) and exits 1.

More than one process: ``torchrun --nproc_per_node=2 -m train.mnist ...`` trains
with DistributedDataParallel (gloo on CPU, nccl on CUDA). Every rank draws the
same permutation and takes its slice of each global batch of ``--batch-size``;
DDP averages the gradients, which for a mean-reduced cost is the gradient of
the whole batch's cost; the logged train loss is likewise the ranks' mean (one
all-reduce per log step and per epoch). Rank 0 alone evaluates, logs and checkpoints. δ
statistics: each rank's DeltaMonitor sees only its shard, so under DDP the
``delta/norm`` scalars are the whole global batch's ‖Σ_n δ_n^l‖ read from the
all-reduced bias gradient (∇_{b^l} C = Σ_n δ_n^l exactly) at the log step itself;
rank 0's own shard statistics keep their tags, except its norm, which goes to ``delta/shard_norm``.
At the end the ranks' weights are compared (``ranks_identical_weights`` in metrics.json).
With ``--download`` one process per node (local rank 0) fetches the files while the others wait.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

import torchbp
from train import checkpoint, distributed
from train.cli import check_default_root, counted, int_in, logdir_arg, new_run_folder
from train.data import DATA_DIR, MNIST, Batches, DataError, Split, load_mnist, one_hot

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

RECIPES: dict[str, dict] = {
    "nielsen": dict(
        sizes=[784, 30, 10], init="normal", optimizer="sgd", lr=3.0, momentum=0.0, schedule="none",
        batch_size=10, epochs=30, target_range=[0.0, 1.0], normalization="unit",
    ),
    "fast": dict(
        sizes=[784, 400, 10], init="default", optimizer="adam", lr=4e-3, momentum=0.0, schedule="onecycle",
        batch_size=128, epochs=10, target_range=[0.05, 0.95], normalization="standard",
    ),
}
EXIT_DATA, EXIT_INTERRUPTED, EXIT_DIVERGED = 2, 130, 1
FINAL_EVENTS = ".final"  # the suffix of the event file holding a finished run's hparams and misclassified digits
CLAIM = ".claimed"  # a new run's claim on its folder, made before it writes there (see open_writer)
Step = Callable[[Tensor, Tensor], Tensor]  # one optimisation step on a batch (x, y); returns its cost


def _recipe_default(field: str) -> str:
    values = ", ".join(f"{name} {recipe[field]}" for name, recipe in RECIPES.items())
    return f"(default: from --recipe: {values})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.mnist",
        description="Train torchbp's sigmoid MLP on MNIST through the hand-written backward; "
        "log per-layer δ norms to TensorBoard.",
    )
    p.add_argument("--recipe", choices=sorted(RECIPES), default="fast", help="hyperparameter set (default: fast)")
    p.add_argument("--sizes", type=int, nargs="+", metavar="N",
                   help=f"layer widths, input first, e.g. --sizes 784 30 10 {_recipe_default('sizes')}")
    p.add_argument("--hidden", type=int, nargs="+", metavar="N",
                   help="hidden widths only (784 and 10 added), e.g. --hidden 30 (default: from --sizes)")
    p.add_argument("--init", choices=["default", "normal"],
                   help=f"default: PyTorch's Kaiming-uniform; normal: weights and biases N(0, 1) {_recipe_default('init')}")
    p.add_argument("--epochs", type=int, help=f"epochs {_recipe_default('epochs')}")
    p.add_argument("--batch-size", type=int, help=f"global mini-batch size; an epoch's last, partial one is left "
                   f"out {_recipe_default('batch_size')}")
    p.add_argument("--lr", type=float, help=f"learning rate η (peak η for onecycle) {_recipe_default('lr')}")
    p.add_argument("--optimizer", choices=["sgd", "adam"], help=f"optimizer {_recipe_default('optimizer')}")
    p.add_argument("--momentum", type=float, help=f"SGD momentum; with --schedule onecycle the top of its cycle, "
                   f"0.85/0.95 of it at the peak learning rate {_recipe_default('momentum')}")
    p.add_argument("--schedule", choices=["none", "onecycle"], help=f"learning-rate schedule {_recipe_default('schedule')}")
    p.add_argument("--target-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help=f"one-hot target values, e.g. 0.05 0.95 {_recipe_default('target_range')}")
    p.add_argument("--normalization", choices=["unit", "standard"],
                   help=f"unit: pixels in [0, 1]; standard: zero mean, unit variance {_recipe_default('normalization')}")
    p.add_argument("--seed", type=int_in(-2**63, 2**64 - 1), default=0, metavar="N",
                   help="seed of the initialisation and batch order, -2^63..2^64-1 as torch takes it; torch's CPU "
                        "generator keeps its low 32 bits, so seeds equal modulo 2^32 give the same run (default: 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda when available (default: auto)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch's ops (torch.set_num_threads), 1 to 4096; at mini-batch 10 one "
                        "thread is fastest, the matmuls being too small to share (default: torch's choice)")
    p.add_argument("--logdir", type=logdir_arg, help="run folder, new or empty (default: runs/<recipe>-<timestamp>)")
    p.add_argument("--log-every", type=int, default=100, help="steps between loss/δ logs (default: 100)")
    p.add_argument("--delta-hist-every", type=int, default=0,
                   help="steps between δ histograms, 0 for none; a multiple of --log-every (default: 0)")
    p.add_argument("--no-monitor", action="store_true",
                   help="do not record δ statistics nor the weight-gradient norms logged with them (default: False)")
    p.add_argument("--resume", metavar="PATH", help="continue the run of this checkpoint.pt in its folder, with its "
                   "hyperparameters, data, device, threads and compile; --data-dir, --download, --device, --threads "
                   "and --compile may be given anew, and --epochs, to train a run without a schedule for longer "
                   "(default: None)")
    p.add_argument("--limit-train", type=int, metavar="N", help="train on the first N of the 50,000 images (default: all)")
    p.add_argument("--dry-run", action="store_true",
                   help="one training batch (at the full run's first learning rate), logged as a log step, and a "
                        "one-batch evaluation (default: False)")
    p.add_argument("--data-dir", help=f"folder holding MNIST/raw/ (default: {DATA_DIR}; with --resume, the run's)")
    p.add_argument("--download", action="store_true", help="download MNIST into --data-dir if missing (default: False)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the training step (forward, cost and backward; the optimizer's fused step, "
                        "which torch does not trace, runs as it is; the hand-written "
                        "MLP.sgd_step where plain SGD runs by hand, which is then slower than the eager "
                        "MLP.sgd_epoch spans it replaces); --no-compile resumes a compiled run eagerly "
                        "(default: False)")
    return p


# With --resume the run's hyperparameters come from its checkpoint; these say where and how it runs now,
# and --epochs how long (resume_args allows a new value only where no schedule is laid out over the epochs).
RESUME_FLAGS = ("resume", "data_dir", "download", "device", "threads", "compile", "epochs")


def given_options(argv: list[str] | None) -> set[str]:
    """The dests of the options written on the command line, whatever their values (a default given too)."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS  # so that only what was parsed lands in the namespace
    return set(vars(probe.parse_args(argv)))


# More threads than any machine has only cost memory: each has a stack (100,000 ran a 24 GiB machine out of it).
MAX_THREADS = 4096


def check_threads(parser: argparse.ArgumentParser, threads: int | None) -> None:
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        parser.error(f"--threads must be in 1..{MAX_THREADS}, got {threads}")


def resolve_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line, fill every unset field from the recipe, refuse contradictions."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:
        given = given_options(argv)
        refused = [a.option_strings[0] for a in parser._actions if a.dest in given and a.dest not in RESUME_FLAGS]
        if refused:
            parser.error(f"--resume continues a run with the hyperparameters in its checkpoint; {', '.join(refused)} "
                         "cannot change them (with --resume only --data-dir, --download, --device, --threads, "
                         "--compile and --epochs apply)")
        for dest in ("device", "threads", "compile"):
            if dest not in given:
                setattr(args, dest, None)  # how the run ran: resume_args takes the checkpoint's
        if args.epochs is not None and args.epochs < 1:
            parser.error(f"--epochs must be at least 1, got {args.epochs}")
        check_threads(parser, args.threads)
        if os.path.isdir(args.resume):
            parser.error(f"--resume takes a run's checkpoint.pt, got the folder {args.resume}; did you mean "
                         f"{os.path.join(args.resume, 'checkpoint.pt')}?")
        if os.path.basename(args.resume) != "checkpoint.pt":
            # The run goes on in the checkpoint's folder, writing checkpoint.pt, metrics.json and
            # TensorBoard events there: another run's, or a folder of copies, would be overwritten or mixed.
            sibling = os.path.join(os.path.dirname(args.resume), "checkpoint.pt")
            advice = (f"did you mean {sibling}?" if os.path.isfile(sibling) else
                      f"to continue from this file, copy {args.resume} into a folder of its own as checkpoint.pt "
                      "and resume from that")
            parser.error(f"--resume takes a run's checkpoint.pt (the run goes on in its folder), got "
                         f"{args.resume}; {advice}")
        return args  # resume_args fills in the rest from the checkpoint
    # Absolute, as the checkpoint keeps it: --resume and train.evaluate may run from another folder
    args.data_dir = os.path.abspath(DATA_DIR if args.data_dir is None else args.data_dir)
    if args.logdir is None:
        check_default_root(parser)
    if args.hidden is not None and args.sizes is not None:
        parser.error(f"--hidden and --sizes both give the layer widths; pass one, got --hidden {args.hidden} "
                     f"and --sizes {args.sizes}")
    for field, value in RECIPES[args.recipe].items():
        if getattr(args, field) is None:
            setattr(args, field, value)
    if args.hidden is not None:
        if min(args.hidden) < 1:
            parser.error(f"--hidden widths must be positive, got {args.hidden}")
        args.sizes = [784, *args.hidden, 10]
    args.hidden = None
    if args.sizes[0] != 784 or args.sizes[-1] != 10 or min(args.sizes) < 1:
        parser.error(f"--sizes must start with 784, end with 10 and be positive, got {args.sizes}")
    for name in ("epochs", "batch_size", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.limit_train is not None and not 1 <= args.limit_train <= 50_000:
        parser.error(f"--limit-train must be in 1..50000, got {args.limit_train}")
    if args.limit_train is not None and args.batch_size > args.limit_train:
        parser.error(f"--batch-size ({args.batch_size}) exceeds the training set of --limit-train "
                     f"({counted(args.limit_train, 'image')}): one mini-batch needs that many")
    check_threads(parser, args.threads)
    if args.delta_hist_every and args.no_monitor:
        parser.error(f"--delta-hist-every {args.delta_hist_every} needs the δ monitor that --no-monitor turns off")
    if args.delta_hist_every < 0 or args.delta_hist_every % args.log_every:
        # histograms are taken from the log steps' δ, the only steps the monitor sees
        parser.error(f"--delta-hist-every must be 0 or a multiple of --log-every ({args.log_every}), "
                     f"got {args.delta_hist_every}")
    largest = torch.finfo(torch.float32).max
    # the weights are float32: a larger η cannot even be multiplied into an update, one that rounds to 0 there
    # (below 1.4e-45) moves nothing
    if not 0 < as_float32(args.lr) <= largest:
        parser.error(f"--lr must be a positive, finite float32 number (not 0 once rounded to float32), got {args.lr}")
    if not 0 <= args.momentum < math.inf:
        parser.error(f"--momentum must be a finite number >= 0, got {args.momentum}")
    if args.momentum and args.optimizer != "sgd":
        parser.error(f"--momentum is SGD's; --optimizer {args.optimizer} has none, got --momentum {args.momentum}")
    low, high = args.target_range
    # the predicted digit is the largest output: the target of the true class must be the larger, in float32
    # (the targets'), where 0.5 and 0.50000001 are one number
    if not -largest <= as_float32(low) < as_float32(high) <= largest:
        parser.error(f"--target-range LOW HIGH must be finite float32 numbers with LOW < HIGH once rounded to "
                     f"float32, got {low} {high}")
    return args


def as_float32(value: float) -> float:
    """``value`` rounded to float32, as the weights and targets hold it (inf above its range, 0 below)."""
    return torch.tensor(value, dtype=torch.float32).item()


class CostOf(nn.Module):
    """``forward(x, y) = model.cost(x, y)``: lets DDP wrap the fused network+cost node."""

    def __init__(self, model: torchbp.MLP) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model.cost(x, y)


class _RenameTags:
    """A SummaryWriter whose scalar tags starting with ``old`` are written as ``new`` + the rest."""

    def __init__(self, writer, old: str, new: str) -> None:
        self._writer, self._old, self._new = writer, old, new

    def add_scalar(self, tag: str, *args, **kwargs) -> None:
        if tag.startswith(self._old):
            tag = self._new + tag[len(self._old):]
        self._writer.add_scalar(tag, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._writer, name)


class Stop:
    """Set by SIGINT; the loop reads it between steps, so the current step always completes."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True


def fail(message: str, code: int) -> None:
    print(f"train.mnist: error: {message}", file=sys.stderr)
    sys.exit(code)


@torch.no_grad()
def predict(model: torchbp.MLP, x: torch.Tensor, chunk: int = 10_000) -> torch.Tensor:
    """Predicted digits: the index of the largest output activation. (N, 784) -> (N,)."""
    return torch.cat([model(part).argmax(1) for part in x.split(chunk)])


def accuracy(model: torchbp.MLP, split: Split) -> float:
    return (predict(model, split.x) == split.y).sum().item() / len(split)


def make_optimizer(args, params, lr_tensor: bool):
    # A tensor lr, as torch's docs advise for a compiled step with a schedule: a float lr traced into the
    # graph would recompile at every change. (torch runs a fused optimizer's step outside the graph today.)
    lr = torch.tensor(args.lr) if lr_tensor else args.lr
    # fused=True: one kernel per parameter for the whole update (2-3x faster than
    # the default foreach step on CPU for [784, 512, 10]; same arithmetic every run).
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=args.momentum, fused=True)
    return torch.optim.Adam(params, lr=lr, fused=True)


def make_scheduler(args, optimizer, total_steps: int):
    if args.schedule == "none":
        return None
    if args.optimizer == "adam":  # β1 cycles between OneCycleLR's own 0.85 and 0.95
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total_steps)
    # SGD: --momentum is the top of the cycle, down by OneCycleLR's 0.85/0.95 at the peak learning rate
    # (its own 0.95 would override the flag); plain SGD has no momentum to cycle.
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=total_steps, cycle_momentum=args.momentum > 0,
        max_momentum=args.momentum, base_momentum=args.momentum * 0.85 / 0.95,
    )


def init_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) for ``--device``; the process group where torchrun started several."""
    if device_arg == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device is available", EXIT_DATA)
    return distributed.init(use_cuda=device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available()))


def read_data(args: argparse.Namespace, device: torch.device, world_size: int) -> MNIST:
    """MNIST on the device. Under torchrun with ``--download`` one process per node (local rank 0)
    downloads while the others wait, then they read its files: processes fetching into one folder
    at once would overwrite each other's files. If that download fails, the process that tried says
    why and the others exit with the same code, quietly."""
    shared = args.download and world_size > 1
    fetch = args.download and (not shared or int(os.environ.get("LOCAL_RANK", "0")) == 0)
    # (any_rank is one all-reduce: the waiting processes wait there until every download is over)
    if shared and not fetch and distributed.any_rank(False, device, world_size):
        sys.exit(EXIT_DATA)  # the process that tried has said why
    try:
        data, error = load_mnist(args.data_dir, device, args.normalization, fetch), None
    except DataError as e:
        data, error = None, e
    if shared and fetch:
        distributed.any_rank(error is not None, device, world_size)  # lets the waiting processes go on
    if error is not None:
        fail(str(error), EXIT_DATA)
    return data


def load_data(args: argparse.Namespace, device: torch.device, rank: int, world_size: int
              ) -> tuple[MNIST, Batches, Split, Split]:
    """MNIST on the device: (data, this rank's training batches, validation split, test split)."""
    data = read_data(args, device, world_size)
    train_split = data.train
    if args.limit_train is not None:
        train_split = Split(train_split.x[: args.limit_train], train_split.y[: args.limit_train])
    if args.batch_size > len(train_split):
        fail(f"--batch-size ({args.batch_size}) exceeds the training set ({counted(len(train_split), 'image')})",
             EXIT_DATA)
    # Targets gathered with the images: (N,) labels -> (N, 10) one-hot in [low, high]
    train_targets = Split(train_split.x, one_hot(train_split.y, *args.target_range))
    batches = Batches(train_targets, args.batch_size, rank, world_size)
    val, test = data.val, data.test
    if args.dry_run:
        val = Split(val.x[: args.batch_size], val.y[: args.batch_size])
        test = Split(test.x[: args.batch_size], test.y[: args.batch_size])
    return data, batches, val, test


def build_model(args: argparse.Namespace, device: torch.device) -> torchbp.MLP:
    """The network of ``--sizes``, initialised as ``--init`` says from the global torch RNG."""
    try:
        model = torchbp.MLP(args.sizes, fused=True, device=device)
    except RuntimeError as e:  # CUDA's OutOfMemoryError is one; the CPU allocator raises a plain RuntimeError
        if not (isinstance(e, torch.cuda.OutOfMemoryError) or "can't allocate" in str(e)
                or "not enough memory" in str(e) or "Storage size calculation overflowed" in str(e)):
            raise
        n = sum((n_in + 1) * n_out for n_in, n_out in zip(args.sizes[:-1], args.sizes[1:]))  # weights and biases
        fail(f"--sizes {' '.join(map(str, args.sizes))}: the network's {n:,} parameters ({n * 4 / 2**30:,.1f} GiB "
             f"in float32) do not fit in the memory of {device}", EXIT_DATA)
    if args.init == "normal":
        with torch.no_grad():
            for layer in model.linears:
                layer.weight.normal_()
                layer.bias.normal_()
    return model


def cost_module(model: torchbp.MLP, world_size: int, device: torch.device) -> nn.Module:
    """``(x, y) -> model.cost(x, y)`` as a module; under torchrun wrapped in DistributedDataParallel."""
    module: nn.Module = CostOf(model)
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        module = DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)
    return module


def make_steps(args: argparse.Namespace, model: torchbp.MLP, step_module: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler | None, world_size: int
               ) -> tuple[Step, Step, Step | None]:
    """(train_step, fast_step, fast_steps): optimisation steps, each returning its cost (a device tensor).

    ``train_step`` is the eager autograd step on a batch ``(x, y)`` (the log steps take it, so
    DeltaMonitor's hooks and the weight gradients are there); ``fast_step`` is what the other
    steps take. ``fast_steps``, where plain SGD runs by hand without --compile, takes several
    consecutive batches as one ``(x, y)``, a step on each in turn, and returns their summed cost.
    """

    def train_step(x, y):
        optimizer.zero_grad(set_to_none=True)
        cost = step_module(x, y)
        cost.backward()
        optimizer.step()
        return cost.detach()

    # Plain SGD in one process needs neither autograd nor an optimizer object: MLP.sgd_step runs
    # forward, the notes' recursion and p <- p - η∇C by hand, about 2.5 times as fast at mini-batch 10.
    # (--compile compiles that step; the compiled step is not run in spans.)
    # Log steps still go through train_step, so weight-gradient norms are logged.
    by_hand = world_size == 1 and args.optimizer == "sgd" and args.momentum == 0 and scheduler is None

    def hand_step(x, y):
        return model.sgd_step(x, y, args.lr)

    # MLP.sgd_epoch checks its arguments once for all the batches it is given: at mini-batch 10
    # the checks of a separate sgd_step per batch are a third of the step's time or more.
    def hand_steps(x, y):
        return model.sgd_epoch(x, y, args.lr, args.batch_size).sum()

    fast_step = hand_step if by_hand else train_step
    if args.compile:
        return train_step, torch.compile(fast_step), None
    return train_step, fast_step, hand_steps if by_hand else None


def run_folder(args: argparse.Namespace) -> str | None:
    """The run folder: ``--logdir``, new or empty unless resumed; None for the default one (see default_folder)."""
    if args.resume:
        return args.logdir  # the checkpoint's folder
    if args.logdir is None:
        return None
    entries = os.listdir(args.logdir) if os.path.isdir(args.logdir) else []
    if entries:
        # Another run's checkpoint.pt would be overwritten and its TensorBoard events mixed with this one's.
        ckpt = os.path.join(args.logdir, "checkpoint.pt")
        hint = f"continue that run with --resume {ckpt}, or " if os.path.exists(ckpt) else ""
        if entries == [CLAIM]:  # (ls shows nothing: say what is there)
            hint = (f"it holds only {CLAIM}, the claim of a run that wrote nothing more or whose files were "
                    "removed; remove it if no run is using the folder, or ")
        fail(f"--logdir {args.logdir} is not empty; {hint}give a new or empty folder", EXIT_DATA)
    return args.logdir


def default_folder(recipe: str, rank: int, world_size: int) -> str:
    """A new runs/<recipe>-<timestamp>[-k], created by rank 0 once the run is about to write, named to all ranks.

    Created atomically, so that runs started together get folders of their own, and only now, so that
    a run that fails before (no data, a bad flag) leaves no empty folder behind.
    """
    folder = None
    if rank == 0:
        try:
            folder = new_run_folder(recipe)
        except OSError as e:
            fail(f"cannot create the run folder under runs/: {e.strerror}; give --logdir", EXIT_DATA)
    return distributed.from_rank0(folder, world_size)


def open_writer(logdir: str, purge_step: int | None) -> SummaryWriter:
    """The run folder's SummaryWriter (rank 0 only); a resumed run's (``purge_step`` given) first removes the
    temp files of a write its run was killed in.

    A new run first claims the folder with a file only one run can create: two runs given the same new
    --logdir at once both pass its emptiness check (made before the data loads), and would write into one
    folder; the second now stops here.
    """
    from torch.utils.tensorboard import SummaryWriter

    claim = os.path.join(logdir, CLAIM)
    try:
        os.makedirs(logdir, exist_ok=True)
        if purge_step is None:
            # (0o666 less the umask, as any file the run writes)
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except OSError as e:  # what --logdir's check cannot see ahead (a read-only mount, /proc), or the claim
        if e.filename == claim and isinstance(e, FileExistsError):
            fail(f"--logdir {logdir} was taken by another run started at the same time; give a new or empty "
                 "folder", EXIT_DATA)
        fail(f"--logdir {logdir} cannot be created: {e.strerror}", EXIT_DATA)
    if purge_step is not None:
        checkpoint.remove_leftovers(logdir, ("checkpoint.pt", "metrics.json"))  # of a run killed mid-write
    # purge_step: events a killed run wrote after its last checkpoint are dropped from the plots
    return SummaryWriter(logdir, purge_step=purge_step)


@dataclasses.dataclass
class Run:
    """What one training process works with, fixed for the whole run."""

    args: argparse.Namespace
    model: torchbp.MLP
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    train_step: Step  # see make_steps
    fast_step: Step
    writer: SummaryWriter | None  # rank 0 only
    stop: Stop
    device: torch.device
    rank: int
    world_size: int
    epochs: int  # 1 under --dry-run
    steps_per_epoch: int  # 1 under --dry-run
    log_every: int  # 1 under --dry-run: its one step logs, so that the dry run tries the logging too
    interactive: bool  # rank 0 writing to a terminal: a tqdm progress bar per epoch
    fast_steps: Step | None = None  # see make_steps

    @functools.cached_property
    def shard_writer(self) -> _RenameTags:
        """Under DDP rank 0's own δ statistics are its shard's: delta/norm/* become delta/shard_norm/*.

        One wrapper for the whole run, so that log_deltas writes the chart layout once.
        """
        return _RenameTags(self.writer, "delta/norm/", "delta/shard_norm/")

    @property
    def main_rank(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.args.logdir, "checkpoint.pt")

    def echo(self, line: str) -> None:
        """Print a line; above the progress bar where there is one."""
        if self.interactive:
            from tqdm import tqdm

            tqdm.write(line)
        else:
            print(line)


@dataclasses.dataclass
class Progress:
    """Where the run stands: the fields a checkpoint holds besides the model, optimizer, scheduler and RNG states."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken, over all epochs
    batch_in_epoch: int = 0  # steps taken in the current epoch (a mid-epoch checkpoint resumes after them)
    # The float32 sums of the losses of the current epoch's steps and of the steps since the last log
    # step, as the device added them (a resumed run goes on adding to the same float32 number); after a
    # stop mid-epoch, every rank's own, (world_size,).
    epoch_loss_sum: Tensor = dataclasses.field(default_factory=lambda: torch.zeros(()))
    loss_since_log: Tensor = dataclasses.field(default_factory=lambda: torch.zeros(()))
    steps_since_log: int = 0
    epoch_generator_state: Tensor | None = None  # the batch generator's state the current epoch's permutation comes from
    train_seconds: float = 0.0
    history: list[dict] = dataclasses.field(default_factory=list)  # one dict per epoch: losses, accuracies, train_seconds
    best_val_accuracy: float = -1.0


def resume_args(args: argparse.Namespace) -> tuple[argparse.Namespace, dict | None]:
    """(arguments, checkpoint): with ``--resume``, the checkpoint and its run's arguments; else (args, None)."""
    if not args.resume:
        return args, None
    try:
        state = checkpoint.load(args.resume)
    except checkpoint.CheckpointError as e:
        fail(str(e), EXIT_DATA)
    # The run's hyperparameters come from the checkpoint; where things are comes from this command.
    resumed = argparse.Namespace(**state["args"])
    resumed.resume, resumed.download = args.resume, args.download
    if args.data_dir is not None:  # else the data of the run itself
        resumed.data_dir = os.path.abspath(args.data_dir)
    # Where and how it runs, unless given again, as the run ran: its --threads and --compile change the
    # float rounding, so the run ends as the uninterrupted one would only with the same ones.
    parser = build_parser()
    for dest in ("device", "threads", "compile"):
        if getattr(args, dest) is not None:
            setattr(resumed, dest, getattr(args, dest))
        else:  # a checkpoint from before the flag existed: its default
            vars(resumed).setdefault(dest, parser.get_default(dest))
    if resumed.device == "cuda" and args.device is None and not torch.cuda.is_available():
        fail("this run trained with --device cuda, and no CUDA device is available here; give --device cpu "
             "to resume it on the CPU", EXIT_DATA)
    resumed.logdir = os.path.dirname(os.path.abspath(args.resume))
    if args.epochs is not None and args.epochs != resumed.epochs:
        if resumed.schedule != "none":
            # OneCycleLR's steps are fixed when it is built: more epochs would run past its end
            fail(f"--epochs {args.epochs}: this run's --schedule {resumed.schedule} is laid out over its "
                 f"{resumed.epochs} epochs and cannot be stretched; start a new run for a longer schedule", EXIT_DATA)
        started = state["epoch"] + (state.get("batch_in_epoch", 0) > 0)  # a mid-epoch checkpoint's epoch too
        if args.epochs < started:
            fail(f"--epochs must be at least the {started} epochs this run has started, got {args.epochs}", EXIT_DATA)
        resumed.epochs = args.epochs  # saved with the next checkpoint: a later resume trains as long
    return resumed, state


def run_complete(args: argparse.Namespace, state: dict) -> bool:
    """Whether the checkpoint ends the run (its last epoch done) and the run's final metrics, of that epoch, are
    written (a run resumed for more epochs and stopped before its end has the shorter run's)."""
    epochs = 1 if args.dry_run else args.epochs
    if state["epoch"] < epochs or state.get("batch_in_epoch", 0):
        return False
    try:
        with open(os.path.join(args.logdir, "metrics.json")) as f:
            return json.load(f).get("epochs") == state["epoch"]
    except (OSError, ValueError, AttributeError):  # none, or not what finish() writes
        return False


def restore(state: dict, path: str, model: torchbp.MLP, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler | None, device: torch.device, rank: int = 0,
            world_size: int = 1) -> Progress:
    """Load the checkpoint at ``path`` into the model, optimizer, scheduler and the RNGs; return its progress."""
    try:
        checkpoint.load_model(model, state, path)
    except checkpoint.CheckpointError as e:
        fail(str(e), EXIT_DATA)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    progress = Progress(**{f.name: state[f.name] for f in dataclasses.fields(Progress) if f.name in state})
    for name in ("epoch_loss_sum", "loss_since_log"):
        # (a float in checkpoints written before the loss sums were kept in float32)
        sums = torch.as_tensor(getattr(progress, name), dtype=torch.float32)
        if sums.dim() == 1:  # every rank's own, from a stop mid-epoch: this rank's, or in another number of
            sums = sums[rank] if len(sums) == world_size else sums.mean()  # processes their mean
        setattr(progress, name, sums)
    torch.set_rng_state(state["torch_rng_state"])
    if state.get("cuda_rng_state") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng_state"], device)
    return progress


def save_checkpoint(run: Run, progress: Progress) -> None:
    """Write ``progress`` and the states to ``checkpoint.pt``, atomically (rank 0; the others return)."""
    if not run.main_rank:
        return
    checkpoint.save({
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
        "epoch": progress.epoch, "step": progress.step, "batch_in_epoch": progress.batch_in_epoch,
        "epoch_loss_sum": progress.epoch_loss_sum, "loss_since_log": progress.loss_since_log,
        "steps_since_log": progress.steps_since_log,
        "epoch_generator_state": progress.epoch_generator_state,
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None,
        "train_seconds": progress.train_seconds, "history": progress.history,
        "best_val_accuracy": progress.best_val_accuracy,
        "world_size": run.world_size,
        "args": vars(run.args),
    }, run.ckpt_path)


def diverged(run: Run, what: str) -> None:
    """A non-finite training loss: close TensorBoard and exit 1, leaving the last checkpoint as it is."""
    if run.main_rank:
        run.writer.close()
    last = (f"The last good checkpoint is {run.ckpt_path}" if os.path.exists(run.ckpt_path) else
            "No checkpoint was written (one is, at the end of every epoch)")
    fail(f"{what}; stopping. {last}. Try a smaller --lr.", EXIT_DIVERGED)


def agree_to_stop(run: Run) -> bool:
    # Under DDP all ranks must leave the loop at the same step, or the next all-reduce hangs.
    return distributed.any_rank(run.stop.requested, run.device, run.world_size)


def mean_over_ranks(run: Run, total: Tensor) -> Tensor:
    """Summed costs of the global batches: under DDP each rank's cost is its shard's mean, and with
    equal shards the global batch's cost is the mean over the ranks."""
    return distributed.mean_over_ranks(total, run.world_size)


def log_step(run: Run, progress: Progress, monitor: torchbp.DeltaMonitor | None,
             loss_since_log: Tensor, n: int, lr: float | None) -> float:
    """The mean loss of the last ``n`` steps (exit 1 if not finite); rank 0 logs it, the step's ``lr`` and δ statistics."""
    loss = (mean_over_ranks(run, loss_since_log) / n).item()
    if not math.isfinite(loss):
        diverged(run, f"the training loss is {loss} at step {progress.step} (epoch {progress.epoch + 1})")
    writer, step, model = run.writer, progress.step, run.model
    if run.main_rank:
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("train/lr", lr, step)
    if monitor is None:
        return loss
    if not run.main_rank:
        monitor.pop()  # only rank 0 logs; keep the other ranks' accumulators from growing
        return loss
    from torchbp.tensorboard import log_deltas

    hist_every = run.args.delta_hist_every
    if run.world_size == 1:
        log_deltas(writer, monitor, step, model=model, hist_every=hist_every)
    else:
        # The monitor sees rank 0's shard: its ‖Σ_n δ_n‖ goes to delta/shard_norm; delta/norm is
        # the whole global batch's, ∇_{b^l} C = Σ_n δ_n^l from DDP's all-reduced bias gradient.
        log_deltas(run.shard_writer, monitor, step, model=model, hist_every=hist_every)
        for name, layer in zip(monitor.layer_names, model.linears):
            writer.add_scalar(f"delta/norm/{name}", torch.linalg.vector_norm(layer.bias.grad).item(), step)
    return loss


def train(run: Run, progress: Progress, batches: Batches, generator: torch.Generator) -> tuple[float | None, bool]:
    """Train one epoch, from ``progress.batch_in_epoch`` on, and advance ``progress``.

    Returns ``(train_loss, stopped)``: the epoch's mean training loss, and whether Ctrl-C asked
    to stop. A stop inside the epoch returns ``(None, True)`` with ``progress`` at the position
    to resume from; a stop at its last step returns the loss: the epoch is complete.
    """
    args = run.args
    generator.set_state(progress.epoch_generator_state)
    batches.shuffle(generator)  # this epoch's order: batches.span(i) is its i-th batch
    next_generator_state = generator.get_state()  # the next epoch's permutation comes from here
    bar = None
    if run.interactive:
        from tqdm import tqdm

        bar = tqdm(total=run.steps_per_epoch, initial=progress.batch_in_epoch,
                   desc=f"epoch {progress.epoch + 1}/{run.epochs}", leave=False, dynamic_ncols=True)
    # Host syncs only at log steps and the epoch end: the losses add up on the device.
    epoch_loss = progress.epoch_loss_sum.to(run.device, copy=True)
    loss_since_log = progress.loss_since_log.to(run.device, copy=True)
    n_since_log = progress.steps_since_log
    stopped = False
    t0 = time.perf_counter()
    while progress.batch_in_epoch < run.steps_per_epoch:
        to_log = run.log_every - progress.step % run.log_every  # steps up to and including the next log step
        # δ is recorded on the log steps only: the monitor is attached for that one step, its
        # forward and backward (eager under --compile too, where hooks would break the graph),
        # so the other steps pay nothing for it. Its statistics are those of the log step's batch.
        monitor = None
        n = 1  # steps taken in this pass
        if not args.no_monitor and to_log == 1:
            monitor = torchbp.DeltaMonitor(run.model, keep_last=args.delta_hist_every > 0)
            cost = run.train_step(*batches.span(progress.batch_in_epoch))
        elif run.fast_steps is not None:
            # Plain SGD by hand: every step up to the next log step (the one before it, if the
            # monitor takes the log step) in one call; the same steps as one at a time.
            n = min(to_log - (not args.no_monitor), run.steps_per_epoch - progress.batch_in_epoch)
            cost = run.fast_steps(*batches.span(progress.batch_in_epoch, n))
        else:
            cost = run.fast_step(*batches.span(progress.batch_in_epoch))
        logs = (progress.step + n) % run.log_every == 0
        # The lr this step used, logged with it: read before the scheduler moves it on.
        lr = float(run.optimizer.param_groups[0]["lr"]) if logs and run.main_rank else None
        if run.scheduler is not None:
            run.scheduler.step()  # never with fast_steps: by hand means no scheduler
        epoch_loss += cost
        loss_since_log += cost
        progress.step += n
        progress.batch_in_epoch += n
        n_since_log += n
        if bar is not None:
            bar.update(n)
        if logs:
            loss = log_step(run, progress, monitor, loss_since_log, n_since_log, lr)
            if monitor is not None:
                monitor.close()
            loss_since_log.zero_()
            n_since_log = 0
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}")
            # Under DDP the ranks agree on stopping here (one all-reduce per log step, not per step).
            if run.world_size > 1 and agree_to_stop(run):
                stopped = True
                break
        if run.world_size == 1 and run.stop.requested:
            stopped = True
            break
    progress.train_seconds += time.perf_counter() - t0
    if bar is not None:
        bar.close()
    # (the epoch's and the since-log sums: a checkpoint keeps what the whole global batches cost)
    own_sums = torch.stack([epoch_loss, loss_since_log])
    epoch_loss, loss_since_log = mean_over_ranks(run, own_sums)
    loss_sum = epoch_loss.item()
    if not math.isfinite(loss_sum):
        diverged(run, f"the training loss is {loss_sum} in epoch {progress.epoch + 1}")
    if not stopped and run.world_size > 1:
        stopped = agree_to_stop(run)  # a Ctrl-C since the last log step stops the run at this epoch's end
    progress.loss_since_log, progress.steps_since_log = loss_since_log.cpu(), n_since_log
    if stopped and progress.batch_in_epoch < run.steps_per_epoch:
        # Mid-epoch, each rank goes on adding to its own sums, as the uninterrupted run does (resumed from
        # their mean, the ranks would round the rest of the epoch differently): the checkpoint keeps every
        # rank's, (world_size,) each.
        progress.epoch_loss_sum, progress.loss_since_log = distributed.gather(own_sums, run.world_size).T.cpu()
        return None, True
    train_loss = loss_sum / progress.batch_in_epoch
    progress.epoch += 1
    progress.batch_in_epoch, progress.epoch_loss_sum = 0, torch.zeros(())
    progress.epoch_generator_state = next_generator_state
    return train_loss, stopped


def evaluate(run: Run, progress: Progress, val: Split, test: Split, train_loss: float) -> None:
    """After an epoch (rank 0): validation and test accuracy into the history, TensorBoard and the console."""
    if not run.main_rank:
        return
    val_acc, test_acc = accuracy(run.model, val), accuracy(run.model, test)
    progress.best_val_accuracy = max(progress.best_val_accuracy, val_acc)
    progress.history.append(dict(epoch=progress.epoch, train_loss=train_loss, val_accuracy=val_acc,
                                 test_accuracy=test_acc, train_seconds=progress.train_seconds))
    writer, step = run.writer, progress.step
    writer.add_scalar("epoch/train_loss", train_loss, step)
    writer.add_scalar("accuracy/val", val_acc, step)
    writer.add_scalar("accuracy/test", test_acc, step)
    run.echo(f"epoch {progress.epoch:>3}/{run.epochs}  train loss {train_loss:.5f}  val acc {val_acc:.2%}  "
             f"test acc {test_acc:.2%}  {progress.train_seconds:6.1f} s")
    sys.stdout.flush()


def interrupted_mid_epoch(run: Run, progress: Progress) -> int:
    """Ctrl-C inside an epoch: checkpoint its position (resume continues from the next step); exit 130."""
    save_checkpoint(run, progress)
    if run.main_rank:
        run.writer.flush()
        run.writer.close()
        run.echo(f"interrupted at step {progress.step} (epoch {progress.epoch + 1}, batch {progress.batch_in_epoch}); "
                 f"checkpoint written to {run.ckpt_path}; resume with --resume {run.ckpt_path}")
    sys.stdout.flush()
    return EXIT_INTERRUPTED


def summary(history: list[dict]) -> dict:
    """metrics.json's figures from the per-epoch history: the last epoch's, and the test accuracy at the best
    validation accuracy (the first epoch to reach it)."""
    last = history[-1]
    best = max(history, key=lambda h: h["val_accuracy"])
    return dict(
        test_accuracy=last["test_accuracy"],
        test_accuracy_at_best_val=best["test_accuracy"],
        best_test_accuracy=max(h["test_accuracy"] for h in history),
        final_train_loss=last["train_loss"],
        epochs=last["epoch"],
    )


def finish(run: Run, progress: Progress, data: MNIST, test: Split, ranks_identical: bool | None) -> None:
    """Final metrics: misclassified digits, hparams and metrics.json (rank 0)."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summaries
    from torchvision.utils import make_grid

    args, writer, history, step = run.args, run.writer, progress.history, progress.step
    best_val, train_seconds = progress.best_val_accuracy, progress.train_seconds
    figures = summary(history)
    metrics = dict(
        test_accuracy=figures.pop("test_accuracy"),
        best_val_accuracy=best_val,
        **figures,
        steps=step,
        train_seconds=train_seconds,
        steps_per_second=step / train_seconds if train_seconds > 0 else 0.0,
        world_size=run.world_size,
        ranks_identical_weights=ranks_identical,  # None in a single process
        args=vars(args),
        history=history,
    )
    writer.close()
    # The final model's records go to an event file of their own, which replaces the one a run resumed for
    # more epochs wrote at its shorter end (TensorBoard's HPARAMS shows a run's first hparams record, and
    # purge_step keeps those of the checkpoint's step); removed only once the new one is written, so that
    # a failed extension leaves the finished run's records.
    earlier = [name for name in os.listdir(args.logdir)
               if name.startswith("events.out.tfevents.") and name.endswith(FINAL_EVENTS)]
    with SummaryWriter(args.logdir, filename_suffix=FINAL_EVENTS) as final:
        predicted = predict(run.model, test.x)
        wrong = (predicted != test.y).nonzero().flatten()[:64]
        if len(wrong):
            # back to [0, 1] pixels: (k, 784) -> (k, 1, 28, 28)
            images = (test.x[wrong] * data.std + data.mean).clamp(0, 1).reshape(-1, 1, 28, 28).cpu()
            final.add_image("test/misclassified", make_grid(images, nrow=8, pad_value=1.0), step)
            labels = [f"{p}({t})" for p, t in zip(predicted[wrong].tolist(), test.y[wrong].tolist())]
            rows = [" ".join(labels[i : i + 8]) for i in range(0, len(labels), 8)]
            final.add_text("test/misclassified_labels",
                           "predicted(true), row by row as in the image grid:\n\n    " + "\n    ".join(rows), step)
        hparams = {k: (str(v) if isinstance(v, list) else v) for k, v in vars(args).items()
                   if isinstance(v, (int, float, str, bool, list))}
        results = {"hparam/test_accuracy": metrics["test_accuracy"], "hparam/best_val_accuracy": best_val,
                   "hparam/train_seconds": train_seconds}
        # (SummaryWriter.add_hparams's records, written here: it would open a writer of its own)
        for record in hparams_summaries(hparams, results):
            final.file_writer.add_summary(record, step)
        for tag, value in results.items():
            final.add_scalar(tag, value, step)
    for name in earlier:
        os.remove(os.path.join(args.logdir, name))
    # (atomically: a run killed mid-write would leave a part of it, and a file there means the run is complete)
    checkpoint.write_atomically(os.path.join(args.logdir, "metrics.json"),
                                lambda f: f.write(json.dumps(metrics, indent=2).encode()))
    print(f"test accuracy {metrics['test_accuracy']:.2%} (best val {best_val:.2%}, "
          f"best test {metrics['best_test_accuracy']:.2%}); {train_seconds:.1f} s of training, "
          f"{metrics['steps_per_second']:.1f} steps/s; run folder {args.logdir}")


def main(argv: list[str] | None = None) -> int:
    args = resolve_args(argv)
    try:
        setup = start(args)
    except KeyboardInterrupt:  # Ctrl-C before the first step: Stop's handler is not installed yet
        print("train.mnist: interrupted before the first training step; no checkpoint was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    if setup is None:
        return 0
    run, progress, data, batches, generator, val, test = setup
    return train_epochs(run, progress, data, batches, generator, val, test)


def start(args: argparse.Namespace) -> tuple[Run, Progress, MNIST, Batches, torch.Generator, Split, Split] | None:
    """Everything before the first step: data, model, optimizer, checkpoint, writer; None if there is nothing to do.

    Ctrl-C here raises KeyboardInterrupt (nothing is worth a checkpoint yet); Stop's handler, which lets the
    current step finish and writes one, is installed last.
    """
    args, state = resume_args(args)
    if state is not None and run_complete(args, state):
        # Resuming would rewrite the final epoch's events and metrics of a run that has them all.
        more = ("a --dry-run run is one batch long" if args.dry_run else
                "give --epochs to train a run without a schedule for longer" if args.schedule == "none" else
                f"its --schedule {args.schedule} ends with its epochs")
        print(f"the run in {args.logdir} is complete ({counted(state['epoch'], 'epoch')}, metrics.json written); "
              f"nothing to do: {more}, or start a new run")
        return None
    args.logdir = run_folder(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rank, world_size, device = init_distributed(args.device)
    if args.batch_size % world_size:
        fail(f"--batch-size ({args.batch_size}) must be divisible by the number of processes ({world_size})", EXIT_DATA)
    if state is not None and state.get("world_size", world_size) != world_size and rank == 0:
        print(f"train.mnist: note: this run trained in {state['world_size']} process(es) and goes on in "
              f"{world_size}: the same batches and updates, rounded differently (not bit for bit)", file=sys.stderr)

    data, batches, val, test = load_data(args, device, rank, world_size)
    steps_per_epoch = 1 if args.dry_run else len(batches)
    epochs = 1 if args.dry_run else args.epochs
    if not args.dry_run and epochs * steps_per_epoch < args.log_every and rank == 0:
        print(f"train.mnist: note: --log-every {args.log_every} is more than this run's "
              f"{counted(epochs * steps_per_epoch, 'step')}: it logs no step's loss, δ statistics or gradient "
              f"norms, only each epoch's loss and accuracies", file=sys.stderr)

    torch.manual_seed(args.seed)
    model = build_model(args, device)
    generator = torch.Generator().manual_seed(args.seed)  # the batch order
    step_module = cost_module(model, world_size, device)
    optimizer = make_optimizer(args, model.parameters(), lr_tensor=args.compile)
    # Laid out over the whole run even for --dry-run, whose one step then takes the run's first learning rate
    scheduler = make_scheduler(args, optimizer, args.epochs * len(batches))
    progress = Progress(epoch_generator_state=generator.get_state())
    if state is not None:
        progress = restore(state, args.resume, model, optimizer, scheduler, device, rank, world_size)
    if args.logdir is None:
        args.logdir = default_folder(args.recipe, rank, world_size)
    # A resumed run keeps the events up to its checkpoint's step (that step's logs and evaluation were
    # written before the checkpoint) and drops those a killed run wrote after it.
    writer = open_writer(args.logdir, progress.step + 1 if state is not None else None) if rank == 0 else None
    train_step, fast_step, fast_steps = make_steps(args, model, step_module, optimizer, scheduler, world_size)
    run = Run(args=args, model=model, optimizer=optimizer, scheduler=scheduler, train_step=train_step,
              fast_step=fast_step, writer=writer, stop=Stop(), device=device, rank=rank, world_size=world_size,
              epochs=epochs, steps_per_epoch=steps_per_epoch, log_every=1 if args.dry_run else args.log_every,
              interactive=sys.stdout.isatty() and rank == 0,
              fast_steps=fast_steps)
    return run, progress, data, batches, generator, val, test


def train_epochs(run: Run, progress: Progress, data: MNIST, batches: Batches, generator: torch.Generator,
                 val: Split, test: Split) -> int:
    """The epochs from ``progress`` on, each evaluated and checkpointed; the exit status."""
    epochs, world_size, writer = run.epochs, run.world_size, run.writer
    while progress.epoch < epochs:
        train_loss, stopped = train(run, progress, batches, generator)
        if train_loss is None:
            return interrupted_mid_epoch(run, progress)
        evaluate(run, progress, val, test, train_loss)
        save_checkpoint(run, progress)
        if stopped or (run.stop.requested and world_size == 1):
            # Ctrl-C at an epoch's last step (or during its evaluation): the epoch-end checkpoint is the resume point
            if run.main_rank:
                writer.close()
                run.echo(f"interrupted after epoch {progress.epoch}; checkpoint written to {run.ckpt_path}")
            return EXIT_INTERRUPTED

    # Every rank must hold the same weights (DDP's invariant): compared once, at the end.
    ranks_identical = None  # (one process)
    if world_size > 1:
        ranks_identical = distributed.identical_on_all_ranks(list(run.model.parameters()), world_size)
    if run.main_rank:
        finish(run, progress, data, test, ranks_identical)
    distributed.shutdown(world_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
