"""fold-constants: evaluate calls whose inputs are all constants and store the results as constants.

Before::

    w = get_attr("fc.weight"); wt = aten.t(w); y = aten.mm(x, wt)

After::

    wt = get_attr("fc.weight_folded"); y = aten.mm(x, wt)

Only pure calls are folded: no mutation, no randomness (ops tagged ``nondeterministic_seeded``), no
quantize/dequantize (they mark quantization boundaries that later lowering needs). A call is not
folded when its result would be much larger than its inputs (``expand``/``repeat`` of a small
constant would materialize a big tensor); it is reported as skipped with the size.

Numerics: exact (the same kernels run ahead of time on the same values).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..ir.graph import add_constant, get_attr_value, is_pure, node_label, op_name, prune_unused_attributes
from ..ir.report import PassReport
from .base import Pass, register_pass

_KEEP_NAMESPACES = {"quantized_decomposed"}


def _bytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_bytes(v) for v in x)
    return 0


@register_pass
class FoldConstants(Pass):
    """Precompute calls that only read constants.

    max_growth: skip a call whose result is more than this many times larger than its constant
    inputs (and larger than 1 MiB).
    """

    name = "fold-constants"
    exact = True

    def __init__(self, max_growth: float = 4.0):
        self.max_growth = max_growth

    def run(self, gm: fx.GraphModule, report: PassReport) -> None:
        values: dict[fx.Node, object] = {}
        for node in list(gm.graph.nodes):
            if node.op == "get_attr":
                values[node] = get_attr_value(gm, node.target)
                continue
            if node.op != "call_function":
                continue
            inputs = node.all_input_nodes
            if not inputs or not all(n in values for n in inputs):
                continue
            namespace = getattr(node.target, "namespace", None)
            if namespace in _KEEP_NAMESPACES:
                continue  # quantization boundaries stay in the graph by design
            if not is_pure(node):
                report.skip(node_label(node), f"{op_name(node)} has side effects or randomness")
                continue
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
            with torch.no_grad():
                result = node.target(*args, **kwargs)
            in_bytes = sum(_bytes(values[n]) for n in inputs)
            out_bytes = _bytes(result)
            if out_bytes > (1 << 20) and out_bytes > self.max_growth * max(in_bytes, 1):
                report.skip(node_label(node), f"result ({out_bytes >> 10} KiB) would be {out_bytes / max(in_bytes, 1):.0f}x its inputs")
                continue
            values[node] = result
        self._materialize(gm, values, report)

    def _materialize(self, gm: fx.GraphModule, values: dict, report: PassReport) -> None:
        # replace folded calls that are read by something not folded (a frontier) with a constant
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node not in values or not isinstance(values[node], torch.Tensor):
                continue
            if all(u in values for u in node.users):
                continue
            stem = _stem(node)
            const = add_constant(gm, f"{stem}_folded", values[node].contiguous(), before=node)
            node.replace_all_uses_with(const)
            report.change(f"{node_label(node)} = {op_name(node)}(constants)", kind="folded")
        if report.changed:
            gm.graph.eliminate_dead_code()
            prune_unused_attributes(gm)
            gm.recompile()


def _stem(node: fx.Node) -> str:
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            return arg.target
    return f"_folded.{node.name}"
