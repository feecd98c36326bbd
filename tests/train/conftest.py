import pytest
import torch


@pytest.fixture(scope="session")
def digits():
    """A trained digits CNN (eval mode) and its data: (model, (x_train, y_train, x_test, y_test))."""
    from fxpress.demo import train_digits_cnn

    torch.manual_seed(0)
    model, data = train_digits_cnn(epochs=8, progress=False)
    for p in model.parameters():
        p.requires_grad_(True)
    return model, data
