"""The rewrite engine: Op/Var/Const/Lit matching, check reasons, the inner-node rule, reporting."""

import pytest
import torch
import torch.nn as nn

import fxpress
from fxpress.ir import Const, Lit, Match, Op, PassReport, RewriteRule, Var, apply_rules, verify_graph

aten = torch.ops.aten


def _capture(fn, *shapes, params=None):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            for name, value in (params or {}).items():
                self.register_parameter(name, nn.Parameter(value))

        def forward(self, *xs):
            return fn(self, *xs)

    model = M().eval()
    args = tuple(torch.randn(*s) for s in shapes)
    return model, args, fxpress.capture(model, args)


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


class DoubleRelu(RewriteRule):
    """relu(relu(x)) -> relu(x), as one new node (both matched nodes go)."""

    name = "double-relu"
    pattern = Op({aten.relu.default}, Op({aten.relu.default}, Var("x"), name="inner"), name="outer")

    def rewrite(self, gm, m: Match):
        with gm.graph.inserting_before(m.anchor):
            new = gm.graph.call_function(aten.relu.default, (m["x"],))
        new.meta["val"] = m.anchor.meta["val"]
        return new


class AddZero(RewriteRule):
    """x + 0 -> x (alpha defaulted from the schema must be 1)."""

    name = "add-zero"
    pattern = Op({aten.add.Tensor}, Var("x"), Lit(0, name="other"), Lit(1, name="alpha"))

    def rewrite(self, gm, m):
        return m["x"]


class Square(RewriteRule):
    """x * x (the same value twice) -> aten.square(x)."""

    name = "square"
    pattern = Op({aten.mul.Tensor}, Var("x"), Var("x"))

    def rewrite(self, gm, m):
        with gm.graph.inserting_before(m.anchor):
            new = gm.graph.call_function(aten.square.default, (m["x"],))
        new.meta["val"] = m.anchor.meta["val"]
        return new


class AddConstOnlyIfSmall(RewriteRule):
    """x + c with a constant c: fold into a sub of -c, refused (with a reason) for big constants."""

    name = "add-const"
    pattern = Op({aten.add.Tensor}, Var("x"), Const("c"))

    def check(self, gm, m):
        if m["c"].meta["val"].numel() > 4:
            return f"constant has {m['c'].meta['val'].numel()} elements, more than 4"
        return None

    def rewrite(self, gm, m):
        from fxpress.ir.graph import add_constant, get_attr_value

        neg = add_constant(gm, "neg_c", -get_attr_value(gm, m["c"].target), before=m.anchor)
        with gm.graph.inserting_before(m.anchor):
            new = gm.graph.call_function(aten.sub.Tensor, (m["x"], neg))
        new.meta["val"] = m.anchor.meta["val"]
        return new


def test_op_var_match_rewrites_and_erases_matched_nodes():
    model, args, gm = _capture(lambda self, x: torch.relu(torch.relu(x)) * 3, (2, 5))
    assert _count(gm, aten.relu.default) == 2
    report = PassReport("test")
    assert apply_rules(gm, [DoubleRelu()], report) == 1
    assert _count(gm, aten.relu.default) == 1
    # the inner relu was refused as an anchor, then consumed by the outer match: not "skipped"
    assert report.counts["double-relu"] == 1 and report.skipped == []
    assert "double-relu" in report.changed[0]
    verify_graph(gm)
    torch.testing.assert_close(gm(*args), model(*args))


def test_inner_node_with_outside_users_is_refused_with_reason():
    model, args, gm = _capture(lambda self, x: _shared_inner(x), (2, 5))
    report = PassReport("test")
    assert apply_rules(gm, [DoubleRelu()], report) == 0
    assert _count(gm, aten.relu.default) == 2
    outer = [why for where, why in report.skipped if where.startswith("relu_1")]
    assert len(outer) == 1 and "relu (aten.relu) also feeds 1 other node" in outer[0]
    torch.testing.assert_close(gm(*args), model(*args))


def _shared_inner(x):
    a = torch.relu(x)
    return torch.relu(a), a * 2


def test_dead_outside_users_do_not_block_a_match():
    """apply_rules runs dead-code elimination first, so a dead reader of the inner node is no user."""

    def fn(self, x):
        a = torch.relu(x)
        _unused = a * 2  # noqa: F841 - captured as a dead node
        return torch.relu(a)

    model, args, gm = _capture(fn, (2, 5))
    if not any(n.target == aten.mul.Tensor for n in gm.graph.nodes):
        # export already dropped the dead multiply; put one back so the test means something
        relu = next(n for n in gm.graph.nodes if n.target == aten.relu.default)
        with gm.graph.inserting_after(relu):
            dead = gm.graph.call_function(aten.mul.Tensor, (relu, 2))
        dead.meta["val"] = relu.meta["val"]
    inner = next(n for n in gm.graph.nodes if n.target == aten.relu.default)
    assert len(inner.users) == 2
    report = PassReport("test")
    assert apply_rules(gm, [DoubleRelu()], report) == 1
    torch.testing.assert_close(gm(*args), model(*args))


def test_lit_matches_literals_and_schema_defaults():
    model, args, gm = _capture(lambda self, x, y: (x + 0) * 2 + y, (2, 3), (2, 3))
    report = PassReport("test")
    assert apply_rules(gm, [AddZero()], report) == 1
    # `(..) + y` is refused: y is a graph input, not the literal 0
    assert any("expected 0" in why for _, why in report.skipped)
    assert _count(gm, aten.add.Tensor) == 1
    torch.testing.assert_close(gm(*args), model(*args))


def test_lit_refuses_a_different_alpha():
    model, args, gm = _capture(lambda self, x: torch.add(x, 0, alpha=2), (2, 3))
    report = PassReport("test")
    assert apply_rules(gm, [AddZero()], report) == 0
    (_, why), = report.skipped
    assert "alpha is 2, expected 1" in why


def test_var_bound_twice_must_be_the_same_value():
    model, args, gm = _capture(lambda self, x, y: x * x + x * y, (2, 3), (2, 3))
    report = PassReport("test")
    assert apply_rules(gm, [Square()], report) == 1
    assert _count(gm, aten.square.default) == 1 and _count(gm, aten.mul.Tensor) == 1
    (_, why), = report.skipped
    assert "bound to two different values" in why
    torch.testing.assert_close(gm(*args), model(*args))


def test_const_and_check_reasons_are_recorded():
    def fn(self, x):
        return (x + self.small) + self.big + torch.relu(x) + (x + torch.relu(x))

    model, args, gm = _capture(fn, (2, 8), params={"small": torch.randn(1), "big": torch.randn(8)})
    report = PassReport("test")
    assert apply_rules(gm, [AddConstOnlyIfSmall()], report) == 1
    reasons = [why for _, why in report.skipped]
    assert any("more than 4" in r for r in reasons)  # refused by check()
    assert any("is not a constant tensor (it is aten.add)" in r or "is not a constant tensor (it is aten.relu)" in r for r in reasons)
    assert _count(gm, aten.sub.Tensor) == 1
    verify_graph(gm)
    torch.testing.assert_close(gm(*args), model(*args))


def test_candidate_filter_silences_unrelated_anchors():
    class Quiet(DoubleRelu):
        def candidate(self, node):
            return False

    model, args, gm = _capture(lambda self, x: torch.relu(x), (2, 3))
    report = PassReport("test")
    assert apply_rules(gm, [Quiet()], report) == 0
    assert report.skipped == []
    report2 = PassReport("test")
    apply_rules(gm, [DoubleRelu()], report2)
    assert len(report2.skipped) == 1  # without the filter the lone relu is listed


def test_rule_that_edits_the_graph_itself_returns_none():
    class Annotate(RewriteRule):
        name = "annotate"
        pattern = Op({aten.relu.default}, Var("x"))

        def rewrite(self, gm, m):
            m.anchor.meta["annotated"] = True
            return None

    model, args, gm = _capture(lambda self, x: torch.relu(x) + 1, (2, 3))
    report = PassReport("test")
    assert apply_rules(gm, [Annotate()], report) == 1
    relu = next(n for n in gm.graph.nodes if n.target == aten.relu.default)
    assert relu.meta["annotated"] is True  # the anchor was kept


@pytest.mark.parametrize("pattern, reason", [
    (Op({aten.mul.Tensor}, Var("x"), Var("y")), "not aten.mul"),
    (Op({aten.relu.default}, Op({aten.mul.Tensor}, Var("x"), Var("y"))), "input is placeholder, not aten.mul"),
])
def test_pattern_reasons_name_what_was_found(pattern, reason):
    model, args, gm = _capture(lambda self, x: torch.relu(x), (2, 3))
    relu = next(n for n in gm.graph.nodes if n.target == aten.relu.default)
    got = pattern.match(relu, Match(anchor=relu), inner=False)
    assert got is not None and reason in got
