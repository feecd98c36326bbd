"""Resolve a model named on the command line to ``(model in eval mode, example inputs)``.

Specs:
  ``digits``                      the embedded DigitsCNN (trained in seconds on bundled data)
  ``torchvision:NAME`` or ``NAME`` a torchvision classification model with random weights
  ``package.module:callable``      your own factory; it returns a model, or ``(model, example_inputs)``
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

__all__ = ["ModelSpecError", "load_model"]


class ModelSpecError(ValueError):
    """The model spec could not be resolved; the message says which form was expected."""


_INPUT_SIZE = {"inception_v3": 299}


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise ModelSpecError(f"--input-shape {text!r} is not a list of integers like 1,3,224,224") from None
    if not shape or any(s <= 0 for s in shape):
        raise ModelSpecError(f"--input-shape {text!r} must be positive integers like 1,3,224,224")
    return shape


def load_model(spec: str, input_shape: str | None = None) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    shape = _parse_shape(input_shape) if input_shape else None
    if spec == "digits":
        from .demo import train_digits_cnn

        model, data = train_digits_cnn(progress=False)
        return model, (torch.randn(shape) if shape else data[2][:1],)
    if ":" in spec and not spec.startswith("torchvision:"):
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ModelSpecError(f"cannot import {module_name!r} from model spec {spec!r}: {exc}") from exc
        factory = getattr(module, attr, None)
        if factory is None or not callable(factory):
            raise ModelSpecError(f"{module_name!r} has no callable {attr!r} (model spec {spec!r})")
        made = factory()
        if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
            model, inputs = made
            inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        elif isinstance(made, torch.nn.Module):
            if shape is None:
                raise ModelSpecError(f"{spec} returned a model without example inputs: pass --input-shape, e.g. 1,3,224,224")
            model, inputs = made, (torch.randn(shape),)
        else:
            raise ModelSpecError(f"{spec} returned {type(made).__name__}; expected a model or (model, example_inputs)")
        if shape is not None:
            inputs = (torch.randn(shape),)
        return model.eval(), inputs
    name = spec.removeprefix("torchvision:")
    try:
        import torchvision
    except ImportError as exc:
        raise ModelSpecError(f"{spec!r} names a torchvision model, but torchvision is not installed: pip install 'fxpress[models]'") from exc
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        import difflib

        close = difflib.get_close_matches(name, available, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelSpecError(
            f"unknown model {spec!r}.{hint} Give a torchvision classification model name, 'digits', or package.module:factory."
        )
    model = torchvision.models.get_model(name, weights=None)
    size = _INPUT_SIZE.get(name, 224)
    return model.eval(), (torch.randn(shape or (1, 3, size, size)),)
