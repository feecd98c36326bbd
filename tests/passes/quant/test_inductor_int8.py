"""inductor-int8-layout and the int8 inductor target: structure, numerics, lowering, negative cases.

Numerics bounds: the pass only drops roundings (conv outputs before a residual add) and folds exact
dequantizes, so its graph stays within 30 dB SQNR of the converted one; the compiled int8 graph
(oneDNN kernels, requantizing in their own order) stays within 30 dB of the converted graph run
eagerly. Lowering is observed in the code inductor generates: ``onednn.qconv*`` / ``qlinear*`` calls.
"""

from __future__ import annotations

import copy
import re
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from models import ResidualBlock, randomize_bn

import fxpress
from fxpress.ir.graph import get_attr_value
from fxpress.passes import get_pass
from fxpress.passes.quant.fold_weight_quant import DEQUANTIZE_OPS, QUANTIZE_OPS
from fxpress.passes.quant.inductor_layout import InductorInt8Layout, register_inductor_int8_patterns

aten = torch.ops.aten


class ResidualNet(nn.Module):
    """stem conv-relu, a basic block (projection and identity shortcuts: two residual adds), pool, linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = ResidualBlock(8, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = self.block(F.relu(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class LinearResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x))) + x


class LinearPlusConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.pos = nn.Parameter(torch.randn(4, 16))

    def forward(self, x):
        return torch.relu(self.fc(x) + self.pos)


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = (ref.double() - out.double()).pow(2).sum().clamp(min=1e-30)
    return float(10 * torch.log10(ref.double().pow(2).sum() / noise))


def _calls(gm, targets) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


@pytest.fixture(scope="module")
def quantized():
    torch.manual_seed(0)
    model = randomize_bn(ResidualNet()).eval()
    x = torch.randn(2, 3, 16, 16)
    calib = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    qm = fxpress.quantize(model, (x,), calibration=calib, progress=False)
    return model, qm, x


def _laid_out(qm):
    gm = copy.deepcopy(qm)
    return gm, InductorInt8Layout()(gm)


# ---------------------------------------------------------------------------------------------
# structure


def test_registered_by_name():
    assert isinstance(get_pass("inductor-int8-layout"), InductorInt8Layout)


def test_conv_add_loses_its_output_qdq_and_every_dq_has_one_user(quantized):
    _, qm, _ = quantized
    n_q = len(_calls(qm, QUANTIZE_OPS))
    gm, result = _laid_out(qm)
    assert result.modified
    assert result.report.counts["conv+add fused"] == 2  # projection add and identity add
    assert len(_calls(gm, QUANTIZE_OPS)) == n_q - 2
    adds = _calls(gm, {aten.add.Tensor, aten.add_.Tensor})
    assert len(adds) == 2
    for add in adds:
        kinds = sorted("conv" if a.target == aten.conv2d.default else "dq" if a.target in DEQUANTIZE_OPS else "other" for a in add.args)
        assert kinds == ["conv", "dq"], add.format_node()
    assert all(len(dq.users) == 1 for dq in _calls(gm, DEQUANTIZE_OPS))
    # the stem / conv1 / projection convs and the linear keep their quantized outputs
    assert len(_calls(qm, {aten.conv2d.default})) == len(_calls(gm, {aten.conv2d.default})) == 5


def test_pass_leaves_the_users_graph_alone(quantized):
    _, qm, _ = quantized
    code = qm.code
    _laid_out(qm)
    assert qm.code == code


def test_int32_bias_is_folded_back_to_float_exactly(quantized):
    _, qm, x = quantized
    gm = copy.deepcopy(qm)
    get_pass("quantize-bias")(gm)  # the ONNX lowering: int32 bias behind a dequantize
    with torch.no_grad():
        ref = gm(x)
    result = InductorInt8Layout()(gm)
    assert result.report.counts["float biases"] == 6  # 5 convs + the linear
    for node in _calls(gm, {aten.conv2d.default, aten.linear.default}):
        assert node.args[2].op == "get_attr" and get_attr_value(gm, node.args[2].target).dtype == torch.float32
    with torch.no_grad():
        out = gm(x)
    assert sqnr(ref, out) >= 30


def test_linear_add_is_reported_not_rewritten():
    torch.manual_seed(0)
    model = LinearResidual().eval()
    x = torch.randn(4, 16)
    qm = fxpress.quantize(model, (x,), calibration=[torch.randn(8, 16)], progress=False)
    gm, result = _laid_out(qm)
    assert result.report.counts["conv+add fused"] == 0
    assert any("qlinear binary fusion" in why for _, why in result.report.skipped)
    assert len(_calls(gm, QUANTIZE_OPS)) == len(_calls(qm, QUANTIZE_OPS))


def test_dynamic_linear_plus_input_or_constant_becomes_a_subtraction():
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    for model, root in ((LinearResidual(), "placeholder"), (LinearPlusConstant(), "get_attr")):
        qm = fxpress.quantize(model.eval(), (x,), config="int8_dynamic", progress=False)
        gm, result = _laid_out(qm)
        assert result.report.counts["residuals guarded"] == 1
        assert not _calls(gm, {aten.add.Tensor, aten.add_.Tensor})
        (sub,) = _calls(gm, {aten.sub.Tensor})
        assert sub.args[0].target == aten.linear.default and sub.args[1].target == aten.neg.default
        assert sub.args[1].args[0].op == root
        with torch.no_grad():
            torch.testing.assert_close(gm(x), qm(x), rtol=0, atol=0)  # a - (-r) == a + r exactly


def test_float_graph_is_untouched():
    model = randomize_bn(ResidualNet()).eval()
    gm = fxpress.capture(model, (torch.randn(2, 3, 16, 16),))
    code = gm.code
    result = InductorInt8Layout()(gm)
    assert not result.modified and not result.report.changed
    assert gm.code == code
    assert result.report.notes  # says why it did nothing


# ---------------------------------------------------------------------------------------------
# numerics


def test_layout_keeps_the_converted_numerics(quantized):
    model, qm, x = quantized
    gm, _ = _laid_out(qm)
    xs = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        ref, before, after = model(xs), qm(xs), gm(xs)
    assert sqnr(before, after) >= 30
    assert sqnr(ref, after) >= sqnr(ref, before) - 1.0  # dropping a rounding does not cost accuracy


# ---------------------------------------------------------------------------------------------
# backend: torch.compile(backend="fxpress") lowers to oneDNN int8 kernels


def _onednn_calls(code: str) -> list[str]:
    return re.findall(r"torch\.ops\.onednn\.(q\w+)\.(\w+)\(", code)


@pytest.mark.skipif(register_inductor_int8_patterns() is not None, reason="inductor's x86 int8 patterns are unavailable")
def test_compiled_int8_lowers_to_onednn_and_matches_eager(quantized):
    from torch._inductor.utils import run_and_get_code

    _, qm, x = quantized
    code_before = qm.code
    with torch.no_grad():
        ref = qm(x)
    torch._dynamo.reset()
    compiled = torch.compile(qm, backend="fxpress", options={"fallback": "raise"})
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, x)
        assert torch.equal(qm(x), ref)  # compiling left the user's graph and weights as they were
    calls = [c for code in codes for c in _onednn_calls(code)]
    convs = [c for c in calls if c[0].startswith("qconv")]
    assert len(convs) == 5, calls
    assert sum(c[0] == "qconv2d_pointwise" and c[1].startswith("binary") for c in convs) == 2, calls
    assert sum(c[0].startswith("qlinear") for c in calls) == 1, calls
    assert "dequantize_per_channel" not in "".join(codes)  # no float conv on dequantized weights
    assert sqnr(ref, out) >= 30
    with torch.no_grad():  # another batch size: no wrong specialization
        x5 = torch.randn(5, 3, 16, 16)
        assert sqnr(qm(x5), compiled(x5)) >= 30
    assert qm.code == code_before  # the user's graph keeps its ONNX layout (Q/DQ before every add)


@pytest.mark.skipif(register_inductor_int8_patterns() is not None, reason="inductor's x86 int8 patterns are unavailable")
@pytest.mark.parametrize("model_cls", [LinearResidual, LinearPlusConstant])
def test_compiled_dynamic_int8_leaves_inputs_and_weights_alone(model_cls):
    # inductor's qlinear "sum" fusion accumulates in place into the add's other operand
    torch.manual_seed(0)
    model = model_cls().eval()
    x = torch.randn(4, 16)
    qm = fxpress.quantize(model, (x,), config="int8_dynamic", progress=False)
    torch._dynamo.reset()
    compiled = torch.compile(qm, backend="fxpress", options={"fallback": "raise"})
    with torch.no_grad():
        ref, x0 = qm(x), x.clone()
        outs = [compiled(x) for _ in range(2)]
    assert torch.equal(x, x0), "the compiled model wrote into its input"
    assert all(sqnr(ref, out) >= 30 for out in outs)


def test_missing_torchao_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.quantization.pt2e.inductor_passes.x86", None)
    monkeypatch.delattr("torch._inductor.fx_passes.quantization._register_quantization_weight_pack_pass", raising=False)
    why = register_inductor_int8_patterns()
    assert why is not None and "torchao" in why


# ---------------------------------------------------------------------------------------------
# resnet18


@pytest.mark.slow
@pytest.mark.skipif(register_inductor_int8_patterns() is not None, reason="inductor's x86 int8 patterns are unavailable")
def test_resnet18_all_convs_lower_to_int8():
    import torchvision
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    qm = fxpress.quantize(model, (x,), calibration=[torch.randn(4, 3, 64, 64)], config="int8_static", progress=False, verify=False)
    _, result = _laid_out(qm)
    assert result.report.counts["conv+add fused"] == 8
    torch._dynamo.reset()
    compiled = torch.compile(qm, backend="fxpress", options={"fallback": "raise"})
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, x)
        ref, fp32 = qm(x), model(x)
    calls = [c for code in codes for c in _onednn_calls(code)]
    convs = [c for c in calls if c[0].startswith("qconv")]
    assert len(convs) == 20 and sum(c[1].startswith("binary") for c in convs) == 8, calls
    assert sum(c[0].startswith("qlinear") for c in calls) == 1, calls
    assert sqnr(ref, out) >= 30
    assert sqnr(fp32, out) >= 25
