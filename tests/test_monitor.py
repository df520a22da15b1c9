"""DeltaMonitor against an independent oracle: δ = ∂C/∂z from torch.autograd.grad on the equivalent torch.nn model.

The oracle captures every nn.Linear output z with forward hooks and asks
torch.autograd for ∂C/∂z; from it the statistics are formed by hand. All in
float64, tolerance 1e-10 (relative and absolute): the two sum in other orders, float32's rounding (1e-7)
would fail it. Tests of what a monitor records among other passes (threads, copies, pauses, flush windows)
compare it with a fresh monitor given only the passes it should record (``popped_after``): a consistency
check, resting on the tests against the oracle.
"""

from __future__ import annotations

import copy
import math
import os
import warnings

import pytest
import torch
from torch import nn

import torchbp
from torchbp.monitor import STATS

from oracles import Unsorted, nn_deltas, nn_sequential, oracle_cost

TOL = dict(rtol=1e-10, atol=1e-10)
DT = torch.float64


def oracle_stats(model: nn.Module, x, y, reduction="mean"):
    """{name: (norm, sample_norm, max_abs)} of one backward pass of the quadratic cost, from torch's own autograd."""
    n = math.prod(y.shape[:-1])  # samples
    stats = {}
    for name, delta in nn_deltas(model, x, y, reduction=reduction).items():
        rows = delta.reshape(-1, delta.shape[-1])  # (*, out) -> (N, out)
        factor = n if reduction == "mean" else 1
        stats[name] = (
            rows.sum(0).norm().item(),
            (rows.norm(dim=1) * factor).mean().item(),
            rows.abs().max().item(),
        )
    return stats


def popped_after(model: nn.Module, *passes) -> dict:
    """What a fresh monitor of ``model`` pops after ``model.cost(x, y).backward()`` for each (x, y) of ``passes``,
    in turn: the oracle of the tests whose monitor sees other passes too."""
    with torchbp.DeltaMonitor(model) as monitor:
        for x, y in passes:
            model.cost(x, y).backward()
        return monitor.pop()


def assert_close(popped, expected):
    assert set(popped) == set(expected)
    for name, (norm, sample_norm, max_abs) in expected.items():
        got = popped[name]
        torch.testing.assert_close(got["norm"], norm, **TOL)
        torch.testing.assert_close(got["sample_norm"], sample_norm, **TOL)
        torch.testing.assert_close(got["max_abs"], max_abs, **TOL)


def mean_stats(per_pass):
    return {k: tuple(sum(p[k][i] for p in per_pass) / len(per_pass) for i in range(3)) for k in per_pass[0]}


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("flush_every", [1, 2, 32])
def test_mlp_stats_match_autograd_averaged_over_passes(fused, flush_every):
    """Three backward passes (different batches, one smaller) then one pop: the mean of the oracle's per-pass stats."""
    torch.manual_seed(0)
    ref = nn_sequential([6, 5, 4, 3], dtype=DT)
    model = torchbp.MLP([6, 5, 4, 3], fused=fused, dtype=DT)
    model.load_state_dict(ref.state_dict())
    batches = [(torch.randn(n, 6, dtype=DT), torch.rand(n, 3, dtype=DT)) for n in (7, 7, 4)]
    with torchbp.DeltaMonitor(model, flush_every=flush_every) as monitor:
        for x, y in batches:
            model.cost(x, y).backward()
        popped = monitor.pop()
    assert_close(popped, mean_stats([oracle_stats(ref, x, y) for x, y in batches]))


def test_sgd_epoch_under_no_grad_is_recorded_step_by_step():
    """MLP.sgd_epoch runs its backward by hand, under torch.no_grad() too: the monitor gets every step's δ.

    Oracle: autograd's δ of each mini-batch (7, 7, 4 samples) on the torch.nn twin, with the same
    SGD update between the mini-batches.
    """
    torch.manual_seed(1)
    ref = nn_sequential([6, 5, 4, 3], dtype=DT)
    model = torchbp.MLP([6, 5, 4, 3], dtype=DT)
    model.load_state_dict(ref.state_dict())
    x, y = torch.randn(18, 6, dtype=DT), torch.rand(18, 3, dtype=DT)
    optimizer = torch.optim.SGD(ref.parameters(), lr=0.5)
    expected = []
    for i in range(0, 18, 7):
        expected.append(oracle_stats(ref, x[i : i + 7], y[i : i + 7]))
        optimizer.zero_grad()
        oracle_cost(ref(x[i : i + 7]), y[i : i + 7]).backward()
        optimizer.step()
    with torchbp.DeltaMonitor(model) as monitor, torch.no_grad():
        model.sgd_epoch(x, y, 0.5, batch_size=7)
        popped = monitor.pop()
    assert_close(popped, mean_stats(expected))


@pytest.mark.parametrize("batch", [(5,), (2, 8)], ids=["2-D", "3-D"])
def test_sum_reduction_has_no_batch_factor(batch):
    """reduction="sum": sample_norm is the plain mean of ‖δ_n‖ of a summed cost, over every sample of
    every leading dimension (a (2, 8) batch is 16 samples, not 2)."""
    torch.manual_seed(1)
    ref = nn_sequential([4, 3, 2], dtype=DT)
    model = torchbp.MLP([4, 3, 2], dtype=DT)
    model.load_state_dict(ref.state_dict())
    x, y = torch.randn(*batch, 4, dtype=DT), torch.rand(*batch, 2, dtype=DT)
    with torchbp.DeltaMonitor(model, reduction="sum") as monitor:
        model.cost(x, y, reduction="sum").backward()
        assert_close(monitor.pop(), oracle_stats(ref, x, y, reduction="sum"))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.ModuleDict({"proj": nn.Linear(5, 4, dtype=DT), "act": nn.Sigmoid()})
        self.skip = nn.Linear(5, 4, dtype=DT)

    def forward(self, a):
        return self.inner["act"](self.inner["proj"](a)) + self.skip(a)


def test_converted_nested_model_with_leading_dims():
    """convert()-ed nested model, input (2, 3, 6): names are nn's qualified names, samples are all leading dims."""
    torch.manual_seed(2)
    ref = nn.Sequential(nn.Linear(6, 5, dtype=DT), nn.Sigmoid(), Block(), nn.Sequential(nn.Linear(4, 3, dtype=DT)))
    model = torchbp.convert(ref)
    x, y = torch.randn(2, 3, 6, dtype=DT), torch.rand(2, 3, 3, dtype=DT)
    with torchbp.DeltaMonitor(model) as monitor:
        assert monitor.layer_names == ("0", "2.inner.proj", "2.skip", "3.0")
        torchbp.QuadraticCost()(model(x), y).backward()
        assert_close(monitor.pop(), oracle_stats(ref, x, y))


def test_variable_length_sequences_as_a_jagged_nested_tensor():
    """A jagged nested input (sequences of 2 and 5 rows, as a converted transformer gets): every row is a
    sample, so the statistics equal those of the same rows packed into one dense (7, features) batch
    (oracle: torch's autograd on the nn model), with the cost summed over rows."""
    torch.manual_seed(3)
    ref = nn_sequential([4, 3, 2], dtype=DT)
    model = torchbp.convert(ref)
    rows = [torch.randn(2, 4, dtype=DT), torch.randn(5, 4, dtype=DT)]
    x = torch.nested.nested_tensor(rows, layout=torch.jagged)
    y = torch.rand(7, 2, dtype=DT)
    with torchbp.DeltaMonitor(model, reduction="sum") as monitor:
        a = model(x).values()  # (7, 2): the packed rows
        (0.5 * ((a - y) ** 2).sum()).backward()
        assert_close(monitor.pop(), oracle_stats(ref, torch.cat(rows), y, reduction="sum"))


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_a_backward_calls_the_hooks_registered_when_its_forward_ran(fused):
    """As nn.Module's full backward hooks: a monitor attached after the forward records nothing of that
    backward, with or without another hook attached during the forward (it once recorded only with one);
    a monitor closed between forward and backward records nothing either."""
    model = torchbp.MLP([4, 3, 2], fused=fused, dtype=DT)
    x, y = torch.randn(5, 4, dtype=DT), torch.rand(5, 2, dtype=DT)
    for other_hook in (False, True):
        handle = model[0].register_delta_hook(lambda m, d: None) if other_hook else None
        c = model.cost(x, y)
        late = torchbp.DeltaMonitor(model)
        c.backward()
        assert late.pop() == {}, f"other hook: {other_hook}"
        late.close()
        if handle is not None:
            handle.remove()
    early = torchbp.DeltaMonitor(model)
    c = model.cost(x, y)
    early.close()
    c.backward()
    assert early.pop() == {}
    with torchbp.DeltaMonitor(model) as monitor:  # and one attached before the forward records it
        model.cost(x, y).backward()
        assert set(monitor.pop()) == {"0", "2"}


def test_a_failed_reduction_drops_its_passes_and_the_next_ones_count(monkeypatch):
    """A flush whose reduction raises (inside the backward) leaves nothing held and counts nothing; the next
    pass is recorded as usual. Oracle: torch's autograd on the nn model for that pass (1e-6)."""
    torch.manual_seed(7)
    ref = nn_sequential([4, 3, 2], dtype=DT)
    model = torchbp.convert(ref)
    x, y = torch.randn(5, 4, dtype=DT), torch.rand(5, 2, dtype=DT)
    monitor = torchbp.DeltaMonitor(model, flush_every=1)
    reduce = monitor._reduce
    monkeypatch.setattr(monitor, "_reduce", lambda *args: (_ for _ in ()).throw(RuntimeError("reduction failed")))
    with pytest.raises(RuntimeError, match="reduction failed"):
        torchbp.QuadraticCost()(model(x), y).backward()
    assert not monitor._held["2"] and monitor._passes["2"] == 0
    monkeypatch.setattr(monitor, "_reduce", reduce)
    torchbp.QuadraticCost()(model(x), y).backward()
    assert monitor._passes["0"] == monitor._passes["2"] == 1
    assert_close(monitor.pop(), oracle_stats(ref, x, y))
    monitor.close()


def test_a_reduction_failing_on_one_group_keeps_the_groups_before_it_whole(monkeypatch):
    """A flush window holding a float32 pass and a float64 one (a model made .double() between pops) reduces
    them as two groups; a failure on the second drops that group's pass and keeps the first's sums and count
    together (the sums once stayed, the count did not, and the next pop doubled that pass). Oracle: a monitor
    of the float32 pass alone."""
    torch.manual_seed(8)
    model = torchbp.MLP([4, 3, 2])
    x, y = torch.randn(5, 4), torch.rand(5, 2)
    expected = popped_after(model, (x, y))
    vector_norm = torch.linalg.vector_norm

    def failing_in_float64(t, *args, **kwargs):
        if t.dtype == torch.float64:
            raise RuntimeError("reduction failed")
        return vector_norm(t, *args, **kwargs)

    with torchbp.DeltaMonitor(model) as monitor:
        model.cost(x, y).backward()
        model.double().cost(x.double(), y.double()).backward()
        monkeypatch.setattr(torch.linalg, "vector_norm", failing_in_float64)
        with pytest.raises(RuntimeError, match="reduction failed"):
            monitor.pop()
        monkeypatch.setattr(torch.linalg, "vector_norm", vector_norm)
        popped = monitor.pop()
    assert popped["0"] == expected["0"]
    # (layer 2's flush never ran in the pop that failed on layer 0: it averages both passes, one input in
    # float32 and in float64)
    assert popped["2"] == pytest.approx(expected["2"], rel=1e-6)


def test_passes_of_other_sizes_and_dtypes_in_one_window_are_each_reduced_as_theirs():
    """One flush window holding passes of two batch sizes and two dtypes (float32, then the model made
    .double()): each group is stacked and reduced apart, and the averages are those of the passes one by one.
    Oracle: monitors with flush_every=1 of each pass alone, averaged by hand (1e-6: float32 passes)."""
    torch.manual_seed(10)
    model = torchbp.MLP([4, 3, 2])
    batches = [(torch.randn(n, 4), torch.rand(n, 2)) for n in (5, 3, 5)]
    state = copy.deepcopy(model.state_dict())

    def passes(m):
        for dtype in (torch.float32, torch.float64):
            m.to(dtype)
            for x, y in batches:
                m.cost(x.to(dtype), y.to(dtype)).backward()

    singles = []
    for dtype in (torch.float32, torch.float64):
        model.load_state_dict(state)
        model.to(dtype)
        for x, y in batches:
            with torchbp.DeltaMonitor(model, flush_every=1) as one:
                model.cost(x.to(dtype), y.to(dtype)).backward()
                singles.append(one.pop())
    model.float().load_state_dict(state)
    with torchbp.DeltaMonitor(model) as monitor:
        passes(model)
        popped = monitor.pop()
    for layer in ("0", "2"):
        for stat in STATS:
            mean = sum(p[layer][stat] for p in singles) / len(singles)
            assert popped[layer][stat] == pytest.approx(mean, rel=1e-6), (layer, stat)


def test_a_backward_under_fake_tensor_mode_is_not_recorded():
    """A backward under FakeTensorMode (a memory or shape estimate) has no values: not held, not counted, and
    the real passes around it are recorded as they are (a fake δ was held, and the next pop() gave 0.0 for
    every statistic). Oracle: a monitor of the real pass alone."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(11)
    model = torchbp.MLP([4, 3, 2])
    x, y = torch.randn(5, 4), torch.rand(5, 2)
    expected = popped_after(model, (x, y))
    with torchbp.DeltaMonitor(model) as monitor:
        model.cost(x, y).backward()
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            model.cost(mode.from_tensor(x), mode.from_tensor(y)).backward()
        assert len(monitor._held["0"]) == 1
        assert monitor.pop() == expected


def test_copies_and_pickles_of_a_monitor_while_another_thread_records():
    """copy.deepcopy, copy.copy and pickle of a monitor while another thread's backward passes append to it:
    each copy succeeds (the held δ and a layer's first sums and last δ are taken as they are; iterating the
    deque, or a dict, while it grew raised "... mutated during iteration"), closed."""
    import pickle
    import sys
    import threading
    import time

    model = torchbp.MLP([4, 3, 2])
    x, y = torch.randn(5, 4), torch.rand(5, 2)
    with torchbp.DeltaMonitor(model, flush_every=300) as monitor:
        done, errors = threading.Event(), []

        def passes():
            try:
                while not done.is_set():
                    model.cost(x, y).backward()
            except Exception as error:  # (reported below: an exception in a thread fails nothing by itself)
                errors.append(error)

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # threads switch as often as they can: the copies meet the appends
        thread = threading.Thread(target=passes)
        thread.start()
        try:
            while len(monitor._held["0"]) < 200 and thread.is_alive():
                time.sleep(0.01)  # a long deque to copy
            copies = [make(monitor) for _ in range(10)
                      for make in (copy.deepcopy, copy.copy, lambda m: pickle.loads(pickle.dumps(m)))]
        finally:
            done.set()
            thread.join(timeout=60)
            sys.setswitchinterval(interval)
    assert not errors and not thread.is_alive()
    assert all("attached=False" in repr(c) for c in copies)
    # A layer's first pass adds its sums and last δ: copies meet those additions too (a deep net, fresh monitors)
    deep = torchbp.MLP([4] + [3] * 30 + [2])
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(10):
            fresh = torchbp.DeltaMonitor(deep, keep_last=True, flush_every=1)
            thread = threading.Thread(target=lambda: deep.cost(x, y).backward())
            thread.start()
            while thread.is_alive():
                copy.deepcopy(fresh)
            thread.join()
            fresh.close()
    finally:
        sys.setswitchinterval(interval)


def test_a_pause_ended_by_the_garbage_collector_during_a_flush_does_not_deadlock(monkeypatch):
    """A generator left suspended inside ``with monitor.paused():``, in a reference cycle, is finalized by the
    garbage collector, which may run in the middle of a flush, under the monitor's lock: the block's end then
    takes the lock again in the same thread (a plain lock hung there for good)."""
    import gc
    import threading

    model = torchbp.MLP([4, 3, 2])
    x, y = torch.randn(5, 4), torch.rand(5, 2)
    monitor = torchbp.DeltaMonitor(model)

    def paused_forever():
        with monitor.paused():
            yield

    generator = paused_forever()
    next(generator)
    cycle = [generator]
    cycle.append(cycle)
    del generator, cycle
    reduce = monitor._reduce

    def collect_then_reduce(*args):
        gc.collect()  # stands in for a collection the flush's allocations trigger
        return reduce(*args)

    monkeypatch.setattr(monitor, "_reduce", collect_then_reduce)
    assert monitor._paused == 1
    monitor._paused = 0  # (recording on, to hold a pass; the block itself is still open)
    model.cost(x, y).backward()
    monitor._paused = 1
    result = []
    popper = threading.Thread(target=lambda: result.append(monitor.pop()), daemon=True)
    popper.start()
    popper.join(timeout=30)
    assert not popper.is_alive(), "pop() hung"
    assert set(result[0]) == {"0", "2"} and monitor._paused == 0
    monitor.close()


def test_pop_resets_and_leaves_out_layers_without_a_pass():
    torch.manual_seed(3)
    model = torchbp.MLP([4, 3, 2], dtype=DT)
    x, y = torch.randn(5, 4, dtype=DT), torch.rand(5, 2, dtype=DT)
    monitor = torchbp.DeltaMonitor(model)
    model.cost(x, y).backward()
    first = monitor.pop()
    assert set(first) == {"0", "2"}
    assert monitor.pop() == {}
    # Only the output layer gets δ when the input-side Linear's output needs no gradient.
    model[0].requires_grad_(False)
    model.cost(x, y).backward()
    assert set(monitor.pop()) == {"2"}
    model[0].requires_grad_(True)
    # After a reset one pass again equals the first pass alone: nothing carried over.
    model.zero_grad()
    model.cost(x, y).backward()
    again = monitor.pop()
    for name in first:
        assert again[name] == pytest.approx(first[name], rel=1e-12)
    monitor.close()


@pytest.mark.parametrize("flush_every", [1, 32])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_a_pass_with_no_samples_is_not_counted(fused, flush_every):
    """An empty batch (through backward and through sgd_step) records nothing and breaks nothing: the next
    pop holds exactly the one real pass, as the oracle gives it."""
    torch.manual_seed(4)
    model = torchbp.MLP([4, 3, 2], fused=fused, dtype=DT)
    x, y = torch.randn(5, 4, dtype=DT), torch.rand(5, 2, dtype=DT)
    monitor = torchbp.DeltaMonitor(model, flush_every=flush_every)
    model.cost(x[:0], y[:0], reduction="sum").backward()
    model.sgd_step(x[:0], y[:0], 0.1)
    assert monitor.pop() == {}
    reference = nn_sequential([4, 3, 2], dtype=DT)
    reference.load_state_dict(model.state_dict())
    expected = oracle_stats(reference, x, y)
    model.cost(x, y).backward()
    assert_close(monitor.pop(), expected)
    monitor.close()


def test_close_removes_hooks():
    """close() removes every δ hook (a later pass records nothing) and the repr says attached=False after it,
    attached=True before."""
    model = torchbp.MLP([4, 3, 2], dtype=DT)
    x, y = torch.randn(5, 4, dtype=DT), torch.rand(5, 2, dtype=DT)
    monitor = torchbp.DeltaMonitor(model)
    assert repr(monitor).endswith("attached=True)")
    monitor.close()
    assert all(not m._delta_hooks for m in model.linears)
    assert repr(monitor).endswith("attached=False)")
    model.cost(x, y).backward()
    assert monitor.pop() == {}
    with torchbp.DeltaMonitor(model) as monitor:
        assert all(len(m._delta_hooks) == 1 for m in model.linears)
    assert all(not m._delta_hooks for m in model.linears)


def test_paused_skips_gradcheck_and_keep_last_holds_delta():
    """Passes inside paused() are not recorded; keep_last holds the last recorded δ, detached: that of the
    second of two passes on other data, not the first."""
    torch.manual_seed(4)
    ref = nn_sequential([4, 3, 2], dtype=DT)
    model = torchbp.MLP([4, 3, 2], dtype=DT)
    model.load_state_dict(ref.state_dict())
    x, y = torch.randn(5, 4, dtype=DT), torch.rand(5, 2, dtype=DT)
    with torchbp.DeltaMonitor(model, keep_last=True) as monitor:
        model.cost(torch.randn(3, 4, dtype=DT), torch.rand(3, 2, dtype=DT)).backward()  # a first pass, popped
        monitor.pop()
        # create_graph: δ arrives with a graph of its own, which the monitor must detach
        torch.autograd.grad(model.cost(x, y), list(model.parameters()), create_graph=True)
        with monitor.paused():
            assert torch.autograd.gradcheck(lambda w: model[0](x) @ w, torch.randn(3, 2, dtype=DT, requires_grad=True))
        assert_close(monitor.pop(), oracle_stats(ref, x, y))
        assert not monitor.last_delta["0"].requires_grad
        deltas = nn_deltas(ref, x, y)
        for name in ("0", "2"):
            torch.testing.assert_close(monitor.last_delta[name], deltas[name], **TOL)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_torch_func_passes_are_skipped_with_one_warning(fused):
    """Under torch.func.grad, and in the backward of a forward run under vmap, the hooks see wrapped tensors: no
    error, nothing recorded, one warning for the monitor (the vmap case was silent); torch.func.vjp's backward
    runs outside the transform and is recorded, equal to the plain backward's statistics."""
    model = torchbp.MLP([4, 3, 2], fused=fused, dtype=DT)
    params = dict(model.named_parameters())
    x = torch.randn(5, 4, dtype=DT)
    with torchbp.DeltaMonitor(model) as monitor:
        with pytest.warns(UserWarning, match="under a torch.func transform .* is not recorded") as caught:
            grads = torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).sum())(params)
            torch.func.vmap(model)(x).sum().backward()
        assert set(grads) == set(params)
        assert len([w for w in caught if "DeltaMonitor" in str(w.message)]) == 1
        assert monitor.pop() == {}
        out, vjp_fn = torch.func.vjp(model, x)
        vjp_fn(torch.ones_like(out))
        by_vjp = monitor.pop()
        model(x).sum().backward()
        expected = monitor.pop()
        assert set(by_vjp) == set(expected) == {"0", "2"}
        for layer in expected:
            assert by_vjp[layer] == pytest.approx(expected[layer], rel=1e-12)


def test_bad_arguments_fail_fast():
    model = torchbp.MLP([4, 3, 2])
    with pytest.raises(ValueError, match="reduction"):
        torchbp.DeltaMonitor(model, reduction="none")
    with pytest.raises(ValueError, match="no torchbp.Linear"):
        torchbp.DeltaMonitor(nn.Sequential(nn.Linear(2, 2)))
    # converted, but its Linear is a subclass that convert() leaves alone: the message says why
    with pytest.raises(ValueError, match=r"convert\(\) first \(which converts torch\.nn\.Linear layers, not "
                                         r"subclasses of it"):
        torchbp.DeltaMonitor(torchbp.convert(nn.MultiheadAttention(8, 2)))
    with pytest.raises(TypeError, match="model"):
        torchbp.DeltaMonitor("model")


def test_a_closed_monitor_refuses_a_new_with_block_and_arguments_are_checked():
    """Re-entering a closed monitor would record nothing, silently: it raises instead."""
    model = torchbp.MLP([4, 3, 2])
    monitor = torchbp.DeltaMonitor(model)
    monitor.close()
    with pytest.raises(RuntimeError, match="closed"):
        with monitor:
            pass
    with pytest.raises(TypeError, match="keep_last must be a bool, got 'no'"):
        torchbp.DeltaMonitor(model, keep_last="no")
    np = pytest.importorskip("numpy")
    assert torchbp.DeltaMonitor(model, flush_every=np.int64(4)).flush_every == 4  # numpy's ints are ints


def test_pop_inside_inference_mode_leaves_the_monitor_usable():
    """pop() inside torch.inference_mode() (logging in an eval block), then more passes outside it.

    The accumulator first created in that pop must not be an inference tensor,
    or every later flush (in a backward, or in pop) fails to add to it.
    """
    torch.manual_seed(5)
    ref = nn_sequential([4, 3, 2], dtype=DT)
    model = torchbp.MLP([4, 3, 2], dtype=DT)
    model.load_state_dict(ref.state_dict())
    x, y = torch.randn(5, 4, dtype=DT), torch.rand(5, 2, dtype=DT)
    expected = oracle_stats(ref, x, y)
    with torchbp.DeltaMonitor(model, flush_every=2) as monitor:
        model.cost(x, y).backward()
        with torch.inference_mode():
            assert_close(monitor.pop(), expected)
        for _ in range(3):  # the second pass flushes inside backward
            model.cost(x, y).backward()
        assert_close(monitor.pop(), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_deltas_are_reduced_in_float32(dtype):
    """δ in float16 / bfloat16: the statistics are those of the same δ computed in float64.

    32 passes of 16384 samples with a sum-reduced cost: Σ_n δ_n exceeds float16's
    65504 (it overflowed to inf when reduced in δ's own dtype) and bf16 sums
    rounded by ~0.4%. Oracle: the kept δ, in float64. Tolerance 1e-5 (float32 sums).
    """
    torch.manual_seed(0)
    model = torchbp.MLP([8, 16, 4], dtype=dtype)
    x, y = torch.randn(16384, 8, dtype=dtype), torch.zeros(16384, 4, dtype=dtype)
    with torchbp.DeltaMonitor(model, reduction="sum", keep_last=True) as monitor:
        for _ in range(32):
            model.cost(x, y, reduction="sum").backward()  # the same δ every pass
        deltas = {name: d.double() for name, d in monitor.last_delta.items()}
        popped = monitor.pop()
    for name, d in deltas.items():
        expected = (d.sum(0).norm().item(), d.norm(dim=1).mean().item(), d.abs().max().item())
        got = tuple(popped[name][stat] for stat in ("norm", "sample_norm", "max_abs"))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


@pytest.mark.filterwarnings("error")  # a complex accumulator warned at pop(), casting to real
def test_complex_deltas_give_real_statistics():
    """A complex layer's δ (torch's ∂L/∂z of a real loss, conjugate convention): norm = ‖Σ_n δ_n‖, sample_norm
    and max_abs = max |δ| by hand from torch.autograd.grad on the nn model, real numbers (complex128, 1e-6)."""
    torch.manual_seed(12)
    reference = nn.Sequential(nn.Linear(4, 3, dtype=torch.cdouble), nn.Sigmoid(), nn.Linear(3, 2, dtype=torch.cdouble))
    model = torchbp.convert(reference)
    x = torch.randn(6, 4, dtype=torch.cdouble)
    zs = []
    for m in reference:
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda mod, inputs, z: zs.append(z))
    expected = {}
    for name, delta in zip(("0", "2"), torch.autograd.grad(reference(x).abs().pow(2).sum(-1).mean(), zs)):
        expected[name] = (delta.sum(0).abs().norm().item(), (delta.abs().norm(dim=1) * len(x)).mean().item(),
                          delta.abs().max().item())
    with torchbp.DeltaMonitor(model, keep_last=True) as monitor:
        model(x).abs().pow(2).sum(-1).mean().backward()
        popped = monitor.pop()
    assert_close(popped, expected)
    assert all(isinstance(v, float) for stats in popped.values() for v in stats.values())


def test_accumulator_follows_the_model_to_float64():
    """Passes in float32, then model.double() without a pop between: the float64 passes are summed in float64."""
    torch.manual_seed(6)
    model = torchbp.MLP([4, 3, 2])
    x, y = torch.randn(5, 4), torch.rand(5, 2)
    with torchbp.DeltaMonitor(model, flush_every=1) as monitor:
        model.cost(x, y).backward()
        first = {k: v["norm"] for k, v in monitor.pop().items()}
        model.cost(x, y).backward()  # the accumulator exists now, in float32
        model.double()
        ref = nn_sequential([4, 3, 2], dtype=DT)
        ref.load_state_dict(model.state_dict())
        expected64 = oracle_stats(ref, x.double(), y.double())
        model.cost(x.double(), y.double()).backward()
        popped = monitor.pop()
    for name, (norm64, _, _) in expected64.items():
        # The mean of a float32 pass (the first pop's value: same weights, same batch) and a
        # float64 one, to float64's precision; a float32 accumulator is ~1e-8 off.
        torch.testing.assert_close(popped[name]["norm"], (first[name] + norm64) / 2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_dataparallel_replicas_are_skipped_with_one_warning(fused):
    """nn.DataParallel on several devices runs replicas (nn.parallel.replicate: _replicate_for_data_parallel,
    sharing the layers' hooks), each on a part of the batch: each replica's δ was recorded as a pass of its
    own, k passes per backward of shards. Here replicas made as replicate() makes them, on the CPU: nothing
    recorded, one warning; the model's own pass still is (a hand count of layers)."""
    torch.manual_seed(13)
    model = torchbp.MLP([4, 3, 2], fused=fused, dtype=DT)
    x, y = torch.randn(8, 4, dtype=DT), torch.rand(8, 2, dtype=DT)

    def replica() -> torchbp.MLP:
        copy = model._replicate_for_data_parallel()
        for name, layer in model.named_children():
            twin = layer._replicate_for_data_parallel()
            for key, p in layer._parameters.items():
                twin._parameters[key] = p * 1  # a differentiable copy, as DataParallel's broadcast gives
            copy._modules[name] = twin
        return copy

    with torchbp.DeltaMonitor(model) as monitor:
        with pytest.warns(UserWarning, match="replicas of an nn.DataParallel .* are not recorded") as caught:
            out = torch.cat([replica()(part) for part in x.chunk(2)])  # scatter, replicas' forward, gather
            torchbp.QuadraticCost()(out, y).backward()
        assert len([w for w in caught if "DeltaMonitor" in str(w.message)]) == 1
        assert monitor.pop() == {}
        model.cost(x, y).backward()
        assert set(monitor.pop()) == {"0", "2"}


@pytest.mark.parametrize("flush_every", [1, 2, 7])
def test_backward_passes_in_several_threads_are_each_recorded_whole(flush_every):
    """Backward passes run in three threads at once (as DataParallel's devices, or a user's threads, run them),
    each on inputs of its own: every pass is recorded once, whole (a δ held while another thread reduced the
    held ones was once counted and never added: averages 18-23% off). Oracle: the same passes one after the
    other in one thread (the averages of 3 x 60 different passes, 1e-12, float64)."""
    import threading

    torch.manual_seed(14)
    model = torchbp.MLP([4, 3, 2], dtype=DT)
    inputs = [[(torch.randn(6, 4, dtype=DT), torch.rand(6, 2, dtype=DT)) for _ in range(60)] for _ in range(3)]
    with torchbp.DeltaMonitor(model, flush_every=flush_every) as monitor:
        for x, y in (xy for batch in inputs for xy in batch):
            model.cost(x, y).backward()
        expected = monitor.pop()

        def passes(batch) -> None:
            for x, y in batch:
                model.cost(x, y).backward()

        threads = [threading.Thread(target=passes, args=(batch,)) for batch in inputs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        popped = monitor.pop()
    for layer in ("0", "2"):
        assert popped[layer] == pytest.approx(expected[layer], rel=1e-12)


def test_a_copy_of_a_monitored_model_is_not_monitored():
    """copy.deepcopy (an EMA or best-model snapshot) and torch.save of a monitored model carry no δ hook.

    The copy's passes would otherwise be recorded under the original's names,
    after close() too, and torch.save(model) fails on the hook's closure.
    """
    import copy
    import io

    model = torchbp.MLP([4, 3, 2])
    x, y = torch.randn(5, 4), torch.rand(5, 2)
    with torchbp.DeltaMonitor(model) as monitor:
        snapshot = copy.deepcopy(model)
        snapshot.cost(x, y).backward()
        assert monitor.pop() == {}
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        loaded.cost(x, y).backward()
        assert monitor.pop() == {}
        model.cost(x, y).backward()  # the original is still monitored
        assert set(monitor.pop()) == {"0", "2"}
    # A copy can be monitored on its own.
    with torchbp.DeltaMonitor(snapshot) as own:
        snapshot.cost(x, y).backward()
        assert set(own.pop()) == {"0", "2"}


@pytest.mark.parametrize("copies", ["deepcopy", "convert"])
def test_a_copy_of_a_monitored_parametrized_layer_is_not_monitored(copies):
    """torch's parametrize gives a parametrized layer a deepcopy of its own, which copied the δ hooks as they
    were: the copy (copy.deepcopy, convert(inplace=False)) recorded into the original's monitor. Oracle: a
    monitor records nothing while only the copy runs, and the original and a monitor of the copy's own do
    record (a hand count of layers); the copy computes what the original does (exactly)."""
    import copy

    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, weight):
            return 2 * weight

    model = nn.Sequential(torchbp.Linear(4, 3), torchbp.Sigmoid(), torchbp.Linear(3, 2), torchbp.Sigmoid())
    parametrize.register_parametrization(model[0], "weight", Doubled())
    x = torch.randn(5, 4)
    with torchbp.DeltaMonitor(model) as monitor:
        twin = copy.deepcopy(model) if copies == "deepcopy" else torchbp.convert(model)
        assert torch.equal(twin(x), model(x))
        twin(x).sum().backward()
        assert monitor.pop() == {}
        model(x).sum().backward()
        assert set(monitor.pop()) == {"0", "2"}
    with torchbp.DeltaMonitor(twin) as own:
        twin(x).sum().backward()
        assert set(own.pop()) == {"0", "2"}


def test_a_copied_monitor_holds_what_was_recorded_and_is_closed():
    """copy.deepcopy of a DeltaMonitor, or of an object holding one (a trainer's state), copy.copy and pickle
    give the statistics recorded so far, closed: the hooks stay with the original, which alone records on (a
    copy that said it was attached recorded nothing; copy.copy's shared the original's sums, so it saw the
    original's later passes and its pop() emptied the original's). The lock is made anew. Oracle: a monitor
    of the first pass alone."""
    import copy
    import pickle

    model = torchbp.MLP([4, 3, 2])
    x, x2, y = torch.randn(5, 4), 3 * torch.randn(5, 4), torch.rand(5, 2)
    expected = popped_after(model, (x, y))
    with torchbp.DeltaMonitor(model) as monitor:
        model.cost(x, y).backward()
        copies = [copy.deepcopy({"monitor": monitor})["monitor"], pickle.loads(pickle.dumps(monitor)),
                  copy.copy(monitor)]
        model.cost(x2, y).backward()  # the original's alone
        both = monitor.pop()
    assert set(both) == {"0", "2"} and both != expected
    for twin in copies:
        assert twin._lock is not monitor._lock and "attached=False" in repr(twin)
        with pytest.raises(RuntimeError, match="closed"):
            twin.__enter__()
        assert twin.pop() == expected


def test_ddp_keeps_inner_names(tmp_path):
    """A DistributedDataParallel-wrapped model (gloo, world size 1) is monitored under the inner model's names."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    torch.manual_seed(5)
    ref = nn_sequential([4, 3, 2], dtype=DT)
    model = torchbp.MLP([4, 3, 2], dtype=DT)
    model.load_state_dict(ref.state_dict())
    store = dist.FileStore(os.fspath(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        x, y = torch.randn(5, 4, dtype=DT), torch.rand(5, 2, dtype=DT)
        with torchbp.DeltaMonitor(ddp) as monitor:
            assert monitor.layer_names == ("0", "2")
            torchbp.QuadraticCost()(ddp(x), y).backward()
            assert_close(monitor.pop(), oracle_stats(ref, x, y))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrap", [nn.DataParallel, torch.compile], ids=["DataParallel", "compile"])
def test_data_parallel_and_compile_wrappers_keep_inner_names(wrap):
    """DeltaMonitor(nn.DataParallel(model)) and DeltaMonitor(torch.compile(model)) (not called: no compiled code
    runs) hook the inner model under its own names ("0", "2", not "module.0" / "_orig_mod.0"); an eager pass of
    the inner model is recorded under them. Oracle: torch's autograd on the nn twin (float64, 1e-6)."""
    torch.manual_seed(8)
    ref = nn_sequential([4, 3, 2], dtype=DT)
    model = torchbp.MLP([4, 3, 2], dtype=DT)
    model.load_state_dict(ref.state_dict())
    x, y = torch.randn(5, 4, dtype=DT), torch.rand(5, 2, dtype=DT)
    with torchbp.DeltaMonitor(wrap(model)) as monitor:
        assert monitor.layer_names == ("0", "2")
        model.cost(x, y).backward()
        assert_close(monitor.pop(), oracle_stats(ref, x, y))


def test_statistics_go_to_their_layer_when_names_are_not_in_sorted_order():
    """Layers registered as z_hidden, a_out (sorted order is the reverse): each layer's popped statistics are its
    own δ's, not the other layer's (their δ differ, the output layer's about 10x the hidden one's). Oracle:
    torch's autograd on the nn model (float64, 1e-6)."""
    torch.manual_seed(9)
    ref = Unsorted(DT)
    with torch.no_grad():
        ref.a_out.weight.mul_(0.1)  # the hidden layer's δ = W_outᵀ δ_out σ': an order of magnitude smaller
    model = torchbp.convert(ref)
    x, y = torch.randn(6, 4, dtype=DT), torch.rand(6, 3, dtype=DT)
    expected = oracle_stats(ref, x, y)
    assert expected["a_out"][0] > 5 * expected["z_hidden"][0]
    with torchbp.DeltaMonitor(model) as monitor:
        assert monitor.layer_names == ("z_hidden", "a_out")
        torchbp.QuadraticCost()(model(x), y).backward()
        assert_close(monitor.pop(), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_max_abs_is_summed_over_passes_in_float32(dtype):
    """32 passes (one flush) of a float16 / bfloat16 Linear with |δ| between 4000 and 4992: max_abs is the mean
    of the per-pass max |δ| (4496), not inf (float16's 32-pass sum, 143872, passes 65504) nor a bf16-rounded
    sum (143872 is no bf16 number). Oracle: max |δ| of the δ backpropagated (the gradient given to
    backward, exact in both dtypes), in float64; tolerance 1e-5 (float32 sums)."""
    torch.manual_seed(10)
    layer = torchbp.Linear(3, 2, dtype=dtype)
    grads = [torch.tensor([[(-1) ** k * (4000.0 + 32 * k), 1.0]], dtype=dtype) for k in range(32)]
    with torchbp.DeltaMonitor(layer) as monitor:
        for g in grads:
            layer(torch.randn(1, 3, dtype=dtype)).backward(g)
        popped = monitor.pop()[""]
    expected = sum(g.double().abs().max().item() for g in grads) / len(grads)
    assert expected == 4496.0
    torch.testing.assert_close(popped["max_abs"], expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(popped["norm"], sum(g.double().norm().item() for g in grads) / len(grads),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_compiled_forward_installs_no_hook_and_keeps_one_graph(fused):
    """Under torch.compile(fullgraph=True) a monitored model still compiles; only eager passes are recorded."""
    torch._dynamo.reset()
    model = torchbp.MLP([5, 4, 3], fused=fused, dtype=torch.float64)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.rand(6, 3, dtype=torch.float64)
    with torchbp.DeltaMonitor(model) as monitor:
        compiled = torch.compile(lambda x, y: model.cost(x, y), fullgraph=True)
        compiled(x, y).backward()
        assert monitor.pop() == {}
        model.cost(x, y).backward()
        assert sorted(monitor.pop()) == ["0", "2"]
    torch._dynamo.reset()


def test_nested_pauses_restore_the_outer_one():
    """Leaving an inner paused() block keeps the outer one paused: nothing recorded until the outer exits."""
    model = torchbp.MLP([4, 3, 2])
    x, y = torch.randn(5, 4), torch.rand(5, 2)
    with torchbp.DeltaMonitor(model) as monitor:
        with monitor.paused():
            with monitor.paused():
                pass
            model.cost(x, y).backward()
            assert monitor.pop() == {}
        model.cost(x, y).backward()
        assert set(monitor.pop()) == {"0", "2"}


def test_pauses_overlapping_across_threads_keep_the_monitor_paused_until_the_last_ends():
    """Thread A pauses, thread B pauses, A's block ends while B's has not: B's backward is still not recorded
    (a saved-and-restored flag resumed recording at A's end), and recording resumes after B's. A pause holds
    for every thread's passes (a backward may run in a thread of autograd's own)."""
    import threading

    model = torchbp.MLP([4, 3, 2])
    x, y = torch.randn(5, 4), torch.rand(5, 2)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    with torchbp.DeltaMonitor(model) as monitor:
        def thread_a():
            with monitor.paused():
                a_in.set()
                b_in.wait()
            a_out.set()

        def thread_b():
            a_in.wait()
            with monitor.paused():
                b_in.set()
                a_out.wait()
                model.cost(x, y).backward()
                ran.append(True)

        ran = []
        threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert ran == [True] and not any(t.is_alive() for t in threads)  # B's backward ran, inside its block
        assert monitor.pop() == {}
        model.cost(x, y).backward()
        assert set(monitor.pop()) == {"0", "2"}


def test_passes_on_the_meta_device_are_not_recorded():
    """A model moved to the meta device (a shape check) between flushes, and back: its passes there have no
    values, so none is held or counted, nothing raises inside the backward, and the CPU passes before and
    after are recorded as if the meta ones had not run (the sums once followed the model to meta, and every
    later pop() raised; before that, stacking a CPU δ with a meta one raised in the backward). Oracle: a
    monitor of the two CPU passes alone."""
    torch.manual_seed(9)
    model = torchbp.MLP([4, 3, 2], dtype=DT)
    x, y = torch.randn(5, 4, dtype=DT), torch.rand(5, 2, dtype=DT)
    expected = popped_after(model, (x, y), (2 * x, y))
    with torchbp.DeltaMonitor(model, flush_every=2) as monitor:
        model.cost(x, y).backward()  # held: one δ on the CPU
        state = model.state_dict()
        model.to("meta")
        for _ in range(3):
            model.cost(x.to("meta"), y.to("meta")).backward()
        assert monitor._passes["0"] == 0 and len(monitor._held["0"]) == 1
        model.to_empty(device="cpu").load_state_dict(state)
        model.cost(2 * x, y).backward()
        assert monitor.pop() == expected


def test_statistics_are_taken_once_the_held_deltas_reach_max_held_bytes():
    """max_held_bytes=32 and a float32 δ of 4 x 2 (32 bytes): its statistics are taken in that pass, so an
    in-place change of the gradient afterwards (allowed from then on) changes nothing recorded."""
    layer = torchbp.Linear(3, 2)
    g = torch.ones(4, 2)
    with torchbp.DeltaMonitor(layer, max_held_bytes=32) as monitor:
        layer(torch.randn(4, 3)).backward(g)
        g.mul_(100)
        assert monitor.pop()[""]["max_abs"] == 1.0


def test_a_paused_monitor_neither_warns_nor_uses_up_its_one_warning():
    """A pass under a torch.func transform while the monitor is paused is skipped in silence (paused means
    nothing happens), and the one warning still comes with the first such pass after the pause."""
    model = torchbp.MLP([4, 3, 2], dtype=DT)
    params, x = dict(model.named_parameters()), torch.randn(5, 4, dtype=DT)

    def cost(p):
        return torch.func.functional_call(model, p, (x,)).sum()

    with torchbp.DeltaMonitor(model) as monitor:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with monitor.paused():
                torch.func.grad(cost)(params)
        with pytest.warns(UserWarning, match="under a torch.func transform"):
            torch.func.grad(cost)(params)


def test_an_empty_pass_under_a_transform_warns_too():
    """A pass with no samples under a torch.func transform: nothing to record either way, but the warning that
    transforms are skipped is still given."""
    model = torchbp.MLP([4, 3, 2], dtype=DT)
    params, x = dict(model.named_parameters()), torch.randn(0, 4, dtype=DT)
    with torchbp.DeltaMonitor(model) as monitor:
        with pytest.warns(UserWarning, match="under a torch.func transform"):
            torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).sum())(params)
        assert monitor.pop() == {}
