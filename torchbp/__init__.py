"""torchbp: the notes' backpropagation as custom autograd Functions and drop-in torch.nn modules."""

from torchbp import functional, sgd
from torchbp.nn import MLP, CrossEntropyCost, Linear, QuadraticCost, Sigmoid, convert
from torchbp.monitor import DeltaMonitor

__all__ = [
    "functional", "sgd", "Linear", "Sigmoid", "QuadraticCost", "CrossEntropyCost", "MLP", "convert", "DeltaMonitor",
]
__version__ = "0.1.0"
