"""Zoo sweep: real torchvision architectures (random weights, nothing downloaded) through the whole
int8 static pipeline: quantize → run → export_onnx → onnxruntime parity and fusion, with a report
that accounts for every op left in float.

Models, chosen to cover the op families and to fit the suite's time budget on 2 cores:

=======================  ============================================================  ================
model                    what it exercises                                             size
=======================  ============================================================  ================
resnet18                 conv-BN-ReLU, residual adds, max pool, global pool, linear    full, 224x224
mobilenet_v3_small       depthwise conv, squeeze-excitation (mul, hardsigmoid),        full, 224x224
                         hardswish, dropout
regnet_y_400mf           grouped conv, squeeze-excitation (sigmoid), residual adds     full, 224x224
convnext (2 stages)      7x7 depthwise conv, permute, LayerNorm, GELU, layer scale,    2 stages x 2
                         linears on NHWC tensors (MatMul in ONNX)                      blocks, 224x224
vit_b_16 (2 layers)      patch conv, class token cat, attention (packed in-proj,       ViT-B/16 widths,
                         SDPA), LayerNorm, GELU                                        2 of 12 layers
=======================  ============================================================  ================

convnext_tiny (135 s) and swin_t (over 300 s to quantize) take minutes each on 2 cores; the cut-down
ConvNeXt and ViT run the same blocks at a fraction of the depth. ViT's class token and head are
zero-initialised by torchvision: the head is re-drawn (a zero output makes every comparison
vacuous) and so is the class token (a near-zero token row is amplified by LayerNorm into a 6 dB
SQNR, an artefact of the init, not of trained models).

Config: int8_static with min/max activation ranges instead of the preset's histogram-MSE search,
which costs 0.1-0.6 s per activation observer on 2 cores (135 observers in regnet_y_400mf: 80 s);
the observers are tested on their own in test_observers.py, and the small models, the digits CNN
and the ONNX tests use the preset as is.

Bounds: SQNR of the int8 graph vs the float model at least ``MIN_SQNR`` (random weights, per-tensor
uint8 activations, 3 calibration batches; measured 25-39 dB, the floors sit 5 dB lower). The
cut-down ConvNeXt is lowest: its error builds up through per-tensor quantized tensors that a
LayerNorm reads (the pooled features before the head alone cost 4.7 dB). onnxruntime vs the fxpress graph: within
5% of max |output| (``export_onnx``'s check) and an SQNR against the float model within 1 dB of the
fxpress graph's: the int8 kernels round a requantization one step apart from the float emulation
now and then (see test_quant_onnx.py), and in these deeper graphs the flipped steps add up.
"""

from __future__ import annotations

import pytest
import torch
from models import randomize_bn

import fxpress
from fxpress import QuantConfig, TensorSpec
from fxpress.backends import optimized_op_counts

pytestmark = pytest.mark.slow

torchvision = pytest.importorskip("torchvision")

RTOL = 0.05
CONFIG = QuantConfig.preset("int8_static").with_default(activation=TensorSpec(observer="minmax"))
FUSED = {
    "conv": ("QLinearConv",),
    "linear": ("QGemm", "QLinearMatMul", "MatMulIntegerToFloat"),
    "add": ("QLinearAdd",),
    "cat": ("QLinearConcat",),
}
# op kinds fxpress does not quantize in int8_static, with the reason the report must give
EXPECTED_FLOAT_REASON = {"mul": "mul is not quantized in static mode"}


def _convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(96, 192, 2), CNBlockConfig(192, None, 2)], stochastic_depth_prob=0.0)


def _vit():
    m = torchvision.models.vit_b_16(weights=None)
    m.encoder.layers = m.encoder.layers[:2]
    torch.nn.init.normal_(m.heads.head.weight, std=0.02)
    torch.nn.init.normal_(m.class_token, std=1.0)
    return m


ZOO = {
    "resnet18": lambda: torchvision.models.resnet18(weights=None),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(weights=None),
    "regnet_y_400mf": lambda: torchvision.models.regnet_y_400mf(weights=None),
    "convnext_2stage": _convnext,
    "vit_b_16_2layer": _vit,
}
# SQNR floors (dB): 5 dB under what these seeded models measure (35.5, 34.0, 39.0, 25.1, 29.2)
MIN_SQNR = {"resnet18": 30, "mobilenet_v3_small": 29, "regnet_y_400mf": 34, "convnext_2stage": 20, "vit_b_16_2layer": 24}


def sqnr(ref, out) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum().clamp_min(1e-30)))


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_int8_static_to_onnxruntime(name, tmp_path, record_property):
    torch.manual_seed(0)
    model = randomize_bn(ZOO[name]()).eval()
    x = torch.randn(1, 3, 224, 224)
    calibration = [torch.randn(1, 3, 224, 224) for _ in range(3)]

    qm = fxpress.quantize(model, (x,), calibration=calibration, config=CONFIG, progress=False)
    report = fxpress.quant_report(qm)
    text = str(report)

    # coverage: every conv and linear runs int8; whatever stays float is listed with a reason
    assert report.quantized("conv") == report.total("conv") > 0, text
    if report.total("linear"):
        assert report.quantized("linear") == report.total("linear"), text
    for node, kind, why in report.float_ops:
        assert why and "no observers were planned" not in why, f"{node} [{kind}] has no reason: {why!r}"
        if kind in EXPECTED_FLOAT_REASON:
            assert why == EXPECTED_FLOAT_REASON[kind], (node, why)
        assert f"{node} [{kind}]: {why}" in text
    for op in report.other_float:
        assert op in text
    n_float_kinds = sum(report.total(k) - report.quantized(k) for k in report.per_kind)
    assert len(report.float_ops) == n_float_kinds

    # numerics of the fxpress graph
    x_eval = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref, out = model(x_eval), qm(x_eval)
    s_torch = sqnr(ref, out)
    assert s_torch >= MIN_SQNR[name], f"{name}: SQNR {s_torch:.1f} dB"

    # onnxruntime: parity with the fxpress graph, accuracy vs float, fusion of every quantized op
    path = tmp_path / f"{name}.onnx"
    result = fxpress.export_onnx(qm, (x,), path, rtol=RTOL)
    o = result.session()(x_eval)
    rel = float((o - out).abs().max() / out.abs().max())
    s_ort = sqnr(ref, o)
    assert rel <= RTOL, f"{name}: max |ort - torch| is {rel:.2%} of max |torch|"
    assert s_ort >= s_torch - 1.0, f"{name}: onnxruntime SQNR {s_ort:.1f} dB vs fxpress graph {s_torch:.1f} dB"
    counts = optimized_op_counts(path)
    fused = {}
    for kind, op_types in FUSED.items():
        fused[kind] = sum(counts.get(t, 0) for t in op_types)
        assert fused[kind] == report.quantized(kind), f"{name} {kind}: fused {fused[kind]}, quant_report {report.quantized(kind)}"

    summary = (
        f"{name}: quantized {', '.join(f'{k} {report.quantized(k)}/{report.total(k)}' for k in report.per_kind)}; "
        f"float {dict(report.other_float)}; SQNR torch {s_torch:.1f} dB, ort {s_ort:.1f} dB; "
        f"ort parity max diff {result.max_abs_diff[0]:.3g} (sample), {rel:.2%} of max (fresh); "
        f"fused {dict((t, counts[t]) for ts in FUSED.values() for t in ts if counts.get(t))}"
    )
    record_property("zoo", summary)
    print(summary)
