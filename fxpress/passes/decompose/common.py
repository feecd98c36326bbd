"""What every decomposition pass shares: options, rank rules, the cheaper check, output errors,
tolerance roll-back, emission, and one ``LayerRecord`` per layer considered.

A concrete pass (svd_linear.py, spatial_svd_conv.py, tucker_conv.py, cp_conv.py, tt_linear.py)
supplies the method: which layers it applies to, the spectra it ranks by, the cost of a rank, and
the factorization itself. The loop here, per layer:

1. the rank: ``rank={layer: r}`` (a plan, e.g. from the model-wide budget), an int/tuple, a ratio of
   the layer's parameters, ``"evbmf"``, or ``energy=``; rounded to multiples of ``round_to``;
2. the cheaper check on the analytic cost: a layer is rewritten only when its parameters and MACs
   do not grow and at least one drops; otherwise it is left alone and the record says why;
3. the factorization, and its relative output error ``||y_hat - y|| / ||y||`` on the layer's inputs
   from the calibration batches (the graph as it is when the pass runs), in float64;
4. roll-back: with ``tolerance=``, a layer whose output error exceeds it is left as it was;
5. emission: the layer's node is replaced by the chain of factor ops (``ops.emit``), new parameters
   live next to the old weight (``layer1.0.conv1.tucker.0.weight``), the old weight is deleted.

``meta["val"]`` is refreshed once at the end. Records accumulate in
``gm.meta["fxpress"]["decompose_records"]`` for ``fxpress.decompose_report``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Sequence

import torch
import torch.fx as fx

from ...ir.report import PassReport
from ...ir.verify import refresh_meta
from ..base import Pass
from .activations import LayerInputs, collect_inputs
from .latency import LatencyModel, Option, choose, latency_note, objective_beta
from .layers import Layer, find_layers
from .ops import Factorization, emit
from .ranks import rank_grid, round_rank, solver_context, validate_rule

__all__ = ["DecomposePass", "LayerRecord", "RECORDS", "format_ranks", "resolve_plan_key"]

RECORDS = "decompose_records"


def format_ranks(ranks: Any) -> str:
    if isinstance(ranks, (tuple, list)):
        return "(" + ", ".join(str(r) for r in ranks) + ")"
    return str(ranks)


@dataclass
class LayerRecord:
    """One layer a decomposition pass considered: what it did, or why not."""

    node: str
    module: str
    layer: str  # "conv 64->64 3x3 s2"
    method: str
    status: str  # "decomposed" | "skipped"
    reason: str = ""
    ranks: Any = None
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    weight_error: float | None = None
    output_error: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.node} ({self.module})" if self.module else self.node


def resolve_plan_key(layer: Layer, plan: dict[str, Any]) -> Any:
    """A rank from a {layer: rank} dict, keyed by node name or module path; None if absent."""
    if layer.name in plan:
        return plan[layer.name]
    if layer.module and layer.module in plan:
        return plan[layer.module]
    return None


def _no_progress(it, **_):
    return it


class DecomposePass(Pass):
    """Base of the decomposition passes (not registered itself). Options:

    rank: int (tuple for Tucker), float in (0, 1) = fraction of the layer's parameters kept,
        "evbmf", or {layer: rank} keyed by node name or module path (layers not in it are left alone).
    energy: fraction of the squared singular values kept (per mode for Tucker).
    round_to: ranks become multiples of this where the layer is big enough (>= 2 * round_to).
    calibration: batches of model inputs for the output errors (and activation-aware SVD);
        without them errors are reported on the weights only.
    max_batches: how many calibration batches are read.
    tolerance: largest relative output error a layer may have; worse layers are left as they were.
    layers / exclude: restrict to these layers / leave these alone (node names or module paths).
    progress: a tqdm bar over the layers (None: only on a terminal).
    requires_grad: whether the new factors are trainable (for fine-tuning).
    only_cheaper: leave layers alone that would not get cheaper (False: decompose anyway; for
        experiments and for checking exactness at full rank).
    cache: a dict the caller owns in which spectra are kept by (method, weight, data) so that a rank
        search and the pass that follows it decompose each kernel once (``fxpress.decompose`` does this).
    objective: how a ratio rank is chosen among the ranks that fit: "error" (the lowest predicted
        error; the default of a pass), "balanced" or "latency" (weigh the measured latency of each
        candidate on this machine too; see latency.py), or a latency exponent >= 0.
    latency: what times the candidates for a non-"error" objective (default: a ``LatencyModel``,
        eager PyTorch at the layer's input shape), or any ``f(layer, {key: ops}) -> {key: ms}``.
    """

    exact: ClassVar[bool] = False
    method: ClassVar[str] = ""
    kinds: ClassVar[tuple[str, ...]] = ()
    default_rank: ClassVar[Any] = 0.5

    def __init__(
        self,
        rank: Any = None,
        *,
        energy: float | None = None,
        round_to: int = 1,
        calibration: Iterable | None = None,
        max_batches: int | None = 8,
        tolerance: float | None = None,
        layers: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        progress: bool | None = False,
        requires_grad: bool = True,
        only_cheaper: bool = True,
        cache: dict | None = None,
        objective: Any = "error",
        latency: Any = None,
    ):
        validate_rule(rank, energy)
        self.beta = objective_beta(objective)
        self.objective = objective
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"round_to must be an integer >= 1, got {round_to!r}")
        if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance <= 0):
            raise ValueError(f"tolerance is the largest relative output error a layer may have (a number > 0), got {tolerance!r}")
        if calibration is not None and iter(calibration) is calibration:
            calibration = list(calibration)  # a one-shot iterator: the pass may read it more than once
        self.rank = rank if rank is not None or energy is not None else self.default_rank
        self.energy = float(energy) if energy is not None else None
        self.round_to = round_to
        self.calibration = calibration
        self.max_batches = max_batches
        self.tolerance = float(tolerance) if tolerance is not None else None
        self.layers = list(layers) if layers is not None else None
        self.exclude = list(exclude)
        self.progress = progress
        self.requires_grad = requires_grad
        self.only_cheaper = only_cheaper
        self.cache = cache
        self.latency = latency if latency is not None or self.beta <= 0 else LatencyModel()

    # ---- the method's hooks -------------------------------------------------------------------

    def applicable(self, layer: Layer) -> str | None:
        """None, or why this method cannot decompose the layer."""
        return None

    def wants_gram(self, layer: Layer) -> bool:
        """Whether the analysis reads input statistics (activations.py) beyond the samples."""
        return False

    def wants_full_gram(self, layer: Layer) -> bool:
        """With ``wants_gram``: the full second moment (else only its diagonal)."""
        return True

    def analyze(self, layer: Layer, inputs: LayerInputs | None) -> Any:
        """Spectra etc. the rank rules and the factorization read (computed once per layer)."""
        return None

    def full_rank(self, layer: Layer) -> Any:
        raise NotImplementedError

    def normalize_rank(self, layer: Layer, rank: Any) -> Any:
        """A user's int/tuple rank clamped to what the layer allows (default: one rank, rounded)."""
        if isinstance(rank, (tuple, list)):
            rank = rank[0]
        return round_rank(int(rank), self.full_rank(layer), self.round_to)

    def candidates(self, layer: Layer) -> list[Any]:
        """Ranks a ratio search walks (rounded per ``round_to``; default: one rank)."""
        return rank_grid(self.full_rank(layer), self.round_to)

    def cost(self, layer: Layer, rank: Any) -> tuple[int, int]:
        """(params, MACs) of the decomposed layer at ``rank``, analytically."""
        raise NotImplementedError

    def energy_rank(self, layer: Layer, analysis: Any, energy: float) -> Any:
        raise NotImplementedError

    def evbmf_rank(self, layer: Layer, analysis: Any) -> tuple[Any, list[str]]:
        raise NotImplementedError

    def curve(self, layer: Layer, analysis: Any) -> list[tuple[Any, float]] | None:
        """(rank, error) points for a model-wide budget where ``predicted_error`` cannot give them
        without decomposing (CP); None: the budget reads ``predicted_error`` on ``candidates``."""
        return None

    def predicted_error(self, layer: Layer, analysis: Any, rank: Any) -> float | None:
        """Relative error the rank search ranks by (weights, or whitened outputs); None if unknown."""
        return None

    def factorize(self, layer: Layer, rank: Any, analysis: Any) -> Factorization:
        raise NotImplementedError

    def template(self, layer: Layer, rank: Any) -> list | None:
        """The op chain the layer would become at ``rank``, with random factors (what latency is
        measured on); None where it cannot be built without decomposing."""
        return None

    def frontier(self, layer: Layer, cap: float, metric: str = "params") -> list[Any]:
        """The ranks that use most of ``cap`` (the layer's parameters or MACs after decomposing): the
        largest that fits, and the largest multiples of 8 and of 16 that fit (SIMD-friendly widths
        the latency-aware choice times next to it). Default: one scalar rank, cost growing with it."""
        idx = 0 if metric == "params" else 1
        cands = self.candidates(layer)
        if not cands or not all(isinstance(r, int) for r in cands):
            return [r for r in cands if self.cost(layer, r)[idx] <= cap]
        full = max(cands)
        step = self.round_to if full >= 2 * self.round_to else 1
        lo, hi = 0, full // step
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.cost(layer, mid * step)[idx] <= cap:
                lo = mid
            else:
                hi = mid - 1
        r_max = full if full % step and self.cost(layer, full)[idx] <= cap else lo * step
        if r_max < 1:
            return []
        return sorted({r_max} | {r_max // m * m for m in (8, 16) if r_max // m * m >= 1 and m % step == 0})

    # ---- rank rules ---------------------------------------------------------------------------

    def ratio_rank(self, layer: Layer, ratio: float, analysis: Any = None) -> Any:
        """Among the candidates whose parameters are at most ``ratio`` of the layer's: the one with the
        lowest predicted error (where the method predicts errors), else the largest."""
        target = ratio * layer.params()
        cands = self.candidates(layer)
        if cands and all(isinstance(r, int) for r in cands):
            # one scalar rank, cost growing with it: every rank up to the largest candidate is a
            # candidate (the grid is thinned for searches; a ratio should use its whole budget)
            step = self.round_to if max(cands) >= 2 * self.round_to else 1
            lo, hi = 0, max(cands) // step
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self.cost(layer, mid * step)[0] <= target:
                    lo = mid
                else:
                    hi = mid - 1
            if lo > 0:
                return lo * step
        best = None
        for r in cands:
            p, _ = self.cost(layer, r)
            if p > target:
                continue
            err = self.predicted_error(layer, analysis, r) if analysis is not None else None
            key = (err if err is not None else 0.0, -p)
            if best is None or key < best[0]:
                best = (key, r)
        if best is None:
            cands = self.candidates(layer)
            return min(cands, key=lambda r: self.cost(layer, r)[0]) if cands else None
        return best[1]

    def choose_rank(self, layer: Layer, analysis: Any) -> tuple[Any, list[str]]:
        rule: Any = self.rank
        notes: list[str] = []
        if isinstance(rule, dict):
            rule = resolve_plan_key(layer, rule)
        if self.energy is not None:
            return self.energy_rank(layer, analysis, self.energy), notes
        if isinstance(rule, str):
            return self.evbmf_rank(layer, analysis)
        if isinstance(rule, float):
            if self.beta > 0 and self.latency is not None and analysis is not None:
                return self.balanced_rank(layer, rule, analysis, notes), notes
            return self.ratio_rank(layer, rule, analysis), notes
        return self.normalize_rank(layer, rule), notes

    def balanced_rank(self, layer: Layer, ratio: float, analysis: Any, notes: list[str]) -> Any:
        """A ratio rank chosen by ``objective`` among the frontier of ranks that fit (latency.py)."""
        cap = ratio * layer.params()
        options = []
        for r in self.frontier(layer, cap):
            params, macs = self.cost(layer, r)
            options.append(Option(self.method, r, params, macs, self.predicted_error(layer, analysis, r)))
        if not options:
            return self.ratio_rank(layer, ratio, analysis)
        best, info = choose(layer, options, self.objective, self.latency, lambda o: self.template(layer, o.rank))
        if info:
            notes.append(latency_note(self.objective, best, info))
        return best.rank

    # ---- the loop -----------------------------------------------------------------------------

    def _selected(self, layer: Layer) -> bool:
        keys = {layer.name, layer.module}
        if any(k in keys for k in self.exclude):
            return False
        if isinstance(self.rank, dict) and resolve_plan_key(layer, self.rank) is None:
            return False
        if self.layers is not None and not any(k in keys for k in self.layers):
            return False
        return True

    def _record(self, layer: Layer, status: str, reason: str = "", **kw) -> LayerRecord:
        return LayerRecord(layer.name, layer.module, layer.describe(), self.method, status, reason,
                           params_before=layer.params(), macs_before=layer.macs(), **kw)

    def run(self, gm: fx.GraphModule, report: PassReport) -> None:
        from tqdm.auto import tqdm

        records: list[LayerRecord] = gm.meta.setdefault("fxpress", {}).setdefault(RECORDS, [])
        layers, not_layers = find_layers(gm, self.kinds)
        for node, why in not_layers:
            if self.layers is None or node.name in self.layers:
                report.skip(node.name, why)
        chosen = [layer for layer in layers if self._selected(layer)]
        if len(chosen) < len(layers):
            report.note(f"{len(layers) - len(chosen)} of {len(layers)} {'/'.join(self.kinds)} layers not selected (layers=/exclude=/rank plan)")
        todo = []
        for layer in chosen:
            why = self.applicable(layer)
            if why:
                report.skip(layer.label, why)
                records.append(self._record(layer, "skipped", why))
            else:
                todo.append(layer)
        if not todo:
            if not chosen:
                report.note(f"no {'/'.join(self.kinds)} layer to decompose")
            return
        inputs: dict[str, LayerInputs] = {}
        if self.calibration is not None:
            inputs = collect_inputs(
                gm, self.calibration, {layer.name: layer.kind for layer in todo},
                gram=[layer.name for layer in todo if self.wants_gram(layer) and self.wants_full_gram(layer)],
                diag=[layer.name for layer in todo if self.wants_gram(layer) and not self.wants_full_gram(layer)],
                max_batches=self.max_batches,
            )
        bar = tqdm(todo, desc=self.name, disable=(None if self.progress is None else not self.progress), leave=False) if len(todo) > 1 else todo
        changed = False
        for layer in bar:
            rec = self._one(gm, layer, inputs.get(layer.name))
            records.append(rec)
            if rec.status == "decomposed":
                changed = True
                err = f", output error {rec.output_error:.3g}" if rec.output_error is not None else (
                    f", weight error {rec.weight_error:.3g}" if rec.weight_error is not None else "")
                report.change(
                    f"{rec.name}: {self.method} ranks {format_ranks(rec.ranks)}, params {rec.params_before:,} -> {rec.params_after:,}, "
                    f"MACs {rec.macs_before:,} -> {rec.macs_after:,}{err}",
                    "layers decomposed",
                )
                for n in rec.notes:
                    report.note(f"{rec.name}: {n}")
            else:
                report.skip(rec.name, rec.reason)
        if changed:
            gm.graph.lint()
            gm.recompile()
            refresh_meta(gm)

    def _one(self, gm: fx.GraphModule, layer: Layer, inputs: LayerInputs | None) -> LayerRecord:
        with solver_context(layer.weight.numel()):
            return self._decompose(gm, layer, inputs)

    def cached_analysis(self, layer: Layer, inputs: LayerInputs | None) -> Any:
        if self.cache is None:
            return self.analyze(layer, inputs)
        data = inputs is not None and (inputs.gram is not None or inputs.sq is not None) and self.wants_gram(layer)
        key = (type(self).__name__, layer.weight_node.target, tuple(layer.weight.shape), data)
        if key not in self.cache:
            self.cache[key] = self.analyze(layer, inputs)
        return self.cache[key]

    def cached_factorization(self, layer: Layer, rank: Any, analysis: Any) -> Factorization:
        """``factorize``, kept in ``cache`` (a trial decomposition during a rank search is not redone)."""
        if self.cache is None:
            return self.factorize(layer, rank, analysis)
        key = ("factorization", type(self).__name__, layer.weight_node.target, tuple(layer.weight.shape), repr(rank))
        if key not in self.cache:
            self.cache[key] = self.factorize(layer, rank, analysis)
        fac = self.cache[key]
        # the ops that reuse the bias point at its node: the one of *this* graph (the cached
        # factorization may come from a rank search on a copy)
        ops = [dataclasses.replace(op, bias_node=layer.bias_node) if getattr(op, "bias_node", None) is not None else op
               for op in fac.ops]
        return dataclasses.replace(fac, ops=ops, notes=list(fac.notes))

    def _decompose(self, gm: fx.GraphModule, layer: Layer, inputs: LayerInputs | None) -> LayerRecord:
        analysis = self.cached_analysis(layer, inputs)
        rank, notes = self.choose_rank(layer, analysis)
        if rank is None:
            return self._record(layer, "skipped", "no rank fits the layer")
        params, macs = self.cost(layer, rank)
        p0, m0 = layer.params(), layer.macs()
        if self.only_cheaper and (params >= p0 and macs >= m0 or params > p0 or macs > m0):
            grew = [f"{what} {a:,} -> {b:,}" for what, a, b in (("params", p0, params), ("MACs", m0, macs)) if b >= a]
            return self._record(layer, "skipped", f"not cheaper at ranks {format_ranks(rank)}: " + ", ".join(grew), ranks=rank,
                                params_after=params, macs_after=macs, notes=notes)
        fac = self.cached_factorization(layer, rank, analysis)
        notes = notes + fac.notes
        params, macs = fac.params(layer), fac.macs(layer)
        if self.only_cheaper and (params > p0 or macs > m0):  # a fallback (CP -> Tucker) may land elsewhere than planned
            return self._record(layer, "skipped", f"not cheaper as factorized ({fac.method} {format_ranks(fac.ranks)}): params "
                                f"{p0:,} -> {params:,}, MACs {m0:,} -> {macs:,}", ranks=fac.ranks, notes=notes)
        out_err = None
        x = inputs.sample() if inputs is not None else None
        if x is not None:
            with torch.no_grad():
                ref = layer.apply(x, dtype=torch.float64)
                got = fac.apply(x, dtype=torch.float64)
                denom = ref.norm().item()
                out_err = (got - ref).norm().item() / denom if denom > 0 else (got - ref).norm().item()
        rec = self._record(layer, "decomposed", ranks=fac.ranks, params_after=params, macs_after=macs,
                           weight_error=fac.weight_error, output_error=out_err, notes=notes)
        rec.method = fac.method
        if self.tolerance is not None and out_err is not None and out_err > self.tolerance:
            rec.status = "skipped"
            rec.reason = f"rolled back: output error {out_err:.3g} > tolerance {self.tolerance:g} at ranks {format_ranks(fac.ranks)}"
            return rec
        if self.tolerance is not None and out_err is None:
            rec.notes.append("tolerance not checked: no calibration data (pass calibration= to measure output errors)")
        emit(gm, layer, fac, requires_grad=self.requires_grad)
        return rec
