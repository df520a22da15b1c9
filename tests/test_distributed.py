"""train.distributed's collectives across two real processes (gloo on CPU): what each rank gets back.

Oracle: the values each rank put in, combined by hand (any, mean, rank 0's, equality).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ranks import run_ranks


def _rank(rank: int, store: str, report: str) -> None:
    """One of two ranks: every collective of train.distributed on values that differ by rank."""
    import torch.distributed as dist

    from train import distributed

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    device = torch.device("cpu")
    result = {
        "any_rank_one_true": distributed.any_rank(rank == 1, device, 2),  # True on rank 1 only
        "any_rank_none_true": distributed.any_rank(False, device, 2),
        "mean": distributed.mean_over_ranks(torch.tensor([1.0 + rank, 10.0 * rank]), 2).tolist(),
        "from_rank0": distributed.from_rank0(f"runs/from-rank-{rank}", 2),
        "gather": distributed.gather(torch.tensor([1.0 + rank, 10.0 * rank]), 2).tolist(),
        "identical_same": distributed.identical_on_all_ranks([torch.ones(3), torch.zeros(2)], 2),
        "identical_different": distributed.identical_on_all_ranks([torch.ones(3), torch.full((2,), rank)], 2),
    }
    distributed.shutdown(2)
    Path(report).write_text(json.dumps(result))


def test_collectives_of_two_ranks(tmp_path):
    run_ranks(_rank, [(r, str(tmp_path / "store"), str(tmp_path / f"rank{r}.json")) for r in range(2)])
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:  # every rank gets the same answers
        assert report == {
            "any_rank_one_true": True,
            "any_rank_none_true": False,
            "mean": [1.5, 5.0],  # ([1, 0] + [2, 10]) / 2
            "from_rank0": "runs/from-rank-0",
            "gather": [[1.0, 0.0], [2.0, 10.0]],  # rank 0's row, then rank 1's
            "identical_same": True,
            "identical_different": False,
        }


def test_one_process_needs_no_process_group():
    """Without torchrun every collective answers with the local value and touches no process group."""
    from train import distributed

    assert distributed.init(use_cuda=False) == (0, 1, torch.device("cpu"))
    assert distributed.any_rank(True, torch.device("cpu"), 1) is True
    total = torch.tensor([3.0])
    assert distributed.mean_over_ranks(total, 1) is total
    assert distributed.from_rank0("x", 1) == "x"
    assert distributed.gather(total, 1).tolist() == [[3.0]]
    distributed.shutdown(1)


def test_a_cuda_rank_binds_its_local_gpu_before_joining_with_nccl(monkeypatch):
    """The CUDA branch of init, on a CPU machine with torch's calls recorded: under torchrun each process
    takes GPU LOCAL_RANK (set before the group forms, as nccl requires) and the nccl backend; in one process
    it joins nothing."""
    import torch.distributed as dist

    from train import distributed

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init_process_group", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 5)
    monkeypatch.setattr(dist, "get_world_size", lambda: 8)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")  # the second GPU of the second node
    assert distributed.init(use_cuda=True) == (5, 8, torch.device("cuda:1"))
    assert calls == [("set_device", 1), ("init_process_group", "nccl")]

    calls.clear()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init(use_cuda=True) == (0, 1, torch.device("cuda"))
    assert calls == []
