"""Model-wide rank selection: which layers to decompose, by which method, at which rank.

For every candidate layer and every allowed method, ``layer_options`` lists the ranks on the
rounded grid that make the layer cheaper (parameters and MACs both no higher, one lower), each with
its analytic cost and predicted relative error (the truncation error of the spectrum: weights, or
whitened outputs for activation-aware SVD).

``solve_budget`` then meets a model-wide budget on parameters or MACs at the least total loss
``sum_l -log(1 - e_l^2)`` (``e_l^2`` for small errors; see ``_loss``): per layer, the options'
(saving, loss) points are reduced to their lower convex hull, and hull steps are taken greedily
across layers by the smallest loss increase per unit of saved cost
(the Lagrangian relaxation of the multiple-choice knapsack: optimal at every hull vertex it stops
at). The last step can overshoot where a layer's hull has few vertices (random weights: the error
grows linearly with the saving); that layer then takes, among all its options, the lowest-error one
that still meets the budget.

Every method has an error curve: SVD, spatial SVD and Tucker-2 from their spectra (no decomposition),
tensor-train from its TT-SVD sweep (the exact error of TT-SVD at those ranks, a few small SVDs per
rank), and CP from trial decompositions at ``curve_points`` ranks per layer (``CpConv.curve``: CP-ALS
has no spectrum to read errors from; each trial is one time-limited CP-ALS, kept in the cache, so
the pass re-uses the one the plan picks). ``solve_uniform`` (one ratio for every layer, the largest
that meets the budget) remains for options without errors.

``solve_ratio`` picks, per layer, the option with the lowest predicted error among those keeping at
most a given fraction of the layer's parameters (``rank=0.5`` with ``method="auto"``).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any

from .common import DecomposePass
from .latency import Option
from .layers import Layer
from .ranks import solver_context

__all__ = ["Option", "LayerOptions", "layer_options", "solve_budget", "solve_uniform", "solve_ratio", "BudgetError"]


class BudgetError(ValueError):
    """The budget cannot be met; the message says how close it gets and what to change."""


@dataclass
class LayerOptions:
    layer: Layer
    options: list[Option] = field(default_factory=list)
    why_not: dict[str, str] = field(default_factory=dict)  # method -> reason it offers nothing

    def cost(self, metric: str) -> int:
        return self.layer.params() if metric == "params" else self.layer.macs()


def _cheaper(layer: Layer, params: int, macs: int) -> bool:
    p0, m0 = layer.params(), layer.macs()
    return params <= p0 and macs <= m0 and (params < p0 or macs < m0)


def layer_options(layer: Layer, passes: dict[str, DecomposePass], inputs: Any = None, exclude: dict[str, set] | None = None) -> LayerOptions:
    """Every cheaper (method, rank) of ``layer`` with its cost and predicted error."""
    with solver_context(layer.weight.numel()):
        return _layer_options(layer, passes, inputs, exclude)


def _layer_options(layer, passes, inputs, exclude) -> LayerOptions:
    out = LayerOptions(layer)
    for method, p in passes.items():
        if layer.kind not in p.kinds:
            continue
        why = p.applicable(layer)
        if why:
            out.why_not[method] = why
            continue
        analysis = p.cached_analysis(layer, inputs if p.wants_gram(layer) else None)
        banned = (exclude or {}).get(method, set())
        n = 0
        curve = p.curve(layer, analysis)  # methods whose errors need trial decompositions
        points = curve if curve is not None else [(r, None) for r in p.candidates(layer)]
        for r, err in points:
            if r in banned:
                continue
            params, macs = p.cost(layer, r)
            if not _cheaper(layer, params, macs):
                continue
            out.options.append(Option(method, r, params, macs, err if curve is not None else p.predicted_error(layer, analysis, r)))
            n += 1
        if n == 0:
            out.why_not[method] = "no rank makes it cheaper"
    return out


def _hull(points: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Lower convex hull of (saving, error^2, index) from (0, 0), saving ascending."""
    pts = sorted(points + [(0.0, 0.0, -1)], key=lambda t: (t[0], t[1]))
    pareto: list[tuple[float, float, int]] = []
    for p in pts:  # one point per saving: the lowest error (sorted first)
        if pareto and p[0] == pareto[-1][0]:
            continue
        pareto.append(p)
    hull: list[tuple[float, float, int]] = []
    for p in pareto:
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:  # hull[-1] is above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def solve_budget(layers: list[LayerOptions], metric: str, saving: float) -> dict[str, Option]:
    """The options (by layer node name) that save at least ``saving`` of ``metric`` at the least
    total squared predicted error (see the module docstring). Raises BudgetError if impossible."""
    key = (lambda o: o.params) if metric == "params" else (lambda o: o.macs)
    hulls = []
    for lo in layers:
        c0 = lo.cost(metric)
        pts = [(float(c0 - key(o)), _loss(o.error), i) for i, o in enumerate(lo.options) if c0 - key(o) > 0]
        hulls.append(_hull(pts) if pts else [(0.0, 0.0, -1)])
    heap: list[tuple[float, int, int]] = []
    for li, h in enumerate(hulls):
        if len(h) > 1:
            heapq.heappush(heap, (_slope(h[0], h[1]), li, 1))
    chosen: dict[int, int] = {}
    saved = 0.0
    last = None
    while saved < saving and heap:
        _, li, step = heapq.heappop(heap)
        h = hulls[li]
        saved += h[step][0] - h[step - 1][0]
        chosen[li] = h[step][2]
        last = li
        if step + 1 < len(h):
            heapq.heappush(heap, (_slope(h[step], h[step + 1]), li, step + 1))
    if saved < saving:
        raise BudgetError("unreachable")
    if chosen and last is not None:
        # the last hull step may overshoot (hull vertices are sparse where the error grows linearly):
        # among all of that layer's options, take the lowest-error one that still meets the budget
        li = last
        lo = layers[li]
        c0 = lo.cost(metric)
        current = c0 - key(lo.options[chosen[li]])
        needed = saving - (saved - current)
        fits = [(_loss(o.error), -(c0 - key(o)), i) for i, o in enumerate(lo.options) if c0 - key(o) >= needed]
        if fits:
            chosen[li] = min(fits)[2]
    return {layers[li].layer.name: layers[li].options[oi] for li, oi in chosen.items()}


def _loss(error: float | None) -> float:
    """What a layer's relative error e costs the model: ``-log(1 - e^2)``. A layer passing on a
    fraction ``1 - e^2`` of its output's energy as signal, in a chain, keeps ``prod(1 - e_l^2)`` of it;
    the sum of these losses is minus its log. Near 0 it is ``e^2`` (errors add like independent
    noise); towards e = 1 it grows without bound, so no layer is destroyed to spare the others."""
    e2 = min(float(error or 0.0) ** 2, 1.0 - 1e-9)
    return -math.log1p(-e2)


def _slope(a: tuple[float, float, int], b: tuple[float, float, int]) -> float:
    return (b[1] - a[1]) / max(b[0] - a[0], 1e-12)


def max_saving(layers: list[LayerOptions], metric: str) -> float:
    key = (lambda o: o.params) if metric == "params" else (lambda o: o.macs)
    return float(sum(max([lo.cost(metric) - key(o) for o in lo.options] + [0]) for lo in layers))


def solve_uniform(layers: list[LayerOptions], metric: str, saving: float) -> dict[str, Option]:
    """One ratio for all layers (each takes its costliest option within ratio x its cost), the largest
    that saves at least ``saving``."""
    key = (lambda o: o.params) if metric == "params" else (lambda o: o.macs)

    def pick(ratio: float) -> tuple[float, dict[str, Option]]:
        total, out = 0.0, {}
        for lo in layers:
            c0 = lo.cost(metric)
            fits = [o for o in lo.options if key(o) <= ratio * c0]
            if fits:
                o = max(fits, key=key)
                out[lo.layer.name] = o
                total += c0 - key(o)
        return total, out

    lo_r, hi_r = 0.0, 1.0
    best = pick(1.0)
    if best[0] >= saving:
        return best[1]
    for _ in range(40):
        mid = (lo_r + hi_r) / 2
        s, plan = pick(mid)
        if s >= saving:
            lo_r, best = mid, (s, plan)
        else:
            hi_r = mid
    s, plan = pick(lo_r)
    if s < saving:
        raise BudgetError("unreachable")
    return plan


def solve_ratio(layers: list[LayerOptions], ratio: float) -> dict[str, Option]:
    """Per layer: the lowest-error option keeping at most ``ratio`` of its parameters."""
    out = {}
    for lo in layers:
        target = ratio * lo.layer.params()
        fits = [o for o in lo.options if o.params <= target]
        if fits:
            out[lo.layer.name] = min(fits, key=lambda o: (o.error if o.error is not None else 1.0, -o.params))
    return out
