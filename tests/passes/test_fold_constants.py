"""fold-constants: what folds, what must not (quantize/dequantize, state, randomness, huge results).

Numerics: the pass claims exactness; the same kernels run ahead of time, so outputs must be equal
to float32 defaults of torch.testing.assert_close.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxpress
from fxpress.ir import verify_graph
from fxpress.passes import get_pass

try:  # registers torch.ops.quantized_decomposed.* (PT2E's Q/DQ ops)
    import torch.ao.quantization.fx._decomposed  # noqa: F401
except ImportError:  # pragma: no cover - newer torch moved it to torchao
    pass

aten = torch.ops.aten


def _calls(gm, *targets):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in targets)


def _fold(gm, **options):
    result = get_pass("fold-constants", **options)(gm)
    verify_graph(result.gm)
    return result


class _TransposedWeight(nn.Module):
    def __init__(self, scale_inside: bool):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 6))
        self.scale_inside = scale_inside

    def forward(self, x):
        if self.scale_inside:
            return x @ (self.w.t() * 2)
        return x @ self.w.t() * 2


def test_weight_transform_chain_folds_into_one_constant():
    model, x = _TransposedWeight(scale_inside=True).eval(), torch.randn(3, 6)
    gm = fxpress.capture(model, (x,))
    assert _calls(gm, aten.t.default) == 1 and _calls(gm, aten.mul.Tensor) == 1
    result = _fold(gm)
    assert result.modified
    assert _calls(gm, aten.t.default) == 0 and _calls(gm, aten.mul.Tensor) == 0
    # t and mul both ran ahead of time; only the frontier (mul) is stored
    assert result.report.counts["folded"] == 1
    torch.testing.assert_close(gm(x), model(x))
    torch.testing.assert_close(gm(torch.ones(7, 6)), model(torch.ones(7, 6)))  # any batch
    # the original weight is no longer read, so it is dropped from the module
    assert "w" not in dict(gm.named_parameters())


def test_only_the_constant_part_folds():
    model, x = _TransposedWeight(scale_inside=False).eval(), torch.randn(3, 6)
    gm = fxpress.capture(model, (x,))
    result = _fold(gm)
    assert result.report.counts["folded"] == 1  # w.t()
    assert _calls(gm, aten.t.default) == 0
    assert _calls(gm, aten.mul.Tensor) == 1  # (x @ wt) * 2 depends on the input
    torch.testing.assert_close(gm(x), model(x))


class _ViewedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(30))

    def forward(self, x):
        return F.linear(x, self.w.view(5, 6))  # a contiguous view: .contiguous() would not copy it


@pytest.mark.parametrize("factory", [lambda: _TransposedWeight(scale_inside=False), _ViewedWeight], ids=["t", "view"])
def test_folded_view_does_not_alias_the_eager_weight(factory):
    model, x = factory().eval(), torch.randn(3, 6)
    gm = fxpress.capture(model, (x,))
    assert _fold(gm).report.counts["folded"] == 1
    (const,) = [gm.get_parameter(n.target) for n in gm.graph.find_nodes(op="get_attr")]
    assert const.untyped_storage().data_ptr() != model.w.untyped_storage().data_ptr()
    with torch.no_grad():
        const.mul_(0)  # a later in-place edit of the folded constant...
    assert model.w.abs().sum() > 0  # ...cannot reach the user's model


class _BufferTransform(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("log_scale", torch.randn(8))
        self.register_buffer("offset", torch.randn(2, 4))

    def forward(self, x):
        scale = self.log_scale.exp().reshape(1, -1)  # constant transformed in forward
        return x * scale + self.offset.flatten()


def test_constant_buffer_transformed_in_forward_is_folded():
    model, x = _BufferTransform().eval(), torch.randn(2, 8)
    gm = fxpress.capture(model, (x,))
    n_calls_before = _calls(gm, aten.exp.default, aten.reshape.default, aten.view.default, aten.flatten.using_ints)
    assert n_calls_before >= 3
    result = _fold(gm)
    assert _calls(gm, aten.exp.default, aten.reshape.default, aten.view.default, aten.flatten.using_ints) == 0
    assert result.report.counts["folded"] == 2  # exp+reshape → one constant, flatten → another
    torch.testing.assert_close(gm(x), model(x))


class _QDQ(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("qweight", torch.randint(-128, 127, (4, 6), dtype=torch.int8))
        self.w = nn.Parameter(torch.randn(4, 6))

    def forward(self, x):
        qd = torch.ops.quantized_decomposed
        w1 = qd.dequantize_per_tensor(self.qweight, 0.05, 0, -128, 127, torch.int8)
        q = qd.quantize_per_tensor(self.w, 0.05, 0, -128, 127, torch.int8)
        w2 = qd.dequantize_per_tensor(q, 0.05, 0, -128, 127, torch.int8)
        return F.linear(x, w1.t().t()) + F.linear(x, w2)


@pytest.mark.skipif(not hasattr(torch.ops.quantized_decomposed, "dequantize_per_tensor"), reason="no quantized_decomposed ops")
def test_quantize_dequantize_are_never_folded():
    model, x = _QDQ().eval(), torch.randn(2, 6)
    gm = fxpress.capture(model, (x,))
    qd = torch.ops.quantized_decomposed
    targets = (qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default)
    assert _calls(gm, *targets) == 3
    result = _fold(gm)
    assert _calls(gm, *targets) == 3  # all Q/DQ survive, and so does what reads them
    assert _calls(gm, aten.t.default) == 2
    assert not result.modified
    assert any("quantize/dequantize" in note for note in result.report.notes)  # not a silent no-op
    assert gm.get_buffer("qweight").dtype == torch.int8
    torch.testing.assert_close(gm(x), model(x))


class _HugeExpand(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("row", torch.randn(1, 256))

    def forward(self, x):
        return x.sum() + self.row.expand(2048, 256)  # 1 KiB constant → 2 MiB


def test_huge_expand_is_skipped_with_reason():
    model, x = _HugeExpand().eval(), torch.randn(2, 3)
    gm = fxpress.capture(model, (x,))
    result = _fold(gm)
    assert not result.modified
    assert _calls(gm, aten.expand.default) == 1
    (where, why), = result.report.skipped
    assert where.startswith("expand") and "2048 KiB" in why and "x its inputs" in why
    # a user who wants it anyway raises the growth limit
    assert _fold(gm, max_growth=1e6).report.counts["folded"] == 1
    assert _calls(gm, aten.expand.default) == 0
    torch.testing.assert_close(gm(x), model(x))


class _Stateful(nn.Module):
    """Reads a buffer before mutating it through a view: the buffer is state, not a constant."""

    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(2, 3))
        self.w = nn.Parameter(torch.randn(3, 3))

    def forward(self, x):
        y = x @ self.w.t() + self.count[0] * 2
        self.count.view(-1)[:3].add_(1)
        return y


def test_state_mutated_in_the_graph_is_not_folded():
    x = torch.randn(2, 3)
    folded = fxpress.capture(_Stateful().eval(), (x,))
    reference = fxpress.capture(_Stateful().eval(), (x,))
    reference.load_state_dict(folded.state_dict())
    result = _fold(folded)
    assert result.report.counts["folded"] == 1  # w.t() only
    assert any("count is mutated" in note for note in result.report.notes)
    assert _calls(folded, aten.add_.Tensor) == 1  # the mutation stays
    for _ in range(3):  # the count advances each call in both graphs
        torch.testing.assert_close(folded(x), reference(x))
    assert folded.get_buffer("count")[0, 0] == 3


def test_inplace_and_random_calls_on_constants_are_skipped_with_reason():
    class Impure(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("b", torch.ones(3))

        def forward(self, x):
            return x + torch.rand_like(self.b)

    gm = fxpress.capture(Impure().eval(), (torch.randn(2, 3),))
    result = _fold(gm)
    assert not result.modified
    (_, why), = result.report.skipped
    assert "randomness" in why


def test_nothing_to_fold_is_no_change():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    gm = fxpress.capture(model, (torch.randn(2, 4),))
    code = gm.code
    result = _fold(gm)
    assert not result.modified and result.report.summary() == "no change"
    assert gm.code == code
