import pytest
import torch

# pytest runs two workers on CI's two cores: one intra-op thread each, or they oversubscribe the
# cores (measured: a digits training step 26 ms with one thread, 800 ms with two per worker)
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    """Every test draws the same random weights and inputs, whatever ran before it."""
    torch.manual_seed(0)
