"""Where quantization loses accuracy, and keeping the worst layers in float until a target is met.

SQNR (signal-to-quantization-noise ratio) of a quantized tensor ŷ against its float value y,
summed over every element of every batch:

    SQNR = 10 · log10( Σ y² / Σ (y - ŷ)² )  dB      (∞ when they are equal; 20 dB ≈ 10% error, 40 dB ≈ 1%)

* ``compare_nodes(float_gm, quant_gm, inputs)``: SQNR per node. Nodes are matched by name: the
  quantization passes keep every original node (and its name) and only add quantize/dequantize
  nodes around them, so ``conv2d_3`` in the quantized graph computes the same tensor as
  ``conv2d_3`` in the float graph. ``mode="cumulative"`` (default) runs both graphs as they are: a
  node's SQNR includes everything quantized upstream. ``mode="local"`` feeds every matched node
  of the quantized graph the float values of its inputs, so a node's SQNR is what its own input
  quantization and weight quantization cost: the layer that hurts stands out.
* ``sensitivity(model, example_inputs, calibration, config)``: the model's output SQNR when only
  one layer is quantized, for every layer the config quantizes; most sensitive first.
* ``auto_fallback(..., target_sqnr=30.0)``: quantize everything; while the output SQNR is below
  the target, keep the next most sensitive layer in float (``QuantConfig(nodes={name: None})``).
  Returns the graph and a ``FallbackReport`` (which layers fell back, the SQNR reached).
  ``fxpress.quantize(..., target_sqnr=...)`` calls it.

The float reference: ``compare_nodes`` takes the float model, its captured graph, or the prepared
graph. Quantization rewrites the float graph before observing it (batch-norm folding, and the
exact CLE / SmoothQuant rescalings, which change intermediate tensors channel by channel), so a
model or a captured graph is brought to the same point by replaying the float passes recorded
in the quantized graph's ``meta["fxpress"]["float_passes"]``. ``float_graph(prepared)`` gives it
directly from a prepared graph (observers removed).

``sensitivity`` and ``auto_fallback`` drive the user-level pipeline (prepare → calibrate → convert)
and so import ``fxpress.api`` lazily; ``compare_nodes`` uses only the IR and the pass manager.
Each trial re-observes a copy of the float graph captured once; cost: one calibration + convert
per layer for ``sensitivity``, plus one per fallen-back layer for ``auto_fallback``.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Any, Iterable, NamedTuple

import torch
import torch.fx as fx
from torch.fx import _pytree as fx_pytree
from torch.utils import _pytree as pytree

from ...ir.capture import capture, normalize_inputs
from ...ir.graph import node_label
from ..manager import PassManager
from .bias_correction import RECORDER_ROOT
from .config import MODES, OP_KINDS, QuantConfig, op_kind
from .insert_observers import OBSERVER_ROOT

__all__ = [
    "NodeSQNR",
    "FallbackReport",
    "sqnr",
    "float_graph",
    "compare_nodes",
    "sensitivity",
    "auto_fallback",
]

_DEFAULT_FLOAT_PASSES = ("fold-constants", "fold-batch-norm", "eliminate-dead-code")


class NodeSQNR(NamedTuple):
    """One row: the node (name in the graph; a layer for ``sensitivity``) and its SQNR in dB."""

    node: str
    sqnr_db: float


def sqnr(ref: Any, out: Any) -> float:
    """SQNR in dB of ``out`` against ``ref`` (tensors or matching structures of tensors)."""
    signal, noise = _energy(ref, out)
    return _db(signal, noise)


def _energy(ref: Any, out: Any) -> tuple[float, float]:
    refs = [t for t in pytree.tree_leaves(ref) if isinstance(t, torch.Tensor)]
    outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    signal = noise = 0.0
    for a, b in zip(refs, outs):
        a64, b64 = a.detach().double(), b.detach().double()
        signal += float(a64.pow(2).sum())
        noise += float((a64 - b64).pow(2).sum())
    return signal, noise


def _db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise, dtype=torch.float64)).item()


# ---------------------------------------------------------------------------------------------
# inputs and the float reference


def _batches(inputs: Any) -> list[tuple[tuple, dict]]:
    """One batch (a tensor, or a tuple of inputs) or a list of batches → [(args, kwargs)]."""
    if isinstance(inputs, list):
        out = []
        for b in inputs:
            if isinstance(b, dict):
                out.append(((), b))
            else:
                out.append((normalize_inputs(b), {}))
        return out
    if isinstance(inputs, dict):
        return [((), inputs)]
    return [(normalize_inputs(inputs), {})]


def _calibration_batches(data: Iterable, arity: int, max_batches: int | None) -> list[tuple[tuple, dict]]:
    from ...api import _batch_args  # noqa: PLC0415  (the calibration batch convention lives there)

    return [_batch_args(b, arity) for b in itertools.islice(data, max_batches)]


def float_graph(prepared: fx.GraphModule) -> fx.GraphModule:
    """A float copy of a prepared graph: observers and recorders removed, float passes kept."""
    if any(n.op == "call_function" and "dequantize" in str(n.target) for n in prepared.graph.nodes):
        raise ValueError("float_graph() takes a prepared (observed) graph, not a converted one")
    gm = copy.deepcopy(prepared)
    for node in list(gm.graph.nodes):
        node.meta.pop("fxpress_quant", None)
        if node.op == "call_module" and str(node.target).split(".")[0] in (OBSERVER_ROOT, RECORDER_ROOT):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    for root in (OBSERVER_ROOT, RECORDER_ROOT):
        if hasattr(gm, root):
            delattr(gm, root)
    gm.graph.lint()
    gm.recompile()
    meta = prepared.meta.get("fxpress", {})
    gm.meta["fxpress"] = {
        "float_reference": True,
        "float_passes": meta.get("float_passes", list(_DEFAULT_FLOAT_PASSES)),
        "example_inputs": meta.get("example_inputs"),
    }
    return gm


def _reference_graph(float_model: Any, quant_gm: fx.GraphModule, batches: list) -> fx.GraphModule:
    meta = getattr(float_model, "meta", {}).get("fxpress", {}) if isinstance(float_model, fx.GraphModule) else {}
    if meta.get("float_reference"):
        return float_model
    if isinstance(float_model, fx.GraphModule) and hasattr(float_model, OBSERVER_ROOT):
        return float_graph(float_model)
    qmeta = quant_gm.meta.get("fxpress", {})
    if isinstance(float_model, fx.GraphModule) and any("val" in n.meta for n in float_model.graph.nodes):
        gm = copy.deepcopy(float_model)
    elif isinstance(float_model, torch.nn.Module):
        example = qmeta.get("example_inputs") or batches[0][0]
        gm = capture(float_model, example)
    else:
        raise TypeError(f"compare_nodes takes the float model or a graph of it, not {type(float_model).__name__}")
    passes = qmeta.get("float_passes", list(_DEFAULT_FLOAT_PASSES))
    gm, _ = PassManager(passes, verify=False).run(gm)
    return gm


def _flat_args(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    spec = getattr(gm, "_in_spec", None)
    if spec is not None:
        return fx_pytree.tree_flatten_spec((list(args), kwargs), spec)
    return [*args, *kwargs.values()]


class _Run(fx.Interpreter):
    """Runs a graph, keeping copies of the named nodes' outputs, optionally substituting values."""

    def __init__(self, gm: fx.GraphModule, keep: set[str], substitute: dict[str, torch.Tensor] | None = None, on_value=None):
        super().__init__(gm)
        self.keep, self.substitute, self.on_value = keep, substitute, on_value
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op != "call_function" or not isinstance(out, torch.Tensor):
            return out
        if self.on_value is not None:
            self.on_value(n, out)
        if n.name in self.keep:
            self.values[n.name] = out.detach().clone()
        if self.substitute is not None and n.name in self.substitute:
            ref = self.substitute[n.name]
            if ref.shape == out.shape and ref.dtype == out.dtype:
                return ref.clone()
        return out


def compare_nodes(
    float_gm: Any,
    quant_gm: fx.GraphModule,
    inputs: Any,
    *,
    mode: str = "cumulative",
    all_nodes: bool = False,
) -> list[NodeSQNR]:
    """SQNR (dB) of each node of ``quant_gm`` against the same node of the float graph, in graph order.

    float_gm: the float model, its captured graph, or the prepared graph (see the module docstring).
    inputs: one batch (a tensor or a tuple of inputs) or a list of batches; SQNR sums over all.
    mode: "cumulative" (both graphs run as they are) or "local" (each quantized node gets the float
    values of its inputs, so its SQNR is its own quantization error).
    all_nodes: every matched node with a float tensor output, not just the quantizable ops
    (conv, linear, matmul, add, mul, cat, pooling) and the nodes the model returns.
    """
    if mode not in ("cumulative", "local"):
        raise ValueError(f"mode must be 'cumulative' or 'local', got {mode!r}")
    batches = _batches(inputs)
    ref_gm = _reference_graph(float_gm, quant_gm, batches)
    float_names = {n.name for n in ref_gm.graph.nodes if n.op == "call_function"}
    outputs = {a.name for a in quant_gm.graph.output_node().all_input_nodes}
    matched = [n for n in quant_gm.graph.nodes if n.op == "call_function" and n.name in float_names]
    reported = [n for n in matched if all_nodes or op_kind(n) is not None or n.name in outputs]
    reported = [n for n in reported if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].is_floating_point()]
    keep = {n.name for n in matched} if mode == "local" else {n.name for n in reported}
    report_names = {n.name for n in reported}
    energy = {n.name: [0.0, 0.0] for n in reported}
    with torch.no_grad():
        for args, kwargs in batches:
            ref = _Run(ref_gm, keep)
            ref.run(*_flat_args(ref_gm, args, kwargs))

            def accumulate(n: fx.Node, out: torch.Tensor, values=ref.values) -> None:
                if n.name in report_names and n.name in values and values[n.name].shape == out.shape:
                    s, e = _energy(values[n.name], out)
                    energy[n.name][0] += s
                    energy[n.name][1] += e

            run = _Run(quant_gm, set(), ref.values if mode == "local" else None, on_value=accumulate)
            run.run(*_flat_args(quant_gm, args, kwargs))
    return [NodeSQNR(n.name, _db(*energy[n.name])) for n in reported]


# ---------------------------------------------------------------------------------------------
# sensitivity and fallback


@dataclasses.dataclass
class FallbackReport:
    """What ``auto_fallback`` did: the layers kept in float and the SQNR reached."""

    target_sqnr_db: float
    sqnr_db: float
    initial_sqnr_db: float
    met: bool
    fallbacks: list[str] = dataclasses.field(default_factory=list)  # node labels, most sensitive first
    sensitivity: list[NodeSQNR] = dataclasses.field(default_factory=list)
    trials: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (layers in float, SQNR)
    quantized_layers: int = 0

    def __str__(self) -> str:
        head = (
            f"output SQNR {self.sqnr_db:.1f} dB (target {self.target_sqnr_db:.1f} dB, "
            f"{'met' if self.met else 'NOT met'}); all layers quantized: {self.initial_sqnr_db:.1f} dB"
        )
        if not self.fallbacks:
            return head + "; no layer kept in float"
        lines = [head, f"{len(self.fallbacks)} of {self.quantized_layers} layers kept in float (most sensitive first):"]
        sens = dict(self.sensitivity)
        lines += [f"  {name}: output SQNR {sens.get(name, float('nan')):.1f} dB when quantized alone" for name in self.fallbacks]
        return "\n".join(lines)


class _Session:
    """One capture, one float graph, the calibration and evaluation batches; runs quantization trials."""

    def __init__(self, model, example_inputs, calibration, config, *, eval_data, max_batches, equalize, bias_correction, smooth_quant, verify):
        from ...api import prepare  # noqa: PLC0415

        if calibration is None:
            raise ValueError("sensitivity analysis needs calibration data (a list or DataLoader of batches)")
        self.cfg = QuantConfig.coerce(config)
        self.inputs = normalize_inputs(example_inputs)
        self.calibration = list(itertools.islice(calibration, max_batches))
        if not self.calibration:
            raise ValueError("the calibration data yielded no batches")
        self.bias_correction = bias_correction
        self.base = prepare(
            model, self.inputs, self.cfg, verify=verify, equalize=equalize, bias_correction=bias_correction,
            smooth_quant=smooth_quant, calibration=self.calibration,
        )
        self.float_passes = self.base.meta["fxpress"].get("float_passes")
        self.layers = [n for n in self.base.graph.nodes if n.op == "call_function" and n.meta.get("fxpress_quant") in MODES]
        self.float_gm = float_graph(self.base)
        # the trials prepare the folded float graph: drop the names only the unfolded graph had (a
        # folded batch norm's path), which the checked config kept but that match nothing now
        self.cfg = _names_in(self.cfg, self.float_gm)
        arity = len(self.inputs)
        evaluation = eval_data if eval_data is not None else self.calibration
        self.eval = _calibration_batches(evaluation, arity, None)
        with torch.no_grad():
            self.reference = [self.float_gm(*a, **k) for a, k in self.eval]

    def score(self, gm: fx.GraphModule) -> float:
        signal = noise = 0.0
        with torch.no_grad():
            for (a, k), ref in zip(self.eval, self.reference):
                s, e = _energy(ref, gm(*a, **k))
                signal, noise = signal + s, noise + e
        return _db(signal, noise)

    def finish(self, prepared: fx.GraphModule, verify: bool = False) -> fx.GraphModule:
        from ...api import calibrate, convert  # noqa: PLC0415

        calibrate(prepared, self.calibration, progress=False)
        gm = convert(prepared, verify=verify)
        gm.meta["fxpress"]["float_passes"] = self.float_passes
        return gm

    def trial(self, cfg: QuantConfig) -> tuple[fx.GraphModule, float]:
        from ...api import prepare  # noqa: PLC0415

        prepared = prepare(copy.deepcopy(self.float_gm), self.inputs, cfg, verify=False, bias_correction=self.bias_correction)
        gm = self.finish(prepared)
        return gm, self.score(gm)

    def ranking(self, progress: bool = False) -> list[NodeSQNR]:
        from tqdm.auto import tqdm

        rows = []
        for node in tqdm(self.layers, desc="sensitivity", disable=not progress, leave=False):
            spec, _ = self.cfg.resolve(node)
            only = QuantConfig(
                default=self.cfg.default,
                op_types={k: None for k in OP_KINDS},
                nodes={node.name: spec},
                op_kinds=self.cfg.op_kinds,
                quantize_outputs=self.cfg.quantize_outputs,
            )
            _, score = self.trial(only)
            rows.append(NodeSQNR(node.name, score))
        return sorted(rows, key=lambda r: r.sqnr_db)


def _names_in(cfg: QuantConfig, gm: fx.GraphModule) -> QuantConfig:
    """``cfg`` without the ``nodes`` / ``ignore`` names that match no node of ``gm`` (no-ops on it)."""
    from ...ir.channels import resolve_ignore  # noqa: PLC0415

    def found(name: str) -> bool:
        try:
            resolve_ignore(gm, [name])
        except ValueError:
            return False
        return True

    nodes = {k: v for k, v in cfg.nodes.items() if found(k)}
    ignore = [k for k in cfg.ignore if k in OP_KINDS or found(k)]
    if len(nodes) == len(cfg.nodes) and len(ignore) == len(cfg.ignore):
        return cfg
    return dataclasses.replace(cfg, nodes=nodes, ignore=ignore)


def sensitivity(
    model: Any,
    example_inputs: Any,
    calibration: Iterable,
    config: QuantConfig | str | dict | None = "int8_static",
    *,
    eval_data: Iterable | None = None,
    max_batches: int | None = None,
    equalize: bool = False,
    bias_correction: bool = False,
    smooth_quant: float | bool | None = None,
    progress: bool = False,
) -> list[NodeSQNR]:
    """Output SQNR with only one layer quantized, for each layer ``config`` quantizes; lowest (most sensitive) first.

    Layers are named by graph node name (what ``QuantConfig(nodes=...)`` takes). The SQNR is
    measured on ``eval_data`` (default: the calibration batches) against the float graph.
    """
    session = _Session(
        model, example_inputs, calibration, config, eval_data=eval_data, max_batches=max_batches,
        equalize=equalize, bias_correction=bias_correction, smooth_quant=smooth_quant, verify=False,
    )
    return session.ranking(progress)


def auto_fallback(
    model: Any,
    example_inputs: Any,
    calibration: Iterable,
    config: QuantConfig | str | dict | None = "int8_static",
    *,
    target_sqnr: float = 30.0,
    eval_data: Iterable | None = None,
    max_batches: int | None = None,
    max_fallback: int | None = None,
    equalize: bool = False,
    bias_correction: bool = False,
    smooth_quant: float | bool | None = None,
    verify: bool = False,
    progress: bool = False,
) -> tuple[fx.GraphModule, FallbackReport]:
    """Quantize, then keep the most sensitive layers in float until the output SQNR reaches ``target_sqnr`` dB.

    Layers fall back one at a time in ``sensitivity`` order (at most ``max_fallback``). Returns the
    quantized graph (the first that meets the target, else the best one tried) and a
    ``FallbackReport``, also stored in ``gm.meta["fxpress"]["fallback_report"]``.
    """
    session = _Session(
        model, example_inputs, calibration, config, eval_data=eval_data, max_batches=max_batches,
        equalize=equalize, bias_correction=bias_correction, smooth_quant=smooth_quant, verify=verify,
    )
    gm = session.finish(session.base, verify=verify)
    initial = session.score(gm)
    report = FallbackReport(target_sqnr, initial, initial, initial >= target_sqnr, quantized_layers=len(session.layers))
    report.trials.append((0, initial))
    if not report.met:
        report.sensitivity = session.ranking(progress)
        labels = {n.name: node_label(n) for n in session.layers}
        best = (initial, gm, [])
        fallen: list[str] = []
        limit = len(report.sensitivity) if max_fallback is None else min(max_fallback, len(report.sensitivity))
        for row in report.sensitivity[:limit]:
            fallen.append(row.node)
            cfg = dataclasses.replace(session.cfg, nodes={**session.cfg.nodes, **{name: None for name in fallen}})
            trial_gm, score = session.trial(cfg)
            report.trials.append((len(fallen), score))
            if score > best[0]:
                best = (score, trial_gm, list(fallen))
            if score >= target_sqnr:
                best = (score, trial_gm, list(fallen))
                break
        score, gm, fallen = best
        report.sqnr_db, report.met = score, score >= target_sqnr
        report.fallbacks = [labels.get(name, name) for name in fallen]
        report.sensitivity = [NodeSQNR(labels.get(r.node, r.node), r.sqnr_db) for r in report.sensitivity]
    gm.meta["fxpress"]["fallback_report"] = report
    return gm, report
