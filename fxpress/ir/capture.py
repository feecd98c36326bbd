"""Capture a model as fxpress's IR: the ATen-level FX GraphModule that torch.export gives.

``capture(model, args)`` tries non-strict ``torch.export`` first (it handles far more Python than
strict tracing), then strict, and raises a ``CaptureError`` that names what failed and how to fix
it. The batch dimension (dim 0 of every tensor input) is dynamic by default, because example inputs
are only a sample: a model captured from one image must run on a batch of 500. A model that
specializes its batch size is captured static with one warning that says so.

The result checks its inputs on every call (``input_check.py``): a wrong number of inputs, dtype, rank
or static size raises ``InputMismatchError`` naming the input and the dim, for a few µs a call instead
of the ~0.1 ms of torch.export's own check.

Every node of the result carries ``meta["val"]`` (a FakeTensor, or a tuple/SymInt for multi-output
and size nodes); the sizes are symbolic where the dimension is dynamic and have the sample's value
as their hint.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import warnings
from typing import Any

import torch
import torch.fx.experimental._config as fx_config
from torch.export import Dim
from torch.utils import _pytree as pytree

from .input_check import InputMismatchError, install_input_check
from .mode import enable_train_eval

__all__ = ["CaptureError", "InputMismatchError", "capture", "normalize_inputs", "dynamic_dims", "dynamic_shapes_of"]


class CaptureError(RuntimeError):
    """The model could not be captured as a graph; the message says what failed and how to fix it."""


_HINTS = [
    (
        re.compile(r"data.dependent|GuardOnDataDependentSymNode|Could not guard on data-dependent", re.I),
        "the model branches or indexes on the *values* of a tensor (data-dependent control flow). "
        "Rewrite the branch with torch.cond(pred, true_fn, false_fn, operands), or compute it from "
        "shapes instead of values.",
    ),
    (
        re.compile(r"Constraints violated|specialized|ConstraintViolation|conflicts between user-specified", re.I),
        "the dynamic dimensions asked for cannot be kept dynamic. Pass dynamic_batch=False, or give "
        "dynamic_shapes=... explicitly (see torch.export.Dim).",
    ),
    (
        re.compile(r"Unsupported|graph break|not supported", re.I),
        "a Python construct in forward() is not traceable. Move it out of forward(), or wrap the "
        "untraceable helper so it runs on tensors only.",
    ),
]


def normalize_inputs(args: Any) -> tuple:
    """Return the example inputs as a tuple; a lone tensor is wrapped. Wrong types raise TypeError."""
    if isinstance(args, torch.Tensor):
        return (args,)
    if isinstance(args, list):
        args = tuple(args)
    if not isinstance(args, tuple):
        raise TypeError(
            f"example inputs must be a tensor or a tuple of inputs for forward(), got {type(args).__name__}. "
            "Pass e.g. (torch.randn(1, 3, 224, 224),)."
        )
    if not any(isinstance(a, torch.Tensor) for a in pytree.tree_leaves(args)):
        raise TypeError(
            "example inputs contain no tensor: capture needs at least one sample tensor, "
            f"got {tuple(type(a).__name__ for a in args)}."
        )
    return args


def _batch_dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    def spec(x):
        return {0: Dim.DYNAMIC} if isinstance(x, torch.Tensor) and x.dim() > 0 else None

    # torch.export matches the specs to forward()'s signature: key them by parameter name, so that
    # keyword inputs and `forward(self, *xs)` (whose inputs arrive as one tuple) line up too
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return pytree.tree_map(spec, args) if not kwargs else None
    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


def dynamic_dims(gm: torch.fx.GraphModule) -> list[tuple[int, ...]]:
    """For each placeholder of a captured graph, the dimensions whose size is symbolic."""
    out = []
    for n in gm.graph.find_nodes(op="placeholder"):
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            out.append(tuple(i for i, s in enumerate(val.shape) if isinstance(s, torch.SymInt)))
        else:
            out.append(())
    return out


def dynamic_shapes_of(gm: torch.fx.GraphModule) -> tuple | None:
    """A ``dynamic_shapes`` tuple reproducing the symbolic dims of a captured graph (or None if static)."""
    dims = dynamic_dims(gm)
    if not any(dims):
        return None
    return tuple({d: Dim.DYNAMIC for d in ds} if ds else None for ds in dims)


def _first_line(exc: BaseException, limit: int = 600) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    text = text.split("\n\nThe following call raised", 1)[0]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    short = "\n    ".join(lines[:6])
    return short[:limit] + ("..." if len(short) > limit else "")


def _hint(messages: list[str]) -> str:
    joined = "\n".join(messages)
    for pattern, hint in _HINTS:
        if pattern.search(joined):
            return hint
    return "simplify forward() around the construct named above, or capture a sub-module that traces."


def _fresh(tree: Any) -> Any:
    """New tensor objects sharing the sample's storage.

    torch.export marks the example tensors' Python objects with its dynamic dims
    (``_dynamo_dynamic_indices`` ...) and a failed export leaves the marks behind: a static retry
    on the same objects then fails with the same "Constraints violated", and the user's tensors
    stay marked. Each attempt therefore gets its own objects.
    """

    def fresh(x):
        return x.detach().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x

    return pytree.tree_map(fresh, tree)


def _export(model, args, kwargs, dynamic_shapes, strict):
    # Size-oblivious reasoning keeps a sample batch of 1 from being specialized to the constant 1.
    ctx = fx_config.patch(backed_size_oblivious=True) if dynamic_shapes is not None else contextlib.nullcontext()
    args, kwargs = _fresh(args), _fresh(kwargs)
    with ctx, warnings.catch_warnings(), _quiet_fake_tensor_log():
        warnings.filterwarnings("ignore", message=".*(training mode|not in eval).*")
        return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)


@contextlib.contextmanager
def _quiet_fake_tensor_log():
    # A failing op logs a full traceback at ERROR level before the exception we turn into a
    # CaptureError; the user gets that error (with the fix), not two screens of torch internals.
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def capture(
    model: torch.nn.Module,
    args: Any,
    kwargs: dict | None = None,
    *,
    dynamic_batch: bool = True,
    dynamic_shapes: Any = None,
    strict: bool | None = None,
    share_weights: bool = True,
) -> torch.fx.GraphModule:
    """Capture ``model`` called on the sample ``args``/``kwargs`` as an ATen-level GraphModule.

    dynamic_batch: make dim 0 of every tensor input dynamic (ignored when ``dynamic_shapes`` is given).
    dynamic_shapes: passed to ``torch.export.export`` as is.
    strict: force strict (True) or non-strict (False) tracing; by default non-strict, then strict.
    share_weights: the graph uses the model's own parameter and buffer tensors (no copy). False gives
        it copies, so training or editing the graph in place never changes ``model``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"capture() takes a torch.nn.Module, got {type(model).__name__}.")
    args = normalize_inputs(args)
    kwargs = dict(kwargs or {})
    auto_dynamic = dynamic_shapes is None and dynamic_batch
    if auto_dynamic:
        dynamic_shapes = _batch_dynamic_shapes(model, args, kwargs)

    modes = [strict] if strict is not None else [False, True]
    errors: list[str] = []
    for mode in modes:
        try:
            ep = _export(model, args, kwargs, dynamic_shapes, mode)
        except Exception as exc:  # noqa: BLE001 - every failure is reported below
            if auto_dynamic and _is_dynamic_failure(exc):
                try:
                    ep = _export(model, args, kwargs, None, mode)
                except Exception as exc2:  # noqa: BLE001
                    errors.append(f"{'strict' if mode else 'non-strict'} export: {_first_line(exc2)}")
                    continue
                warnings.warn(
                    f"fxpress.capture: {type(model).__name__} fixes its batch size in forward() (e.g. a reshape to a "
                    "constant batch), so it was captured with static shapes and the result only runs on inputs "
                    "shaped like the sample. Make the code batch-agnostic (reshape(x.shape[0], ...) or -1) to get "
                    "a dynamic batch.",
                    stacklevel=2,
                )
            else:
                errors.append(f"{'strict' if mode else 'non-strict'} export: {_first_line(exc)}")
                if not errors[1:]:
                    _raise_if_eager_fails(model, args, kwargs)
                continue
        gm = _finish(ep, model)
        return gm if share_weights else _own_weights(gm, model)
    raise CaptureError(
        f"could not capture {type(model).__name__} with torch.export.\n  "
        + "\n  ".join(errors)
        + f"\nHow to fix: {_hint(errors)}"
    )


def _own_weights(gm: torch.fx.GraphModule, model: torch.nn.Module) -> torch.fx.GraphModule:
    """Replace every tensor ``gm`` shares with ``model`` by a copy."""
    shared = {id(t) for t in (*model.parameters(), *model.buffers())}
    for name, t in [*gm.named_parameters(), *gm.named_buffers()]:
        if id(t) in shared:
            owner_path, _, attr = name.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            copy = t.detach().clone()
            setattr(owner, attr, torch.nn.Parameter(copy, t.requires_grad) if isinstance(t, torch.nn.Parameter) else copy)
    return gm


def _describe_inputs(args: tuple, kwargs: dict) -> str:
    def one(x):
        return f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" if isinstance(x, torch.Tensor) else type(x).__name__

    parts = [one(a) for a in pytree.tree_leaves(args)] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return ", ".join(parts)


def _raise_if_eager_fails(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """When tracing fails, tell apart a model that fails on these inputs even in eager mode."""
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise CaptureError(
            f"{type(model).__name__} fails on the example inputs even without tracing: {_first_line(exc, 300)}\n"
            f"Example inputs: {_describe_inputs(args, kwargs)}.\n"
            "How to fix: pass example inputs with the shapes and dtypes forward() expects."
        ) from exc


def _is_dynamic_failure(exc: BaseException) -> bool:
    text = str(exc)
    return bool(re.search(r"specializ|Constraints violated|conflicts between user-specified|Dim\.", text))


def _finish(ep: torch.export.ExportedProgram, model: torch.nn.Module) -> torch.fx.GraphModule:
    gm = ep.module(check_guards=False)  # our passes and exporters want a plain graph of ATen calls
    # The unlifted module refuses .train()/.eval(); ours switch the ops' mode flags (ir/mode.py).
    enable_train_eval(gm)
    torch.nn.Module.train(gm, model.training)
    gm.meta["fxpress"] = {"source": type(model).__name__}
    # torch.export's per-call input check costs ~0.1 ms; ours costs a few µs and says how to fix a bad input
    install_input_check(gm)
    return gm
