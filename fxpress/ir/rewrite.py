"""The one rewrite mechanism: pattern → check → rewrite, with a reason whenever a candidate is refused.

A ``Pattern`` describes a small tree of calls rooted at an *anchor* node::

    Op(BATCH_NORMS, Op(CONVS, Var("x"), Const("w"), Var("b")), Const("gamma"), ..., name="bn")

``Op`` matches a ``call_function`` node whose target is one of the given overloads and matches its
positional arguments (defaults from the op schema fill in omitted ones); ``Var`` binds anything;
``Const`` binds a ``get_attr`` node (or ``None`` where ``optional``); ``Lit`` requires a literal.
An inner ``Op`` must have no users outside the match, because rewriting it would change what those
users see (the FX subgraph rewriter silently drops such matches; here the reason is recorded).

A ``RewriteRule`` subclass sets ``pattern``, may refine with ``check`` (return a reason string to
refuse), and implements ``rewrite`` returning the node that replaces the anchor. ``apply_rules``
runs dead-code elimination first, tries every rule at every anchor, and records each rewrite and
each refusal in the pass report, so no candidate disappears without a word.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx

from .graph import node_label, op_name, prune_unused_attributes
from .report import PassReport

__all__ = ["Pattern", "Op", "Var", "Const", "Lit", "Match", "RewriteRule", "apply_rules"]

_NO_DEFAULT = object()


@dataclass
class Match:
    """Bindings of a successful match; ``nodes`` lists the matched calls, inputs first, anchor last."""

    anchor: fx.Node
    bindings: dict[str, Any] = field(default_factory=dict)
    nodes: list[fx.Node] = field(default_factory=list)

    def __getitem__(self, name: str) -> Any:
        return self.bindings[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.bindings.get(name, default)


class Pattern:
    name: str | None = None

    def match(self, value: Any, m: Match, inner: bool) -> str | None:
        """Bind ``value`` into ``m``; return None on success or a reason on failure."""
        raise NotImplementedError

    def _bind(self, value: Any, m: Match) -> str | None:
        if self.name is None:
            return None
        if self.name in m.bindings and m.bindings[self.name] is not value:
            return f"'{self.name}' bound to two different values"
        m.bindings[self.name] = value
        return None


class Var(Pattern):
    """Matches anything and binds it."""

    def __init__(self, name: str | None = None):
        self.name = name

    def match(self, value, m, inner):
        return self._bind(value, m)


class Const(Pattern):
    """Matches a ``get_attr`` node (a weight or buffer); with ``optional`` also ``None``."""

    def __init__(self, name: str | None = None, optional: bool = False):
        self.name, self.optional = name, optional

    def match(self, value, m, inner):
        if value is None and self.optional:
            return self._bind(value, m)
        if not (isinstance(value, fx.Node) and value.op == "get_attr"):
            what = op_name(value) if isinstance(value, fx.Node) else repr(value)
            return f"{self.name or 'operand'} is not a constant tensor (it is {what})"
        return self._bind(value, m)


class Lit(Pattern):
    """Matches a literal argument equal to ``value``."""

    def __init__(self, value: Any, name: str | None = None, why: str | None = None):
        self.value, self.name, self.why = value, name, why

    def match(self, value, m, inner):
        if isinstance(value, fx.Node) or value != self.value:
            return self.why or f"{self.name or 'argument'} is {value!r}, expected {self.value!r}"
        return self._bind(value, m)


class Op(Pattern):
    """Matches a call to one of ``targets`` whose arguments match ``args`` positionally."""

    def __init__(self, targets: Iterable[Any], *args: Pattern, name: str | None = None):
        self.targets = frozenset(targets)
        self.args = args
        self.name = name

    def describe(self) -> str:
        names = sorted({op_name_of_target(t) for t in self.targets})
        return "/".join(names)

    def match(self, value, m, inner):
        if not isinstance(value, fx.Node) or value.op != "call_function" or value.target not in self.targets:
            what = op_name(value) if isinstance(value, fx.Node) else repr(value)
            return f"input is {what}, not {self.describe()}"
        if inner and len(value.users) > 1:
            return f"{value.name} ({op_name(value)}) also feeds {len(value.users) - 1} other node(s)"
        for i, sub in enumerate(self.args):
            arg = _argument(value, i)
            if arg is _NO_DEFAULT:
                return f"{value.name} has no argument {i}"
            reason = sub.match(arg, m, inner=True)
            if reason:
                return reason
        m.nodes.append(value)
        return self._bind(value, m)


def op_name_of_target(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[-1]}"
    return getattr(target, "__name__", str(target))


def _argument(node: fx.Node, i: int) -> Any:
    if i < len(node.args):
        return node.args[i]
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        schema_args = target._schema.arguments
        if i < len(schema_args):
            arg = schema_args[i]
            if arg.name in node.kwargs:
                return node.kwargs[arg.name]
            if arg.has_default_value():
                return arg.default_value
    return _NO_DEFAULT


class RewriteRule:
    """One rewrite: ``pattern`` finds candidates, ``check`` refuses with a reason, ``rewrite`` replaces.

    ``rewrite(gm, m)`` inserts new nodes (before ``m.anchor``) and returns the node that takes the
    anchor's place, or None when it edited the graph itself. It must give new nodes ``meta["val"]``.
    """

    name: str = "rule"
    pattern: Op

    def candidate(self, node: fx.Node) -> bool:
        """Whether an anchor node is worth a report line when the pattern refuses it.

        Broad anchors (``getitem``) override this so unrelated nodes are not listed as skipped.
        """
        return True

    def check(self, gm: fx.GraphModule, m: Match) -> str | None:
        return None

    def rewrite(self, gm: fx.GraphModule, m: Match) -> fx.Node | None:
        raise NotImplementedError

    def describe(self, m: Match) -> str:
        return " + ".join(node_label(n) for n in m.nodes)


def apply_rules(gm: fx.GraphModule, rules: Sequence[RewriteRule], report: PassReport) -> int:
    """Apply every rule at every anchor once; record rewrites and refusals in ``report``."""
    gm.graph.eliminate_dead_code()
    anchors: dict[Any, list[RewriteRule]] = {}
    for rule in rules:
        for target in rule.pattern.targets:
            anchors.setdefault(target, []).append(rule)
    rewritten = 0
    # Refusals are reported at the end, and only for nodes no later match consumed: in a chain
    # relu(relu(x)) the inner relu is refused as an anchor, then rewritten as part of the outer match.
    refused: dict[fx.Node, tuple[str, str]] = {}
    consumed: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if node.graph is None or node.op != "call_function" or node.target not in anchors:
            continue
        if getattr(node, "_erased", False):
            continue
        reasons = []
        for rule in anchors[node.target]:
            if not rule.candidate(node):
                continue
            m = Match(anchor=node)
            reason = rule.pattern.match(node, m, inner=False) or rule.check(gm, m)
            if reason:
                reasons.append(reason)
                continue
            what = rule.describe(m)
            consumed.update(m.nodes)
            replacement = rule.rewrite(gm, m)
            if replacement is not None and replacement is not node:
                node.replace_all_uses_with(replacement)
                for dead in reversed(m.nodes):  # anchor first, so users go before their inputs
                    if not dead.users and not getattr(dead, "_erased", False):
                        gm.graph.erase_node(dead)
            report.change(f"{what}: {rule.name}", kind=rule.name)
            rewritten += 1
            break
        else:
            if reasons:
                refused[node] = (node_label(node), "; ".join(dict.fromkeys(reasons)))
    for node, (label, why) in refused.items():
        if node not in consumed:
            report.skip(label, why)
    if rewritten:
        gm.graph.eliminate_dead_code()
        prune_unused_attributes(gm)
        gm.graph.lint()
        gm.recompile()
    return rewritten
