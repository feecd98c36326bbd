"""ONNX lowering of dynamic int8 and weight-only (int8 / int4) linears: which kernels onnxruntime runs,
parity with the fxpress torch graph, per-channel / per-group scales on the right axis, fallbacks.

Tolerances (max |onnxruntime - fxpress graph| <= atol + rtol * max|fxpress graph|, on the same batch):
* dynamic int8: atol 1e-3, rtol 1e-2; integer accumulation is exact, the rest is float rounding plus
  the rare activation that onnxruntime's DynamicQuantizeLinear rounds to the neighbouring code;
* weight-only through MatMulNBits at accuracy_level 0 (float compute): atol 1e-4, rtol 1e-4, float rounding;
* int8 weight-only through DequantizeLinear → MatMul/Gemm: atol 1e-3, rtol 1e-2, because onnxruntime may
  fuse it into MatMulNBits at its session default accuracy level (int8 compute).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxpress
from fxpress.backends import count_ops, export_onnx, optimized_op_counts
from fxpress.backends.onnx_quant import LowerQuantizedLinears, OnnxQuantOptions, pack_nbits, unpack_nbits
from fxpress.passes.quant import OpQuant, QuantConfig, TensorSpec

FLOAT_MATMULS = ("MatMul", "Gemm", "FusedMatMul", "FusedGemm")
INT_KERNELS = ("MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")


class MLP(nn.Module):
    def __init__(self, d_in=64, hidden=64, d_out=32):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, d_out, bias=False)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(torch.relu(self.fc1(x)))))


class QKV(nn.Module):
    """Three linears read one input (the attention projections' layout)."""

    def __init__(self, d=64):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return self.q(x) * self.k(x) + self.v(x)


def _skewed(d=64, bias=True) -> nn.Linear:
    """A square linear whose output channels differ in magnitude by 10^5: a scale applied along the
    wrong axis (input instead of output features) gives errors the size of the largest channels."""
    lin = nn.Linear(d, d, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-3, 2, d).unsqueeze(1))
        if bias:
            lin.bias.mul_(torch.logspace(-3, 2, d))
    return lin.eval()


def _quantize(model, x, config):
    return fxpress.quantize(model.eval(), (x,), config=config, progress=False)


def _assert_parity(session, graph, x, atol, rtol):
    with torch.no_grad():
        ref = graph(x)
    out = session(x)
    assert out.shape == ref.shape
    bound = atol + rtol * ref.abs().max().item()
    assert (out - ref).abs().max().item() <= bound


def _assert_parity_per_channel(session, graph, x, rtol):
    """Every output channel within rtol of its own magnitude (scales on the wrong axis fail this)."""
    with torch.no_grad():
        ref = graph(x)
    out = session(x)
    err = (out - ref).abs().flatten(0, -2).amax(0)
    mag = ref.abs().flatten(0, -2).amax(0)
    assert bool((err <= rtol * mag + 1e-6).all()), f"worst channel: err {err.max():.3g}, magnitudes {mag.min():.3g}..{mag.max():.3g}"


def _float_matmuls(counts) -> int:
    return sum(counts.get(k, 0) for k in FLOAT_MATMULS)


# ---------------------------------------------------------------------------------------------
# dynamic int8


@pytest.mark.parametrize("shape", [(4, 64), (2, 5, 64)], ids=["2d", "3d"])
def test_dynamic_mlp_runs_integer_kernels(tmp_path, shape):
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(shape)
    q = _quantize(model, x, "int8_dynamic")
    res = export_onnx(q, (x,), tmp_path / "dyn.onnx", atol=1e-3, rtol=1e-2)

    exported = count_ops(res.model)
    assert exported["DynamicQuantizeLinear"] == 3 and exported["MatMulInteger"] == 3
    assert _float_matmuls(exported) == 0
    assert not any(k.startswith(("QuantizeLinear", "DequantizeLinear")) for k in exported)

    fused = optimized_op_counts(res.path)
    assert sum(fused.get(k, 0) for k in ("MatMulIntegerToFloat", "DynamicQuantizeMatMul")) == 3
    assert _float_matmuls(fused) == 0, fused

    # another batch (size and values): dynamic qparams follow it in both runtimes
    x2 = torch.randn((7, *shape[1:])) * 3
    _assert_parity(res.session(), q, x2, atol=1e-3, rtol=1e-2)
    # the user's graph keeps its reference Q/DQ (the lowering works on a copy)
    assert any("choose_qparams" in str(n.target) for n in q.graph.nodes)


def test_dynamic_shared_input_is_quantized_once(tmp_path):
    torch.manual_seed(0)
    model, x = QKV().eval(), torch.randn(2, 8, 64)
    q = _quantize(model, x, "int8_dynamic")
    res = export_onnx(q, (x,), tmp_path / "qkv.onnx", atol=1e-3, rtol=1e-2)
    exported = count_ops(res.model)
    assert exported["DynamicQuantizeLinear"] == 1 and exported["MatMulInteger"] == 3
    fused = optimized_op_counts(res.path)
    assert fused["MatMulIntegerToFloat"] + fused["DynamicQuantizeMatMul"] == 3 and _float_matmuls(fused) == 0
    _assert_parity(res.session(), q, torch.randn(3, 8, 64), atol=1e-3, rtol=1e-2)


def test_dynamic_per_channel_scales_on_output_axis(tmp_path):
    torch.manual_seed(0)
    model, x = _skewed(), torch.randn(4, 64)
    q = _quantize(model, x, "int8_dynamic")
    res = export_onnx(q, (x,), tmp_path / "skewed.onnx", atol=1e-3, rtol=1e-2)
    _assert_parity_per_channel(res.session(), q, torch.randn(6, 64), rtol=1e-3)
    # and the quantized model is still close to the float one, channel by channel
    _assert_parity_per_channel(res.session(), model, torch.randn(6, 64), rtol=0.05)


def test_dynamic_per_tensor_and_asymmetric_weights(tmp_path):
    """Per-tensor weight scales (scalar) and asymmetric weights (MatMulInteger's b_zero_point)."""
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(4, 64)
    for weight in (
        TensorSpec(dtype=torch.int8, symmetric=True, axis=None, observer="minmax"),
        TensorSpec(dtype=torch.int8, symmetric=False, axis=0, observer="minmax"),
    ):
        q = _quantize(model, x, QuantConfig(default=OpQuant("dynamic", TensorSpec(observer="minmax"), weight)))
        res = export_onnx(q, (x,), tmp_path / "w.onnx", atol=1e-3, rtol=1e-2)
        matmuls = [n for n in res.model.graph.node if n.op_type == "MatMulInteger"]
        assert len(matmuls) == 3
        assert (len(matmuls[0].input) == 4) == (not weight.symmetric)
        _assert_parity(res.session(), q, torch.randn(5, 64), atol=1e-3, rtol=1e-2)


def test_dynamic_int8_activations_fall_back_to_float_qdq(tmp_path):
    """DynamicQuantizeLinear is uint8 only: int8 activations keep Q/DQ, exported through the fallbacks."""
    torch.manual_seed(0)
    w8 = TensorSpec(dtype=torch.int8, symmetric=True, axis=0, observer="minmax")
    cfg = QuantConfig(default=OpQuant("dynamic", TensorSpec(dtype=torch.int8, observer="minmax"), w8))
    model, x = MLP().eval(), torch.randn(4, 64)
    q = _quantize(model, x, cfg)
    lowered, report = _lower(q)
    assert report.counts.get("dynamic int8 linears", 0) == 0 and len(report.skipped) == 3
    assert "uint8" in report.skipped[0][1]
    res = export_onnx(q, (x,), tmp_path / "int8act.onnx", atol=1e-3, rtol=1e-2)
    assert count_ops(res.model)["MatMulInteger"] == 0
    _assert_parity(res.session(), q, torch.randn(5, 64), atol=1e-3, rtol=1e-2)


# ---------------------------------------------------------------------------------------------
# weight-only


def test_int4_weight_only_lowers_to_matmul_nbits(tmp_path):
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(2, 5, 64)
    q = _quantize(model, x, "int4_weight_only")
    res = export_onnx(q, (x,), tmp_path / "int4.onnx")  # default tolerance: float compute
    exported = count_ops(res.model)
    assert exported["MatMulNBits"] == 3 and _float_matmuls(exported) == 0
    assert not any(k.startswith("DequantizeLinear") for k in exported)
    fused = optimized_op_counts(res.path)
    assert fused["MatMulNBits"] == 3 and _float_matmuls(fused) == 0
    nbits = [n for n in res.model.graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: a.i for a in nbits[0].attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == 32 and attrs["accuracy_level"] == 0
    assert nbits[0].domain == "com.microsoft"
    _assert_parity(res.session(), q, torch.randn(3, 5, 64), atol=1e-4, rtol=1e-4)


def test_int4_group_scales_on_the_right_axis(tmp_path):
    torch.manual_seed(0)
    lin = _skewed()
    with torch.no_grad():  # and the two groups of each row differ by 100x
        lin.weight[:, 32:].mul_(0.01)
    x = torch.randn(4, 64)
    q = _quantize(lin, x, "int4_weight_only")
    res = export_onnx(q, (x,), tmp_path / "int4_skewed.onnx")
    assert count_ops(res.model)["MatMulNBits"] == 1
    _assert_parity_per_channel(res.session(), q, torch.randn(6, 64), rtol=1e-4)


def test_int4_asymmetric_and_non_power_of_two_groups(tmp_path):
    """Asymmetric groups carry packed zero points; groups of 48 run as blocks of 16 (scales repeated);
    groups of 24 (no power-of-two block >= 16) keep the dequantize, exported in float."""
    torch.manual_seed(0)

    def cfg(group, symmetric):
        spec = TensorSpec(dtype=torch.int8, symmetric=symmetric, axis=0, group_size=group, bits=4, observer="minmax")
        return QuantConfig(default=OpQuant("weight_only", None, spec))

    model, x = MLP(d_in=96, hidden=96).eval(), torch.randn(3, 96)
    for group, symmetric, blocks in [(32, False, 32), (48, True, 16), (48, False, 16)]:
        q = _quantize(model, x, cfg(group, symmetric))
        res = export_onnx(q, (x,), tmp_path / f"g{group}{symmetric}.onnx")
        nodes = [n for n in res.model.graph.node if n.op_type == "MatMulNBits"]
        assert len(nodes) == 3
        assert {a.name: a.i for a in nodes[0].attribute}["block_size"] == blocks
        assert (nodes[0].input[3] != "") == (not symmetric)  # zero points only when needed
        _assert_parity(res.session(), q, torch.randn(5, 96), atol=1e-4, rtol=1e-4)

    q = _quantize(model, x, cfg(24, True))
    _, report = _lower(q)
    assert report.counts.get("MatMulNBits linears", 0) == 0 and "power-of-two" in report.skipped[0][1]
    res = export_onnx(q, (x,), tmp_path / "g24.onnx")
    assert count_ops(res.model)["MatMulNBits"] == 0
    _assert_parity(res.session(), q, torch.randn(5, 96), atol=1e-4, rtol=1e-4)


def test_int8_weight_only_default_and_matmul_nbits(tmp_path):
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(2, 5, 64)
    q = _quantize(model, x, "int8_weight_only")
    res = export_onnx(q, (x,), tmp_path / "w8.onnx", atol=1e-3, rtol=1e-2)
    exported = count_ops(res.model)
    assert exported["DequantizeLinear"] == 3 and exported["MatMulNBits"] == 0
    _assert_parity(res.session(), q, torch.randn(3, 5, 64), atol=1e-3, rtol=1e-2)

    res = export_onnx(q, (x,), tmp_path / "w8_nbits.onnx", quant_options={"weight_only_int8": "matmul_nbits"})
    exported = count_ops(res.model)
    assert exported["MatMulNBits"] == 3 and exported["DequantizeLinear"] == 0 and _float_matmuls(exported) == 0
    assert {a.name: a.i for a in res.model.graph.node[0].attribute if a.type == 2}.get("bits", 8) == 8
    _assert_parity(res.session(), q, torch.randn(3, 5, 64), atol=1e-4, rtol=1e-4)


def test_int8_weight_only_matmul_nbits_scales_on_output_axis(tmp_path):
    torch.manual_seed(0)
    model, x = _skewed(d=48), torch.randn(4, 48)  # K = 48: padded to one block of 64
    q = _quantize(model, x, "int8_weight_only")
    res = export_onnx(q, (x,), tmp_path / "w8_skewed.onnx", quant_options=OnnxQuantOptions(weight_only_int8="matmul_nbits"))
    assert count_ops(res.model)["MatMulNBits"] == 1
    _assert_parity_per_channel(res.session(), q, torch.randn(6, 48), rtol=1e-4)


def test_accuracy_level_is_passed_through(tmp_path):
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(2, 64)
    q = _quantize(model, x, "int4_weight_only")
    res = export_onnx(q, (x,), tmp_path / "acc4.onnx", atol=1e-2, rtol=5e-2, quant_options={"accuracy_level": 4})
    levels = {a.i for n in res.model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    with pytest.raises(ValueError, match="weight_only_int8"):
        OnnxQuantOptions(weight_only_int8="fast")


# ---------------------------------------------------------------------------------------------
# the pieces


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [32, 40])
def test_pack_nbits_layout_and_round_trip(bits, k):
    codes = torch.randint(0, 1 << bits, (3, k), dtype=torch.int32)
    packed = pack_nbits(codes, bits, 32)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (3, -(-k // 32), 32 * bits // 8)
    if bits == 4:  # low nibble first along K
        assert int(packed[0, 0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)
    else:
        assert int(packed[1, 0, 5]) == int(codes[1, 5])
    assert torch.equal(unpack_nbits(packed, bits, k), codes)


def _lower(q, options=None):
    """The lowering export_onnx runs (after quantize-bias), on a copy of the user's graph."""
    result = LowerQuantizedLinears(options)(copy.deepcopy(q))
    return result.gm, result.report


def test_lowering_pass_reports_and_keeps_numerics():
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(4, 64)
    for config, kind in [("int8_dynamic", "dynamic int8 linears"), ("int4_weight_only", "MatMulNBits linears")]:
        q = _quantize(model, x, config)
        lowered, report = _lower(q)
        assert report.counts[kind] == 3 and not report.skipped
        assert not any(n.target == torch.ops.aten.linear.default for n in lowered.graph.nodes if n.op == "call_function")
        x2 = torch.randn(5, 64)
        with torch.no_grad():
            assert torch.equal(lowered(x2), q(x2))  # the custom ops' eager code is the graph's math, bit for bit
    # static graphs are left to quantize-bias and the Q/DQ fusions, whatever the weight-only options
    q = fxpress.quantize(model, (x,), calibration=[torch.randn(8, 64)], progress=False)
    _, report = _lower(q, {"weight_only_int8": "matmul_nbits"})
    assert not report.changed and not report.notes
    # int8 weight-only is left to the exporter by default, and says so
    _, report = _lower(_quantize(model, x, "int8_weight_only"))
    assert not report.changed and "3 int8 weight-only" in report.notes[0]


# ---------------------------------------------------------------------------------------------
# a real architecture


@pytest.mark.slow
@pytest.mark.parametrize("config", ["int8_dynamic", "int4_weight_only", "int8_weight_only"])
def test_tiny_bert(tmp_path, config):
    from models import tiny_bert

    model, (ids,) = tiny_bert(batch=2, seq=16)
    q = _quantize(model, ids, config)
    res = export_onnx(q, (ids,), tmp_path / "bert.onnx", atol=1e-3, rtol=1e-2)
    fused = optimized_op_counts(res.path)
    if config == "int8_dynamic":
        assert sum(fused[k] for k in INT_KERNELS) == 12
    elif config == "int4_weight_only":
        assert fused["MatMulNBits"] == 12
    # the 4 float matmuls left are attention's Q·K^T and P·V (activations on both sides)
    assert _float_matmuls(fused) == 4
    _assert_parity(res.session(), q, torch.randint(0, 100, (3, 16)), atol=1e-3, rtol=1e-2)
