"""fold-constants: evaluate calls whose inputs are all constants and store the results as constants.

Before::

    w = get_attr("fc.weight"); wt = aten.t(w); y = aten.mm(x, wt)

After::

    wt = get_attr("fc.weight_folded"); y = aten.mm(x, wt)

Only pure calls are folded: no mutation, no randomness (ops tagged ``nondeterministic_seeded``), no
quantize/dequantize (they mark quantization boundaries that later lowering needs). A call is not
folded when its result would be much larger than its inputs (``expand``/``repeat`` of a small
constant would materialize a big tensor); it is reported as skipped with the size, judged from
``meta["val"]`` before anything is computed. Attributes the graph mutates in place (counters,
train-mode statistics, also through a view) are state, not constants: nothing reading them is
folded. A folded view of a weight is stored as a copy, so it never aliases the original.

Numerics: exact (the same kernels run ahead of time on the same values).
"""

from __future__ import annotations

import operator

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
        kept_qdq = 0
        mutated = _mutated_attributes(gm)
        for target in sorted(mutated):
            report.note(f"{target} is mutated by the graph (state); reads of it are not folded")
        for node in list(gm.graph.nodes):
            if node.op == "get_attr":
                if node.target not in mutated:
                    values[node] = get_attr_value(gm, node.target)
                continue
            if node.op != "call_function":
                continue
            inputs = node.all_input_nodes
            if not inputs or not all(n in values for n in inputs):
                continue
            namespace = getattr(node.target, "namespace", None)
            if namespace in _KEEP_NAMESPACES:
                kept_qdq += 1  # quantization boundaries stay in the graph by design
                continue
            if not is_pure(node):
                report.skip(node_label(node), f"{op_name(node)} has side effects or randomness")
                continue
            in_bytes = sum(_bytes(values[n]) for n in inputs)
            # judge the size from meta["val"] first, so a huge expand is never materialized
            out_bytes = _static_bytes(node.meta.get("val"))
            if out_bytes is None or not self._too_big(out_bytes, in_bytes):
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
                try:
                    with torch.no_grad():
                        result = node.target(*args, **kwargs)
                except Exception as exc:  # noqa: BLE001 - an op that cannot run here stays in the graph
                    report.skip(node_label(node), f"{op_name(node)} failed on the constants: {type(exc).__name__}: {exc}")
                    continue
                out_bytes = _bytes(result)
            if self._too_big(out_bytes, in_bytes):
                report.skip(node_label(node), f"result ({out_bytes >> 10} KiB) would be {out_bytes / max(in_bytes, 1):.0f}x its inputs")
                continue
            values[node] = result
        if kept_qdq:
            report.note(f"kept {kept_qdq} quantize/dequantize call(s) on constants: they mark quantization boundaries")
        self._materialize(gm, values, report)

    def _too_big(self, out_bytes: int, in_bytes: int) -> bool:
        return out_bytes > (1 << 20) and out_bytes > self.max_growth * max(in_bytes, 1)

    def _materialize(self, gm: fx.GraphModule, values: dict, report: PassReport) -> None:
        # replace folded calls that are read by something not folded (a frontier) with a constant
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node not in values or not isinstance(values[node], torch.Tensor):
                continue
            if all(u in values for u in node.users):
                continue
            stem = _stem(node)
            value = values[node]
            # a view of an input (t, view, detach, ...) would alias the original weight, which the
            # eager model may share: store a copy so later in-place edits cannot reach through
            if any(_shares_storage(value, values[n]) for n in node.all_input_nodes):
                value = value.clone()
            const = add_constant(gm, f"{stem}_folded", value.contiguous(), before=node)
            node.replace_all_uses_with(const)
            report.change(f"{node_label(node)} = {op_name(node)}(constants)", kind="folded")
        if report.changed:
            gm.graph.eliminate_dead_code()
            prune_unused_attributes(gm)
            gm.recompile()


def _static_bytes(val) -> int | None:
    """Bytes of a fake value whose sizes are all concrete (None when unknown or symbolic)."""
    if isinstance(val, torch.Tensor):
        if any(not isinstance(s, int) for s in val.shape):
            return None
        return val.numel() * val.element_size()
    return None


def _shares_storage(a, b) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.untyped_storage().nbytes() > 0


def _schema_args(node: fx.Node):
    """(schema argument, value) pairs of an OpOverload call, positional and keyword."""
    schema = node.target._schema
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            yield arg, node.args[i]
        elif arg.name in node.kwargs:
            yield arg, node.kwargs[arg.name]


def _aliased_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs whose storage ``node``'s result may share (views, getitem of a split, ...)."""
    if node.op != "call_function":
        return []
    if node.target is operator.getitem:
        return [node.args[0]] if isinstance(node.args[0], fx.Node) else []
    schema = getattr(node.target, "_schema", None)
    if schema is None or not any(r.alias_info is not None for r in schema.returns):
        return []
    out = []
    for arg, value in _schema_args(node):
        if arg.alias_info is not None:
            values = value if isinstance(value, (list, tuple)) else [value]
            out += [v for v in values if isinstance(v, fx.Node)]
    return out


def _mutated_attributes(gm: fx.GraphModule) -> set[str]:
    """Targets of attributes the graph mutates in place (directly or through a view of them).

    Such an attribute is state (a counter, running statistics): its value at run time is not the
    value now, so neither it nor anything computed from it may be folded.
    """
    mutated: set[str] = set()
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is None or not schema.is_mutable:
            continue
        stack = []
        for arg, value in _schema_args(node):
            if arg.alias_info is not None and arg.alias_info.is_write:
                values = value if isinstance(value, (list, tuple)) else [value]
                stack += [v for v in values if isinstance(v, fx.Node)]
        seen: set[fx.Node] = set()
        while stack:  # walk back through views to the attribute that owns the storage
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "get_attr":
                mutated.add(n.target)
            else:
                stack.extend(_aliased_inputs(n))
    return mutated


def _stem(node: fx.Node) -> str:
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            return arg.target
    return f"_folded.{node.name}"
