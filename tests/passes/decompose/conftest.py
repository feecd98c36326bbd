import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run small kernels: one intra-op thread. On a shared, loaded CI box two spinning
    OpenMP threads made a digits training step 30x slower (800 ms vs 26 ms, measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
