"""quantize-bias: store the bias of int8 conv/linear as int32 at scale ``x_scale * w_scale``.

Before::

    x_d = dequantize_per_tensor(x_q, s_x, z_x, 0, 255, uint8)
    W_d = dequantize_per_channel(W_q, s_w, z_w, 0, -128, 127, int8)
    y = aten.conv2d(x_d, W_d, b)                                      # b: float32 constant

After::

    b_d = dequantize_per_channel(b_q, s_x * s_w, 0, 0, -2**31, 2**31 - 1, int32)   # b_q = round(b / (s_x * s_w))
    y = aten.conv2d(x_d, W_d, b_d)

This is the layout onnxruntime requires before it fuses a DQ→Conv/Gemm→Q group into QLinearConv /
QGemm: a float bias blocks the fusion, and a bias scale other than ``s_x * s_w`` gives wrong results
(the scale is computed in float32 exactly as onnxruntime does). It is a lowering step for ONNX
export; the torch graph keeps its float bias, which inductor's int8 lowering expects.

Numerics: the bias is rounded to a multiple of ``s_x * s_w`` (an error of at most half that per
output channel, far below the activation quantization step ``s_y``).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ...ir.graph import add_constant, get_attr_value, node_label
from ...ir.report import PassReport
from ..base import Pass, register_pass
from .config import op_kind
from .convert_to_qdq import qdq_ops

__all__ = ["QuantizeBias"]

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@register_pass
class QuantizeBias(Pass):
    """Replace float biases of int8 conv/linear by int32 constants behind a dequantize."""

    name = "quantize-bias"
    run_after = ("fold-weight-quant", "fold-qdq")
    tolerance = (1e-3, 1e-3)

    def run(self, gm: fx.GraphModule, report: PassReport) -> None:
        qd = qdq_ops()
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or op_kind(node) not in ("conv", "linear"):
                continue
            x, w = node.args[0], node.args[1]
            bias = node.args[2] if len(node.args) > 2 else None
            if not isinstance(bias, fx.Node) or bias.op != "get_attr":
                continue
            if not (_is(x, qd.dequantize_per_tensor.default) and _is(w, qd.dequantize_per_channel.default, qd.dequantize_per_tensor.default)):
                report.skip(node_label(node), "input or weight is not statically quantized; bias stays float")
                continue
            x_scale = torch.tensor(float(x.args[1]), dtype=torch.float32)
            w_scale = get_attr_value(gm, w.args[1].target) if isinstance(w.args[1], fx.Node) else torch.tensor(float(w.args[1]))
            b = get_attr_value(gm, bias.target)
            scale = (x_scale * w_scale.to(torch.float32)).expand(b.shape[0]).contiguous()
            q = torch.round(b.detach().to(torch.float32) / scale).clamp(INT32_MIN, INT32_MAX).to(torch.int32)
            stem = bias.target
            q_node = add_constant(gm, f"{stem}_int32", q, before=node)
            s_node = add_constant(gm, f"{stem}_scale", scale, before=node)
            z_node = add_constant(gm, f"{stem}_zero_point", torch.zeros(b.shape[0], dtype=torch.int64), before=node)
            with gm.graph.inserting_before(node):
                dq = gm.graph.call_function(qd.dequantize_per_channel.default, (q_node, s_node, z_node, 0, INT32_MIN, INT32_MAX, torch.int32))
            dq.meta["val"] = bias.meta["val"]
            node.update_arg(2, dq)
            report.change(f"{node_label(node)}: bias int32 at scale x_scale*w_scale", kind="int32 biases")
        if report.changed:
            gm.graph.eliminate_dead_code()
            gm.recompile()


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets
