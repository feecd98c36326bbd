"""eliminate-dead-code: dead calls and unread attributes go; side effects stay. Numerics: exact."""

import torch
import torch.nn as nn

import fxpress
from fxpress.ir import verify_graph
from fxpress.passes import get_pass

aten = torch.ops.aten


def _dce(gm):
    result = get_pass("eliminate-dead-code")(gm)
    verify_graph(result.gm)
    return result


class _WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 100)  # never called
        self.register_buffer("unused_buf", torch.zeros(7))

    def forward(self, x):
        return self.fc(x)


def test_unused_parameters_and_buffers_are_dropped():
    model, x = _WithUnused().eval(), torch.randn(2, 4)
    gm = fxpress.capture(model, (x,))
    ref = gm(x)
    result = _dce(gm)
    assert result.modified
    names = set(gm.state_dict())
    assert names == {"fc.weight", "fc.bias"}
    assert result.report.counts["dropped attributes"] == 3  # unused.weight, unused.bias, unused_buf
    assert any("unused.weight" in c for c in result.report.changed)
    torch.testing.assert_close(gm(x), ref)
    assert not _dce(gm).modified  # a second run has nothing left to do


def test_unused_node_is_removed():
    model, x = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval(), torch.randn(2, 4)
    gm = fxpress.capture(model, (x,))
    _dce(gm)  # start clean
    relu = next(n for n in gm.graph.nodes if n.target == aten.relu.default)
    with gm.graph.inserting_before(next(n for n in gm.graph.nodes if n.op == "output")):
        dead = gm.graph.call_function(aten.mul.Tensor, (relu, 3))
        dead2 = gm.graph.call_function(aten.neg.default, (dead,))
    dead.meta["val"] = dead2.meta["val"] = relu.meta["val"]
    gm.recompile()
    n_before = len(gm.graph.nodes)
    result = _dce(gm)
    assert len(gm.graph.nodes) == n_before - 2
    assert result.report.counts["removed nodes"] == 2
    assert not any(n.target in (aten.mul.Tensor, aten.neg.default) for n in gm.graph.nodes)
    assert "neg" not in gm.code  # recompiled
    torch.testing.assert_close(gm(x), model(x))


class _Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)  # result unused, but the mutation is the point
        return x * 2


def test_inplace_ops_are_kept():
    model, x = _Counter().eval(), torch.randn(2, 3)
    gm = fxpress.capture(model, (x,))
    assert sum(1 for n in gm.graph.nodes if n.target == aten.add_.Tensor) == 1
    result = _dce(gm)
    assert sum(1 for n in gm.graph.nodes if n.target == aten.add_.Tensor) == 1
    assert "calls" in dict(gm.named_buffers())  # still read by the kept mutation
    assert not any("add_" in c for c in result.report.changed)
    gm(x)
    gm(x)
    assert gm.get_buffer("calls").item() == 2


def test_live_graph_is_left_alone():
    model, x = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), torch.randn(2, 3, 6, 6)
    gm = fxpress.capture(model, (x,))
    _dce(gm)
    code = gm.code
    result = _dce(gm)
    assert not result.modified and result.report.changed == []
    assert gm.code == code
