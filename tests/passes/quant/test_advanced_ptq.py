"""Advanced PTQ passes: cross-layer-equalization, record-input-means + bias-correction, smooth-quant.

Tiers (DESIGN.md): structure (what was rewritten, and cases where the rule must not fire, with the
reason), numerics, and the API path (``fxpress.quantize(..., equalize=, bias_correction=, smooth_quant=)``).

Numerics bounds used here:

* cross-layer-equalization and smooth-quant are exact rescalings: outputs within 1e-4 (relative to
  the output's scale) of the float graph; the pass manager checks the same on the sample inputs.
* CLE: after the pass, per-channel ranges of the two layers are equal (max|W1[i]| = max|W2[:, i]|).
* bias-correction with weight-only quantization: the quantized layer's output error is exactly
  linear in the input, so on the calibration data the per-channel mean error becomes 0 (up to float
  rounding); with 4-bit weights and int8 activations it must cut the mean output error at least in
  half and raise the SQNR by at least 3 dB (measured: ~12 dB).
* smooth-quant on a linear whose input has 3 channels 50x larger than the rest (and, as in trained
  transformers, correspondingly small weights for them): int8 SQNR up by at least 3 dB.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from models import conv_bn_relu_cnn, inverted_residual, mlp, residual_block

import fxpress
from fxpress import OpQuant, QuantConfig, TensorSpec
from fxpress.ir.capture import capture
from fxpress.passes import PassManager
from fxpress.passes.quant.bias_correction import RECORDER_ROOT, ChannelStats
from fxpress.passes.quant.debug import sqnr
from fxpress.passes.quant.equalize import equalization_pairs
from fxpress.passes.quant.smooth_quant import activation_absmax

aten = torch.ops.aten
FLOAT_PREP = ["fold-constants", "fold-batch-norm", "eliminate-dead-code"]


def float_graph(model, x, *extra):
    gm = capture(model, x)
    gm, report = PassManager([*FLOAT_PREP, *extra]).run(gm, x)  # verify=True: exact passes are checked
    return gm, report


def assert_same(ref, out):
    ref, out = ref.detach(), out.detach()
    torch.testing.assert_close(out, ref, atol=1e-4 * float(ref.abs().max()), rtol=1e-4)


def calls(gm, *targets):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


# ---------------------------------------------------------------------------------------------
# cross-layer-equalization


class ConvReluConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        with torch.no_grad():  # very uneven output channels, as batch-norm folding leaves them
            self.conv1.weight.mul_(torch.logspace(-2, 1, 8).reshape(8, 1, 1, 1))

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


def test_cle_equalizes_channel_ranges_and_keeps_outputs():
    model, x = ConvReluConv().eval(), (torch.randn(2, 3, 10, 10),)
    gm, report = float_graph(model, x, "cross-layer-equalization")
    rep = report["cross-layer-equalization"]
    assert rep.counts["equalized pairs"] == 1
    c1, c2 = calls(gm, aten.conv2d.default)
    w1, w2 = gm.get_parameter(c1.args[1].target), gm.get_parameter(c2.args[1].target)
    r1 = w1.abs().amax((1, 2, 3))
    r2 = w2.abs().amax((0, 2, 3))
    torch.testing.assert_close(r1, r2, rtol=1e-5, atol=0)
    before = model.conv1.weight.detach().abs().amax((1, 2, 3))
    assert float(before.max() / before.min()) > 100 > float(r1.max() / r1.min())
    assert_same(model(*x), gm(*x))


def test_cle_depthwise_chain_rewrites_relu6_exactly():
    model, x = inverted_residual()
    gm, report = float_graph(model, x, "cross-layer-equalization")
    rep = report["cross-layer-equalization"]
    assert rep.counts["equalized pairs"] == 2  # expand → dw, dw → project
    assert not calls(gm, aten.relu6.default, aten.hardtanh.default, aten.hardtanh_.default)
    assert len(calls(gm, aten.clamp.Tensor)) == 2  # relu6(x/s) = clamp(x, 0, 6/s)/s per channel
    assert_same(model(*x), gm(*x))
    # dw conv: input channel i is its group i; its range now matches expand's output channel i
    expand, dw, _ = calls(gm, aten.conv2d.default)
    r1 = gm.get_parameter(expand.args[1].target).abs().amax((1, 2, 3))
    r2 = gm.get_parameter(dw.args[1].target).abs().amax((1, 2, 3))
    assert float((r1 / r2 - 1).abs().max()) < 0.05  # converged across the two overlapping pairs


def test_cle_bounded_activations_off_skips_relu6():
    model, x = inverted_residual()
    gm, report = float_graph(model, x, ("cross-layer-equalization", {"bounded_activations": False}))
    rep = report["cross-layer-equalization"]
    assert rep.counts["equalized pairs"] == 0
    assert any("bounded" in why for _, why in rep.skipped)


class AddBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.conv1(x) + x)


def test_cle_refuses_through_an_add():
    model, x = AddBetween().eval(), (torch.randn(2, 4, 8, 8),)
    gm, report = float_graph(model, x, "cross-layer-equalization")
    rep = report["cross-layer-equalization"]
    assert not rep.changed
    reasons = dict(rep.skipped)
    assert any("add" in why and "conv2" in where for where, why in reasons.items())
    assert_same(model(*x), gm(*x))


def test_cle_refuses_shared_outputs_and_non_homogeneous_ops():
    model, x = residual_block()
    gm, _ = float_graph(model, x)
    pairs, refused = equalization_pairs(gm)
    assert [(p.first.name, p.second.name) for p in pairs] == [("conv2d", "conv2d_1")]  # conv1 → relu → conv2
    why = {n.name: r for n, r in refused}
    assert "also feeds" in why["conv2d_3"]  # conv3 reads relu(add) which also feeds the residual
    model, x = mlp()  # fc1 → relu → fc2 → gelu → fc3
    gm, report = float_graph(model, x, "cross-layer-equalization")
    rep = report["cross-layer-equalization"]
    assert rep.counts["equalized pairs"] == 1
    assert any("gelu" in r and "positively homogeneous" in r for _, r in rep.skipped)
    assert_same(model(*x), gm(*x))


def test_cle_through_quantize_api_is_verified_and_reported():
    model, x = conv_bn_relu_cnn(batch=4)
    calib = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    cfg = QuantConfig(default=OpQuant("static", TensorSpec(observer="minmax"), TensorSpec(dtype=torch.int8, symmetric=True, axis=0, observer="minmax")))
    qm = fxpress.quantize(model, x, calibration=calib, config=cfg, equalize=True, progress=False)
    rep = qm.meta["fxpress"]["prepare_report"]["cross-layer-equalization"]
    assert rep.counts["equalized pairs"] == 2  # conv1 → relu → maxpool → conv2, conv2 → relu → conv3
    assert fxpress.quant_report(qm).quantized("conv") == 3
    assert sqnr(model(calib[0]), qm(calib[0])) > 30


# ---------------------------------------------------------------------------------------------
# bias correction


W4 = TensorSpec(dtype=torch.int8, symmetric=True, axis=0, bits=4, observer="minmax")
W4_STATIC = QuantConfig(default=OpQuant("static", TensorSpec(observer="minmax"), W4))
W4_WEIGHT_ONLY = QuantConfig(default=OpQuant("weight_only", None, W4))


class Convs(nn.Module):
    """conv (no bias) → relu → depthwise conv → relu → conv: inputs with non-zero means, coarse weights."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.conv2 = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.conv2(F.relu(self.dw(F.relu(self.conv1(x)))))


def mean_error(ref, out):
    """Mean over channels of |E[out - ref]| per channel (dim 1)."""
    return float((out - ref).detach().transpose(0, 1).reshape(ref.shape[1], -1).mean(1).abs().mean())


def test_bias_correction_zeroes_mean_error_with_weight_only_quantization():
    model = Convs().eval()
    calib = [torch.randn(4, 3, 6, 6) + 0.5 for _ in range(4)]  # 6x6: the padding border matters
    x = (calib[0],)
    ref = torch.cat([model(c) for c in calib])
    plain = fxpress.quantize(model, x, calibration=calib, config=W4_WEIGHT_ONLY, progress=False)
    corrected = fxpress.quantize(model, x, calibration=calib, config=W4_WEIGHT_ONLY, bias_correction=True, progress=False)
    # only the first layer is exactly linear in the model input; check it through the first conv
    rep = corrected.meta["fxpress"]["convert_report"]["bias-correction"]
    assert rep.counts["corrected biases"] == 3
    assert not [n for n in corrected.graph.nodes if n.op == "call_module"] and not hasattr(corrected, RECORDER_ROOT)
    first = nn.Sequential(model.conv1)
    fq = fxpress.quantize(first.eval(), x, calibration=calib, config=W4_WEIGHT_ONLY, bias_correction=True, progress=False)
    f_ref = torch.cat([first(c) for c in calib])
    f_out = torch.cat([fq(c) for c in calib])
    assert mean_error(f_ref, f_out) < 1e-5 * float(f_ref.detach().abs().mean())  # per-position mean with zero padding: exact
    out_plain = torch.cat([plain(c) for c in calib])
    out_corr = torch.cat([corrected(c) for c in calib])
    assert mean_error(ref, out_corr) < 0.5 * mean_error(ref, out_plain)


def test_bias_correction_improves_sqnr_with_coarse_weights():
    model, x = conv_bn_relu_cnn(batch=8)
    calib = [torch.randn(8, 3, 16, 16) for _ in range(6)]
    held_out = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    ref = torch.cat([model(c) for c in held_out])
    plain = fxpress.quantize(model, x, calibration=calib, config=W4_STATIC, progress=False)
    corrected = fxpress.quantize(model, x, calibration=calib, config=W4_STATIC, bias_correction=True, progress=False)
    out_plain = torch.cat([plain(c) for c in held_out])
    out_corr = torch.cat([corrected(c) for c in held_out])
    assert mean_error(ref, out_corr) < 0.5 * mean_error(ref, out_plain)
    assert sqnr(ref, out_corr) > sqnr(ref, out_plain) + 3.0
    assert fxpress.quant_report(corrected).quantized("conv") == 3  # recorders gone: DQ → conv again


def test_bias_correction_prepare_convert_by_hand_and_skips():
    model, x = mlp()
    cfg = QuantConfig(default=OpQuant("static", TensorSpec(observer="minmax"), W4), ignore=["fc3"])
    prepared = fxpress.prepare(model, x, cfg, bias_correction=True)
    rep = prepared.meta["fxpress"]["prepare_report"]["record-input-means"]
    assert rep.counts["recorders"] == 2
    assert any("fc3" in where for where, _ in rep.skipped)
    stats = [m for m in prepared.modules() if isinstance(m, ChannelStats)]
    assert len(stats) == 2 and not any(s.calibrated for s in stats)  # the manager's check run left no trace
    for _ in range(3):
        prepared(torch.randn(8, 16))
    assert all(s.calibrated and int(s.count) == 24 for s in stats)
    qm = fxpress.convert(prepared)
    assert qm.meta["fxpress"]["convert_report"]["bias-correction"].counts["corrected biases"] == 2


def test_bias_correction_needs_calibration():
    model, x = mlp()
    with pytest.raises(ValueError, match="calibration"):
        fxpress.quantize(model, x, config="int8_weight_only", bias_correction=True)


# ---------------------------------------------------------------------------------------------
# smooth quant


class LNLinear(nn.Module):
    """LayerNorm with 3 outlier channels (gamma 50) → linear: LN feeds only the linear (fold case).

    As in trained transformers, where massive activations act like biases, the linear's weights for
    the outlier channels are small (here 1/50), so every channel matters to the output about
    equally, and crushing the ordinary channels to a few int8 levels shows in the output SQNR.
    """

    OUTLIERS = [3, 17, 40]

    def __init__(self, d=64, out=48):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, out)
        with torch.no_grad():
            self.ln.weight[self.OUTLIERS] = 50.0
            self.fc.weight[:, self.OUTLIERS] /= 50.0

    def forward(self, x):
        return self.fc(self.ln(x))


class OutlierMLP(nn.Module):
    """relu(fc0) with 3 outlier channels → fc1 (fold into fc0's rows case).

    fc1's weights for the outlier channels are 1/50 of the rest (see ``LNLinear``).
    """

    OUTLIERS = [5, 9, 33]

    def __init__(self, d=32, hidden=64):
        super().__init__()
        self.fc0 = nn.Linear(d, hidden)
        self.fc1 = nn.Linear(hidden, d)
        with torch.no_grad():
            self.fc0.weight[self.OUTLIERS] *= 50.0
            self.fc0.bias[self.OUTLIERS] *= 50.0
            self.fc1.weight[:, self.OUTLIERS] /= 50.0

    def forward(self, x):
        return self.fc1(F.relu(self.fc0(x)))


class LNShared(LNLinear):
    """The LayerNorm output also leaves the model (mul case: it cannot be folded into the LayerNorm)."""

    def forward(self, x):
        h = self.ln(x)
        return self.fc(h), h


def smooth(model, x, calib, **options):
    gm, _ = float_graph(model, x)
    stats = activation_absmax(gm, [((c,), {}) for c in calib])
    gm, report = PassManager([("smooth-quant", {"statistics": stats, **options})]).run(gm, x)  # verify: exact
    return gm, report["smooth-quant"]


def test_smooth_quant_folds_into_layer_norm_exactly():
    model, x = LNLinear().eval(), (torch.randn(2, 8, 64),)
    calib = [torch.randn(4, 8, 64) for _ in range(4)]
    gm, rep = smooth(model, x, calib)
    assert rep.counts["smoothed inputs"] == 1 and "folded into" in rep.changed[0]
    assert not calls(gm, aten.mul.Tensor)
    assert_same(model(*x), gm(*x))
    ln = calls(gm, aten.layer_norm.default)[0]
    gamma = gm.get_parameter(ln.args[2].target)
    assert float(gamma.abs().max() / gamma.abs().median()) < 10  # the outliers were divided out


def test_smooth_quant_folds_into_the_linear_before_a_relu():
    model, x = OutlierMLP().eval(), (torch.randn(2, 32),)
    calib = [torch.randn(16, 32) for _ in range(4)]
    gm, rep = smooth(model, x, calib)
    assert rep.counts["smoothed inputs"] == 1  # relu → fc1, folded into fc0
    assert rep.changed[0].startswith("relu") and "folded into the rows of linear (fc0)" in rep.changed[0]
    assert not calls(gm, aten.mul.Tensor)
    assert any("no outlier channels in x" in why for _, why in rep.skipped)  # fc0's evenly spread input
    gm, rep = smooth(model, x, calib, min_spread=0.0)  # smooth it anyway: a mul on the model input
    assert rep.counts["smoothed inputs"] == 2
    (mul,) = calls(gm, aten.mul.Tensor)
    assert mul.args[0].op == "placeholder"
    assert_same(model(*x), gm(*x))
    assert_same(model(*x), gm(*x))
    fc0 = calls(gm, aten.linear.default)[0]
    rows = gm.get_parameter(fc0.args[1].target).abs().amax(1)
    assert float(rows.max() / rows.median()) < 10  # the outlier rows were divided down


def test_smooth_quant_inserts_mul_when_the_activation_has_other_users():
    model, x = LNShared().eval(), (torch.randn(2, 8, 64),)
    calib = [torch.randn(4, 8, 64) for _ in range(4)]
    gm, rep = smooth(model, x, calib)
    assert rep.counts["smoothed inputs"] == 1 and "inserted a mul (1 other user(s)" in rep.changed[0]
    (mul,) = calls(gm, aten.mul.Tensor)
    assert mul.args[0].target == aten.layer_norm.default
    ref, out = model(*x), gm(*x)
    assert_same(ref[0], out[0])
    assert torch.equal(ref[1], out[1])  # the other user reads the unscaled activation


def test_smooth_quant_refuses_without_statistics_and_respects_config():
    model, x = LNLinear().eval(), (torch.randn(2, 8, 64),)
    gm, _ = float_graph(model, x)
    gm, report = PassManager(["smooth-quant"]).run(gm, x)
    rep = report["smooth-quant"]
    assert not rep.changed and any("no calibration statistics" in why for _, why in rep.skipped)
    gm, _ = float_graph(model, x)
    stats = activation_absmax(gm, [(x, {})])
    gm, report = PassManager([("smooth-quant", {"statistics": stats, "config": "int8_weight_only"})]).run(gm, x)
    rep = report["smooth-quant"]
    assert not rep.changed and any("weight_only" in why for _, why in rep.skipped)


@pytest.mark.parametrize("factory", [LNLinear, LNShared, OutlierMLP])
def test_smooth_quant_raises_int8_sqnr(factory):
    model = factory().eval()
    shape = (16, 32) if factory is OutlierMLP else (4, 8, 64)
    calib = [torch.randn(*shape) for _ in range(6)]
    held_out = [torch.randn(*shape) for _ in range(2)]
    x = (calib[0],)

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    ref = torch.cat([first(model(c)) for c in held_out])
    plain = fxpress.quantize(model, x, calibration=calib, progress=False)
    smoothed = fxpress.quantize(model, x, calibration=calib, smooth_quant=0.5, progress=False)
    s_plain = sqnr(ref, torch.cat([first(plain(c)) for c in held_out]))
    s_smooth = sqnr(ref, torch.cat([first(smoothed(c)) for c in held_out]))
    assert s_smooth > s_plain + 3.0, (s_plain, s_smooth)
    assert smoothed.meta["fxpress"]["prepare_report"]["smooth-quant"].counts["smoothed inputs"] >= 1


def test_smooth_quant_alpha_is_checked():
    with pytest.raises(ValueError, match="alpha"):
        PassManager([("smooth-quant", {"alpha": 1.5})])


# ---------------------------------------------------------------------------------------------
# a real architecture


@pytest.mark.slow
def test_cle_and_bias_correction_on_mobilenet_v2_are_exact_and_run():
    import torchvision

    from models import randomize_bn

    model = randomize_bn(torchvision.models.mobilenet_v2(weights=None)).eval()
    x = (torch.randn(2, 3, 64, 64),)
    gm, report = float_graph(model, x, "cross-layer-equalization")  # verified exact by the manager
    rep = report["cross-layer-equalization"]
    assert rep.counts["equalized pairs"] >= 30  # two per inverted residual block
    assert_same(model(*x), gm(*x))
