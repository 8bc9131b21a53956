import os
import sys

import pytest

# Tests import ppap, eval and ext from the repository root, however pytest is started.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda_build: compiles the CUDA sources with nvcc (no GPU needed)")


@pytest.fixture
def matmul_precision():
    """torch.set_float32_matmul_precision, restored after the test."""
    import torch

    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)
