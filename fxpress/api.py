"""The few user-facing functions that drive pipelines: quantization for now.

``quantize`` = ``prepare`` (capture, exact clean-up passes, observers) → calibration → ``convert``
(Q/DQ, integer weights, folded round trips). ``quant_report`` reads a converted graph and says what
runs in int8 and why the rest does not.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx

from .ir.capture import capture, normalize_inputs
from .ir.graph import node_label, op_name
from .passes import PassError, PassManager, PipelineReport
from .passes.quant.config import OP_KINDS, QuantConfig, op_kind
from .passes.quant.convert_to_qdq import qdq_ops
from .passes.quant.fold_weight_quant import DEQUANTIZE_OPS, QUANTIZE_OPS
from .passes.quant.insert_observers import ACTIVATIONS, OBSERVER_ROOT, SHARE_OPS

__all__ = ["prepare", "convert", "quantize", "calibrate", "quant_report", "QuantReport"]

_PREP = ("fold-constants", "matmul-to-linear", "fold-batch-norm", "eliminate-dead-code")


def _as_graph(model: Any, example_inputs: Any) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule) and any("val" in n.meta for n in model.graph.nodes):
        if hasattr(model, OBSERVER_ROOT) or any(n.op == "call_function" and n.target in DEQUANTIZE_OPS for n in model.graph.nodes):
            raise ValueError("this graph is already prepared or quantized; pass the float model (or its captured graph)")
        # the passes edit in place: work on a copy so the caller's captured graph stays float and reusable
        return copy.deepcopy(model)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError(
            f"{type(model).__name__} is in training mode; call model.eval() before post-training quantization "
            "(batch norm must use its running statistics and be folded)"
        )
    return capture(model, example_inputs, share_weights=False)


def prepare(
    model: torch.nn.Module,
    example_inputs: Any,
    config: QuantConfig | str | dict | None = "int8_static",
    *,
    verify: bool = True,
    equalize: bool = False,
    bias_correction: bool = False,
    smooth_quant: float | bool | None = None,
    calibration: Iterable | None = None,
    max_batches: int | None = None,
) -> fx.GraphModule:
    """Capture ``model``, fold batch norms, and insert observers; run calibration batches through the result.

    equalize: cross-layer equalization of conv/linear chains first (exact in float).
    bias_correction: also record each quantized conv/linear's input mean during calibration, so
    ``convert`` corrects the bias for the weights' rounding.
    smooth_quant: SmoothQuant alpha (True = 0.5) for linears: needs ``calibration`` here, for the
    activation statistics it reads before the observers go in (calibrate the result as usual after).
    """
    cfg = QuantConfig.coerce(config)
    inputs = normalize_inputs(example_inputs)
    gm = _as_graph(model, inputs)
    cfg.check_names(gm)  # a nodes / ignore name that matches nothing fails before any work
    gm, report, float_passes = _float_passes(gm, inputs, cfg, equalize, smooth_quant, calibration, max_batches, verify)
    observe = [("insert-observers", {"config": cfg}), *(["record-input-means"] if bias_correction else [])]
    gm, more = PassManager(observe, verify=verify).run(gm, inputs)
    report.passes += more.passes
    gm.meta.setdefault("fxpress", {})
    gm.meta["fxpress"].update(
        quant_config=cfg, prepare_report=report, example_inputs=inputs, bias_correction=bias_correction, float_passes=float_passes
    )
    return gm


def _float_passes(gm, inputs, cfg, equalize, smooth_quant, calibration, max_batches, verify) -> tuple[fx.GraphModule, PipelineReport, list]:
    """The exact float rewrites before observers: folding, then CLE and SmoothQuant when asked."""
    passes: list[Any] = [*_PREP, *(["cross-layer-equalization"] if equalize else [])]
    gm, report = PassManager(passes, verify=verify).run(gm, inputs)
    if smooth_quant is not None and smooth_quant is not False:
        from .passes.quant.smooth_quant import activation_absmax

        if calibration is None:
            raise ValueError("smooth_quant needs calibration data for its activation statistics: pass calibration=loader")
        batches = itertools.islice(calibration, max_batches)
        stats = activation_absmax(gm, (_batch_args(b, len(inputs)) for b in batches))
        alpha = 0.5 if smooth_quant is True else float(smooth_quant)
        sq = ("smooth-quant", {"statistics": stats, "alpha": alpha, "config": cfg})
        gm, more = PassManager([sq], verify=verify).run(gm, inputs)
        report.passes += more.passes
        passes.append(sq)
    return gm, report, passes


def convert(prepared: fx.GraphModule, *, verify: bool = True, sync: bool = True) -> fx.GraphModule:
    """Turn a calibrated prepared graph into the int8 Q/DQ graph (raises if it was never calibrated).

    The prepared graph is converted in place (its observers are replaced): convert a
    ``copy.deepcopy`` of it to keep calibrating or to convert twice.
    Also takes a graph from ``fxpress.prepare_qat`` (after training): the passes that graph lists
    in ``meta["fxpress"]["pre_convert"]`` run first. sync: under torch.distributed, reduce the
    observers' statistics across ranks first, so every rank gets the same qparams (every rank must
    then call convert).
    """
    meta = getattr(prepared, "meta", {}).get("fxpress", {})
    if "quant_config" not in meta:
        raise ValueError("convert() takes the graph returned by fxpress.prepare() (after calibration)")
    cfg = meta["quant_config"]
    if sync:
        from .train.distributed import sync_observers

        sync_observers(prepared)
    passes = [*meta.get("pre_convert", ()), ("convert-to-qdq", {"config": cfg}), "fold-weight-quant", "fold-qdq", "eliminate-dead-code"]
    if meta.get("bias_correction"):
        passes.insert(len(meta.get("pre_convert", ())) + 1, "bias-correction")
    try:
        gm, report = PassManager(passes, verify=verify).run(prepared)
    except PassError as exc:
        from .passes.quant.observers import CalibrationError

        if isinstance(exc.__cause__, CalibrationError):  # the user's mistake, not a pass failure: say it plainly
            if "qat" in meta:
                raise CalibrationError(
                    f"this QAT graph was neither calibrated nor trained: {str(exc.__cause__).split('. Run')[0]}. Pass "
                    "calibration= to prepare_qat, or train it first (fxpress.distill or your own loop in .train() mode)"
                ) from None
            raise exc.__cause__ from None
        raise
    gm.meta["fxpress"]["convert_report"] = report
    return gm


def _batch_args(batch: Any, arity: int) -> tuple[tuple, dict]:
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, dict):
        return (), batch
    if isinstance(batch, (list, tuple)):
        return tuple(batch[:arity]), {}
    raise TypeError(
        f"a calibration batch must be a tensor, a tuple/list (inputs first; extra items such as labels are "
        f"ignored) or a dict of keyword inputs, got {type(batch).__name__}"
    )


def _by_name(gm: fx.GraphModule, batch: dict) -> tuple:
    """A dict batch in the graph's input order (extra keys, such as labels, are ignored)."""
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    missing = [k for k in names if k not in batch]
    if missing:
        raise ValueError(f"a dict calibration batch must hold the model inputs {names} by name; missing {missing}")
    return tuple(batch[k] for k in names)


def calibrate(prepared: fx.GraphModule, data: Iterable, *, max_batches: int | None = None, progress: bool = True) -> int:
    """Run ``data`` through a prepared graph (no grad), with a progress bar; return the batch count."""
    from tqdm.auto import tqdm

    arity = len(prepared.meta.get("fxpress", {}).get("example_inputs", (None,)))
    total = None
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        pass
    if max_batches is not None:
        total = min(total, max_batches) if total is not None else max_batches
    seen = 0
    with torch.no_grad():
        for batch in tqdm(data, total=total, desc="calibrating", disable=not progress, leave=False):
            args, kwargs = _batch_args(batch, arity)
            if kwargs:  # a captured graph takes its inputs by position
                args, kwargs = _by_name(prepared, kwargs), {}
            prepared(*args, **kwargs)
            seen += 1
            if max_batches is not None and seen >= max_batches:
                break
    if seen == 0:
        raise ValueError("the calibration data yielded no batches; give a non-empty DataLoader or list of batches")
    return seen


def quantize(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    calibration: Iterable | None = None,
    config: QuantConfig | str | dict | None = "int8_static",
    max_batches: int | None = None,
    progress: bool = True,
    verify: bool = True,
    equalize: bool = False,
    bias_correction: bool = False,
    smooth_quant: float | bool | None = None,
    target_sqnr: float | None = None,
) -> fx.GraphModule:
    """prepare → calibrate on ``calibration`` → convert. Weight-only and dynamic configs need no data.

    equalize / bias_correction / smooth_quant: see ``prepare``. target_sqnr (dB): keep the most
    sensitive layers in float until the output SQNR on the calibration data reaches it
    (``fxpress.passes.quant.debug.auto_fallback``; its report is in ``gm.meta["fxpress"]["fallback_report"]``).
    """
    cfg = QuantConfig.coerce(config)
    static = cfg.default.mode == "static" or any(s is not None and s.mode == "static" for s in [*cfg.op_types.values(), *cfg.nodes.values()])
    if calibration is None and (static or bias_correction or smooth_quant not in (None, False) or target_sqnr is not None):
        raise ValueError(
            "static quantization, bias_correction, smooth_quant and target_sqnr need calibration data: "
            "quantize(model, x, calibration=loader), or use config='int8_dynamic' / 'int8_weight_only' which need none"
        )
    if calibration is not None and iter(calibration) is calibration:  # a one-shot iterator: some options read it twice
        calibration = list(itertools.islice(calibration, max_batches))
    options = dict(equalize=equalize, bias_correction=bias_correction, smooth_quant=smooth_quant)
    if target_sqnr is not None:
        from .passes.quant.debug import auto_fallback

        gm, fallback = auto_fallback(model, example_inputs, calibration, cfg, target_sqnr=target_sqnr, max_batches=max_batches, verify=verify, **options)
        gm.meta["fxpress"]["fallback_report"] = fallback
        return gm
    prepared = prepare(model, example_inputs, cfg, verify=verify, calibration=calibration, max_batches=max_batches, **options)
    if static or bias_correction:
        calibrate(prepared, calibration, max_batches=max_batches, progress=progress)
    return convert(prepared, verify=verify)


# ---------------------------------------------------------------------------------------------
# report


@dataclass
class QuantReport:
    """What runs quantized in a converted graph, per op kind, and why the rest stays float."""

    per_kind: dict[str, Counter] = field(default_factory=dict)
    float_ops: list[tuple[str, str, str]] = field(default_factory=list)  # (node, op kind/name, reason)
    other_float: Counter = field(default_factory=Counter)
    weight_bytes: tuple[int, int] = (0, 0)  # (integer, float)

    def quantized(self, kind: str) -> int:
        return sum(v for k, v in self.per_kind.get(kind, Counter()).items() if k != "float")

    def total(self, kind: str) -> int:
        return sum(self.per_kind.get(kind, Counter()).values())

    def __str__(self) -> str:
        lines = []
        for kind, counts in self.per_kind.items():
            how = ", ".join(f"{n} {k}" for k, n in counts.items() if k != "float")
            lines.append(f"{kind:15} {self.quantized(kind)} of {self.total(kind)} quantized" + (f" ({how})" if how else ""))
        if self.float_ops:
            lines.append("kept in float:")
            lines += [f"  {node} [{kind}]: {why}" for node, kind, why in self.float_ops]
        if self.other_float:
            ops = ", ".join(f"{op} x{n}" for op, n in self.other_float.most_common())
            lines.append(f"other ops run in float (no int8 kernel in fxpress): {ops}")
        else:
            lines.append("no other compute ops (relu, relu6 and hardtanh fuse into the int8 op before them)")
        q, f = self.weight_bytes
        lines.append(f"weights: {q / 1024:.1f} KiB integer, {f / 1024:.1f} KiB float")
        return "\n".join(lines)


def _is_dq(a: Any) -> bool:
    return isinstance(a, fx.Node) and a.op == "call_function" and a.target in DEQUANTIZE_OPS


def _quant_mode(node: fx.Node) -> str:
    """How a quantizable op runs in a converted graph: int8 static / dynamic, weight-only, or float."""
    weighted = op_kind(node) in ("conv", "conv_transpose", "linear")
    if node.target == torch.ops.aten.cat.default:
        acts = [a for a in node.args[0] if isinstance(a, fx.Node)]
    else:
        acts = [a for a in node.args[: 1 if weighted else 2] if isinstance(a, fx.Node)]
    weight_q = weighted and _is_dq(node.args[1])
    acts_q = bool(acts) and all(_is_dq(a) for a in acts)
    if acts_q and (weight_q or not weighted):
        dynamic = isinstance(acts[0].args[1], fx.Node) and acts[0].args[1].op != "get_attr"
        a_bits = max(_bits(a) for a in acts)
        w_bits = _bits(node.args[1]) if weighted else a_bits
        width = f"int{a_bits}" if w_bits == a_bits else f"w{w_bits}a{a_bits}"
        return f"{width} {'dynamic' if dynamic else 'static'}"
    if weight_q:
        return f"weight-only int{_bits(node.args[1])}"
    return "float"


def _bits(dq: fx.Node) -> int:
    """Bit width of a dequantize's integer range (quant_min/quant_max follow the axis for per-channel ops)."""
    qd = qdq_ops()
    first = 4 if dq.target == qd.dequantize_per_channel.default else 3
    qmin, qmax = dq.args[first], dq.args[first + 1]
    return max(1, int(qmax) - int(qmin)).bit_length()


def _quant_mode_or_float(node: fx.Node) -> str:
    return _quant_mode(node) if node.op == "call_function" and op_kind(node) is not None else "float"


# shapes, per-batch qparams, eval-mode dropout: no float compute to report
_SKIP_FLOAT = frozenset({torch.ops.aten.sym_size.int, qdq_ops().choose_qparams.tensor, torch.ops.aten.dropout_.default}) | SHARE_OPS


def quant_report(gm: fx.GraphModule) -> QuantReport:
    """Count quantized ops per kind, list float ones with the reason recorded when observers were planned."""
    import operator

    report = QuantReport(per_kind={k: Counter() for k in OP_KINDS})
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target in DEQUANTIZE_OPS or node.target in QUANTIZE_OPS:
            continue
        kind = op_kind(node)
        if kind is None:
            fused = node.target in ACTIVATIONS and isinstance(node.args[0], fx.Node) and _quant_mode_or_float(node.args[0]) != "float"
            computes = isinstance(node.meta.get("val"), torch.Tensor)  # not symbolic size arithmetic
            if computes and not fused and node.target not in _SKIP_FLOAT and node.target is not operator.getitem:
                report.other_float[op_name(node)] += 1
            continue
        mode = _quant_mode(node)
        report.per_kind[kind][mode] += 1
        if mode == "float":
            reason = node.meta.get("fxpress_quant") or "not quantized (no observers were planned for it)"
            report.float_ops.append((node_label(node), kind, reason))
    report.per_kind = {k: v for k, v in report.per_kind.items() if v}
    int_bytes = float_bytes = 0
    for _, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        if t.is_floating_point():
            float_bytes += t.numel() * t.element_size()
        else:
            int_bytes += t.numel() * t.element_size()
    report.weight_bytes = (int_bytes, float_bytes)
    return report


def pipeline_reports(gm: fx.GraphModule) -> list[PipelineReport]:
    meta = getattr(gm, "meta", {}).get("fxpress", {})
    return [meta[k] for k in ("prepare_report", "convert_report") if k in meta]
