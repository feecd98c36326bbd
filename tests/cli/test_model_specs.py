"""``package.module:callable`` model and data specs (the CLI's ``inspect`` / ``compress``)."""

import sys

import pytest
import torch

from fxpress.zoo import ModelSpecError, load_data, load_model

PACKAGE = '''
import torch

def factory():
    return torch.nn.Linear(4, 2), (torch.randn(1, 4),)

def batches():
    return [(torch.randn(2, 4),) for _ in range(3)]
'''


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "models.py").write_text(PACKAGE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
        del sys.modules[name]


def test_a_package_in_the_current_directory_is_found(user_package):
    model, inputs = load_model("mypkg.models:factory")
    assert isinstance(model, torch.nn.Linear) and inputs[0].shape == (1, 4)
    assert len(load_data("mypkg.models:batches", inputs)) == 3


def test_a_missing_module_or_callable_is_explained(user_package):
    with pytest.raises(ModelSpecError, match="has no callable 'missing'"):
        load_model("mypkg.models:missing")
    with pytest.raises(ModelSpecError, match=r"cannot import 'nothere\.models' .* current directory .*PYTHONPATH"):
        load_model("nothere.models:factory")
