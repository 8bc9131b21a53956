import os
import sys

# Tests import ppap, eval and ext from the repository root, however pytest is started.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda_build: compiles the CUDA sources with nvcc (no GPU needed)")
