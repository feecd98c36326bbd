"""Backend tier of the quantization passes: quantized graphs exported to ONNX and run in onnxruntime.

What is checked, per model:

* ``export_onnx`` passes its own check (onnx.checker + onnxruntime vs the torch graph it exported);
* the Q/DQ survive export: every conv/linear weight is an int8 initializer behind a
  DequantizeLinear, every bias of a static int8 conv/linear an int32 one at scale
  ``x_scale * w_scale`` (quantize-bias), bit-exact in float32;
* onnxruntime fuses: QLinearConv / QGemm (or MatMulIntegerToFloat for 3-D linears) / QLinearAdd /
  QLinearConcat counts equal the quant_report counts;
* parity with the fxpress graph the user holds, on 8 fresh batches.

Parity tolerance: max |ort - torch| <= 2% of max |torch| (rtol 0.02). onnxruntime's int8 kernels
requantize with one float multiplier ``x_scale * w_scale / y_scale`` and add the int32 bias, while
the torch graph divides a float accumulation (with its float bias) by ``y_scale``: an element
close to a rounding boundary lands one quantization step apart (1/255 of that tensor's range, about
0.4-0.8% of its max), and a flipped step travels through the following layers. Measured worst case
over 16 batches on these models: 1.0%. Against the graph ``export_onnx`` actually exports (int32
biases), onnxruntime agrees to float rounding on nearly every element. A second check makes the
bound meaningful: onnxruntime's SQNR against the float model is within 1 dB of the torch graph's.

Fusion gap kept visible: with ``quantize_outputs=False`` (the default) a conv/add/cat whose result
is a model output has no Q after it, so onnxruntime runs it as DQ → float op; those ops are
subtracted explicitly (``_float_output_ops``), and ``quantize_outputs=True`` must fuse them all.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import onnx
import pytest
import torch
import torch.fx as fx
from models import ALL_SMALL
from onnx import numpy_helper

import fxpress
from fxpress import QuantConfig
from fxpress.backends import count_ops, optimized_op_counts
from fxpress.passes import PassManager

RTOL = 0.02
aten = torch.ops.aten
# onnxruntime op types a quantized op kind fuses into
FUSED = {
    "conv": ("QLinearConv",),
    "linear": ("QGemm", "QLinearMatMul", "MatMulIntegerToFloat"),
    "add": ("QLinearAdd",),
    "cat": ("QLinearConcat",),
}
KIND_TARGETS = {
    "conv": {aten.conv2d.default},
    "linear": {aten.linear.default},
    "add": {aten.add.Tensor},
    "cat": {aten.cat.default},
}


def sqnr(ref, out) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum().clamp_min(1e-30)))


def _float_output_ops(qm: fx.GraphModule, kind: str) -> int:
    """Quantized ops of ``kind`` whose (relu-fused) result is returned as a float model output."""
    outputs = set(qm.graph.output_node().all_input_nodes)
    n = 0
    for node in qm.graph.nodes:
        if node.op == "call_function" and node.target in KIND_TARGETS[kind]:
            out = node
            if len(node.users) == 1 and next(iter(node.users)).target in (aten.relu.default, aten.relu_.default):
                out = next(iter(node.users))
            if kind != "linear" and out in outputs:  # QGemm / MatMulIntegerToFloat take a float output
                n += 1
    return n


def _check_fusion(qm, path, report, *, quantize_outputs: bool) -> dict:
    counts = optimized_op_counts(path)
    for kind, op_types in FUSED.items():
        fused = sum(counts.get(t, 0) for t in op_types)
        expected = report.quantized(kind) - (0 if quantize_outputs else _float_output_ops(qm, kind))
        assert fused == expected, f"{kind}: onnxruntime fused {fused}, expected {expected} ({dict(counts)})"
    return counts


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _check_qdq_layout(model: onnx.ModelProto, report) -> None:
    """int8 weights and int32 biases at x_scale * w_scale behind DequantizeLinear (pitfalls 6 and 7).

    Conv/Gemm carry the bias as their third input; a linear on 3-D inputs exports as MatMul + Add.
    """
    inits = _initializers(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    n_static = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        x_dq, w_dq = producer.get(node.input[0]), producer.get(node.input[1])
        if w_dq is not None and w_dq.op_type == "Transpose":  # MatMul reads the [out, in] weight transposed
            w_dq = producer.get(w_dq.input[0])
        if w_dq is None or w_dq.op_type != "DequantizeLinear":
            continue
        assert inits[w_dq.input[0]].dtype == np.int8, node.name
        if x_dq is None or x_dq.op_type != "DequantizeLinear":
            continue
        n_static += 1
        if node.op_type == "MatMul":
            (add,) = consumers[node.output[0]]
            assert add.op_type == "Add", node.name
            bias = next(i for i in add.input if i != node.output[0])
        elif len(node.input) >= 3:
            bias = node.input[2]
        else:
            continue  # bias=False
        b_dq = producer[bias]
        assert b_dq.op_type == "DequantizeLinear" and inits[b_dq.input[0]].dtype == np.int32, node.name
        x_scale, w_scale, b_scale = (inits[d.input[1]] for d in (x_dq, w_dq, b_dq))
        expected = (np.float32(x_scale) * w_scale.astype(np.float32)).astype(np.float32)
        assert np.array_equal(np.broadcast_to(expected, b_scale.shape), b_scale), node.name
    static = report.per_kind.get("conv", {}).get("int8 static", 0) + report.per_kind.get("linear", {}).get("int8 static", 0)
    assert n_static == static, f"{n_static} conv/linear read DQ'd activations and weights in ONNX, quant_report says {static}"


def _parity_on_fresh_batches(model, qm, session, args, n=8) -> tuple[float, float, float]:
    worst_rel, s_torch, s_ort = 0.0, [], []
    for _ in range(n):
        x = torch.randn_like(args[0])
        with torch.no_grad():
            ref, t = model(x), qm(x)
        o = session(x)
        worst_rel = max(worst_rel, float((o - t).abs().max() / t.abs().max()))
        s_torch.append(sqnr(ref, t))
        s_ort.append(sqnr(ref, o))
    return worst_rel, float(np.mean(s_torch)), float(np.mean(s_ort))


# ---------------------------------------------------------------------------------------------
# small models


MODELS = ["conv_bn_relu_cnn", "residual_block", "concat_block", "mlp", "inverted_residual", "transformer_block"]


@pytest.mark.parametrize("quantize_outputs", [False, True], ids=["float-outputs", "quantized-outputs"])
@pytest.mark.parametrize("name", MODELS)
def test_small_model_onnx_parity_layout_and_fusion(name, quantize_outputs, tmp_path):
    model, args = ALL_SMALL[name](batch=4)
    calib = [torch.randn_like(args[0]) for _ in range(8)]
    qm = fxpress.quantize(model, args, calibration=calib, config=QuantConfig(quantize_outputs=quantize_outputs), progress=False)
    report = fxpress.quant_report(qm)
    path = tmp_path / f"{name}.onnx"
    result = fxpress.export_onnx(qm, args, path, rtol=RTOL)
    assert result.max_abs_diff is not None
    ops = count_ops(result.model)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0  # Q/DQ survived the exporter's optimizer
    _check_qdq_layout(result.model, report)
    _check_fusion(qm, path, report, quantize_outputs=quantize_outputs)
    worst_rel, s_torch, s_ort = _parity_on_fresh_batches(model, qm, result.session(), args)
    assert worst_rel <= RTOL, f"{name}: max |ort - torch| is {worst_rel:.2%} of max |torch|"
    assert s_ort >= s_torch - 1.0, f"{name}: onnxruntime SQNR {s_ort:.1f} dB vs torch graph {s_torch:.1f} dB"
    assert s_torch >= 30, f"{name}: SQNR {s_torch:.1f} dB"


def test_user_graph_keeps_float_bias_export_lowers_a_copy(tmp_path):
    """quantize-bias runs on a copy inside export_onnx: the user's graph keeps its float biases."""
    model, args = ALL_SMALL["conv_bn_relu_cnn"]()
    qm = fxpress.quantize(model, args, calibration=[torch.randn_like(args[0]) for _ in range(4)], progress=False)
    before = {k: v.clone() for k, v in qm.state_dict().items()}
    fxpress.export_onnx(qm, args, tmp_path / "m.onnx", rtol=RTOL)
    after = qm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(v.dtype == torch.int32 for v in after.values())
    lowered, _ = PassManager(["quantize-bias"], verify=False).run(copy.deepcopy(qm))
    assert sum(v.dtype == torch.int32 for v in lowered.state_dict().values()) == 4


def test_weight_only_exports_and_runs(tmp_path):
    """Weight-only graphs export (int8 weights behind DequantizeLinear) and match in onnxruntime."""
    model, args = ALL_SMALL["mlp"](batch=4)
    qm = fxpress.quantize(model, args, config="int8_weight_only", progress=False)
    result = fxpress.export_onnx(qm, args, tmp_path / "wo.onnx", rtol=1e-3)
    inits = _initializers(result.model)
    weights = [n.input[0] for n in result.model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weights) == 3 and all(inits[w].dtype == np.int8 and inits[w].ndim == 2 for w in weights)
    x = torch.randn_like(args[0])
    with torch.no_grad():
        torch.testing.assert_close(result.session()(x), qm(x), atol=1e-4, rtol=1e-3)


def test_quantized_adaptive_avg_pool_runs_as_qlinear_global_average_pool(tmp_path):
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)
    ).eval()
    x = torch.randn(2, 3, 12, 12)
    qm = fxpress.quantize(model, (x,), calibration=[torch.randn(4, 3, 12, 12) for _ in range(4)], progress=False)
    result = fxpress.export_onnx(qm, (x,), tmp_path / "gap.onnx", rtol=RTOL)
    assert "GlobalAveragePool" in count_ops(result.model) and "ReduceMean" not in count_ops(result.model)
    counts = optimized_op_counts(tmp_path / "gap.onnx")
    assert counts["QLinearGlobalAveragePool"] == 1 and (counts["QLinearConv"], counts["QGemm"]) == (1, 1)
    assert any(n.target is aten.adaptive_avg_pool2d.default for n in qm.graph.nodes)  # the user's graph is untouched


def test_relu6_and_hardtanh_fuse_into_the_int8_conv(tmp_path):
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU6(), torch.nn.Conv2d(8, 8, 3, groups=8), torch.nn.Hardtanh(-1.0, 1.0),
        torch.nn.Conv2d(8, 4, 1),
    ).eval()
    x = torch.randn(2, 3, 12, 12)
    qm = fxpress.quantize(model, (x,), calibration=[torch.randn(4, 3, 12, 12) for _ in range(4)], progress=False)
    assert "float" not in str(fxpress.quant_report(qm)).split("weights:")[0]
    fxpress.export_onnx(qm, (x,), tmp_path / "clip.onnx", rtol=RTOL)
    counts = optimized_op_counts(tmp_path / "clip.onnx")
    # the last conv returns a float model output, so onnxruntime keeps it float (quantize_outputs=False)
    assert counts["QLinearConv"] == 2 and "Clip" not in counts, dict(counts)


# ---------------------------------------------------------------------------------------------
# the digits CNN, trained


def _trained_digits(tmp_path_factory):
    """DigitsCNN trained once per session, shared across xdist workers (same cache as test_quant_api)."""
    from filelock import FileLock

    from fxpress.demo import DigitsCNN, load_digits_tensors, train_digits_cnn

    # this session's temp root, shared by its xdist workers (never a file left by an earlier run)
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "fxpress-digits-cnn.pt"
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            model, _ = train_digits_cnn(progress=False)
            torch.save(model.state_dict(), path)
    model = DigitsCNN()
    model.load_state_dict(torch.load(path))
    return model.eval(), load_digits_tensors(0)


def test_digits_cnn_int8_onnx(tmp_path_factory, tmp_path):
    from fxpress.demo import accuracy

    model, (x_train, _, x_test, y_test) = _trained_digits(tmp_path_factory)
    calib = [x_train[i : i + 64] for i in range(0, 512, 64)]
    qm = fxpress.quantize(model, (x_test[:1],), calibration=calib, progress=False)
    report = fxpress.quant_report(qm)
    path = tmp_path / "digits.onnx"
    result = fxpress.export_onnx(qm, (x_test[:1],), path, rtol=RTOL)
    _check_qdq_layout(result.model, report)
    counts = _check_fusion(qm, path, report, quantize_outputs=False)
    assert (counts["QLinearConv"], counts["QGemm"], counts["QLinearAdd"]) == (4, 1, 1)
    assert counts["QLinearGlobalAveragePool"] == 1 and "ReduceMean" not in counts  # x.mean((2, 3)) runs in int8
    session = result.session()
    acc_ort, acc_torch = accuracy(session, x_test, y_test), accuracy(qm, x_test, y_test)
    assert abs(acc_ort - acc_torch) <= 0.3, f"onnxruntime {acc_ort:.2f}% vs torch graph {acc_torch:.2f}%"
    with torch.no_grad():
        t = qm(x_test)
    o = session(x_test)
    assert float((o - t).abs().max() / t.abs().max()) <= RTOL
    assert (o.argmax(1) == t.argmax(1)).float().mean() >= 0.99
