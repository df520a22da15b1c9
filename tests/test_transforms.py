"""torchbp under torch's transforms: torch.func, torch.compile and autocast.

* torch.func: per-sample gradients (vmap over grad with functional_call)
  equal a Python loop of single-sample backward passes; vmap, jacrev, jvp,
  linearize and hessian of the Functions equal those of torch's own ops
  (float64, 1e-12).
* torch.compile(fullgraph=True): forward and gradients equal eager mode, and so
  do the parameters after compiled MLP.sgd_step calls.
* autocast: torchbp's MLP and costs against the same torch.nn network under
  torch.autocast: same output dtypes, outputs and float32 gradients within
  the lower precision's rounding.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, jvp, vmap

import torchbp
from torchbp import functional as F

from oracles import close, flat_views, oracle_cost, sequential_like

SIZES = [6, 5, 3]
N = 4


def _oracle_mlp(x, w1, b1, w2, b2):
    return torch.sigmoid(TF.linear(torch.sigmoid(TF.linear(x, w1, b1)), w2, b2))


# torchbp function, the same function with torch's ops, and the shapes of its arguments.
# Activations and targets ("a", "y") lie in (0.2, 0.8) so the cross entropy is smooth.
FUNCTIONS = {
    "linear": (F.linear, TF.linear, [("x", (N, 6)), ("w", (5, 6)), ("b", (5,))]),
    "sigmoid": (F.sigmoid, torch.sigmoid, [("z", (N, 5))]),
    "quadratic_cost": (F.quadratic_cost, oracle_cost, [("a", (N, 3)), ("y", (N, 3))]),
    "cross_entropy_cost": (
        lambda a, y: F.cross_entropy_cost(a, y, "none"),
        lambda a, y: TF.binary_cross_entropy(a, y, reduction="none").sum(-1),
        [("a", (N, 3)), ("y", (N, 3))],
    ),
    "mlp": (
        lambda x, w1, b1, w2, b2: F.mlp(x, [w1, w2], [b1, b2]),
        _oracle_mlp,
        [("x", (N, 6)), ("w1", (5, 6)), ("b1", (5,)), ("w2", (3, 5)), ("b2", (3,))],
    ),
    "mlp_cost": (
        lambda x, y, w1, b1, w2, b2: F.mlp_cost(x, y, [w1, w2], [b1, b2], cost="cross_entropy"),
        lambda x, y, w1, b1, w2, b2: (oracle_cost(a := _oracle_mlp(x, w1, b1, w2, b2), y, "cross_entropy"), a),
        [("x", (N, 6)), ("y", (N, 3)), ("w1", (5, 6)), ("b1", (5,)), ("w2", (3, 5)), ("b2", (3,))],
    ),
}


def _args(spec, gen, batch=()):
    out = []
    for kind, shape in spec:
        t = torch.rand((*batch, *shape), generator=gen, dtype=torch.float64)
        out.append(0.2 + 0.6 * t if kind in ("a", "y") else 2 * t - 1)
    return out


# --------------------------------------------------------------------------
# torch.func
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", FUNCTIONS)
def test_jacrev_matches_torch_ops(name):
    """The full Jacobian (reverse mode, every argument) equals that of torch's ops."""
    fn, oracle, spec = FUNCTIONS[name]
    args = _args(spec, torch.Generator().manual_seed(0))
    argnums = tuple(range(len(args)))
    got, expected = jacrev(fn, argnums=argnums)(*args), jacrev(oracle, argnums=argnums)(*args)
    for g, e in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected), strict=True):
        close(g, e)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_jvp_matches_torch_ops(name):
    """Forward mode (torch.func.jvp, tangents for every argument) equals that of torch's ops."""
    fn, oracle, spec = FUNCTIONS[name]
    gen = torch.Generator().manual_seed(1)
    args = tuple(_args(spec, gen))
    tangents = tuple(torch.randn(a.shape, generator=gen, dtype=a.dtype) for a in args)
    (out, out_t), (exp, exp_t) = jvp(fn, args, tangents), jvp(oracle, args, tangents)
    for g, e in zip(torch.utils._pytree.tree_leaves((out, out_t)), torch.utils._pytree.tree_leaves((exp, exp_t)),
                    strict=True):
        close(g, e)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_linearize_matches_torch_ops(name):
    """torch.func.linearize's jvp_fn, which replays the traced forward, equals torch's ops' forward mode; the
    fused forward once wrote a^l over its z^l in place, which the replay refused. Parameters requiring
    grad, with grad mode on, as a model's do. Oracle: torch.func.jvp of torch's ops, float64, 1e-12."""
    fn, oracle, spec = FUNCTIONS[name]
    gen = torch.Generator().manual_seed(5)
    args = tuple(a.requires_grad_() for a in _args(spec, gen))
    tangents = tuple(torch.randn(a.shape, generator=gen, dtype=a.dtype) for a in args)
    out, jvp_fn = torch.func.linearize(fn, *args)
    exp, exp_t = jvp(oracle, args, tangents)
    for g, e in zip(torch.utils._pytree.tree_leaves((out, jvp_fn(*tangents))),
                    torch.utils._pytree.tree_leaves((exp, exp_t)), strict=True):
        close(g, e)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_vmap_matches_loop(name):
    """vmap over a leading dimension of every argument (weights included) equals a loop over it."""
    fn, _, spec = FUNCTIONS[name]
    args = _args(spec, torch.Generator().manual_seed(2), batch=(3,))
    got = vmap(fn)(*args)
    loop = [fn(*(a[i] for a in args)) for i in range(3)]
    expected = torch.utils._pytree.tree_map(lambda *xs: torch.stack(xs), *loop)
    for g, e in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected), strict=True):
        close(g, e)


def test_hessian_of_fused_cost_matches_torch_ops():
    """hessian (forward over reverse) of the fused network-and-cost wrt the input equals torch's."""
    fn, oracle, spec = FUNCTIONS["mlp_cost"]
    x, *rest = _args(spec, torch.Generator().manual_seed(3))
    got = hessian(lambda x: fn(x, *rest)[0])(x)
    expected = hessian(lambda x: oracle(x, *rest)[0])(x)
    close(got, expected)


class _CostOf(nn.Module):
    """``mlp.cost(x, y, cost)`` as a module's forward, so functional_call can drive it."""

    def __init__(self, mlp: torchbp.MLP, cost: str):
        super().__init__()
        self.mlp, self.cost = mlp, cost

    def forward(self, x, y):
        return self.mlp.cost(x, y, self.cost)


@pytest.mark.parametrize("path", ["forward+QuadraticCost", "MLP.cost-quadratic", "MLP.cost-cross_entropy"])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_per_sample_gradients_equal_a_loop(fused, path):
    """vmap(grad(C)) with functional_call gives each sample's gradients, equal to one backward per sample."""
    torch.manual_seed(4)
    mlp = torchbp.MLP(SIZES, fused=fused, dtype=torch.float64)
    if path == "forward+QuadraticCost":
        def sample_cost(params, x, y):
            return torchbp.QuadraticCost()(functional_call(mlp, params, (x,)), y)
        module = mlp
    else:
        module = _CostOf(mlp, path.removeprefix("MLP.cost-"))

        def sample_cost(params, x, y):
            return functional_call(module, params, (x, y))

    params = {k: v.detach() for k, v in module.named_parameters()}
    x = torch.randn(N, SIZES[0], dtype=torch.float64)
    y = torch.rand(N, SIZES[-1], dtype=torch.float64)
    per_sample = vmap(grad(sample_cost), in_dims=(None, 0, 0))(params, x, y)
    for n in range(N):
        module.zero_grad()
        if path == "forward+QuadraticCost":
            torchbp.QuadraticCost()(mlp(x[n]), y[n]).backward()
        else:
            module(x[n], y[n]).backward()
        for name, p in module.named_parameters():
            close(per_sample[name][n], p.grad, what=f"sample {n}, {name}")


@pytest.mark.parametrize("argnums", [0, 1, 2, (0, 1), (1, 2)], ids=["x", "w", "b", "x,w", "w,b"])
@pytest.mark.parametrize("in_dims", [(0, None, None), (None, 0, 0), (None, 0, None), (0, 0, 0)],
                         ids=["batched-x", "batched-params", "batched-w", "batched-all"])
def test_grad_of_vmap_of_linear_matches_torch(in_dims, argnums):
    """grad(vmap(linear)): the torch.func ensembling recipe (stacked weights) and input gradients of a vmapped
    batch. Each combination of what is vmapped and what is differentiated equals torch's own F.linear
    (float64, 1e-12); this once crashed wherever Linear saved no input or no weight for backward."""
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(2, N, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    args = [t if d == 0 else t[0] for t, d in zip((x, w, b), in_dims)]

    def grads(linear):
        return grad(lambda *a: vmap(linear, in_dims=in_dims)(*a).pow(2).sum(), argnums=argnums)(*args)

    close(grads(F.linear), grads(TF.linear))


@pytest.mark.parametrize("argnums", [1, 2], ids=["W1", "W2"])
@pytest.mark.parametrize("in_dims", [(0, 0, 0), (None, 0, 0), (0, None, 0), (0, 0, None)],
                         ids=["batched-all", "batched-weights", "batched-x-W2", "batched-x-W1"])
def test_grad_of_vmap_of_the_fused_cost_matches_torch(in_dims, argnums):
    """grad(vmap(mlp_cost)) differentiating one weight: the fused node keeps no x or W^1 where nothing below asks
    for a gradient, except under torch.func transforms, whose vmap rule batches every saved tensor (without that
    it crashed). Equal to the same network in torch's ops (float64, 1e-12)."""
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(2, N, 6, generator=gen, dtype=torch.float64)
    w1 = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    w2 = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    y = torch.rand(2, N, 3, generator=gen, dtype=torch.float64)
    args = [t if d == 0 else t[0] for t, d in zip((x, w1, w2), in_dims)] + [y]

    def ours(x, w1, w2, y):
        return F.mlp_cost(x, y, [w1, w2], None)[0]

    def torchs(x, w1, w2, y):
        return oracle_cost(torch.sigmoid(torch.sigmoid(x @ w1.mT) @ w2.mT), y)

    def grads(cost):
        return grad(lambda *a: vmap(cost, in_dims=(*in_dims, 0))(*a).pow(2).sum(), argnums=argnums)(*args)

    close(grads(ours), grads(torchs))


def test_grad_of_vmap_of_a_model_ensemble_matches_torch_nn():
    """The torch.func ensembling recipe on torchbp.Linear models: stack_module_state, vmap over the stacked
    parameters, grad of the summed output; equal to the same recipe on nn.Linear models (float64, 1e-12)."""
    torch.manual_seed(22)
    models = [torchbp.MLP(SIZES, dtype=torch.float64) for _ in range(3)]
    references = [sequential_like(m) for m in models]
    x = torch.randn(N, SIZES[0], dtype=torch.float64)

    def ensemble_grad(models):
        params, buffers = torch.func.stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")

        def total(params):
            outputs = vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)
            return outputs.pow(2).sum()

        return grad(total)(params)

    close(ensemble_grad(models), ensemble_grad(references))


def test_grad_of_vmap_of_a_fused_ensemble_past_a_block_runs_batched(monkeypatch):
    """The ensembling recipe on fused MLPs whose batch is larger than the fused backward's block of samples
    (made 2 samples here): under vmap the backward takes all the samples at once, since its blocks' in-place
    addmm_ has no batching rule (torch warned and looped over the batch, 2-2.6x slower at real sizes); no
    warning, and the cost's gradients equal the nn.Linear ensemble's (float64, 1e-12)."""
    monkeypatch.setattr(F, "_BLOCK_ELEMENTS", 2 * max(SIZES))
    torch.manual_seed(24)
    models = [torchbp.MLP(SIZES, fused=True, dtype=torch.float64) for _ in range(3)]
    references = [sequential_like(m) for m in models]
    x = torch.randn(4 * N, SIZES[0], dtype=torch.float64)
    y = torch.rand(4 * N, SIZES[-1], dtype=torch.float64)

    def ensemble_grad(models, cost):
        params, buffers = torch.func.stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")

        def total(params):
            costs = vmap(lambda p, b: cost(functional_call(base, (p, b), (x,)), y))(params, buffers)
            return costs.sum()

        return grad(total)(params)

    with warnings.catch_warnings():
        # vmap's fallback to a loop over the batch warns ("... not yet implemented the batching rule for ...")
        warnings.filterwarnings("error", message=".*batching rule", category=UserWarning)
        ours = ensemble_grad(models, F.quadratic_cost)
    close(ours, ensemble_grad(references, oracle_cost))


# --------------------------------------------------------------------------
# torch.fx symbolic tracing (feature extraction, FX quantization)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["converted", "unfused", "fused", "unfused-cost", "fused-cost",
                                   "unfused-cross_entropy-cost", "fused-cross_entropy-cost"])
def test_fx_symbolic_trace_gives_the_same_outputs_and_gradients(model):
    """torch.fx.symbolic_trace of torchbp models, a delta hook attached: the GraphModule calls torchbp's
    functions (one call each, not a trace through their checks) and gives the eager module's output and
    gradients, which equal nn.Sequential's (float64, 1e-12). The graph carries no hook; the eager model
    keeps its own."""
    torch.manual_seed(23)
    mlp = torchbp.MLP(SIZES, fused=model.startswith("fused"), dtype=torch.float64)
    reference = sequential_like(mlp)
    x = torch.randn(N, SIZES[0], dtype=torch.float64)
    y = torch.rand(N, SIZES[-1], dtype=torch.float64)
    if model == "converted":
        module = torchbp.convert(reference)
    elif model.endswith("-cost"):
        module = _CostOf(mlp, "cross_entropy" if "cross_entropy" in model else "quadratic")
    else:
        module = mlp
    linears = [m for m in module.modules() if isinstance(m, torchbp.Linear)]
    seen = []
    linears[0].register_delta_hook(lambda m, delta: seen.append(delta))
    traced = torch.fx.symbolic_trace(module)
    calls = {n.target.__module__ for n in traced.graph.nodes if n.op == "call_function" and callable(n.target)}
    assert "torchbp.functional" in calls

    def run(m):
        out = m(x, y) if model.endswith("-cost") else m(x)
        m.zero_grad()
        (out if out.dim() == 0 else out.pow(2).sum()).backward()
        return out, [p.grad for p in m.parameters()]

    out, grads = run(traced)
    assert not seen  # the traced graph calls no hook
    eager_out, eager_grads = run(module)
    assert len(seen) == 1  # the eager module still does
    cost = "cross_entropy" if "cross_entropy" in model else "quadratic"
    expected = oracle_cost(reference(x), y, cost) if model.endswith("-cost") else reference(x)
    close(out, eager_out)
    close(out, expected)
    for g, e in zip(grads, eager_grads):
        close(g, e)


class _OnBuffer(nn.Module):
    """A torchbp network fed a buffer: while fx traces, its input is a tensor, not a Proxy."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.register_buffer("tokens", torch.randn(N, SIZES[0], dtype=torch.float64))

    def forward(self, x):
        return self.net(self.tokens) + x


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_fx_symbolic_trace_of_a_hooked_layer_fed_a_buffer_keeps_no_hook(fused):
    """torch.fx.symbolic_trace of a hooked torchbp network whose input is a buffer, not a Proxy: the trace
    succeeds and its graph calls no hook (the unfused trace once failed to put the hook into the graph; a
    fused one computed the call at trace time, its graph holding the hook); the eager model still calls it."""
    torch.manual_seed(25)
    module = _OnBuffer(torchbp.MLP(SIZES, fused=fused, dtype=torch.float64))
    seen = []
    handle = module.net[0].register_delta_hook(lambda m, delta: seen.append(delta))
    traced = torch.fx.symbolic_trace(module)
    x = torch.randn(N, SIZES[-1], dtype=torch.float64)
    traced(x).pow(2).sum().backward()
    assert not seen
    module(x).pow(2).sum().backward()
    assert len(seen) == 1
    handle.remove()


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_jit_trace_of_a_hooked_model_keeps_no_hook(fused):
    """torch.jit.trace of an MLP with a delta hook: the trace's own check passes (a hook, a new closure at every
    forward, made the two traced graphs differ), the traced module calls no hook (one removed later would still
    have run), and its gradients equal nn.Sequential's (float64, 1e-12); the eager model keeps its hook."""
    torch.manual_seed(24)
    model = torchbp.MLP(SIZES, fused=fused, dtype=torch.float64)
    reference = sequential_like(model)
    x = torch.randn(N, SIZES[0], dtype=torch.float64)
    seen = []
    model[0].register_delta_hook(lambda m, delta: seen.append(delta))
    traced = torch.jit.trace(model, (x,))
    traced(x).pow(2).sum().backward()
    assert not seen
    reference(x).pow(2).sum().backward()
    for p, e in zip(model.parameters(), reference.parameters()):
        close(p.grad, e.grad)
    model(x).sum().backward()
    assert len(seen) == 1


# --------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# --------------------------------------------------------------------------

COMPILE_TOL = 1e-10  # float64; the compiler may fuse and reorder arithmetic, so not bit-exact


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("path", ["unfused", "fused", "fused-cost"])
def test_compile_fullgraph_matches_eager(path, fresh_dynamo):
    """torch.compile(fullgraph=True) traces without graph breaks; output and every gradient equal eager mode."""
    torch.manual_seed(5)
    model = torchbp.MLP(SIZES, fused=path != "unfused", dtype=torch.float64)
    x = torch.randn(N, SIZES[0], dtype=torch.float64, requires_grad=True)
    y = torch.rand(N, SIZES[-1], dtype=torch.float64)
    if path == "fused-cost":
        def run(x):
            return model.cost(x, y)
    else:
        def run(x):
            return model(x).square().sum()
    compiled = torch.compile(run, fullgraph=True)
    c_compiled = compiled(x)
    grads_compiled = torch.autograd.grad(c_compiled, [x, *model.parameters()])
    c_eager = run(x)
    grads_eager = torch.autograd.grad(c_eager, [x, *model.parameters()])
    close(c_compiled, c_eager, COMPILE_TOL, "output")
    for name, g, e in zip(["input", *dict(model.named_parameters())], grads_compiled, grads_eager):
        close(g, e, COMPILE_TOL, name)
    # And eager mode is right: the same as torch.nn's network.
    reference = sequential_like(model)
    expected = oracle_cost(reference(x), y) if path == "fused-cost" else reference(x).square().sum()
    close(c_eager, expected, 1e-12, "eager vs torch.nn")


def test_compiled_fused_cost_of_batches_past_a_block_compiles_once_for_every_size(fresh_dynamo, monkeypatch):
    """Batches larger than the fused backward's block of samples (made 8 here): compiled, the backward takes
    all the samples at once, so after one recompile the graph takes any batch size (a loop over blocks fixed
    the size: one graph per batch size). Gradients equal the per-layer path's in eager mode (1e-12)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(F, "_BLOCK_ELEMENTS", 8 * 8)  # the widest layer is 8 wide: blocks of 8 samples
    torch.manual_seed(16)
    model = torchbp.MLP([5, 8, 3], fused=True, dtype=torch.float64)
    reference = torchbp.MLP([5, 8, 3], dtype=torch.float64)
    reference.load_state_dict(model.state_dict())
    cost = torch.compile(lambda x, y: model.cost(x, y), fullgraph=True)
    graphs = counters["stats"]["unique_graphs"]
    for n in (40, 48, 56):
        x, y = torch.randn(n, 5, dtype=torch.float64), torch.rand(n, 3, dtype=torch.float64)
        model.zero_grad()
        reference.zero_grad()
        cost(x, y).backward()
        reference.cost(x, y).backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            close(p.grad, q.grad, 1e-12, f"{name} at batch {n}")
    assert counters["stats"]["unique_graphs"] - graphs <= 2


def test_compiled_sgd_step_matches_eager(fresh_dynamo):
    """torch.compile(fullgraph=True) of MLP.sgd_step: the in-place updates land on the parameters as in eager mode.

    New data and a new lr at each step, as a schedule gives: after one recompile lr is an input of the
    graph, not one graph per lr (a float alpha pinned it: 4 graphs for 4 lrs, and eager mode after 8), and
    inductor once moved W by the wrong amount (up to 3e-2 here) when an addmm_ and an addmv_ shared a
    symbolic alpha.
    """
    from torch._dynamo.utils import counters

    torch.manual_seed(6)
    eager = torchbp.MLP(SIZES, dtype=torch.float64)
    compiled_model = copy.deepcopy(eager)
    step = torch.compile(compiled_model.sgd_step, fullgraph=True)
    graphs = counters["stats"]["unique_graphs"]
    for i, lr in enumerate([0.5, 0.1, 0.2, 1.0]):
        x = torch.randn(N, SIZES[0], dtype=torch.float64)
        y = torch.rand(N, SIZES[-1], dtype=torch.float64)
        close(step(x, y, lr), eager.sgd_step(x, y, lr), COMPILE_TOL, f"cost of step {i}")
        for (name, p), q in zip(compiled_model.named_parameters(), eager.parameters()):
            close(p, q, COMPILE_TOL, f"{name} after step {i} (lr {lr})")
    assert counters["stats"]["unique_graphs"] - graphs <= 2  # the first lr's graph, then one for any lr
    # An empty batch moves nothing: the mean's 1/N is nan there, and a compiled update would spread it.
    before = copy.deepcopy(compiled_model.state_dict())
    step(torch.randn(0, SIZES[0], dtype=torch.float64), torch.rand(0, SIZES[-1], dtype=torch.float64), 0.5)
    assert all(torch.equal(compiled_model.state_dict()[k], v) for k, v in before.items())


def test_compiled_functional_step_trains_views_of_a_flat_parameter_and_refuses_a_computed_one(fresh_dynamo):
    """torch.compile of mlp_sgd_step on views of one flat leaf (a flat parameter buffer): the buffer moves as in
    eager mode (float64, COMPILE_TOL), and a computed tensor (W * 1, a temporary) is refused as in eager mode.
    Dynamo cannot tell the two apart, so the graph breaks at the check: skipping it under compile trained the
    temporary, silently."""
    torch.manual_seed(7)
    flat = torch.randn(4 * 3 + 3 + 3 * 2 + 2, dtype=torch.float64, requires_grad=True)
    eager_flat = flat.detach().clone().requires_grad_()
    step = torch.compile(torchbp.sgd.mlp_sgd_step)
    start = flat.detach().clone()
    for i in range(2):
        x, y = torch.randn(5, 4, dtype=torch.float64), torch.rand(5, 2, dtype=torch.float64)
        close(step(x, y, *flat_views(flat), 0.5), torchbp.sgd.mlp_sgd_step(x, y, *flat_views(eager_flat), 0.5),
              COMPILE_TOL, f"cost of step {i}")
        close(flat.detach(), eager_flat.detach(), COMPILE_TOL, f"flat buffer after step {i}")
    assert not torch.equal(flat.detach(), start)
    (w1, w2), biases = flat_views(flat)
    with pytest.raises(ValueError, match=r"weights\[0\] must be a parameter or a view of one to be trained in "
                                         r"place, got one computed by MulBackward0"):
        step(x, y, [w1 * 1, w2], biases, 0.5)


# --------------------------------------------------------------------------
# Autocast
# --------------------------------------------------------------------------

_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
AUTOCAST = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16"),
    pytest.param("cuda", torch.float16, id="cuda-float16", marks=_needs_cuda),
    pytest.param("cuda", torch.bfloat16, id="cuda-bfloat16", marks=_needs_cuda),
]
# Relative to the largest value compared. Unit roundoff is 2^-8 ≈ 3.9e-3 (bfloat16) and
# 2^-11 ≈ 4.9e-4 (float16); the hand-written backward rounds in a different order than
# torch's (measured: up to 2 units on the CPU), so allow about 5 units.
AUTOCAST_TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3}


def _close_relative_to_max(actual, expected, tol, what):
    """|actual − expected| ≤ tol · max|expected| elementwise: rounding error scales with the largest value."""
    atol = tol * expected.detach().abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=lambda m: f"{what}: {m}")


def _autocast_models(device, fused):
    torch.manual_seed(6)
    model = torchbp.MLP([20, 16, 10], fused=fused, device=device)  # float32 parameters
    return model, sequential_like(model)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("device, dtype", AUTOCAST)
def test_autocast_forward_matches_torch_nn(device, dtype, fused):
    """Under autocast the network runs in the lower dtype as nn.Sequential does; float32 gradients agree."""
    model, reference = _autocast_models(device, fused)
    x = torch.randn(8, 20, device=device)
    g = torch.randn(8, 10, device=device)
    with torch.autocast(device, dtype=dtype):
        a, a_ref = model(x), reference(x)
    assert a.dtype == a_ref.dtype == dtype
    tol = AUTOCAST_TOL[dtype]
    _close_relative_to_max(a.float(), a_ref.float(), tol, "output")
    a.backward(g.to(a.dtype))
    a_ref.backward(g.to(a_ref.dtype))
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        assert p.grad.dtype == p_ref.grad.dtype == torch.float32
        _close_relative_to_max(p.grad, p_ref.grad, tol, name)


@pytest.mark.parametrize("cost", ["quadratic", "cross_entropy"])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("device, dtype", AUTOCAST)
def test_autocast_cost_matches_torch_nn(device, dtype, fused, cost):
    """MLP.cost under autocast: float32 cost like torch's losses, close to nn.Sequential's; float32 gradients agree."""
    model, reference = _autocast_models(device, fused)
    x = torch.randn(8, 20, device=device)
    y = torch.rand(8, 10, device=device)
    with torch.autocast(device, dtype=dtype):
        c = model.cost(x, y, cost)
        a_ref = reference(x)
    # torch's losses in float32, as autocast runs mse_loss (and CPU's binary_cross_entropy; CUDA's autocast
    # refuses that one, so the reference cost is taken outside it)
    c_ref = oracle_cost(a_ref.float(), y, cost)
    assert c.dtype == c_ref.dtype == torch.float32
    tol = AUTOCAST_TOL[dtype]
    _close_relative_to_max(c, c_ref, tol, "cost")
    c.backward()
    c_ref.backward()
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        assert p.grad.dtype == torch.float32
        _close_relative_to_max(p.grad, p_ref.grad, tol, name)


@pytest.mark.parametrize("device, dtype", AUTOCAST)
def test_autocast_functional_costs_run_in_float32(device, dtype):
    """The costs alone cast a lower-precision a to float32, as autocast does for torch's losses."""
    a = (0.2 + 0.6 * torch.rand(8, 10, device=device)).to(dtype)
    y = torch.rand(8, 10, device=device)
    for fn, cost in ((F.quadratic_cost, "quadratic"), (F.cross_entropy_cost, "cross_entropy")):
        expected = oracle_cost(a.float(), y, cost)  # (outside autocast: CUDA's refuses binary_cross_entropy)
        with torch.autocast(device, dtype=dtype):
            c = fn(a, y)
        assert c.dtype == torch.float32
        close(c, expected, 1e-5, cost)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("device, dtype", AUTOCAST)
def test_autocast_float64_network_with_a_float32_target_costs_as_torch(device, dtype, fused):
    """Under autocast a float64 network's a^L stays float64 and a float32 target stays float32, as torch's
    losses take them: the quadratic cost (mse_loss promotes) is float64 and equals nn.Sequential's (1e-12),
    gradients too; the cross-entropy is refused, as binary_cross_entropy refuses two dtypes."""
    torch.manual_seed(8)
    model = torchbp.MLP([6, 5, 3], fused=fused, dtype=torch.float64, device=device)
    reference = sequential_like(model)
    x = torch.randn(4, 6, dtype=torch.float64, device=device)
    y = torch.rand(4, 3, device=device)  # float32
    with torch.autocast(device, dtype=dtype):
        c, a_ref = model.cost(x, y), reference(x)
        c_ref = oracle_cost(a_ref, y)
        with pytest.raises(RuntimeError, match="target must have the same dtype"):
            model.cost(x, y, "cross_entropy")
    with pytest.raises(RuntimeError):  # torch's own refusal of the two dtypes (outside CUDA's autocast, which bans it)
        TF.binary_cross_entropy(a_ref, y)
    assert c.dtype == c_ref.dtype == torch.float64
    close(c, c_ref)
    c.backward()
    c_ref.backward()
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        close(p.grad, p_ref.grad, what=name)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("device, dtype", AUTOCAST)
def test_autocast_leaves_float64_alone(device, dtype, fused):
    """Autocast never casts a float64 tensor: a float64 network and its cost run in float64, as torch.nn's do."""
    torch.manual_seed(7)
    model = torchbp.MLP([6, 5, 3], fused=fused, dtype=torch.float64, device=device)
    reference = sequential_like(model)
    x = torch.randn(4, 6, dtype=torch.float64, device=device)
    y = torch.rand(4, 3, dtype=torch.float64, device=device)
    with torch.autocast(device, dtype=dtype):
        a, a_ref = model(x), reference(x)
        c = model.cost(x, y, "cross_entropy")
        q = F.quadratic_cost(a, y)
    c_ref = TF.binary_cross_entropy(a_ref, y, reduction="sum") / 4  # (outside: CUDA's autocast refuses it)
    assert a.dtype == a_ref.dtype == c.dtype == c_ref.dtype == q.dtype == torch.float64
    close(a, a_ref)
    close(c, c_ref)
