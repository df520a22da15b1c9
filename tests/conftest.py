"""Shared fixtures for the torchbp test suite."""

import pytest
import torch

_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=_needs_cuda)])
def device(request) -> torch.device:
    """Every device the test should run on: the CPU always, CUDA where there is one (skipped otherwise)."""
    return torch.device(request.param)
