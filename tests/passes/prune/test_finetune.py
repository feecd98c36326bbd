"""A pruned graph trains like an eager module: the issue's digits target (prune 0.5, fine-tune, lose <= 1 point)."""

import torch

import fxpress
from fxpress.demo import accuracy, fit, train_digits_cnn


def test_digits_pruned_half_and_fine_tuned_loses_at_most_one_point():
    model, (x_train, y_train, x_test, y_test) = train_digits_cnn(progress=False)
    before = accuracy(model, x_test, y_test)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    pruned = fxpress.prune(model, (x_train[:8],), ratio=0.5)
    assert fxpress.prune_report(pruned).macs_ratio < 0.4
    torch.manual_seed(0)
    fit(pruned, x_train, y_train, epochs=5, lr=3e-3, progress=False)

    after = accuracy(pruned, x_test, y_test)
    assert not pruned.training
    assert after >= before - 1.0, (before, after)
    # fine-tuning the pruned graph never touched the original model's tensors
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
