"""fold-qdq: remove dequantize → quantize round trips that change nothing.

Before::

    d = quantized_decomposed.dequantize_per_tensor(q, 0.02, 128, 0, 255, torch.uint8)
    q2 = quantized_decomposed.quantize_per_tensor(d, 0.02, 128, 0, 255, torch.uint8)
    y = quantized_decomposed.dequantize_per_tensor(q2, 0.02, 128, 0, 255, torch.uint8)

After::

    y = quantized_decomposed.dequantize_per_tensor(q, 0.02, 128, 0, 255, torch.uint8)

With equal scale, zero point, range and dtype, ``quantize(dequantize(q)) == q`` exactly, so the
pair is dropped (the dequantize stays for its other users). A pair with different qparams is a
real requantization and is kept; the report counts those. Numerics: exact.

Sharing qparams through shape-only ops (view, flatten, permute, max_pool, ...) is decided when
observers are inserted (``insert-observers`` gives them their producer's observer), so every such
op already sits between a dequantize and a quantize with equal qparams, the layout onnxruntime
drops and inductor matches.
"""

from __future__ import annotations

import torch.fx as fx

from ...ir.graph import node_label
from ...ir.report import PassReport
from ..base import Pass, register_pass
from .fold_weight_quant import DEQUANTIZE_OPS, QUANTIZE_OPS

__all__ = ["FoldQDQ"]


def _params(node: fx.Node) -> tuple:
    return tuple(a.target if isinstance(a, fx.Node) and a.op == "get_attr" else a for a in node.args[1:])


@register_pass
class FoldQDQ(Pass):
    """Drop dequantize→quantize pairs with equal qparams."""

    name = "fold-qdq"
    exact = True
    run_after = ("convert-to-qdq", "fold-weight-quant")

    def run(self, gm: fx.GraphModule, report: PassReport) -> None:
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in QUANTIZE_OPS:
                continue
            src = node.args[0]
            if not (isinstance(src, fx.Node) and src.op == "call_function" and src.target in DEQUANTIZE_OPS):
                continue
            same_kind = src.target._schema.name.replace("dequantize", "quantize") == node.target._schema.name
            if same_kind and _params(src) == _params(node):
                node.replace_all_uses_with(src.args[0])
                gm.graph.erase_node(node)
                report.change(f"{node_label(src)} → {node_label(node)}: round trip removed", kind="folded pairs")
            else:
                report.note(f"{node_label(node)} requantizes {node_label(src.args[0])} with different qparams")
        if report.changed:
            gm.graph.eliminate_dead_code()
            gm.recompile()
