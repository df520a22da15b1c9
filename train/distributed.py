"""The torchrun side of train.mnist: the process group and the few collectives a run makes.

``torchrun --nproc_per_node=K -m train.mnist`` starts K processes with
``WORLD_SIZE=K``; each joins the group (gloo on CPU, nccl on CUDA) and
DistributedDataParallel averages the gradients. Besides DDP's own all-reduce
per step, a run communicates only here: at log steps, at epoch ends and at the
start and end of the run, never inside a step. In one process (no torchrun)
each function returns its local answer without touching torch.distributed.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor


def init(use_cuda: bool) -> tuple[int, int, torch.device]:
    """(rank, world_size, device): joins the process group only where torchrun set WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def any_rank(flag: bool, device: torch.device, world_size: int) -> bool:
    """Whether ``flag`` holds on any rank: one all-reduce, which every rank must reach (a barrier too)."""
    if world_size == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(total: Tensor, world_size: int) -> Tensor:
    """``total``'s mean over the ranks (one all-reduce); ``total`` itself in one process."""
    if world_size == 1:
        return total
    total = total.clone()
    torch.distributed.all_reduce(total)
    return total / torch.distributed.get_world_size()  # the number of values summed


def gather(t: Tensor, world_size: int) -> Tensor:
    """Every rank's ``t``, stacked in rank order on every rank: (world_size, *t.shape) (one all-gather)."""
    if world_size == 1:
        return t.unsqueeze(0)
    gathered = [torch.empty_like(t) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, t.contiguous())
    return torch.stack(gathered)


def from_rank0(value: Any, world_size: int) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object: a run folder's name, say)."""
    if world_size == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def identical_on_all_ranks(tensors: list[Tensor], world_size: int) -> bool:
    """Whether every rank holds the same ``tensors`` (the weights: DDP's invariant), compared bit for bit."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def shutdown(world_size: int) -> None:
    """Wait for every rank, then leave the process group."""
    if world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
