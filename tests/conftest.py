"""Shared fixtures for the torchbp test suite."""

import pytest
import torch

_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=_needs_cuda)])
def device(request) -> torch.device:
    """Every device the test should run on: the CPU always, CUDA where there is one (skipped otherwise)."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seeded():
    """Each test starts from the same torch seed (torch seeds itself at random in every process), so that a
    test that draws without a seed of its own sees the same numbers in every run."""
    torch.manual_seed(0)
