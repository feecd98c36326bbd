"""A cheap check of the inputs of a captured graph, in place of torch.export's per-call pre-hook.

``ExportedProgram.module()`` validates every call with ``_check_input_constraints_pre_hook``: it
pytree-flattens the inputs with their key paths and walks the placeholders' fake values and the
sympy range constraints, about 0.1 ms a call (a third of the latency of a small CNN). Without any
check a wrong input fails deep inside the graph, naming an ATen op instead of the input.

``install_input_check(gm)`` replaces torch's hooks with an ``InputCheck``: everything is worked out
once from the placeholders (per input its name, dtype, rank, the sizes of its static dims, the range
of its dynamic dims when they have one that matters, which dims were captured as the same size), and
the check itself costs about 1 µs a call (about 10 µs with nn.Module's hook dispatch, against ~0.1 ms
for torch's: benchmarks/capture_overhead.py). It catches the usual mistakes, each with a message that names the
input, the dim, the expected and the received value, and how to fix it: a wrong number of inputs, a
non-tensor where a tensor was captured, a wrong dtype, a wrong rank, a static dim of another size
(capture with that dim dynamic), a dynamic dim outside its range, dims captured equal that differ,
and a captured constant (an int or a string input) of another value. Dims captured dynamic accept
any size in their range.

The check follows the graph: a pass that edits the graph recompiles it, and the next call re-reads
the placeholders. It survives ``copy.deepcopy`` (torch's hooks do not). Where the inputs are not a
flat list of tensors and constants (nested containers, size inputs, dims captured as expressions
like ``2*s0``), it calls torch's check instead, as before. ``gm.validate_inputs = False`` turns it
off (as it does torch's); ``remove_input_check(gm)`` takes it off the module altogether.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch.compiler import is_dynamo_compiling
from torch.export._unlift import _check_input_constraints_pre_hook

__all__ = ["InputMismatchError", "InputCheck", "install_input_check", "remove_input_check", "input_check_of"]

_Tensor = torch.Tensor
_TORCH = "torch"  # a plan that defers to torch's own check
_OFF = "off"  # a plan that checks nothing (inputs beyond this check, and no torch check to defer to)


class InputMismatchError(ValueError, RuntimeError):
    """A captured graph was called with inputs it was not captured for; the message says how to fix it.

    A ValueError, and a RuntimeError like the errors of torch.export's own input check."""


class _Input:
    """What one placeholder expects (worked out once)."""

    __slots__ = ("name", "kind", "dtype", "shape", "static", "dynamic", "value")

    def __init__(self, name: str, kind: str, dtype=None, shape=(), static=(), dynamic=(), value=None):
        self.name = name
        self.kind = kind  # "tensor", "const" (an int/float/bool/str baked into the graph) or "any"
        self.dtype = dtype
        self.shape = shape  # the captured shape, the symbol's name (a str) at each dynamic dim
        self.static = static  # ((dim, size), ...)
        self.dynamic = dynamic  # ((dim, symbol name), ...)
        self.value = value

    def shape_text(self) -> str:
        dims = ", ".join("*" if isinstance(s, str) else str(s) for s in self.shape)
        return f"({dims}{',' if len(self.shape) == 1 else ''})"


class _Plan:
    __slots__ = ("names", "n", "fast", "inputs", "ranges", "same", "source", "code")

    def __init__(self, names, inputs, ranges, same, source, code):
        self.names = names
        self.n = len(names)
        self.inputs = inputs
        # per input (dtype or None, rank, ((start, stop, static sizes), ...), spec): all a plain call reads
        self.fast = tuple(
            (i.dtype if i.kind == "tensor" else None, len(i.shape), _segments(i.shape), i) for i in inputs
        )
        self.ranges = ranges  # ((input index, dim, lo, hi), ...): dynamic dims with a range that matters
        self.same = same  # ((i, dim, j, dim_j), ...): dims captured as the same symbol
        self.source = source
        self.code = code


def _segments(shape: tuple) -> tuple:
    """Runs of static dims as (start, stop, sizes): a slice of the input's shape must equal each."""
    out, start = [], None
    for d, s in enumerate((*shape, "end")):
        if isinstance(s, int) and start is None:
            start = d
        elif not isinstance(s, int) and start is not None:
            out.append((start, d, tuple(shape[start:d])))
            start = None
    return tuple(out)


class InputCheck:
    """A forward pre-hook (``with_kwargs=True``) that checks a captured graph's inputs; see the module docstring."""

    def __init__(self, range_constraints: dict | None = None):
        self.range_constraints = dict(range_constraints or {})
        self._plan: _Plan | str | None = None

    # -- per call ---------------------------------------------------------------------------------
    def __call__(self, module: fx.GraphModule, args: tuple, kwargs: dict) -> None:
        if is_dynamo_compiling():  # Dynamo traces hooks; the compiled graph has its own guards
            return None
        d = module.__dict__
        plan = self._plan
        if plan is None or (plan.__class__ is _Plan and plan.code is not d.get("_code")):
            plan = self.prepare(module)
        if not d.get("validate_inputs", True) or plan is _OFF:
            return None
        if plan is _TORCH:
            return _check_input_constraints_pre_hook(module, args, kwargs)
        vals = args if not kwargs and len(args) == plan.n else _bind(plan, args, kwargs)
        plain = True
        for x, (dtype, rank, segments, spec) in zip(vals, plan.fast):
            if type(x) is _Tensor and dtype is not None:
                if x.dtype is not dtype:
                    _fail(plan, vals)
                s = x.shape
                if len(s) != rank:
                    _fail(plan, vals)
                for a, b, sizes in segments:
                    if s[a:b] != sizes:
                        _fail(plan, vals)
            elif not _check_other(plan, vals, x, spec):
                plain = False  # a fake or symbolic tensor (tracing): no size comparisons that would add guards
        if plain and (plan.ranges or plan.same):
            for i, dim, lo, hi in plan.ranges:
                if not lo <= vals[i].shape[dim] <= hi:
                    _fail(plan, vals)
            for i, dim, j, dim_j in plan.same:
                if vals[i].shape[dim] != vals[j].shape[dim_j]:
                    _fail(plan, vals)
        return None

    # -- once per graph ---------------------------------------------------------------------------
    def prepare(self, module: fx.GraphModule) -> _Plan | str:
        """Work out the plan for ``module``'s current graph (done at install and after a recompile)."""
        self._plan = plan = _make_plan(module, self.range_constraints)
        return plan

    @property
    def uses_torch_check(self) -> bool:
        """True where the inputs are beyond this check and torch's check runs instead."""
        return self._plan is _TORCH

    def __deepcopy__(self, memo: dict) -> "InputCheck":
        return InputCheck(self.range_constraints)  # the plan is re-made for the copy's graph

    def _on_deepcopy(self, copy: fx.GraphModule) -> None:
        # GraphModule.__deepcopy__ drops forward hooks but deep-copies the deepcopy hooks, then calls the
        # original's with the copy: this puts the copy's own check (the one its hook is bound to) on it
        copy.__dict__.setdefault("validate_inputs", True)
        if "range_constraints" not in copy.__dict__:  # torch's check (the fallback) reads them there
            copy.range_constraints = dict(self.range_constraints)
        own = next((h.__self__ for h in copy._deepcopy_hooks if getattr(h, "__func__", None) is InputCheck._on_deepcopy), None)
        _register(copy, own if own is not None and own is not self else InputCheck(self.range_constraints))


def _register(gm: fx.GraphModule, check: InputCheck) -> None:
    gm.register_forward_pre_hook(check, with_kwargs=True)
    if not any(getattr(h, "__func__", None) is InputCheck._on_deepcopy for h in gm._deepcopy_hooks):
        gm._register_deepcopy_hook(check._on_deepcopy)


# ---------------------------------------------------------------------------------------------
# installing


def input_check_of(gm: torch.nn.Module) -> InputCheck | None:
    """The InputCheck installed on ``gm``, if any."""
    return next((h for h in gm._forward_pre_hooks.values() if isinstance(h, InputCheck)), None)


def _torch_hook_ids(gm: torch.nn.Module) -> tuple[list, list] | None:
    """The ids of torch.export's hooks on ``gm`` (its check, and the enter/exit pair that registers
    nn.Module inputs as pytree nodes), or None where those inputs exist and torch's hooks must stay."""
    pre, post = [], []
    for table, ids in ((gm._forward_pre_hooks, pre), (gm._forward_hooks, post)):
        for key, hook in table.items():
            if hook is _check_input_constraints_pre_hook:
                ids.append(key)
            elif getattr(hook, "__qualname__", "").startswith("_create_stateful_graph_module.<locals>"):
                cells = [c.cell_contents for c in (hook.__closure__ or ())]
                if len(cells) != 1 or not isinstance(cells[0], (set, frozenset)) or cells[0]:
                    return None  # a module passed as an input (or a torch we do not know): keep all
                ids.append(key)
    return pre, post


def _remove_hooks(gm: torch.nn.Module, pre: list, post: list) -> None:
    """Remove the forward pre-hooks and forward hooks with these handle ids."""
    for key in pre:
        gm._forward_pre_hooks.pop(key, None)
        gm._forward_pre_hooks_with_kwargs.pop(key, None)
    for key in post:
        gm._forward_hooks.pop(key, None)
        gm._forward_hooks_with_kwargs.pop(key, None)
        gm._forward_hooks_always_called.pop(key, None)


def install_input_check(gm: fx.GraphModule) -> InputCheck | None:
    """Replace torch.export's input-check hooks on ``gm`` by an ``InputCheck`` (see the module docstring).

    Returns the check, or None where ``gm`` keeps torch's hooks (a graph with a guards function, or one
    that takes nn.Module inputs). Installing twice is harmless.
    """
    existing = input_check_of(gm)
    if existing is not None:
        return existing
    if hasattr(gm, "_guards_fn"):  # ep.module(check_guards=True): the graph checks its own guards
        return None
    ids = _torch_hook_ids(gm)
    if ids is None:
        return None
    _remove_hooks(gm, *ids)
    gm.__dict__.setdefault("validate_inputs", True)
    gm.__dict__.setdefault("range_constraints", {})  # torch's check (the fallback) reads them there
    check = InputCheck(gm.__dict__["range_constraints"])
    check.prepare(gm)
    _register(gm, check)
    return check


def remove_input_check(gm: fx.GraphModule) -> fx.GraphModule:
    """Take every input check off ``gm`` (fxpress's and torch.export's): no per-call cost, no clear errors."""
    pre, post = _torch_hook_ids(gm) or ([], [])
    ours = [key for key, hook in gm._forward_pre_hooks.items() if isinstance(hook, InputCheck)]
    _remove_hooks(gm, pre + ours, post)
    gm._deepcopy_hooks[:] = [h for h in gm._deepcopy_hooks if getattr(h, "__func__", None) is not InputCheck._on_deepcopy]
    return gm


# ---------------------------------------------------------------------------------------------
# the plan


def _flat_spec(in_spec: Any, n: int) -> bool:
    """True if ``in_spec`` is ((leaf, ...), {name: leaf, ...}) with ``n`` leaves in all."""
    if in_spec is None:
        return True
    try:
        if in_spec.type is not tuple or in_spec.num_children != 2:
            return False
        args_spec, kwargs_spec = in_spec.children()
        if args_spec.type is not tuple or kwargs_spec.type is not dict:
            return False
        leaves = [*args_spec.children(), *kwargs_spec.children()]
        return len(leaves) == n and all(c.is_leaf() for c in leaves)
    except Exception:  # noqa: BLE001 - a TreeSpec we do not know: torch's check
        return False


def _range(rc: dict, symbol: sympy.Symbol) -> tuple[float, float] | None:
    """The (lo, hi) a dynamic dim is checked against, as torch's check does: lower bounds up to 2
    are not checked (a dim captured >= 2 runs at 0 and 1), upper bounds only when finite."""
    vr = rc.get(symbol)
    if vr is None:
        return None
    try:
        lo = int(vr.lower) if vr.lower.is_finite else -math.inf
        hi = int(vr.upper) if vr.upper.is_finite else math.inf
    except (TypeError, ValueError, AttributeError):
        return None
    lo = lo if lo > 2 else -math.inf
    return None if lo == -math.inf and hi == math.inf else (lo, hi)


def _make_plan(module: fx.GraphModule, range_constraints: dict) -> _Plan | str:
    # torch's check (the fallback) needs the tree spec of a pytree-flattening forward
    fallback = _TORCH if module.__dict__.get("_in_spec") is not None else _OFF
    placeholders = module.graph.find_nodes(op="placeholder")
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return fallback
    if len(params) != len(placeholders) or any(
        p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD or p.default is not inspect.Parameter.empty for p in params
    ):
        return fallback
    if not _flat_spec(module.__dict__.get("_in_spec"), len(placeholders)):
        return fallback
    names = tuple(p.name for p in params)
    inputs, ranges, same = [], [], []
    first: dict[sympy.Symbol, tuple[int, int]] = {}
    for i, (name, node) in enumerate(zip(names, placeholders)):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            shape, static, dynamic = [], [], []
            for d, s in enumerate(val.shape):
                if isinstance(s, torch.SymInt):
                    expr = s.node.expr
                    if expr.is_number:
                        s = int(expr)
                    elif isinstance(expr, sympy.Symbol):
                        shape.append(str(expr))
                        dynamic.append((d, str(expr)))
                        if expr in first:
                            same.append((*first[expr], i, d))
                        else:
                            first[expr] = (i, d)
                            r = _range(range_constraints, expr)
                            if r is not None:
                                ranges.append((i, d, *r))
                        continue
                    else:
                        return fallback  # a dim captured as an expression (2*s0): torch's check solves for it
                shape.append(int(s))
                static.append((d, int(s)))
            inputs.append(_Input(name, "tensor", val.dtype, tuple(shape), tuple(static), tuple(dynamic)))
        elif isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return fallback  # a size input
        elif type(val) in (int, float, bool, str):
            if isinstance(val, float) and math.isnan(val):
                return fallback
            inputs.append(_Input(name, "const", value=val))
        else:
            inputs.append(_Input(name, "any"))
    meta = getattr(module, "meta", None)
    source = (meta.get("fxpress") or {}).get("source") if isinstance(meta, dict) else None
    return _Plan(names, tuple(inputs), tuple(ranges), tuple(same), source, module.__dict__.get("_code"))


# ---------------------------------------------------------------------------------------------
# the slow paths: binding keyword inputs, other values, and explaining a mismatch


def _bind(plan: _Plan, args: tuple, kwargs: dict) -> tuple:
    names = plan.names
    if len(args) > plan.n:
        _raise(plan, [f"takes {_count(plan.n)} ({', '.join(names)}), got {len(args)} positional"], "pass exactly these inputs.")
    for key in kwargs:
        if key not in names:
            _raise(plan, [f"got an unexpected keyword input {key!r}; its inputs are ({', '.join(names)})"], "pass only these inputs.")
        if names.index(key) < len(args):
            _raise(plan, [f"got two values for input {key!r} (positional and keyword)"], "pass each input once.")
    missing = [n for n in names[len(args):] if n not in kwargs]
    if missing:
        _raise(
            plan,
            [f"takes {_count(plan.n)} ({', '.join(names)}), got {len(args) + len(kwargs)}: missing {', '.join(map(repr, missing))}"],
            "pass every input the model was captured with (as positional or keyword arguments).",
        )
    return (*args, *(kwargs[n] for n in names[len(args):]))


def _count(n: int) -> str:
    return f"{n} input{'s' if n != 1 else ''}"


def _check_other(plan: _Plan, vals: tuple, x: Any, spec: _Input) -> bool:
    """Inputs off the fast path: constants, tensor subclasses, fake tensors. False if x has symbolic sizes."""
    if spec.kind == "const":
        if type(x) is not type(spec.value) or x != spec.value:
            _fail(plan, vals)
        return True
    if spec.kind != "tensor":
        return True
    if not isinstance(x, torch.Tensor):
        if isinstance(x, fx.Proxy):  # symbolic tracing
            return False
        _fail(plan, vals)
    if any(not isinstance(s, int) for s in x.shape):
        # tracing: compare only what needs no guard
        if x.dtype is not spec.dtype or x.dim() != len(spec.shape) or any(
            isinstance(x.shape[d], int) and x.shape[d] != size for d, size in spec.static
        ):
            _fail(plan, vals)
        return False
    if _problems(spec, x):
        _fail(plan, vals)
    return True


def _shape(x: torch.Tensor) -> str:
    return str(tuple(x.shape))


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _problems(spec: _Input, x: Any) -> list[tuple[str, str]]:
    """(what is wrong, how to fix it) for one input, without the cross-input checks."""
    name = spec.name
    if spec.kind == "const":
        if type(x) is not type(spec.value) or x != spec.value:
            return [(
                f"input {name!r} was captured as the constant {spec.value!r} ({type(spec.value).__name__}), "
                f"which the graph is specialized to; got {x!r} ({type(x).__name__})",
                f"pass {spec.value!r}, or capture again with {name}={x!r} (or make it a tensor input).",
            )]
        return []
    if spec.kind != "tensor":
        return []
    captured = f"captured as {_dt(spec.dtype)} {spec.shape_text()}" + (", * = dynamic" if spec.dynamic else "")
    if not isinstance(x, torch.Tensor):
        return [(
            f"input {name!r} must be a tensor ({captured}), got {type(x).__name__}",
            f"pass a tensor, e.g. torch.as_tensor({name}, dtype=torch.{_dt(spec.dtype)}).",
        )]
    out = []
    if x.dtype != spec.dtype:
        out.append((
            f"input {name!r} has dtype {_dt(x.dtype)}, expected {_dt(spec.dtype)} ({captured})",
            f"convert it: {name}.to(torch.{_dt(spec.dtype)}), or capture with a {_dt(x.dtype)} sample.",
        ))
    rank = len(spec.shape)
    if x.dim() != rank:
        fix = f"pass a {rank}-d tensor."
        dyn0 = bool(spec.shape) and isinstance(spec.shape[0], str)
        if dyn0 and x.dim() == rank - 1 and _fits(spec, (1, *x.shape)):
            fix = f"add the batch dim: {name}.unsqueeze(0)."
        out.append((f"input {name!r} has {x.dim()} dims, shape {_shape(x)}, expected {rank} ({captured})", fix))
        return out
    dynamic = [d for d, _ in spec.dynamic]
    for d, size in spec.static:
        got = x.shape[d]
        if isinstance(got, int) and got != size:
            wanted = ", ".join(f"{k}: Dim.DYNAMIC" for k in sorted({*dynamic, d}))
            out.append((
                f"input {name!r} dim {d} has size {got}, expected {size} ({captured}; got {_shape(x)})",
                f"pass inputs shaped {spec.shape_text()}, or capture with dim {d} dynamic: "
                f"fxpress.capture(model, args, dynamic_shapes={{{name!r}: {{{wanted}}}}}) (Dim is torch.export.Dim).",
            ))
    return out


def _fits(spec: _Input, shape: tuple) -> bool:
    return len(shape) == len(spec.shape) and all(shape[d] == s for d, s in spec.static)


def _cross_problems(plan: _Plan, vals: tuple) -> list[tuple[str, str]]:
    out = []
    for i, d, lo, hi in plan.ranges:
        got = vals[i].shape[d]
        if not lo <= got <= hi:
            spec = plan.inputs[i]
            bounds = f">= {lo}" if hi == math.inf else f"<= {hi}" if lo == -math.inf else f"in [{lo}, {hi}]"
            out.append((
                f"input {spec.name!r} dim {d} has size {got}, expected a size {bounds} (the range of this dynamic "
                f"dim at capture; captured as {spec.shape_text()})",
                "pass a size in that range, or capture with a wider range (torch.export.Dim(min=..., max=...)).",
            ))
    for i, d, j, e in plan.same:
        a, b = vals[i].shape[d], vals[j].shape[e]
        if a != b:
            ni, nj = plan.inputs[i].name, plan.inputs[j].name
            out.append((
                f"input {nj!r} dim {e} has size {b}, but input {ni!r} dim {d} has size {a}: the graph was "
                f"captured with these dims equal (one dynamic size, {plan.inputs[i].shape[d]})",
                "pass inputs whose sizes agree there.",
            ))
    return out


def _fail(plan: _Plan, vals: tuple) -> None:
    problems = []
    for spec, x in zip(plan.inputs, vals):
        problems += _problems(spec, x)
    if not problems and all(isinstance(v, torch.Tensor) and all(isinstance(s, int) for s in v.shape)
                            for v, spec in zip(vals, plan.inputs) if spec.kind == "tensor"):
        problems = _cross_problems(plan, vals)
    if not problems:  # not expected: the fast path and this one disagree
        problems = [("the inputs do not match the captured ones", "call it with inputs like the capture's sample.")]
    _raise(plan, [p for p, _ in problems], " ".join(dict.fromkeys(f for _, f in problems)))


def _raise(plan: _Plan, problems: list[str], fix: str) -> None:
    who = f"The captured graph of {plan.source}" if plan.source else "The captured graph"
    if len(problems) == 1:
        text = f"{who} {problems[0]}." if problems[0].startswith(("takes", "got")) else f"{who}: {problems[0]}."
    else:
        text = f"{who}: wrong inputs:\n  " + "\n  ".join(problems)
    raise InputMismatchError(f"{text}\nHow to fix: {fix}")
