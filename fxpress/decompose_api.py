"""User functions for low-rank decomposition: ``decompose`` and ``decompose_report``.

    small = fxpress.decompose(model, (x,), method="auto", budget={"params": 0.5}, calibration=loader)
    print(fxpress.decompose_report(small))   # per layer: method, ranks, params/MACs before -> after, errors
    fxpress.export_onnx(small, (x,), "small.onnx")

``decompose`` captures the model (a captured GraphModule is copied, never edited), folds batch norms
(exact; decomposing the folded kernels accounts for the BN scales), plans the ranks and runs the
decomposition passes (svd-linear, spatial-svd-conv, tucker-conv, cp-conv, tt-linear) through the
PassManager, so the graph is verified after each. The result runs on any batch size like the
captured graph, its parameters are trainable (fine-tune it with any optimizer), and it composes with
``fxpress.quantize`` and ``fxpress.export_onnx``.

How ranks are chosen (exactly one of):

- ``budget={"params": f}`` / ``{"macs": f}``: the whole graph's parameters / MACs (counted after
  batch-norm folding) at most ``f`` of what they were. Every eligible layer offers its cheaper ranks
  (rounded to ``round_to``) with a predicted error; the plan meets the budget at the least total
  loss ``sum -log(1 - e^2)`` (about the sum of squared errors while they are small; it never wipes
  out one layer to spare others): greedy on loss per saved cost over each layer's convex hull; see
  passes/decompose/budget.py. Every method has such an error curve: SVD, spatial SVD and Tucker-2
  from their spectra, tensor-train from its TT-SVD sweep, CP from trial decompositions at
  ``curve_points`` ranks per layer (``method_options={"cp": {"curve_points": 4}}``; each a
  time-limited CP-ALS, cached for the pass).
- ``rank=``: an int (Tucker: also a pair), a float in (0, 1) = fraction of each layer's parameters
  kept (each layer takes, among the methods and ranks that fit, the objective's choice),
  ``"evbmf"``, or a dict {layer: rank}.
- ``energy=``: the fraction of spectral energy kept per layer (per mode for Tucker).

Where a ratio or a budget leaves a choice, ``objective=`` decides it (passes/decompose/latency.py):
"balanced" (default) times the shortlisted candidates' op chains on this machine at the layer's
input shape (eager PyTorch, the current thread count, cached) and trades latency against error
(2x faster is worth 5% more error), which mostly means SIMD-friendly ranks and no structures that
are slow here; "error" takes the lowest predicted error and times nothing; "latency" trades harder.
Under a budget the plan is made on errors, then each layer is re-chosen by the objective among its
options that cost no more than planned, so the budget stays met. The report notes what was timed.

``method="auto"`` chooses per layer among SVD (linears), Tucker-2 and spatial SVD (convolutions);
CP and TT are used when asked for by name. ``method=["auto", "cp"]`` with a ratio rank also tries CP
on each convolution (a CP-ALS per layer at the largest rank that fits, and with a latency-aware
objective at its multiples of 8 and 16) and weighs it with the others. ``calibration=`` makes the
decompositions data-aware (``whiten=True``): activation-whitened SVD for linears (diagonal whitening
past 8192 input features), and Tucker-2 / spatial SVD fitted to the convolutions' outputs
(passes/decompose/data_aware.py). ``tolerance=`` rolls back any layer whose relative output
error on the calibration (or sample) inputs exceeds it; under a budget, the plan is then redone with
those layers held to less aggressive ranks (up to ``replan`` times), and the report says whether the
budget was still met.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx

from .ir.capture import capture, normalize_inputs
from .ir.cost import count_params, total_macs
from .passes.decompose import METHODS, BudgetError, DecomposeReport, LayerRecord, find_layers, layer_options
from .passes.decompose.activations import batch_args, collect_inputs
from .passes.decompose.budget import LayerOptions, _cheaper, max_saving, solve_budget, solve_uniform
from .passes.decompose.common import RECORDS
from .passes.decompose.latency import LatencyModel, Option, choose, latency_note, objective_beta
from .passes.decompose.ranks import solver_context, validate_rule
from .passes.manager import PassManager

__all__ = ["decompose", "decompose_report", "AUTO_METHODS"]

AUTO_METHODS = ("svd", "tucker", "spatial-svd")
_PREP = ("fold-constants", "fold-batch-norm", "eliminate-dead-code")


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of a captured graph without the records of an earlier decomposition."""
    out = copy.deepcopy(gm)
    meta = out.meta.get("fxpress", {})
    out.meta["fxpress"] = {k: v for k, v in meta.items() if k not in (RECORDS, "decompose_report")}
    return out


def _graph(model: Any, inputs: tuple) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule) and any("val" in n.meta for n in model.graph.nodes):
        return _copy(model)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module or a captured GraphModule, got {type(model).__name__}")
    return capture(model, inputs, share_weights=False)  # training the result must never change the original


def _methods(method: Any) -> tuple[str, ...]:
    names = [method] if isinstance(method, str) else list(method) if isinstance(method, (list, tuple)) else None
    if not names:
        raise ValueError(f"method must be 'auto', one of {', '.join(METHODS)}, or a list of them; got {method!r}")
    out: list[str] = []
    for m in names:
        if m == "auto":
            out += [a for a in AUTO_METHODS if a not in out]
            continue
        if m not in METHODS:
            close = difflib.get_close_matches(str(m), [*METHODS, "auto"], n=2)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"unknown decomposition method {m!r}.{hint} Choose 'auto' or one of: {', '.join(METHODS)}.")
        if m not in out:
            out.append(m)
    return tuple(out)


def _check_budget(budget: Any) -> tuple[str, float] | None:
    if budget is None:
        return None
    if not isinstance(budget, dict) or len(budget) != 1:
        raise ValueError(f"budget is a dict with one entry, {{'params': f}} or {{'macs': f}} with f in (0, 1]; got {budget!r}")
    (what, value), = budget.items()
    if what not in ("params", "macs"):
        raise ValueError(f"budget on {what!r} is not supported: use {{'params': f}} or {{'macs': f}}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < float(value) <= 1.0):
        raise ValueError(f"budget {what} must be a fraction in (0, 1] of the model's {what} (e.g. 0.5), got {value!r}")
    return what, float(value)


def _resolve_names(gm: fx.GraphModule, names: Sequence[str] | None, what: str) -> None:
    if not names:
        return
    known = set()
    for layer in find_layers(gm)[0]:
        known |= {layer.name, layer.module}
    for node, _ in find_layers(gm)[1]:
        known.add(node.name)
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"{what}: {missing} match no convolution or linear layer (give node names or module paths, e.g. "
                         f"{sorted(k for k in known if k)[:5]})")


def _selected(layer, layers: Sequence[str] | None, exclude: Sequence[str]) -> bool:
    keys = {layer.name, layer.module}
    if any(k in keys for k in exclude):
        return False
    return layers is None or any(k in keys for k in layers)


def _rule_text(budget, rank, energy) -> str:
    if budget:
        return f"budget {budget[0]} <= {budget[1]:g}"
    if energy is not None:
        return f"energy {energy:g}"
    if isinstance(rank, dict):
        return f"ranks given for {len(rank)} layers"
    if isinstance(rank, float):
        return f"rank ratio {rank:g} of each layer's params"
    return f"rank {rank}"


def decompose(
    model: torch.nn.Module,
    example_inputs: Any,
    method: str | Sequence[str] = "auto",
    *,
    budget: dict[str, float] | None = None,
    rank: Any = None,
    energy: float | None = None,
    calibration: Iterable | None = None,
    tolerance: float | None = None,
    round_to: int = 8,
    layers: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    max_batches: int = 8,
    fold_batch_norm: bool = True,
    whiten: bool = True,
    replan: int = 3,
    progress: bool | None = None,
    verify: bool = True,
    method_options: dict[str, dict] | None = None,
    objective: str | float = "balanced",
    latency: Any = None,
) -> fx.GraphModule:
    """Decompose the convolutions and linears of ``model``; return the smaller GraphModule.

    method: "auto", "svd", "spatial-svd", "tucker", "cp", "tt", or a list of them.
    budget / rank / energy: how ranks are chosen (exactly one; see the module docstring).
    calibration: batches of inputs (a DataLoader or list; labels after the inputs are ignored):
        data-aware decompositions (with ``whiten``: activation-whitened SVD for linears, Tucker-2 and
        spatial SVD fitted to the convolutions' outputs) and the output errors the report shows
        and ``tolerance`` checks. Without it, errors are measured on ``example_inputs``.
    tolerance: the largest relative output error a layer may have (worse layers are rolled back).
    round_to: ranks become multiples of this where the layer is big enough (1 = no rounding).
    layers / exclude: only these / not these layers (node names or module paths).
    max_batches: calibration batches read. fold_batch_norm: fold BN first (exact).
    replan: planning rounds after tolerance roll-backs under a budget.
    progress: tqdm bars (None: on a terminal only). method_options: per method, extra pass options,
        e.g. {"cp": {"time_limit": 5, "restarts": 3}, "tt": {"cores": 4}, "tucker": {"iterations": 10}}.
    objective: where a rank ratio or a budget leaves a choice (method and ranks at a layer's cost),
        "balanced" (default: error and the latency measured on this machine; 2x faster is worth 5%
        more error), "error" (the lowest predicted error; nothing is timed), "latency" (2x faster
        is worth 41% more error), or the latency exponent itself; see passes/decompose/latency.py.
    latency: what measures candidates for a non-"error" objective: None (eager PyTorch at each
        layer's input shape, with the current thread count, cached), a ``LatencyModel`` (e.g.
        ``LatencyModel(threads=1)`` on a machine shared with other processes), or
        ``f(layer, {key: ops}) -> {key: ms}``.
    The report: ``decompose_report(result)``.
    """
    methods = _methods(method)
    beta = objective_beta(objective)
    bud = _check_budget(budget)
    if bud is not None and (rank is not None or energy is not None):
        raise ValueError("give one of budget=, rank= or energy= (a budget chooses the ranks itself)")
    if bud is None and rank is None and energy is None:
        raise ValueError("say how much to decompose: budget={'params': 0.5} (or {'macs': 0.5}), rank=0.5 "
                         "(fraction of each layer's params), rank=<int>, rank='evbmf', or energy=0.95")
    validate_rule(rank, energy)
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance <= 0):
        raise ValueError(f"tolerance is the largest relative output error a layer may have (a number > 0), got {tolerance!r}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be an integer >= 1, got {round_to!r}")
    if isinstance(layers, str):
        layers = [layers]
    if isinstance(exclude, str):
        exclude = [exclude]
    method_options = dict(method_options or {})
    unknown = [m for m in method_options if m not in METHODS]
    if unknown:
        raise ValueError(f"method_options for unknown methods {unknown}; methods: {', '.join(METHODS)}")

    inputs = normalize_inputs(example_inputs)
    trainable = any(p.requires_grad for p in model.parameters()) if isinstance(model, torch.nn.Module) else True
    gm = _graph(model, inputs)
    _resolve_names(gm, layers, "layers")
    _resolve_names(gm, list(exclude), "exclude")
    if fold_batch_norm:
        gm, _ = PassManager(list(_PREP), verify=verify).run(gm, inputs)
    gm.meta.setdefault("fxpress", {}).pop(RECORDS, None)

    calib = list(itertools.islice(calibration, max_batches)) if calibration is not None else None
    if calib is not None and not calib:
        raise ValueError("the calibration data yielded no batches; give a non-empty DataLoader or list of batches")
    error_batches = calib if calib is not None else [inputs]
    with torch.no_grad():
        reference = [gm(*batch_args(gm, b)) for b in error_batches]
    params_before, macs_before = count_params(gm), total_macs(gm)

    cache: dict = {}  # spectra shared by the rank search and the passes (one decomposition per kernel)

    def build(method_name: str, **kw):
        opts = dict(round_to=round_to, calibration=error_batches, max_batches=max_batches, tolerance=tolerance,
                    progress=progress, requires_grad=trainable, cache=cache, **kw)
        if method_name == "svd":
            opts["whiten"] = whiten and calib is not None
        if method_name in ("tucker", "spatial-svd"):
            opts["data_aware"] = whiten and calib is not None
        opts.update(method_options.get(method_name, {}))
        return METHODS[method_name](**opts)

    kinds = {k for m in methods for k in METHODS[m].kinds}
    all_layers, not_layers = find_layers(gm, tuple(sorted(kinds)))
    candidates = [layer for layer in all_layers if _selected(layer, layers, exclude)]
    candidate_names = {layer.name for layer in candidates}
    base = _copy(gm) if (bud is not None and tolerance is not None and replan > 0) else None

    plan_reasons: dict[str, str] = {}
    plan_notes: dict[str, list[str]] = {}
    timer = (latency if latency is not None else LatencyModel()) if beta > 0 else None
    rounds = 0
    banned: dict[str, float] = {}  # layer -> options with predicted error >= this are off the table
    options: list[LayerOptions] | None = None
    previous = None
    while True:
        rounds += 1
        plan = None
        if bud is not None or (isinstance(rank, float) and (len(methods) > 1 or beta > 0)):
            if options is None:
                planner = _Planner(gm, candidates, methods, build, calib, whiten, max_batches, progress, objective, timer, rank)
                options = planner.options(curves=bud is not None)
            opts = [_ban(lo, banned.get(lo.layer.name)) for lo in options]
            if bud is not None:
                try:
                    plan = _solve(opts, bud, methods, params_before, macs_before, not_layers)
                except BudgetError:
                    if previous is None:
                        raise
                    # the tolerance leaves too little to meet the budget: keep the last round's graph
                    rounds -= 1
                    work, pipeline, records, rolled, met, plan_reasons = previous
                    break
                plan_reasons = {}
                if beta > 0:
                    plan, plan_notes = planner.refine(plan, opts, bud[0], banned)
            else:
                plan, plan_notes = planner.ratio_plan(opts, rank, banned)
            for lo in opts:
                if lo.layer.name not in plan:
                    plan_reasons[lo.layer.name] = (
                        "; ".join(f"{m}: {why}" for m, why in lo.why_not.items()) if not lo.options
                        else "kept: the budget was met by decomposing layers that lose less per saved cost" if bud is not None
                        else f"no option keeps <= {rank:g} of its params"
                    )
            passes = []
            for m in methods:
                mine = {name: o.rank for name, o in plan.items() if o.method == m}
                if mine:
                    passes.append(build(m, rank=mine, layers=list(mine)))
        else:
            sel = dict(layers=layers, exclude=list(exclude))
            # several methods and a per-layer rule: one method per layer kind, the first allowed of
            # tucker/spatial-svd/cp for convolutions and svd/tt for linears
            wanted = [next((m for m in group if m in methods), None) for group in (("tucker", "spatial-svd", "cp"), ("svd", "tt"))]
            passes = [build(m, rank=rank, energy=energy, **sel) for m in wanted if m is not None]
        passes.sort(key=lambda p: 0 if "conv2d" in p.kinds else 1)
        work = gm if base is None else _copy(base)
        work.meta.setdefault("fxpress", {})[RECORDS] = []
        pipeline = None
        if passes:
            work, pipeline = PassManager(passes, verify=verify).run(work, inputs)
        records: list[LayerRecord] = list(work.meta["fxpress"].get(RECORDS, []))
        rolled = [r for r in records if r.reason.startswith("rolled back")]
        met = None
        if bud is not None:
            after = count_params(work) if bud[0] == "params" else total_macs(work)
            met = after <= bud[1] * (params_before if bud[0] == "params" else macs_before) + 0.5
        if bud is not None and rolled and not met and rounds <= replan and base is not None and plan is not None:
            previous = (work, pipeline, records, rolled, met, dict(plan_reasons))
            for r in rolled:
                o = plan.get(r.node)
                if o is not None and o.error is not None:
                    banned[r.node] = min(banned.get(r.node, math.inf), o.error)
            continue
        break
    gm = work

    report = DecomposeReport(
        method=method if isinstance(method, str) else "+".join(methods),
        rule=_rule_text(bud, rank, energy),
        params_before=params_before, params_after=count_params(gm),
        macs_before=macs_before, macs_after=total_macs(gm),
        budget={bud[0]: bud[1]} if bud else None, budget_met=met, pipeline=pipeline, rounds=rounds,
    )
    seen = set()
    by_node = {}
    for r in records:  # the last word on a layer wins (a later pass may have declined it)
        if r.status == "decomposed" or r.node not in by_node:
            by_node[r.node] = r
    for name, notes in plan_notes.items():
        if name in by_node and by_node[name].status == "decomposed":
            by_node[name].notes = [n for n in notes if n not in by_node[name].notes] + by_node[name].notes
    for layer in all_layers:
        if layer.name in by_node:
            report.layers.append(by_node[layer.name])
        elif layer.name in candidate_names:
            why = plan_reasons.get(layer.name) or "not selected by the plan"
            report.layers.append(LayerRecord(layer.name, layer.module, layer.describe(), "-", "skipped", why,
                                             params_before=layer.params(), macs_before=layer.macs()))
        seen.add(layer.name)
    for node, why in not_layers:
        if node.name not in seen:
            report.layers.append(LayerRecord(node.name, _module(node), str(node.target).split(".")[-2] if "." in str(node.target) else node.name,
                                             "-", "skipped", why))
    if bud is not None and not met:
        report.notes.append(
            f"the budget was not met: {len(rolled)} layers were rolled back by tolerance={tolerance:g}; raise the tolerance, "
            "lower the budget, or fine-tune after a milder decomposition"
        )
    if calib is None:
        report.notes.append("errors measured on example_inputs only; pass calibration= for data-aware SVD and representative errors")
    with torch.no_grad():
        outs = [gm(*batch_args(gm, b)) for b in error_batches]
    report.output_error = _relative_error(reference, outs)
    report.error_data = f"{len(error_batches)} calibration batches" if calib is not None else "example inputs"
    if trainable:
        for p in gm.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
    gm.meta.setdefault("fxpress", {})["decompose_report"] = report
    return gm


def _module(node: fx.Node) -> str:
    from .passes.decompose.layers import module_path

    return module_path(node)


def _ban(lo: LayerOptions, max_error: float | None) -> LayerOptions:
    if max_error is None:
        return lo
    kept = [o for o in lo.options if o.error is not None and o.error < max_error]
    out = LayerOptions(lo.layer, kept, dict(lo.why_not))
    if not kept:
        out.why_not["tolerance"] = "every cheaper rank exceeded the tolerance"
    return out


class _Planner:
    """The rank search of one ``decompose`` call: every candidate layer's options (cost and predicted
    error per method and rank), then the choice per layer under a ratio, or the refinement of a
    budget's plan by the objective (latency.py)."""

    def __init__(self, gm, candidates, methods, build, calib, whiten, max_batches, progress, objective, timer, ratio):
        self.gm, self.candidates, self.methods = gm, candidates, methods
        self.objective, self.timer = objective, timer
        self.progress = progress
        self.passes = {m: build(m, rank=None) for m in methods}
        self.grams: dict[str, Any] = {}
        if calib is not None and whiten:
            # the input statistics of the data-aware methods (whitened SVD; data-aware Tucker-2 and
            # spatial SVD, which also keep input samples to fit their output factors on)
            want = [(layer, p) for layer in candidates for p in self.passes.values() if layer.kind in p.kinds and p.wants_gram(layer)]
            full = sorted({layer.name for layer, p in want if p.wants_full_gram(layer)})
            diag = sorted({layer.name for layer, p in want} - set(full))
            convs = {layer.name: layer.kind for layer, _ in want if layer.kind == "conv2d"}
            linears = {layer.name: layer.kind for layer, _ in want if layer.kind == "linear"}
            if linears:
                self.grams.update(collect_inputs(gm, calib, linears, gram=[n for n in full if n in linears],
                                                 diag=[n for n in diag if n in linears], max_batches=max_batches, max_elements=0))
            if convs:
                self.grams.update(collect_inputs(gm, calib, convs, gram=[n for n in full if n in convs], max_batches=max_batches))

    def _inputs(self, p, layer):
        return self.grams.get(layer.name) if p.wants_gram(layer) else None

    def options(self, curves: bool) -> list[LayerOptions]:
        """Every candidate layer's options; ``curves``: also the methods whose errors need trial
        decompositions (CP: ``curve_points`` ranks), for a budget."""
        from tqdm.auto import tqdm

        passes = self.passes if curves else {m: p for m, p in self.passes.items() if m != "cp"}
        out = []
        bar = tqdm(self.candidates, desc="planning ranks", disable=(None if self.progress is None else not self.progress), leave=False)
        for layer in bar:
            lo = layer_options(layer, passes, self.grams.get(layer.name))
            if not curves and "cp" in self.passes:
                why = self.passes["cp"].applicable(layer) if layer.kind in self.passes["cp"].kinds else None
                if why:
                    lo.why_not["cp"] = why
            out.append(lo)
        return out

    def _frontier(self, lo: LayerOptions, cap: float, metric: str, max_error: float | None) -> list[Option]:
        """Options at the layer's frontier under ``cap`` for every method with an error curve, and for
        CP its trial decompositions there."""
        layer = lo.layer
        seen = {(o.method, o.rank) for o in lo.options}
        out = []
        with solver_context(layer.weight.numel()):
            for m, p in self.passes.items():
                if layer.kind not in p.kinds or p.applicable(layer):
                    continue
                if m == "cp":
                    out += self._cp_trials(p, layer, cap, metric)
                    continue
                analysis = p.cached_analysis(layer, self._inputs(p, layer))
                for r in p.frontier(layer, cap, metric):
                    if (m, r) in seen:
                        continue
                    params, macs = p.cost(layer, r)
                    if not _cheaper(layer, params, macs):
                        continue
                    out.append(Option(m, r, params, macs, p.predicted_error(layer, analysis, r)))
        if max_error is not None:
            out = [o for o in out if o.error is not None and o.error < max_error]
        return out

    def _cp_trials(self, cp, layer, cap: float, metric: str) -> list[Option]:
        """CP has no error curve: decompose the layer by CP at the frontier (the largest rank that fits;
        with a latency-aware objective also its multiples of 8 and 16), each once (kept in the cache
        for the pass). A CP that falls back to Tucker-2 is offered (as what the CP pass will emit)
        only where Tucker-2 is not a method of its own here."""
        ranks = cp.frontier(layer, cap, metric)
        if not ranks:
            return []
        if self.timer is None or objective_beta(self.objective) <= 0:
            ranks = ranks[-1:]
        out = []
        analysis = cp.cached_analysis(layer, None)
        for r in ranks:
            params, macs = cp.cost(layer, r)
            if not _cheaper(layer, params, macs):
                continue
            fac = cp.cached_factorization(layer, r, analysis)
            if fac.weight_error is not None and (fac.method == "cp" or "tucker" not in self.passes):
                out.append(Option("cp", r, params, macs, fac.weight_error))
        return out

    def _template(self, layer, o: Option):
        p = self.passes[o.method]
        if o.method == "cp":  # decomposed already (the trials): time what the pass will emit, a fallback included
            return p.cached_factorization(layer, o.rank, p.cached_analysis(layer, None)).ops
        return p.template(layer, o.rank)

    def _choose(self, layer, options: list[Option]) -> tuple[Option, list[str]]:
        best, info = choose(layer, options, self.objective, self.timer, lambda o: self._template(layer, o))
        return best, ([latency_note(self.objective, best, info)] if info else [])

    def ratio_plan(self, options: list[LayerOptions], ratio: float, banned: dict[str, float]) -> tuple[dict, dict]:
        """Per layer: the objective's choice among the options keeping at most ``ratio`` of its params."""
        plan, notes = {}, {}
        for lo in options:
            cap = ratio * lo.layer.params()
            fits = [o for o in lo.options if o.params <= cap] + self._frontier(lo, cap, "params", banned.get(lo.layer.name))
            if fits:
                plan[lo.layer.name], notes[lo.layer.name] = self._choose(lo.layer, fits)
        return plan, notes

    def refine(self, plan: dict, options: list[LayerOptions], metric: str, banned: dict[str, float]) -> tuple[dict, dict]:
        """A budget's plan, each layer re-chosen by the objective among its options that cost no more
        (in the budget's metric) than the planned one: the budget stays met."""
        key = (lambda o: o.params) if metric == "params" else (lambda o: o.macs)
        out, notes = dict(plan), {}
        by_name = {lo.layer.name: lo for lo in options}
        for name, chosen in plan.items():
            lo = by_name[name]
            cap = key(chosen)
            fits = [o for o in lo.options if key(o) <= cap] + [
                o for o in self._frontier(lo, cap, metric, banned.get(name)) if o.method != "cp"]
            if chosen not in fits:
                fits.append(chosen)
            out[name], notes[name] = self._choose(lo.layer, fits)
        return out, notes


def _solve(options, bud, methods, params_before, macs_before, not_layers):
    what, frac = bud
    total = params_before if what == "params" else macs_before
    need = total - frac * total
    if need <= 0:
        return {}
    can = max_saving(options, what)
    if can < need:
        best = (total - can) / total if total else 1.0
        fixed = [lo for lo in options if not lo.options]
        raise BudgetError(
            f"budget {{'{what}': {frac:g}}} cannot be met with method {'+'.join(methods)}: decomposing every eligible layer "
            f"at its smallest cheaper rank reaches {best:.3f} of the {what} ({len(fixed)} candidate layers cannot get cheaper, "
            f"{len(not_layers)} are not decomposable). Raise the budget to >= {math.ceil(best * 1000) / 1000:g}"
            + (", or use method='auto' to allow more layer kinds" if len(methods) < 3 else "")
            + ", or lower round_to."
        )
    # every method offers (rank, error) points (CP from trial decompositions); options without an
    # error, if any, are planned by one uniform ratio
    curves = [LayerOptions(lo.layer, [o for o in lo.options if o.error is not None], lo.why_not) for lo in options]
    if max_saving(curves, what) >= need:
        return solve_budget(curves, what, need)
    return solve_uniform(options, what, need)


def _relative_error(ref: list[Any], out: list[Any]) -> float:
    from torch.utils import _pytree as pytree

    num = den = 0.0
    for a, b in zip(ref, out):
        for x, y in zip(pytree.tree_leaves(a), pytree.tree_leaves(b)):
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                num += float((y.double() - x.double()).pow(2).sum())
                den += float(x.double().pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else num**0.5


def decompose_report(model: fx.GraphModule) -> DecomposeReport:
    """The report ``decompose`` attached to the graph it returned."""
    rep = getattr(model, "meta", {}).get("fxpress", {}).get("decompose_report")
    if rep is None:
        raise ValueError("this graph was not produced by fxpress.decompose (no decomposition report attached)")
    return rep
