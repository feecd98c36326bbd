"""fold-batch-norm: structure (BN count before/after, refusals with reasons), numerics, batch size.

Numerics bound: the pass claims exactness up to float rounding; outputs are compared with
torch.testing.assert_close's float32 defaults (rtol 1.3e-6, atol 1e-5) on the small models and
at 1e-4 on resnet18 / mobilenet (deeper, so more rounding accumulates).
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from models import (
    conv_bn_relu_cnn,
    conv_transpose_bn,
    inverted_residual,
    linear_bn1d,
    mobilenet_v3_small,
    randomize_bn,
    residual_block,
    resnet18,
)

import fxpress
from fxpress.ir import verify_graph
from fxpress.ir.graph import get_attr_value
from fxpress.passes import PassManager, get_pass

aten = torch.ops.aten
BN_OPS = (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)


def _bn_count(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in BN_OPS)


def _fold(gm):
    result = get_pass("fold-batch-norm")(gm)
    verify_graph(result.gm)
    return result


def _like(x, batch):
    return torch.randn(batch, *x.shape[1:])


@pytest.mark.parametrize(
    "factory, n_bn",
    [
        (conv_bn_relu_cnn, 3),  # conv with bias, bias=False, strided
        (linear_bn1d, 2),  # linear (2-D) with and without bias
        (conv_transpose_bn, 2),  # conv_transpose with groups=2, and bias=False
        (inverted_residual, 3),  # 1x1, depthwise 3x3, 1x1 projection; all bias=False
        (residual_block, 4),  # BN before the residual adds
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_fold_structure_numerics_and_batch(factory, n_bn):
    model, args = factory(batch=1)
    gm = fxpress.capture(model, args)
    assert _bn_count(gm) == n_bn
    result = _fold(gm)
    assert result.modified
    assert _bn_count(gm) == 0
    assert result.report.counts["folded"] == n_bn and not result.report.skipped
    with torch.no_grad():
        torch.testing.assert_close(gm(*args), model(*args))
        big = tuple(_like(a, 8) for a in args)  # captured at batch 1, runs at batch 8
        torch.testing.assert_close(gm(*big), model(*big))
    # batch-norm parameters and statistics are gone from the module
    assert not [name for name, _ in gm.named_buffers() if "running" in name]


def test_fold_is_idempotent_and_honest_about_modified():
    model, args = conv_bn_relu_cnn()
    gm = fxpress.capture(model, args)
    assert _fold(gm).modified
    again = _fold(gm)
    assert not again.modified and again.report.changed == []


def test_eager_model_is_not_touched():
    model, args = conv_bn_relu_cnn()
    before = copy.deepcopy(model.state_dict())
    _fold(fxpress.capture(model, args))
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize(
    "conv, bn, shape",
    [
        (nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5), (2, 3, 9)),
        (nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), (2, 2, 4, 4, 4)),
        (nn.Conv2d(4, 8, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(8), (2, 4, 6, 6)),  # grouped
        (nn.Conv2d(6, 6, 3, groups=6), nn.BatchNorm2d(6), (2, 6, 6, 6)),  # depthwise with bias
        (nn.Conv2d(3, 4, 3, padding="same"), nn.BatchNorm2d(4), (2, 3, 6, 6)),  # aten.conv2d.padding
        (nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), (2, 3, 6, 6)),  # no gamma / beta
        (nn.ConvTranspose2d(6, 9, 3, stride=2, groups=3, bias=False), nn.BatchNorm2d(9), (2, 6, 4, 4)),
        (nn.ConvTranspose1d(4, 6, 3, groups=2), nn.BatchNorm1d(6), (2, 4, 7)),
        (nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5), (3, 6)),
        (nn.Linear(6, 5), nn.BatchNorm1d(5, affine=False), (3, 6)),
    ],
    ids=["conv1d", "conv3d", "grouped", "depthwise", "padding-same", "affine-false", "conv_t-groups",
         "conv_t1d-groups", "linear-nobias", "linear-affine-false"],
)
def test_fold_variants(conv, bn, shape):
    model = randomize_bn(nn.Sequential(conv, bn)).eval()
    x = torch.randn(*shape)
    gm = fxpress.capture(model, (x,))
    result = _fold(gm)
    assert result.report.counts["folded"] == 1
    assert _bn_count(gm) == 0
    torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize("factory", [conv_bn_relu_cnn, conv_transpose_bn, linear_bn1d], ids=lambda f: f.__name__)
def test_fold_decomposed_form(factory):
    """run_decompositions / aot_autograd give aten.convolution + _native_batch_norm_legit_no_training."""
    model, args = factory()
    gm = torch.export.export(model, args).run_decompositions().module(check_guards=False)
    n_bn = _bn_count(gm)
    assert any(n.target == aten._native_batch_norm_legit_no_training.default for n in gm.graph.nodes)
    result = _fold(gm)
    if factory is linear_bn1d:
        # linear decomposes to addmm / mm of a transposed weight, not producers: refused, with the reason
        assert _bn_count(gm) == n_bn and len(result.report.skipped) == n_bn
        assert all("input is aten.addmm" in why or "input is aten.mm" in why for _, why in result.report.skipped)
    else:
        assert result.report.counts["folded"] == n_bn and _bn_count(gm) == 0
    torch.testing.assert_close(gm(*args), model(*args))


# ----------------------------------------------------------------------------------------------
# refusals: the rule must not fire, and the report says why


def _refused(model, x, *, bn_left=1):
    gm = fxpress.capture(model, (x,))
    ref = gm(x)
    result = _fold(gm)
    assert _bn_count(gm) == bn_left
    assert result.report.skipped, "a refusal must be reported"
    torch.testing.assert_close(gm(x), ref)
    return result.report


def test_train_mode_is_refused_with_reason():
    model, (x,) = conv_bn_relu_cnn()
    model.train()
    report = _refused(model, x, bn_left=3)
    assert report.counts["folded"] == 0
    assert all("training" in why for _, why in report.skipped)


def test_batch_statistics_only_is_refused_with_reason():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    report = _refused(model, torch.randn(2, 3, 8, 8))
    (_, why), = report.skipped
    assert "no running statistics" in why and "train()" not in why


class _BNAfterAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x) + self.b(x))


def test_bn_after_add_is_not_folded():
    report = _refused(randomize_bn(_BNAfterAdd()).eval(), torch.randn(2, 3, 5, 5))
    (where, why), = report.skipped
    assert "bn" in where
    assert "aten.add" in why and "not" in why


class _ConvAlsoUsed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y  # the raw conv output is needed too


def test_conv_with_other_users_is_not_folded():
    report = _refused(randomize_bn(_ConvAlsoUsed()).eval(), torch.randn(2, 3, 5, 5))
    (_, why), = report.skipped
    assert "also feeds" in why


class _LinearBN3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.bn = nn.BatchNorm1d(5)  # normalizes dim 1 of [N, 5, 4]: the sequence, not the features

    def forward(self, x):
        return self.bn(self.fc(x))


def test_linear_with_3d_output_is_not_folded():
    report = _refused(randomize_bn(_LinearBN3d()).eval(), torch.randn(2, 5, 6))
    (_, why), = report.skipped
    assert ">2-D" in why


class _Tied(nn.Module):
    """c1 and c2 share one weight; c1's weight is also used raw, unfolded, by a third call."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c2.weight = self.c1.weight
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn1(self.c1(x)) + self.bn2(self.c2(x)) + F.conv2d(x, self.c1.weight, padding=1)


def test_tied_weights_fold_without_corrupting_the_other_conv():
    model = randomize_bn(_Tied()).eval()
    shared = model.c1.weight.detach().clone()
    x = torch.randn(2, 4, 6, 6)
    gm = fxpress.capture(model, (x,))
    result = _fold(gm)
    assert result.report.counts["folded"] == 2 and _bn_count(gm) == 0
    torch.testing.assert_close(gm(x), model(x))
    # the unfolded conv still reads the original weight, and the two folded ones got their own
    weights = [n.args[1] for n in gm.graph.nodes if n.target == aten.conv2d.default]
    values = [get_attr_value(gm, w.target) for w in weights]
    assert len({w.target for w in weights}) == 3
    assert sum(torch.equal(v, shared) for v in values) == 1
    assert torch.equal(model.c1.weight, shared)  # and the eager model is untouched


def test_fold_under_the_pass_manager_with_verification():
    model, args = residual_block()
    gm = fxpress.capture(model, args)
    gm, report = PassManager(["fold-batch-norm"]).run(gm, args)
    assert report["fold-batch-norm"].counts["folded"] == 4
    assert "fold-batch-norm" in report.table() and "4 folded" in report.table()
    torch.testing.assert_close(gm(*args), model(*args))


@pytest.mark.slow
@pytest.mark.parametrize("factory, n_bn", [(resnet18, 20), (mobilenet_v3_small, 34)], ids=["resnet18", "mobilenet_v3_small"])
def test_fold_real_architectures(factory, n_bn):
    model, args = factory(batch=1)
    gm = fxpress.capture(model, args)
    assert _bn_count(gm) == n_bn
    gm, report = PassManager(["fold-batch-norm"]).run(gm, args)
    assert _bn_count(gm) == 0
    assert report["fold-batch-norm"].counts["folded"] == n_bn
    x = torch.randn(8, *args[0].shape[1:])  # captured at batch 1, runs at batch 8
    with torch.no_grad():
        torch.testing.assert_close(gm(*args), model(*args), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(gm(x), model(x), atol=1e-4, rtol=1e-4)
