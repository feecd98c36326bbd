"""fold-weight-quant: store quantized weights as integer constants behind their dequantize.

Before::

    W = get_attr("conv1.weight")                                    # float32
    W_q = quantized_decomposed.quantize_per_channel(W, s, z, 0, -128, 127, torch.int8)
    W_d = quantized_decomposed.dequantize_per_channel(W_q, s, z, 0, -128, 127, torch.int8)

After::

    W_q = get_attr("conv1.weight")                                  # int8: a quarter of the bytes
    W_d = quantized_decomposed.dequantize_per_channel(W_q, s, z, 0, -128, 127, torch.int8)

Any ``quantize_*`` op whose input is a constant is evaluated ahead of time. The integer tensor takes
over the float weight's attribute name when nothing else reads the float weight, else it is stored
beside it as ``<name>_quantized``; a weight shared by several ops that quantizes to the same integers
is stored once. Numerics: exact (the same rounding, done once).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ...ir.graph import add_constant, fake_value, get_attr_value, node_label, prune_unused_attributes, set_attr_value
from ...ir.report import PassReport
from ..base import Pass, register_pass
from .convert_to_qdq import qdq_ops

__all__ = ["FoldWeightQuant", "QUANTIZE_OPS", "DEQUANTIZE_OPS"]


def _ops(names: tuple[str, ...]) -> frozenset:
    qd = qdq_ops()
    return frozenset(getattr(getattr(qd, n), o) for n in names for o in getattr(qd, n).overloads())


QUANTIZE_OPS = _ops(("quantize_per_tensor", "quantize_per_channel", "quantize_per_channel_group"))
DEQUANTIZE_OPS = _ops(("dequantize_per_tensor", "dequantize_per_channel", "dequantize_per_channel_group"))


@register_pass
class FoldWeightQuant(Pass):
    """Precompute quantize ops on constant weights into integer constants."""

    name = "fold-weight-quant"
    exact = True
    run_after = ("convert-to-qdq",)

    def run(self, gm: fx.GraphModule, report: PassReport) -> None:
        folded: dict[str, list[tuple[torch.Tensor, str]]] = {}  # float weight → (integer tensor, its attribute)
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in QUANTIZE_OPS:
                continue
            weight = node.args[0]
            if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
                continue
            args = fx.node.map_arg(node.args, lambda n: get_attr_value(gm, n.target) if n.op == "get_attr" else n)
            if any(isinstance(a, fx.Node) for a in args):
                report.skip(node_label(node), "qparams are computed in the graph, not constants")
                continue
            with torch.no_grad():
                quantized = node.target(*args, **node.kwargs)
            readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == weight.target]
            same = next((t for q, t in folded.get(weight.target, ()) if q.dtype == quantized.dtype and torch.equal(q, quantized)), None)
            if same is not None:  # a weight shared by several ops: one integer copy
                with gm.graph.inserting_before(node):
                    replacement = gm.graph.get_attr(same)
                replacement.meta["val"] = fake_value(gm, quantized)
            elif len(readers) == 1 and len(weight.users) == 1:
                set_attr_value(gm, weight.target, quantized, parameter=False)
                weight.meta["val"] = fake_value(gm, quantized)
                replacement = weight
            else:
                replacement = add_constant(gm, f"{weight.target}_quantized", quantized, before=node)
            folded.setdefault(weight.target, []).append((quantized, replacement.target))
            node.replace_all_uses_with(replacement)
            gm.graph.erase_node(node)
            report.change(f"{node_label(weight)} → {str(quantized.dtype).removeprefix('torch.')} constant", kind="folded weights")
        if report.changed:
            gm.graph.eliminate_dead_code()
            prune_unused_attributes(gm)
            gm.recompile()
