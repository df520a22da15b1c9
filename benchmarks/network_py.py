"""The book's own algorithm, network.py's mini-batch step, in numpy: the baseline for the Nielsen epoch.

Nielsen's ``network.py`` (chapter 1) backpropagates one sample at a time,
with column vectors and float64 parameters, sums the per-sample gradients
over the mini-batch and moves every parameter by ``η/m`` times the sum. It is
the reference the speed issue is set against ("half of network.py's epoch on
this machine"), so the benchmark runs the same algorithm here rather than
quoting a figure taken on another day. ``tests/test_sgd_step.py`` checks that
one of its steps equals :meth:`torchbp.MLP.sgd_step`.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def sigmoid_prime(z: np.ndarray) -> np.ndarray:
    s = sigmoid(z)
    return s * (1 - s)  # φ'(z) = φ(z)(1 − φ(z))


class Network:
    """``weights[l]``: (out, in), ``biases[l]``: (out, 1), float64, as network.py keeps them."""

    def __init__(self, weights: list[Tensor], biases: list[Tensor]) -> None:
        self.weights = [w.detach().double().numpy().copy() for w in weights]
        self.biases = [b.detach().double().numpy().reshape(-1, 1).copy() for b in biases]

    def update_mini_batch(self, x: np.ndarray, y: np.ndarray, eta: float) -> None:
        """One SGD step on the samples ``x`` (m, in) with targets ``y`` (m, out)."""
        nabla_b = [np.zeros(b.shape) for b in self.biases]
        nabla_w = [np.zeros(w.shape) for w in self.weights]
        for x_n, y_n in zip(x, y):
            delta_b, delta_w = self.backprop(x_n.reshape(-1, 1), y_n.reshape(-1, 1))
            nabla_b = [nb + db for nb, db in zip(nabla_b, delta_b)]
            nabla_w = [nw + dw for nw, dw in zip(nabla_w, delta_w)]
        m = len(x)
        self.weights = [w - (eta / m) * nw for w, nw in zip(self.weights, nabla_w)]
        self.biases = [b - (eta / m) * nb for b, nb in zip(self.biases, nabla_b)]

    def backprop(self, x: np.ndarray, y: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """∇_b C and ∇_W C of one sample's quadratic cost: the notes' four equations."""
        activation, activations, zs = x, [x], []
        for b, w in zip(self.biases, self.weights):
            z = w @ activation + b  # z^l = W^l a^{l-1} + b^l
            zs.append(z)
            activation = sigmoid(z)
            activations.append(activation)
        nabla_b: list[np.ndarray] = [np.empty(0)] * len(self.weights)
        nabla_w: list[np.ndarray] = [np.empty(0)] * len(self.weights)
        delta = (activations[-1] - y) * sigmoid_prime(zs[-1])  # δ^L = (a^L − y) ∘ φ'(z^L)
        for l in range(1, len(self.weights) + 1):  # from the output layer down
            if l > 1:
                delta = (self.weights[-l + 1].T @ delta) * sigmoid_prime(zs[-l])  # δ^{l-1} = φ' ∘ (W^l)^T δ^l
            nabla_b[-l] = delta  # ∇_b C = δ
            nabla_w[-l] = delta @ activations[-l - 1].T  # ∇_W C = δ (a^{l-1})^T
        return nabla_b, nabla_w
