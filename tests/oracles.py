"""The oracles the tests share: the notes' network and costs written with torch.nn and torch's own ops."""

from __future__ import annotations

import torch
from torch import nn

import torchbp


def close(actual, expected, tol=1e-12, what=""):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}" if what else m)


def nn_sequential(sizes, bias=True, dtype=None, device=None) -> nn.Sequential:
    """``nn.Sequential(nn.Linear, nn.Sigmoid, ...)`` for the layer widths ``sizes``, input first."""
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out, bias=bias, dtype=dtype, device=device), nn.Sigmoid()]
    return nn.Sequential(*layers)


class Unsorted(nn.Module):
    """A 4 -> 5 -> 3 sigmoid network in torch.nn whose Linear layers are registered as z_hidden then a_out:
    registration order is not sorted order (for code that must keep layers apart by name)."""

    def __init__(self, dtype=None):
        super().__init__()
        self.z_hidden = nn.Linear(4, 5, dtype=dtype)
        self.act = nn.Sigmoid()
        self.a_out = nn.Linear(5, 3, dtype=dtype)

    def forward(self, x):
        return self.a_out(self.act(self.z_hidden(x)))


def sequential_like(model: torchbp.MLP) -> nn.Sequential:
    """The torch.nn network with the same layers, loaded from ``model``'s state_dict (strict)."""
    weight = model.linears[0].weight
    reference = nn_sequential(model.sizes, model.linears[0].bias is not None, weight.dtype, weight.device)
    reference.load_state_dict(model.state_dict(), strict=True)
    return reference


def oracle_cost(a, y, cost="quadratic", reduction="mean"):
    """The notes' C = ½‖a − y‖² (or the cross entropy) per sample, reduced over samples, with torch ops."""
    if cost == "quadratic":
        c = 0.5 * ((a - y) ** 2).sum(-1)
    else:
        c = nn.functional.binary_cross_entropy(a, y, reduction="none").sum(-1)
    return {"mean": c.mean, "sum": c.sum, "none": lambda: c}[reduction]()


def flat_views(flat: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The weights and biases of a [4, 3, 2] network as views of one flat tensor of 23 elements (a flat
    parameter buffer): ([W^1 (3, 4), W^2 (2, 3)], [b^1 (3,), b^2 (2,)])."""
    w1, b1, w2, b2 = flat.split([12, 3, 6, 2])
    return [w1.view(3, 4), w2.view(2, 3)], [b1, b2]


def nn_deltas(ref: nn.Module, x, y, cost="quadratic", reduction="mean") -> dict[str, torch.Tensor]:
    """δ = ∂C/∂z of every nn.Linear of ``ref`` (by name, in the order they run) for :func:`oracle_cost`, from
    torch's autograd, z caught by forward hooks."""
    zs = {}
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: zs.__setitem__(n, o))
               for n, m in ref.named_modules() if isinstance(m, nn.Linear)]
    c = oracle_cost(ref(x), y, cost, reduction)
    deltas = dict(zip(zs, torch.autograd.grad(c, list(zs.values()))))
    for h in handles:
        h.remove()
    return deltas
