"""Resolve a model named on the command line to ``(model in eval mode, example inputs)``.

Specs:
  ``digits``                      the embedded DigitsCNN (trained in seconds on bundled data)
  ``torchvision:NAME`` or ``NAME`` a torchvision classification model with random weights
  ``transformers:TYPE[:k=v,...]``  a transformers model built from its config with random weights (nothing
                                  downloaded): TYPE is a model type ("bert", "gpt2", "llama") or a config
                                  class ("BertConfig"); k=v override config fields (num_hidden_layers=2).
                                  Encoders get a sequence-classification head, decoders a causal-LM head;
                                  the model returns the logits. Example input: token ids of shape (1, 32).
  ``package.module:callable``      your own factory; it returns a model, or ``(model, example_inputs)``

Data specs (``load_data``, for calibration / training / evaluation batches):
  ``digits``                      scikit-learn's bundled 8x8 digits as (images, labels) batches, resized and
                                  replicated to the model's C x H x W for image models other than DigitsCNN
  ``random``                      random batches shaped like the example inputs (no labels)
  ``package.module:callable``      your own function returning an iterable of batches
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import torch

__all__ = ["ModelSpecError", "load_model", "load_data", "digits_accuracy"]


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


def _user_callable(spec: str, what: str):
    """The callable a ``package.module:callable`` spec names, imported as ``python -m`` would: the
    current directory comes first on ``sys.path``, so a user's own package next to them is found."""
    module_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(
            f"cannot import {module_name!r} from {what} spec {spec!r}: {exc} (looked in the current directory {cwd} "
            "and on sys.path; run from the folder that holds the package, or add it to PYTHONPATH)"
        ) from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelSpecError(f"{module_name!r} has no callable {attr!r} ({what} spec {spec!r})")
    return factory


def load_model(spec: str, input_shape: str | None = None) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    shape = _parse_shape(input_shape) if input_shape else None
    if spec == "digits":
        from .demo import train_digits_cnn

        model, data = train_digits_cnn(progress=False)
        return model, (torch.randn(shape) if shape else data[2][:1],)
    if spec.startswith("transformers:"):
        return _transformers_model(spec, shape)
    if ":" in spec and not spec.startswith("torchvision:"):
        made = _user_callable(spec, "model")()
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


# ---------------------------------------------------------------------------------------------
# transformers models from a config (random weights)

_TINY_SEQ = 32


class _Logits(torch.nn.Module):
    """A transformers model that takes token ids and returns its logits (one tensor)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits


def _parse_overrides(text: str, spec: str) -> dict[str, Any]:
    import ast

    out: dict[str, Any] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ModelSpecError(f"{spec!r}: config overrides are key=value pairs separated by commas, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def _transformers_model(spec: str, shape: tuple[int, ...] | None) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    _, _, rest = spec.partition(":")
    name, _, overrides_text = rest.partition(":")
    overrides = _parse_overrides(overrides_text, spec)
    try:
        import transformers
    except ImportError as exc:
        raise ModelSpecError(f"{spec!r} names a transformers model, but transformers is not installed: pip install 'fxpress[models]'") from exc
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_cls = getattr(transformers, name, None) if name.endswith("Config") else None
    if config_cls is None:
        if name not in CONFIG_MAPPING:
            import difflib

            close = difflib.get_close_matches(name, list(CONFIG_MAPPING.keys()), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ModelSpecError(f"unknown transformers model type {name!r} in {spec!r}.{hint} Give a model type such as bert, gpt2, llama, or a config class name.")
        config_cls = CONFIG_MAPPING[name]
    try:
        config = config_cls(**overrides)
    except TypeError as exc:
        raise ModelSpecError(f"{spec!r}: {exc}") from None
    if hasattr(config, "use_cache"):
        config.use_cache = False
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    try:
        if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise ModelSpecError(f"{spec!r}: fxpress builds sequence-classification or causal-LM models from a config: {exc}") from None
    seq_shape = shape or (1, min(_TINY_SEQ, getattr(config, "max_position_embeddings", _TINY_SEQ) or _TINY_SEQ))
    vocab = int(getattr(config, "vocab_size", 100))
    ids = torch.randint(0, vocab, seq_shape, generator=torch.Generator().manual_seed(0))
    return _Logits(model).eval(), (ids,)


# ---------------------------------------------------------------------------------------------
# data


def _digits_images(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Digits images (N, 1, 8, 8) resized and replicated to ``like``'s (C, H, W), same dtype."""
    if like.dim() != 4 or not like.is_floating_point():
        raise ModelSpecError(
            f"the digits data are images (N, 1, 8, 8), but the model takes {tuple(like.shape)} {like.dtype}; "
            "use --calib random, or your own module:loader"
        )
    c, h, w = like.shape[1:]
    if (h, w) != (8, 8):
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    if c != 1:
        x = x.expand(-1, c, -1, -1).contiguous()
    return x.to(like.dtype)


def load_data(spec: str, example_inputs: tuple, *, split: str = "train", batch_size: int = 32, batches: int | None = None, seed: int = 0) -> list:
    """Batches for calibration / training ("train" split) or evaluation ("test" split), see the data specs above.

    digits: (images, labels) tuples. random: tuples of inputs shaped like ``example_inputs`` with the
    batch size (``batches`` of them, default 8). module:callable: whatever it returns (called with no
    arguments), as a list when it is a one-shot iterator.
    """
    if spec == "digits":
        from .demo import load_digits_tensors

        x_train, y_train, x_test, y_test = load_digits_tensors(seed)
        x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
        x = _digits_images(x, example_inputs[0])
        out = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return out[:batches] if batches else out
    if spec == "random":
        gen = torch.Generator().manual_seed(seed + (0 if split == "train" else 1))
        out = []
        for _ in range(batches or 8):
            batch = []
            for x in example_inputs:
                shape = (batch_size, *x.shape[1:])
                if x.is_floating_point():
                    batch.append(torch.randn(shape, generator=gen).to(x.dtype))
                else:
                    high = int(x.max()) + 1 if x.numel() else 2
                    batch.append(torch.randint(0, max(high, 2), shape, generator=gen).to(x.dtype))
            out.append(tuple(batch))
        return out
    if ":" not in spec:
        raise ModelSpecError(f"unknown data {spec!r}: give 'digits', 'random', or package.module:callable returning batches")
    data = _user_callable(spec, "data")()
    if iter(data) is data:
        data = list(data)
    return data


def digits_accuracy(model: torch.nn.Module, like: torch.Tensor | None = None) -> float:
    """Accuracy (%) on the held-out digits (the split ``load_data("digits", split="test")`` gives)."""
    from .demo import accuracy, load_digits_tensors

    _, _, x_test, y_test = load_digits_tensors(0)
    if like is not None:
        x_test = _digits_images(x_test, like)
    return accuracy(model, x_test, y_test)
