"""Recipes: an ordered list of compression stages, written in TOML or built in Python, applied in one call.

    recipe = fxpress.Recipe.load("cnn-int8")                 # a shipped recipe by name, or .from_file("my.toml")
    recipe = fxpress.Recipe([Prune(0.5), Decompose(budget={"params": 0.5}), Distill(epochs=3), Quantize("int8_static")])
    result = recipe.apply(model, (x,), calibration=loader, train_data=loader)
    result.model, result.report                        # the compressed graph; a CompressionReport
    result.write("out/")                               # model.pt2, model.onnx, report.{html,md,json}, recipe.toml, run.json

The TOML format (read with the standard library's ``tomllib``)::

    [recipe]
    name = "cnn-prune-int8"
    description = "half the channels, then static int8"
    seed = 0                      # torch's RNG is seeded with seed + stage index before every stage

    [[stage]]
    kind = "prune"                # prune | sparsify | decompose | distill | finetune | quantize | qat
    ratio = 0.5                   # every other key is an option of the stage's function
    round_to = 8

    [[stage]]
    kind = "quantize"
    config = "int8_static"        # or an inline table: {default = "int8_static", ignore = ["fc"]}
    max_batches = 16

Each stage maps to a user function and its options are that function's keyword arguments, checked
against its signature (``inspect.signature``): an unknown key is an error naming the stage and the
key, with the closest known keys (difflib); a value of the wrong type is an error naming the key and
the type it takes; the functions' own value checks run before anything is computed. The model,
example inputs, calibration and training data, teacher and progress flag are supplied by ``apply``
and cannot be set in a recipe.

======== =================================== ==========================================================
kind     function                            data it uses
======== =================================== ==========================================================
prune    ``fxpress.prune``                   --
sparsify ``fxpress.sparsify``                calibration (only with ``importance = "wanda"``)
decompose ``fxpress.decompose``              calibration (data-aware SVD and errors; optional)
distill  ``fxpress.train.distill``           train_data (teacher: the original model)
finetune ``fxpress.recipe.finetune``         train_data (labels: cross entropy)
quantize ``fxpress.quantize``                calibration (static int8; dynamic / weight-only need none)
qat      ``fxpress.train.quantize_qat``      train_data (teacher: the original model; calibration
                                             if given, else the training data's inputs)
======== =================================== ==========================================================

``quantize`` or ``qat`` must be the last stage (the other stages take float graphs). A stage whose module is
not in this installation raises a ``RecipeError`` naming the stage. A run records what it did
(the recipe, the fxpress/torch/Python versions, the seed, the stage timings) in its report and, with
``result.write(out)``, next to its outputs (``recipe.toml``, ``run.json``), so it can be repeated.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import math
import os
import platform
import sys
import time
import types
import typing
from collections.abc import Callable as _AbcCallable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

__all__ = [
    "Recipe", "RecipeError", "RecipeResult", "Stage", "Prune", "Sparsify", "Decompose", "Distill", "FineTune", "Quantize", "QAT",
    "STAGES", "finetune", "dict_to_toml",
]


class RecipeError(ValueError):
    """A recipe is malformed: the message names the recipe, the stage and the key."""


class StageError(RuntimeError):
    """A stage failed while running: the message names it and the stages that ran before it."""


# ---------------------------------------------------------------------------------------------
# the fine-tune stage's function (fxpress.demo.fit takes tensors; a recipe gets a loader)


def finetune(
    model: nn.Module,
    data: Iterable,
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup: float = 0.1,
    max_steps: int | None = None,
    shuffle: bool = True,
    progress: bool = True,
) -> nn.Module:
    """Train ``model`` (a graph from fxpress or an eager module) on ``data`` batches of (inputs..., labels)
    with Adam and cross entropy, the learning rate rising linearly over the first ``warmup`` fraction
    of the steps, then decaying to zero on a cosine (``fxpress.train.distill.lr_schedule``, as
    ``distill``); return it in eval mode.

    max_steps: stop each epoch after this many batches. shuffle: visit a list of batches in a new
    random order every epoch (torch's RNG; a DataLoader shuffles itself).
    """
    from tqdm.auto import tqdm

    from .train.distill import lr_schedule

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if epochs > 1 and iter(data) is data:
        raise ValueError("data is a one-shot iterator, but finetune reads it once per epoch: give a list of batches or a DataLoader")
    params = [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]
    if not params:
        raise ValueError("the model has no trainable floating-point parameters (a quantized graph cannot be fine-tuned this way)")
    try:
        per_epoch = len(data)  # type: ignore[arg-type]
    except TypeError:
        per_epoch = max_steps or 100
    per_epoch = min(per_epoch, max_steps) if max_steps else per_epoch
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    schedule = lr_schedule(opt, epochs * per_epoch, "cosine", warmup)
    bar = tqdm(range(epochs), desc="fine-tuning", disable=not progress, leave=False)
    loss = None
    for _ in bar:
        model.train()
        batches = data
        if shuffle and isinstance(data, (list, tuple)):
            batches = [data[i] for i in torch.randperm(len(data)).tolist()]
        for step, batch in enumerate(batches):
            if max_steps is not None and step >= max_steps:
                break
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError("finetune needs labelled batches: (inputs..., labels) tuples")
            *inputs, labels = batch
            loss = nn.functional.cross_entropy(model(*inputs), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
        if loss is not None:
            bar.set_postfix(loss=f"{loss.detach().item():.3f}")
    model.eval()
    model_meta = getattr(model, "meta", None)
    if isinstance(model_meta, dict):
        model_meta.setdefault("fxpress", {})["finetune"] = {"epochs": epochs, "lr": lr, "final_loss": None if loss is None else loss.item()}
    return model


# ---------------------------------------------------------------------------------------------
# stages


@dataclass
class _Context:
    example_inputs: tuple
    calibration: Any = None
    train_data: Any = None
    teacher: Any = None
    evaluate: Any = None
    progress: bool = False
    seed: int = 0


def _resolve(path: str) -> Callable | None:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return getattr(module, attr, None)


class Stage:
    """One step of a recipe: a compression function and its options.

    Subclasses name the function (``function = "module:attr"``), the parameters ``apply`` supplies
    (``provided``) and which options may be given by position (``positional``).
    """

    kind: ClassVar[str] = ""
    function: ClassVar[str] = ""
    provided: ClassVar[tuple[str, ...]] = ()
    positional: ClassVar[tuple[str, ...]] = ()
    uses: ClassVar[str] = ""

    def __init__(self, *args: Any, name: str | None = None, **options: Any):
        if len(args) > len(self.positional):
            raise RecipeError(f"{self.kind} stage: takes at most {len(self.positional)} positional option(s) "
                              f"({', '.join(self.positional) or 'none'}), got {len(args)}")
        given = dict(zip(self.positional, args))
        for key in given:
            if key in options:
                raise RecipeError(f"{self.kind} stage: option {key!r} given twice")
        self.options: dict[str, Any] = {**given, **options}
        self.name = name
        self.validate(f"{self.kind} stage")

    # -- the function and its signature

    @classmethod
    def target(cls, where: str = "") -> Callable:
        fn = _resolve(cls.function)
        if fn is None:
            module = cls.function.partition(":")[0]
            raise RecipeError(
                f"{where or cls.kind + ' stage'}: the {cls.kind!r} stage needs {cls.function.replace(':', '.')}, which this "
                f"installation of fxpress does not have (module {module} is missing); update fxpress or remove the stage"
            )
        return fn

    @classmethod
    def option_names(cls) -> list[str]:
        sig = inspect.signature(cls.target())
        return [p for p in sig.parameters if p not in cls.provided and sig.parameters[p].kind not in (
            inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]

    def validate(self, where: str) -> None:
        fn = self.target(where)
        sig = inspect.signature(fn)
        known = self.option_names()
        for key in self.options:
            if key in self.provided:
                raise RecipeError(f"{where}: option {key!r} is supplied by Recipe.apply (from its arguments or the command line), "
                                  "not by the recipe")
            if key not in known:
                close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
                hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
                raise RecipeError(f"{where}: unknown option {key!r}.{hint} {self.kind} takes: {', '.join(known)}.")
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # noqa: BLE001 - annotations that do not evaluate: skip type checks
            hints = {}
        for key, value in self.options.items():
            hint = hints.get(key)
            if hint is not None and _type_ok(value, hint) is False:
                raise RecipeError(f"{where}: option {key!r} must be {_type_text(hint)}, got {type(value).__name__} {value!r}")
        missing = [p.name for p in sig.parameters.values()
                   if p.default is inspect.Parameter.empty and p.name not in self.provided and p.name not in self.options
                   and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
        if missing:
            raise RecipeError(f"{where}: missing required option(s) {', '.join(map(repr, missing))}")
        try:
            self.check_values()
        except (ValueError, TypeError) as exc:
            raise RecipeError(f"{where}: {exc}") from None

    def check_values(self) -> None:
        """The stage function's own option checks, run before anything is computed (subclasses)."""

    def _defaults(self) -> dict[str, Any]:
        sig = inspect.signature(self.target())
        out = {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
        out.update(self.options)
        return out

    # -- running

    def label(self) -> str:
        return self.name or self.kind

    def needs_calibration(self) -> bool:
        return False

    def needs_train_data(self) -> bool:
        return False

    def run(self, model: Any, ctx: _Context) -> Any:
        raise NotImplementedError

    def _opts(self, ctx: _Context) -> dict[str, Any]:
        """The options, plus the stage's seed for functions that take one and were not given one."""
        opts = dict(self.options)
        if "seed" in inspect.signature(self.target()).parameters and "seed" not in opts:
            opts["seed"] = ctx.seed
        return opts

    def summary(self, model: Any) -> tuple[str, str]:
        """(one line, full text) describing what the stage did to ``model``."""
        return "", ""

    def plan(self, gm: fx.GraphModule, ctx: _Context) -> str:
        return ""

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"kind": self.kind}
        if self.name:
            out["name"] = self.name
        out.update(self.options)
        return out

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stage) and self.to_dict() == other.to_dict()


def _type_ok(value: Any, hint: Any) -> bool | None:
    """True / False where the annotation decides it, None where it cannot (callables, iterables, ...)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        results = [_type_ok(value, h) for h in typing.get_args(hint)]
        if any(r is True for r in results):
            return True
        return None if any(r is None for r in results) else False
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    target = origin or hint
    if target in (tuple, list):
        return isinstance(value, (tuple, list))
    if target is _AbcCallable:
        return callable(value) or None
    if isinstance(target, type):
        if target.__module__ == "collections.abc":
            if target.__name__ in ("Sequence",):
                return isinstance(value, (list, tuple, str))
            return None
        try:
            return isinstance(value, target)
        except TypeError:
            return None
    return None


def _type_text(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_text(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ",".join(f"{k}={_short(v)}" for k, v in value.items())
    return str(value)


class Prune(Stage):
    """Structured channel pruning (``fxpress.prune``): ``Prune(0.5, importance="l2", round_to=8)``."""

    kind = "prune"
    function = "fxpress.prune_api:prune"
    provided = ("model", "example_inputs", "step_callback")
    positional = ("ratio",)

    def check_values(self) -> None:
        from .passes.prune.channel_prune import validate_options

        d = self._defaults()
        validate_options(d["ratio"], d["importance"], d["round_to"], d["min_channels"], d["max_ratio"], d["reduction"], d["factors"])

    def label(self) -> str:
        return self.name or f"prune {_short(self._defaults()['ratio'])}"

    def run(self, model, ctx):
        return self.target()(model, ctx.example_inputs, **self._opts(ctx))

    def summary(self, model):
        from .prune_api import prune_report

        rep = prune_report(model)
        return (f"params {rep.params_ratio:.2f}x, MACs {rep.macs_ratio:.2f}x; {len(rep.pruned_groups)} channel groups pruned, "
                f"{len(rep.frozen_groups)} frozen", str(rep))

    def plan(self, gm, ctx):
        from .prune_api import channel_groups

        ignore = self.options.get("ignore", ())
        return channel_groups(gm, ctx.example_inputs, ignore=ignore).summary(limit=25)


class Sparsify(Stage):
    """Unstructured or N:M weight sparsity (``fxpress.sparsify``): ``Sparsify(0.5)``, ``Sparsify(pattern="2:4")``."""

    kind = "sparsify"
    function = "fxpress.sparsity_api:sparsify"
    provided = ("model", "example_inputs", "calibration")
    positional = ("sparsity", "pattern")
    uses = "calibration (importance='wanda')"

    def check_values(self) -> None:
        from .passes.prune.sparsity import validate_sparsity_options

        d = self._defaults()
        validate_sparsity_options(d["sparsity"], d["pattern"], d["scope"], d.get("importance") or "magnitude", d["min_params"])

    def needs_calibration(self) -> bool:
        return self.options.get("importance") == "wanda"

    def label(self) -> str:
        d = self._defaults()
        what = d["pattern"] if d["pattern"] != "unstructured" else _short(d["sparsity"] if d["sparsity"] is not None else 0.5)
        return self.name or f"sparsify {what}"

    def run(self, model, ctx):
        extra = {"calibration": ctx.calibration} if self.needs_calibration() else {}
        return self.target()(model, ctx.example_inputs, **self._opts(ctx), **extra)

    def summary(self, model):
        from .sparsity_api import sparsity_report

        rep = sparsity_report(model)
        return f"{rep.sparsity:.0%} of the weights of {len(rep.sparsified)} layers are zero", str(rep)

    def plan(self, gm, ctx):
        from .passes.prune.sparsity import find_weight_layers

        try:
            layers = find_weight_layers(gm)
            return f"{len(layers)} conv / linear / matmul weights to sparsify"
        except Exception:  # noqa: BLE001 - the plan is informative only
            return ""


class Decompose(Stage):
    """Low-rank decomposition (``fxpress.decompose``): ``Decompose(budget={"params": 0.5})``."""

    kind = "decompose"
    function = "fxpress.decompose_api:decompose"
    provided = ("model", "example_inputs", "calibration", "progress")
    positional = ("method",)
    uses = "calibration (optional: data-aware SVD and errors)"

    def check_values(self) -> None:
        from . import decompose_api as d

        opts = self._defaults()
        if hasattr(d, "_methods"):
            d._methods(opts["method"])
        if hasattr(d, "_check_budget"):
            d._check_budget(opts.get("budget"))
        if opts.get("budget") is None and opts.get("rank") is None and opts.get("energy") is None:
            raise ValueError("say how much to decompose: budget = {params = 0.5} (or macs), rank = 0.5, or energy = 0.95")

    def label(self) -> str:
        o = self.options
        what = (f"params<={_short(o['budget'].get('params'))}" if isinstance(o.get("budget"), dict) and "params" in o["budget"]
                else f"macs<={_short(o['budget'].get('macs'))}" if isinstance(o.get("budget"), dict)
                else f"rank {_short(o['rank'])}" if "rank" in o else f"energy {_short(o.get('energy'))}")
        return self.name or f"decompose {what}"

    def run(self, model, ctx):
        return self.target()(model, ctx.example_inputs, calibration=ctx.calibration, progress=ctx.progress, **self._opts(ctx))

    def summary(self, model):
        from .decompose_api import decompose_report

        rep = decompose_report(model)
        err = f", output error {rep.output_error:.3g}" if rep.output_error is not None else ""
        return f"{len(rep.decomposed)} layers decomposed, params {rep.params_ratio:.2f}x, MACs {rep.macs_ratio:.2f}x{err}", str(rep)

    def plan(self, gm, ctx):
        from .passes.decompose import find_layers

        layers, skipped = find_layers(gm)
        names = ", ".join(layer.module or layer.name for layer in layers[:8])
        return f"{len(layers)} candidate layers ({names}{', ...' if len(layers) > 8 else ''}); {len(skipped)} not decomposable"


class Distill(Stage):
    """Knowledge distillation from the original model (``fxpress.train.distill``): ``Distill(epochs=3)``."""

    kind = "distill"
    function = "fxpress.train.distill:distill"
    provided = ("student", "teacher", "data", "progress", "eval_fn")
    uses = "train_data"

    def check_values(self) -> None:
        from .train import distill as d

        o = self._defaults()
        if hasattr(d, "_check_options") and isinstance(o.get("loss"), str):
            d._check_options(o["loss"], o["temperature"], o["alpha"], o["hint_loss"], o["hint_weight"], o["epochs"], o["max_hints"])

    def needs_train_data(self) -> bool:
        return True

    def label(self) -> str:
        return self.name or f"distill {self._defaults()['epochs']} ep"

    def run(self, model, ctx):
        return self.target()(model, ctx.teacher, ctx.train_data, progress=ctx.progress, eval_fn=ctx.evaluate, **self._opts(ctx))

    def summary(self, model):
        from .train.distill import distill_report

        try:
            rep = distill_report(model)
        except ValueError:
            return "", ""
        last = rep.final
        loss = f", final loss {last['loss']:.4f}" if "loss" in last else ""
        return f"{len(rep.epochs)} epochs, {len(rep.hints)} feature hints{loss}", str(rep)

    def plan(self, gm, ctx):
        return f"trains the student {self._defaults()['epochs']} epoch(s) against the original model on the training data"


class FineTune(Stage):
    """Fine-tuning with cross entropy on labelled batches (``fxpress.recipe.finetune``): ``FineTune(epochs=2)``."""

    kind = "finetune"
    function = "fxpress.recipe:finetune"
    provided = ("model", "data", "progress")
    positional = ("epochs",)
    uses = "train_data"

    def needs_train_data(self) -> bool:
        return True

    def label(self) -> str:
        return self.name or f"finetune {self._defaults()['epochs']} ep"

    def run(self, model, ctx):
        return self.target()(model, ctx.train_data, progress=ctx.progress, **self._opts(ctx))

    def summary(self, model):
        info = getattr(model, "meta", {}).get("fxpress", {}).get("finetune", {})
        loss = info.get("final_loss")
        return f"{info.get('epochs', '?')} epochs" + (f", final loss {loss:.4f}" if loss is not None else ""), json.dumps(info)

    def plan(self, gm, ctx):
        return f"trains {self._defaults()['epochs']} epoch(s) with cross entropy on the training data"


class QAT(Stage):
    """Quantization-aware training against the original model, then convert (``fxpress.train.quantize_qat``):
    ``QAT("int8_static", epochs=2)``."""

    kind = "qat"
    function = "fxpress.train.qat:quantize_qat"
    provided = ("model", "example_inputs", "teacher", "data", "calibration", "progress")
    positional = ("config",)
    uses = "train_data (calibration: the calibration data if given, else the training data)"

    def check_values(self) -> None:
        from .passes.quant.config import QuantConfig
        from .train.distill import _check_options
        from .train.qat import check_bn_options

        o = self._defaults()
        QuantConfig.coerce(o["config"])
        check_bn_options(o["bn"], o["freeze_bn_after"])
        _check_options("kd", o["temperature"], o["alpha"], "mse", 0.1, o["epochs"], 4)  # the distill options it passes on

    def needs_train_data(self) -> bool:
        return True

    def label(self) -> str:
        return self.name or f"qat {self._defaults()['epochs']} ep"

    def run(self, model, ctx):
        return self.target()(model, ctx.example_inputs, ctx.teacher, ctx.train_data, calibration=ctx.calibration,
                             progress=ctx.progress, **self._opts(ctx))

    def summary(self, model):
        line, text = Quantize.summary(self, model)
        from .train.distill import distill_report

        try:
            rep = distill_report(model)
        except ValueError:
            return line, text
        return f"{line}; trained {len(rep.epochs)} epoch(s)", f"{text}\n\n{rep}"

    def plan(self, gm, ctx):
        o = self._defaults()
        return (f"fake-quantizes ({o['config'] if isinstance(o['config'], str) else 'custom config'}), trains {o['epochs']} epoch(s) "
                "against the original model on the training data, converts")


class Quantize(Stage):
    """Post-training quantization (``fxpress.quantize``): ``Quantize("int8_static", max_batches=16)``."""

    kind = "quantize"
    function = "fxpress.api:quantize"
    provided = ("model", "example_inputs", "calibration", "progress")
    positional = ("config",)
    uses = "calibration (static int8, bias_correction, smooth_quant, target_sqnr)"

    def _config(self):
        from .passes.quant.config import QuantConfig

        return QuantConfig.coerce(self._defaults()["config"])

    def check_values(self) -> None:
        self._config()

    def needs_calibration(self) -> bool:
        cfg = self._config()
        o = self._defaults()
        static = cfg.default.mode == "static" or any(s is not None and s.mode == "static" for s in [*cfg.op_types.values(), *cfg.nodes.values()])
        return static or bool(o.get("bias_correction")) or o.get("smooth_quant") not in (None, False) or o.get("target_sqnr") is not None

    def label(self) -> str:
        config = self._defaults()["config"]
        what = config if isinstance(config, str) else config.get("default", "custom") if isinstance(config, dict) else "custom"
        return self.name or f"quantize {what}"

    def run(self, model, ctx):
        return self.target()(model, ctx.example_inputs, calibration=ctx.calibration, progress=ctx.progress, **self._opts(ctx))

    def summary(self, model):
        from .api import quant_report

        rep = quant_report(model)
        by_mode = {kind for _, kind, why in rep.float_ops if why.endswith(" mode")}  # kinds this mode never quantizes
        parts = [f"{kind} {rep.quantized(kind)}/{rep.total(kind)}" for kind in rep.per_kind if rep.quantized(kind) or kind not in by_mode]
        text = str(rep)
        convert = getattr(model, "meta", {}).get("fxpress", {}).get("convert_report")
        if convert is not None:
            text += "\n\n" + str(convert)
        return "quantized: " + ", ".join(parts), text

    def plan(self, gm, ctx):
        from collections import Counter

        from .passes.quant.config import op_kind

        cfg = self._config()
        todo: Counter = Counter()
        total: Counter = Counter()
        skipped: list[str] = []
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            kind = op_kind(node)
            if kind is None:
                continue
            total[kind] += 1
            spec, why = cfg.resolve(node)
            if spec is not None:
                todo[kind] += 1
            elif why and not why.endswith("mode"):
                skipped.append(f"{node.name}: {why}")
        mode = cfg.default.mode.replace("_", "-")
        lines = [f"quantizable ops ({mode}): " + ", ".join(f"{k} {todo[k]} of {total[k]}" for k in total)]
        lines += [f"  stays float: {s}" for s in skipped[:15]]
        return "\n".join(lines)


STAGES: dict[str, type[Stage]] = {cls.kind: cls for cls in (Prune, Sparsify, Decompose, Distill, FineTune, Quantize, QAT)}


# ---------------------------------------------------------------------------------------------
# the recipe

_RECIPE_KEYS = ("name", "description", "seed")
_TOP_KEYS = ("recipe", "stage")


@dataclass
class RecipeResult:
    """What ``Recipe.apply`` returns: the compressed graph, the report, and the original captured graph."""

    model: Any
    report: Any
    recipe: "Recipe"
    original: Any = None
    example_inputs: tuple = ()

    def write(self, out_dir: str | os.PathLike, *, onnx: bool = True, html: bool = True, extra: dict | None = None) -> dict[str, Path]:
        """Write model.pt2 (``fxpress.save``), model.onnx (checked against the graph), report.json / .md /
        .html, recipe.toml and run.json into ``out_dir``; return the paths by kind."""
        return write_outputs(self, out_dir, onnx=onnx, html=html, extra=extra)


class Recipe:
    """An ordered list of stages, with a name, a description and a seed (see the module docstring)."""

    def __init__(self, stages: Sequence[Stage], *, name: str = "recipe", description: str = "", seed: int = 0, source: str | None = None):
        stages = list(stages)
        for i, s in enumerate(stages, 1):
            if not isinstance(s, Stage):
                raise RecipeError(f"recipe {name!r}, stage {i}: expected a Stage (Prune, Quantize, ...), got {type(s).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise RecipeError(f"recipe {name!r}: seed must be an integer, got {seed!r}")
        self.stages = stages
        self.name = name
        self.description = description
        self.seed = seed
        self.source = source
        self._check_order()

    def _where(self, i: int) -> str:
        src = f" ({self.source})" if self.source else ""
        return f"recipe {self.name!r}{src}, stage {i} ({self.stages[i - 1].kind})"

    def _check_order(self) -> None:
        for i, s in enumerate(self.stages[:-1], 1):
            if isinstance(s, (Quantize, QAT)):
                later = self.stages[i].kind
                raise RecipeError(f"{self._where(i)}: {s.kind} must be the last stage (the {later!r} stage after it takes a float graph); "
                                  "move it to the end")

    # ---- construction

    @classmethod
    def from_dict(cls, data: dict, *, source: str | None = None) -> "Recipe":
        where = f"recipe{f' {source}' if source else ''}"
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: expected a table with [recipe] and [[stage]] entries, got {type(data).__name__}")
        for key in data:
            if key not in _TOP_KEYS:
                close = difflib.get_close_matches(key, _TOP_KEYS, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise RecipeError(f"{where}: unknown top-level key {key!r}.{hint} A recipe has a [recipe] table and [[stage]] tables.")
        head = data.get("recipe", {})
        if not isinstance(head, dict):
            raise RecipeError(f"{where}: [recipe] must be a table (name, description, seed)")
        for key in head:
            if key not in _RECIPE_KEYS:
                close = difflib.get_close_matches(key, _RECIPE_KEYS, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise RecipeError(f"{where}: unknown key {key!r} in [recipe].{hint} It takes: {', '.join(_RECIPE_KEYS)}.")
        name = head.get("name", Path(source).stem if source else "recipe")
        if not isinstance(name, str) or not isinstance(head.get("description", ""), str):
            raise RecipeError(f"{where}: [recipe] name and description must be strings")
        label = f"recipe {name!r}" + (f" ({source})" if source else "")
        raw = data.get("stage", [])
        if isinstance(raw, dict):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            raise RecipeError(f"{label}: no stages; add [[stage]] tables, each with kind = one of {', '.join(STAGES)}")
        stages = []
        for i, entry in enumerate(raw, 1):
            if not isinstance(entry, dict):
                raise RecipeError(f"{label}, stage {i}: must be a table ([[stage]]), got {type(entry).__name__}")
            entry = dict(entry)
            kind = entry.pop("kind", None)
            if kind is None:
                raise RecipeError(f"{label}, stage {i}: no 'kind'; give kind = one of {', '.join(STAGES)}")
            if kind not in STAGES:
                close = difflib.get_close_matches(str(kind), STAGES, n=2)
                hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
                raise RecipeError(f"{label}, stage {i}: unknown kind {kind!r}.{hint} Kinds: {', '.join(STAGES)}.")
            stage_name = entry.pop("name", None)
            stage = STAGES[kind].__new__(STAGES[kind])
            stage.options = entry
            stage.name = stage_name
            stage.validate(f"{label}, stage {i} ({kind})")
            stages.append(stage)
        return cls(stages, name=name, description=head.get("description", ""), seed=head.get("seed", 0), source=source)

    @classmethod
    def from_toml(cls, text: str, *, source: str | None = None) -> "Recipe":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise RecipeError(f"recipe{f' {source}' if source else ''}: not valid TOML: {exc}") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            shipped = shipped_recipes()
            close = difflib.get_close_matches(path.stem, list(shipped), n=1)
            hint = f" Did you mean the shipped recipe {close[0]!r} ({shipped[close[0]]})?" if close else ""
            raise RecipeError(f"no recipe file {str(path)!r}.{hint}")
        return cls.from_toml(path.read_text(), source=str(path))

    @classmethod
    def load(cls, spec: str | os.PathLike) -> "Recipe":
        """A recipe from a file path or the name of a shipped recipe ("cnn-int8")."""
        path = Path(spec)
        if not path.exists():
            shipped = shipped_recipes()
            if str(spec) in shipped:
                path = shipped[str(spec)]
        return cls.from_file(path)

    def to_dict(self) -> dict:
        return {"recipe": {"name": self.name, "description": self.description, "seed": self.seed}, "stage": [s.to_dict() for s in self.stages]}

    def to_toml(self) -> str:
        return dict_to_toml(self.to_dict())

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(self.to_toml())
        return path

    def __repr__(self) -> str:
        return f"Recipe({self.stages!r}, name={self.name!r}, seed={self.seed})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and self.to_dict() == other.to_dict()

    # ---- running

    def _check_data(self, calibration: Any, train_data: Any) -> None:
        for i, s in enumerate(self.stages, 1):
            if s.needs_calibration() and calibration is None:
                raise RecipeError(f"{self._where(i)} ({s.label()}) needs calibration data: pass calibration=loader "
                                  "(fxpress compress: --calib digits or --calib module:loader)")
            if s.needs_train_data() and train_data is None:
                raise RecipeError(f"{self._where(i)} ({s.label()}) needs training data: pass train_data=loader of (inputs, labels) "
                                  "batches (fxpress compress: --train digits or --train module:loader)")

    def plan(self, model: Any, example_inputs: Any, *, calibration: Any = None, train_data: Any = None) -> str:
        """What ``apply`` would do, without doing it: the stages and their options, the model's size,
        the channel groups of a prune stage, the quantizable ops of a quantize stage, the candidate
        layers of a decompose stage, and which data each stage needs."""
        from .ir.capture import normalize_inputs
        from .ir.cost import count_params, total_macs

        inputs = normalize_inputs(example_inputs)
        gm = _captured(model, inputs)
        shapes = ", ".join(f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" for x in inputs if isinstance(x, torch.Tensor))
        lines = [f"recipe {self.name}" + (f" ({self.source})" if self.source else "") + f": {len(self.stages)} stages, seed {self.seed}"]
        if self.description:
            lines.append(f"  {self.description}")
        lines.append(f"model: {gm.meta.get('fxpress', {}).get('source', type(model).__name__)}, {count_params(gm):,} params, "
                     f"{total_macs(gm):,} MACs, inputs {shapes}")
        ctx = _Context(inputs, calibration, train_data)
        for i, s in enumerate(self.stages, 1):
            opts = ", ".join(f"{k}={v!r}" for k, v in s.options.items()) or "defaults"
            lines.append(f"\n{i}. {s.kind} ({s.label()}): {opts}")
            needs = []
            if s.needs_calibration():
                needs.append("calibration data" + (" (given)" if calibration is not None else " (MISSING)"))
            if s.needs_train_data():
                needs.append("training data" + (" (given)" if train_data is not None else " (MISSING)"))
            if needs:
                lines.append("   needs " + ", ".join(needs))
            try:
                text = s.plan(gm, ctx)
            except Exception as exc:  # noqa: BLE001 - a plan must show what it can
                text = f"(could not analyse: {str(exc).splitlines()[0][:200]})"
            if text:
                lines += ["   " + t for t in text.splitlines()]
        lines.append("\ndry run: nothing was changed")
        return "\n".join(lines)

    def apply(
        self,
        model: nn.Module,
        example_inputs: Any,
        *,
        calibration: Iterable | None = None,
        train_data: Iterable | None = None,
        evaluate: Callable[[nn.Module], float] | None = None,
        metric_name: str | None = None,
        eval_data: Iterable | None = None,
        progress: bool | None = None,
        latency: bool = True,
        model_name: str | None = None,
    ) -> RecipeResult:
        """Run the stages in order on ``model`` (captured first, in eval mode) and measure each result.

        calibration: batches for calibration-based stages (tensors, or tuples with inputs first).
        train_data: labelled batches for distill / finetune. evaluate: ``f(model) -> float``, e.g.
        accuracy in % (``metric_name`` names it); without it the report gives each stage's output SQNR
        against the original on ``eval_data`` (default: the first 4 calibration batches, or the
        example inputs). progress: tqdm bars and stage headers on stderr (None: only on a terminal).
        latency: measure latency per stage.
        """
        from . import __version__
        from .ir.capture import normalize_inputs
        from .report import CompressionReport, Meter, StageRecord, evaluate_batches, layer_tables

        inputs = normalize_inputs(example_inputs)
        self._check_data(calibration, train_data)
        if progress is None:
            progress = sys.stderr.isatty()
        if calibration is not None and iter(calibration) is calibration:
            calibration = list(calibration)  # several stages read it
        if isinstance(model, nn.Module) and not isinstance(model, fx.GraphModule) and model.training:
            model.eval()
        torch.manual_seed(self.seed)
        original = _captured(model, inputs)
        source = eval_data if eval_data is not None else calibration if calibration is not None else []
        eval_batches = evaluate_batches(source, 4, len(inputs)) or [inputs]
        meter = Meter(inputs, evaluate=evaluate, metric_name=metric_name, eval_batches=eval_batches, latency=latency)
        report = CompressionReport(model=model_name or original.meta.get("fxpress", {}).get("source", type(model).__name__),
                                   metric_name=meter.metric_name, recipe=self.to_dict())
        report.created = time.strftime("%Y-%m-%d %H:%M:%S")
        report.environment = {
            "recipe": self.name + (f" ({self.source})" if self.source else ""),
            "seed": self.seed, "fxpress": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(terse=True), "torch threads": torch.get_num_threads(),
        }
        report.stages.append(meter.measure(original, StageRecord("original", "original")))
        ctx = _Context(inputs, calibration, train_data, teacher=original, evaluate=evaluate, progress=progress)
        current: Any = original
        for i, stage in enumerate(self.stages, 1):
            if progress:
                print(f"fxpress: [{i}/{len(self.stages)}] {stage.label()}", file=sys.stderr, flush=True)
            torch.manual_seed(self.seed + i)
            ctx.seed = self.seed + i
            start = time.perf_counter()
            try:
                result = stage.run(current, ctx)
            except RecipeError:
                raise
            except Exception as exc:
                done = ", ".join(s.label() for s in self.stages[: i - 1]) or "none"
                raise StageError(f"{self._where(i)} ({stage.label()}) failed: {exc} (stages before it: {done})") from exc
            elapsed = time.perf_counter() - start
            record = StageRecord(stage.label(), stage.kind, time_s=elapsed, options=dict(stage.options))
            try:
                record.summary, record.details = stage.summary(result)
            except Exception as exc:  # noqa: BLE001 - a missing report must not lose the compressed model
                record.summary = f"(no report: {exc})"
            meter.measure(result, record)
            tables = layer_tables(result, stage.kind, before=current, eval_batch=eval_batches[0] if stage.kind == "quantize" else None)
            report.sensitivity = tables.get("sensitivity", report.sensitivity)
            report.channels = tables.get("channels", report.channels)
            report.ranks = tables.get("ranks", report.ranks)
            report.stages.append(record)
            current = result
        report.notes += meter.notes
        if isinstance(current, fx.GraphModule):
            meta = current.meta.setdefault("fxpress", {})
            meta["recipe"] = self.to_dict()
            meta["run_report"] = report
        return RecipeResult(current, report, self, original=original, example_inputs=inputs)


def _captured(model: Any, inputs: tuple) -> fx.GraphModule:
    from .ir.capture import capture

    if isinstance(model, fx.GraphModule) and any("val" in n.meta for n in model.graph.nodes):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"a recipe is applied to a torch.nn.Module, got {type(model).__name__}")
    return capture(model, inputs, share_weights=False)


def shipped_recipes() -> dict[str, Path]:
    """The recipes shipped with fxpress (package data: fxpress/recipes/*.toml), by name."""
    here = Path(__file__).resolve().parent / "recipes"
    return {p.stem: p for p in sorted(here.glob("*.toml"))} if here.is_dir() else {}


# ---------------------------------------------------------------------------------------------
# outputs


def write_outputs(result: RecipeResult, out_dir: str | os.PathLike, *, onnx: bool = True, html: bool = True,
                  extra: dict | None = None) -> dict[str, Path]:
    """See ``RecipeResult.write``. ONNX export failures are recorded in the report's notes (the .pt2 is
    written regardless). onnxruntime latency is measured for the original and the compressed model."""
    from . import __version__
    from .serialize import save

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file; give a directory for the outputs")
    out.mkdir(parents=True, exist_ok=True)
    report = result.report
    paths: dict[str, Path] = {}
    if onnx:
        _export_onnx(result, out, paths)
    paths["recipe"] = result.recipe.save(out / "recipe.toml")
    run = {
        "recipe": result.recipe.to_dict(),
        "seed": result.recipe.seed,
        "versions": {"fxpress": __version__, "torch": torch.__version__, "python": platform.python_version(),
                     **_optional_versions()},
        "platform": platform.platform(),
        "created": report.created,
        "stages": [{"name": s.name, "kind": s.kind, "options": s.options, "time_s": round(s.time_s, 3), "summary": s.summary}
                   for s in report.stages[1:]],
        **(extra or {}),
    }
    paths["run"] = out / "run.json"
    paths["run"].write_text(json.dumps(run, indent=1, default=str))
    paths["model"] = save(result.model, out / "model.pt2", report=report, recipe=result.recipe, extra=extra)
    report.outputs = {p.name: p.stat().st_size for k, p in paths.items() if p.exists()}
    # the .pt2 holds the report as it was before its own size was known; the files written after it are complete
    paths["report_json"] = report.save(out / "report.json")
    paths["report_md"] = out / "report.md"
    report.to_markdown(paths["report_md"])
    if html:
        paths["report_html"] = out / "report.html"
        report.to_html(paths["report_html"])
    return paths


def _optional_versions() -> dict:
    out = {}
    for name in ("onnx", "onnxruntime", "torchvision", "transformers", "numpy"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001
            pass
    return out


def _export_onnx(result: RecipeResult, out: Path, paths: dict) -> None:
    from .backends import export_onnx
    from .report import Meter

    report = result.report
    quantized = any(s.kind == "quantize" for s in result.recipe.stages)
    meter = Meter(result.example_inputs)
    try:
        exported = export_onnx(result.model, result.example_inputs, out / "model.onnx", rtol=0.05 if quantized else 1e-4,
                               atol=1e-3 if quantized else 1e-4)
        paths["onnx"] = exported.path
        session = exported.session(intra_op_threads=torch.get_num_threads())
        report.final.ort_latency_ms = meter.latency_ms(session)
    except Exception as exc:  # noqa: BLE001 - the .pt2 is still written; say why there is no ONNX
        report.notes.append(f"ONNX export of the compressed model failed: {str(exc).splitlines()[0][:300]}")
        return
    if result.original is not None:
        import tempfile

        try:
            with tempfile.TemporaryDirectory() as tmp:
                ref = export_onnx(result.original, result.example_inputs, Path(tmp) / "original.onnx")
                report.original.ort_latency_ms = meter.latency_ms(ref.session(intra_op_threads=torch.get_num_threads()))
        except Exception as exc:  # noqa: BLE001
            report.notes.append(f"ONNX export of the original model failed: {str(exc).splitlines()[0][:200]}")


# ---------------------------------------------------------------------------------------------
# TOML writing (tomllib only reads)


def _toml_key(key: str) -> str:
    import re

    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if value is None:
        raise RecipeError("TOML has no null: leave the option out to use its default")
    raise RecipeError(f"cannot write {type(value).__name__} {value!r} to TOML (only strings, numbers, booleans, lists and tables)")


def dict_to_toml(data: dict) -> str:
    """A recipe dict ({"recipe": {...}, "stage": [{...}, ...]}) as TOML text."""
    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"[{_toml_key(key)}]")
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None]
            lines.append("")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for entry in value:
                lines.append(f"[[{_toml_key(key)}]]")
                lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in entry.items() if v is not None]
                lines.append("")
        else:
            lines.insert(0, f"{_toml_key(key)} = {_toml_value(value)}")
    return "\n".join(lines).rstrip() + "\n"
