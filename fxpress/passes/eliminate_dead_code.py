"""eliminate-dead-code: remove nodes whose results nothing uses, and the attributes they read.

Before::

    t = aten.relu(x)            # no users
    w = get_attr("unused.weight")
    return (aten.conv2d(x, ...),)

After::

    return (aten.conv2d(x, ...),)      # and the module no longer holds `unused.weight`

Nodes with side effects are kept: ops whose schema mutates an input (``relu_``, ``copy_``,
``add_`` on a buffer), and calls FX considers impure. Numerics: exact (nothing that is computed
into an output is touched).
"""

from __future__ import annotations

import torch.fx as fx

from ..ir.graph import node_label, prune_unused_attributes
from ..ir.report import PassReport
from .base import Pass, register_pass


def _is_impure(node: fx.Node) -> bool:
    target = node.target
    schema = getattr(target, "_schema", None)
    if schema is not None and schema.is_mutable:
        return True
    return node.is_impure()


@register_pass
class EliminateDeadCode(Pass):
    """Remove unused nodes and the parameters/buffers only they read."""

    name = "eliminate-dead-code"
    exact = True

    def run(self, gm: fx.GraphModule, report: PassReport) -> None:
        before = {n: node_label(n) for n in gm.graph.nodes}
        gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
        alive = set(gm.graph.nodes)
        for node, label in before.items():
            if node not in alive:
                report.change(f"removed {label}", kind="removed nodes")
        for name in prune_unused_attributes(gm):
            report.change(f"dropped attribute {name}", kind="dropped attributes")
        if report.changed:
            gm.recompile()
