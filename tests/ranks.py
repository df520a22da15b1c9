"""Two real processes standing in for torchrun's ranks, for the tests of what ranks say to each other."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence


def run_ranks(target: Callable, args_per_rank: Sequence[tuple], timeout: float = 180) -> None:
    """Run ``target(*args)`` in one spawned process per entry of ``args_per_rank``; fail if any hangs."""
    context = multiprocessing.get_context("spawn")
    ranks = [context.Process(target=target, args=args) for args in args_per_rank]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=timeout)
    alive = [p.is_alive() for p in ranks]
    for p in ranks:
        p.kill()
    assert not any(alive), "a rank hung"
