"""matmul-to-linear: a matrix product with a constant weight becomes ``aten.linear``.

Before (GPT-2's ``Conv1D``, and any ``x @ W + b`` written by hand)::

    w = get_attr("attn.c_attn.weight")          # [in, out]
    y = aten.addmm(b, x2d, w)                   # or aten.mm(x2d, w), aten.matmul(x, w)

After::

    wt = get_attr("attn.c_attn.weight_t")       # [out, in], a contiguous copy
    y = aten.linear(x2d, wt, b)

Quantization, pruning and decomposition know ``linear`` (per-output-channel weight scales, the
weight-only int4 MatMulNBits lowering, QGemm in onnxruntime); a product with a weight stored the other
way round would otherwise stay float. Rewritten: ``addmm(bias, x, W)`` with ``alpha == beta == 1``,
a 1-D constant bias and a 2-D constant ``W``; ``mm(x, W)``; ``matmul(x, W)`` with a 2-D constant ``W``
(any batch dims in ``x``). The weight keeps its ``requires_grad``. Products whose right operand is
computed (attention scores) are not touched; a constant left operand is reported as skipped.

Numerics: the same GEMM on the transposed operand; equal up to float rounding of the kernel's
accumulation order (checked with the pass manager's default tolerance).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..ir.graph import add_constant, get_attr_value, node_label, prune_unused_attributes
from ..ir.report import PassReport
from .base import Pass, register_pass

aten = torch.ops.aten
_TARGETS = (aten.addmm.default, aten.mm.default, aten.matmul.default)


def _constant(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = get_attr_value(gm, node.target)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
    return None


@register_pass
class MatmulToLinear(Pass):
    """Rewrite addmm / mm / matmul with a constant 2-D right operand as aten.linear (module docstring)."""

    name = "matmul-to-linear"
    exact = True

    def run(self, gm: fx.GraphModule, report: PassReport) -> None:
        transposed: dict[str, fx.Node] = {}
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in _TARGETS:
                continue
            if node.target is aten.addmm.default:
                bias, x, w = node.args[:3]
                if node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("beta", 1) != 1:
                    report.skip(node_label(node), "addmm with alpha or beta other than 1")
                    continue
                b = _constant(gm, bias)
                if b is None or b.dim() != 1:
                    report.skip(node_label(node), "the bias is not a 1-D constant")
                    continue
            else:
                x, w = node.args[:2]
                bias = None
            weight = _constant(gm, w)
            if weight is None or weight.dim() != 2:
                if _constant(gm, x) is not None:
                    report.skip(node_label(node), "the constant is the left operand (x @ W with W computed)")
                continue  # an activation product (attention): not a layer
            wt = transposed.get(w.target)
            if wt is None:
                wt = transposed[w.target] = add_constant(gm, f"{w.target}_t", weight.detach().t().contiguous(), before=node)
                get_attr_value(gm, wt.target).requires_grad_(weight.requires_grad)
            with gm.graph.inserting_before(node):
                linear = gm.graph.call_function(aten.linear.default, (x, wt, bias) if bias is not None else (x, wt))
            linear.meta = dict(node.meta)
            node.replace_all_uses_with(linear)
            gm.graph.erase_node(node)
            report.change(f"{linear.name}: {node.target.__name__} with weight {w.target} {list(weight.shape)} -> linear")
        if transposed:
            gm.graph.eliminate_dead_code()
            prune_unused_attributes(gm)
            gm.recompile()
