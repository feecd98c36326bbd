"""Shared fixtures for the product-surface tests: one thread per process (the tests run two at a
time on small models, where extra threads only contend), a digits CNN trained once."""

import pytest
import torch


@pytest.fixture(scope="session")
def digits():
    """(trained DigitsCNN in eval mode, example inputs, calibration batches, labelled train batches, test x, test y)."""
    from fxpress.demo import train_digits_cnn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, (x_train, y_train, x_test, y_test) = train_digits_cnn(epochs=4, progress=False)
    finally:
        torch.set_num_threads(threads)
    calibration = [x_train[i : i + 32] for i in range(0, 32 * 8, 32)]
    train = [(x_train[i : i + 64], y_train[i : i + 64]) for i in range(0, len(x_train), 64)]
    return model, (x_test[:1],), calibration, train, x_test, y_test
