"""convert-to-qdq: turn calibrated observers into quantize/dequantize pairs with their qparams.

Before::

    x_o = observers.act_0(x);  W_o = observers.weight_1(W);  y = aten.conv2d(x_o, W_o, b)

After::

    x_q = quantized_decomposed.quantize_per_tensor(x, 0.0213, 128, 0, 255, torch.uint8)
    x_d = quantized_decomposed.dequantize_per_tensor(x_q, 0.0213, 128, 0, 255, torch.uint8)
    W_q = quantized_decomposed.quantize_per_channel(W, W_scale, W_zero_point, 0, -128, 127, torch.int8)
    W_d = quantized_decomposed.dequantize_per_channel(W_q, W_scale, W_zero_point, 0, -128, 127, torch.int8)
    y = aten.conv2d(x_d, W_d, b)

This is PT2E's reference Q/DQ form, which inductor's int8 lowering and the ONNX exporter both read.
Shared observers reuse their source's qparams. Weights are observed from the constant itself (no
calibration needed); per-group weights (weight-only int4) use min/max per group. Ops marked
``dynamic`` by insert-observers get their activation qparams computed per batch at run time
(``choose_qparams`` → quantize → dequantize). The observers module is removed afterwards.

Numerics: the graph now computes with quantized values: not exact; the error is what quantization
costs (measured by the SQNR tools in ``fxpress.passes.quant.debug``).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ...ir.graph import add_constant, get_attr_value, node_label
from ...ir.qparams import QParams, dtype_range, qparams_from_range
from ...ir.report import PassReport
from ...ir.verify import refresh_meta
from ..base import Pass, register_pass
from .config import QuantConfig
from .insert_observers import OBSERVER_ROOT, SharedObserver

__all__ = ["ConvertToQDQ", "qdq_ops", "emit_qdq"]

aten = torch.ops.aten


def qdq_ops():
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)

    return torch.ops.quantized_decomposed


def emit_qdq(gm: fx.GraphModule, x: fx.Node, qp: QParams, *, before: fx.Node, stem: str) -> tuple[fx.Node, fx.Node]:
    """Insert ``quantize`` and ``dequantize`` of ``x`` with ``qp`` before ``before``; return (q, dq)."""
    qd = qdq_ops()
    graph = gm.graph
    if qp.group_size is not None:
        scale = add_constant(gm, f"{stem}_scale", qp.scale, before=before)
        zp = add_constant(gm, f"{stem}_zero_point", qp.zero_point, before=before)
        with graph.inserting_before(before):
            q = graph.call_function(qd.quantize_per_channel_group.default, (x, scale, zp, qp.quant_min, qp.quant_max, qp.dtype, qp.group_size))
            dq = graph.call_function(
                qd.dequantize_per_channel_group.default, (q, scale, zp, qp.quant_min, qp.quant_max, qp.dtype, qp.group_size, torch.float32)
            )
    elif qp.per_channel:
        scale = add_constant(gm, f"{stem}_scale", qp.scale, before=before)
        zp = add_constant(gm, f"{stem}_zero_point", qp.zero_point, before=before)
        with graph.inserting_before(before):
            q = graph.call_function(qd.quantize_per_channel.default, (x, scale, zp, qp.axis, qp.quant_min, qp.quant_max, qp.dtype))
            dq = graph.call_function(qd.dequantize_per_channel.default, (q, scale, zp, qp.axis, qp.quant_min, qp.quant_max, qp.dtype))
    else:
        args = (float(qp.scale), int(qp.zero_point), qp.quant_min, qp.quant_max, qp.dtype)
        with graph.inserting_before(before):
            q = graph.call_function(qd.quantize_per_tensor.default, (x, *args))
            dq = graph.call_function(qd.dequantize_per_tensor.default, (q, *args))
    return q, dq


def group_qparams(weight: torch.Tensor, dtype: torch.dtype, bits: int | None, symmetric: bool, group_size: int) -> QParams:
    qmin, qmax = dtype_range(dtype, bits)
    grouped = weight.detach().reshape(weight.shape[0], -1, group_size)
    qp = qparams_from_range(grouped.amin(-1), grouped.amax(-1), dtype, symmetric=symmetric, axis=0, quant_min=qmin, quant_max=qmax)
    return QParams(qp.scale, qp.zero_point, qmin, qmax, dtype, axis=0, group_size=group_size)


@register_pass
class ConvertToQDQ(Pass):
    """Replace observers by quantize/dequantize pairs; quantize dynamic ops' inputs per batch."""

    name = "convert-to-qdq"
    run_after = ("insert-observers",)

    def __init__(self, config: QuantConfig | str | dict | None = None):
        self.config = QuantConfig.coerce(config)

    def run(self, gm: fx.GraphModule, report: PassReport) -> None:
        from .observers import CalibrationError

        root = getattr(gm, OBSERVER_ROOT, None)
        obs_nodes = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(OBSERVER_ROOT + ".")]
        missing = [
            n.target.split(".", 1)[1]
            for n in obs_nodes
            if not isinstance(gm.get_submodule(n.target), SharedObserver)
            and n.args[0].op != "get_attr"
            and not gm.get_submodule(n.target).calibrated
        ]
        if missing:
            raise CalibrationError(
                f"calibration was skipped: {len(missing)} of {len(obs_nodes)} observers never saw data "
                f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}). Run calibration batches "
                "through the prepared model first: `for batch in loader: prepared(batch)`."
            )
        cache: dict[str, QParams] = {}

        def qparams_of(target: str, node: fx.Node) -> QParams:
            mod = gm.get_submodule(target)
            if isinstance(mod, SharedObserver):
                return qparams_of(f"{OBSERVER_ROOT}.{mod.source}", node)
            if target not in cache:
                source = node.args[0]
                if source.op == "get_attr" and not mod.calibrated:
                    mod(get_attr_value(gm, source.target))
                cache[target] = mod.qparams()
            return cache[target]

        for node in obs_nodes:
            x = node.args[0]
            qp = self._weight_group_qparams(gm, node) or qparams_of(node.target, node)
            stem = x.target if x.op == "get_attr" else f"{OBSERVER_ROOT}_{x.name}"
            _, dq = emit_qdq(gm, x, qp, before=node, stem=stem)
            node.replace_all_uses_with(dq)
            gm.graph.erase_node(node)
            kind = "weights" if x.op == "get_attr" else "activations"
            report.change(f"{node_label(x)}: {_describe(qp)}", kind=f"quantized {kind}")
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.meta.get("fxpress_quant") == "dynamic":
                self._dynamic_input(gm, node, report)
        if root is not None:
            delattr(gm, OBSERVER_ROOT)
        if report.changed:
            gm.graph.lint()
            gm.recompile()
            refresh_meta(gm)

    def _weight_group_qparams(self, gm: fx.GraphModule, node: fx.Node) -> QParams | None:
        consumer = next(iter(node.users), None)
        if consumer is None or node.args[0].op != "get_attr":
            return None
        spec, _ = self.config.resolve(consumer)
        if spec is None or spec.weight is None or spec.weight.group_size is None:
            return None
        weight = get_attr_value(gm, node.args[0].target)
        return group_qparams(weight, spec.weight.dtype, spec.weight.bits, spec.weight.symmetric, spec.weight.group_size)

    def _dynamic_input(self, gm: fx.GraphModule, node: fx.Node, report: PassReport) -> None:
        import operator

        qd = qdq_ops()
        spec, _ = self.config.resolve(node)
        act = spec.activation if spec is not None and spec.activation is not None else None
        dtype = act.dtype if act is not None else torch.uint8
        qmin, qmax = dtype_range(dtype)
        x = node.args[0]
        graph = gm.graph
        with graph.inserting_before(node):
            params = graph.call_function(qd.choose_qparams.tensor, (x, qmin, qmax, torch.finfo(torch.float32).eps, dtype))
            scale = graph.call_function(operator.getitem, (params, 0))
            zp = graph.call_function(operator.getitem, (params, 1))
            q = graph.call_function(qd.quantize_per_tensor.tensor, (x, scale, zp, qmin, qmax, dtype))
            dq = graph.call_function(qd.dequantize_per_tensor.tensor, (q, scale, zp, qmin, qmax, dtype))
        node.update_arg(0, dq)
        report.change(f"{node_label(node)}: input quantized per batch ({str(dtype).removeprefix('torch.')})", kind="dynamic inputs")


def _describe(qp: QParams) -> str:
    dtype = str(qp.dtype).removeprefix("torch.")
    bits = f" {qp.quant_max - qp.quant_min + 1} levels" if (qp.quant_min, qp.quant_max) != dtype_range(qp.dtype) else ""
    if qp.group_size is not None:
        return f"{dtype}{bits}, groups of {qp.group_size}"
    if qp.per_channel:
        return f"{dtype}{bits}, per channel (axis {qp.axis})"
    return f"{dtype}{bits}, scale {float(qp.scale):.4g}, zero point {int(qp.zero_point)}"
