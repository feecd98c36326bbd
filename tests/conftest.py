import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test draws the same random weights and inputs, whatever ran before it."""
    torch.manual_seed(0)
