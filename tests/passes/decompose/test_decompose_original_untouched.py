"""Training a decomposed model never changes the original (the layers decompose leaves alone are copies)."""

import torch

import fxpress
from fxpress.demo import DigitsCNN


def test_training_the_result_leaves_the_original_alone():
    torch.manual_seed(0)
    model = DigitsCNN(width=8).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = fxpress.decompose(model, (torch.rand(4, 1, 8, 8),), layers=["conv2d_1"], rank=0.5, progress=False)
    assert len(fxpress.decompose_report(small).decomposed) == 1  # the other layers are kept as they were
    opt = torch.optim.SGD(small.parameters(), lr=0.1)
    small.train()
    small(torch.rand(8, 1, 8, 8)).sum().backward()
    opt.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], msg=k)
