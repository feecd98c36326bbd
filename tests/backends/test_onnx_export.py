"""export_onnx and OnnxRuntimeModule: structure of the exported graph, parity with torch, dynamic/static
batch, error cases. Parity bound throughout: max|ort - torch| <= 1e-4 + 1e-4 * max|torch| (float32)."""

from __future__ import annotations

import collections

import onnx
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxpress
from fxpress.backends import OnnxExportResult, OnnxParityError, OnnxRuntimeModule, count_ops, export_onnx, optimized_op_counts
from fxpress.backends import onnx_export
from fxpress.backends.onnx_export import _choose_opset, compare_parity


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class MLP(nn.Module):
    """Two outputs, so tuple outputs are covered."""

    def __init__(self, width=64):
        super().__init__()
        self.fc1 = nn.Linear(32, width)
        self.fc2 = nn.Linear(width, 5)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h), h


def _cnn() -> SmallCNN:
    torch.manual_seed(0)
    m = SmallCNN()
    with torch.no_grad():  # non-trivial running statistics, so folding batch norm changes the weights
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return m.eval()


def _mlp(seed=0, width=64) -> MLP:
    torch.manual_seed(seed)
    return MLP(width).eval()


def _input_dims(model: onnx.ModelProto, i: int = 0) -> list:
    dims = model.graph.input[i].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


def _close(a, b, atol=1e-4, rtol=1e-4):
    torch.testing.assert_close(a, b, atol=atol + rtol * b.abs().max().item(), rtol=0)


@pytest.fixture(scope="module")
def cnn_export(tmp_path_factory):
    model = _cnn()
    x = torch.randn(1, 3, 16, 16)
    path = tmp_path_factory.mktemp("cnn") / "nested" / "dirs" / "cnn.onnx"  # parents do not exist yet
    return model, export_onnx(model, (x,), path)


# ---- export from an nn.Module -------------------------------------------------------------------------


def test_module_export_writes_checked_file(cnn_export):
    model, res = cnn_export
    assert isinstance(res, OnnxExportResult)
    assert res.path is not None and res.path.is_file()
    assert res.opset == 18
    assert len(res.max_abs_diff) == 1 and res.max_abs_diff[0] <= 1e-4
    assert res.input_names == ["x"] and len(res.output_names) == 1
    onnx.checker.check_model(str(res.path))
    ops = count_ops(res.path)
    assert ops["Conv"] == 2
    assert count_ops(res.model) == ops


def test_dynamic_batch_runs_other_batch_sizes(cnn_export):
    model, res = cnn_export
    dim0 = _input_dims(res.model)[0]
    assert isinstance(dim0, str), f"batch dim should be symbolic, got {dim0!r}"
    ort_mod = res.session()
    for batch in (8, 3):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            ref = model(x)
        out = ort_mod(x)
        assert out.shape == (batch, 10)
        _close(out, ref)


def test_static_when_dynamic_batch_false(tmp_path):
    model = _cnn()
    res = export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "static.onnx", dynamic_batch=False)
    assert _input_dims(res.model) == [1, 3, 16, 16]
    assert res.dynamic_shapes is None
    ort_mod = res.session()
    ort_mod(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="fixes dim 0 to 1"):
        ort_mod(torch.randn(8, 3, 16, 16))


# ---- export from a captured, rewritten GraphModule ----------------------------------------------------


def test_captured_and_folded_graph_exports_without_batch_norm(tmp_path):
    model = _cnn()
    x = torch.randn(1, 3, 16, 16)
    gm = fxpress.capture(model, (x,))
    gm, report = fxpress.PassManager(["fold-batch-norm"]).run(gm, (x,))
    assert report["fold-batch-norm"].changed

    res = export_onnx(gm, (x,), tmp_path / "folded.onnx")
    ops = count_ops(res.path)
    assert ops["Conv"] == 2 and ops["BatchNormalization"] == 0
    assert res.max_abs_diff[0] <= 1e-4
    assert isinstance(_input_dims(res.model)[0], str)  # the captured graph's dynamic batch is kept

    xb = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        _close(res.session()(xb), model(xb))  # against the eager, unfolded model


def test_captured_mlp_in_memory_with_two_outputs():
    model = _mlp()
    x = torch.randn(1, 32)
    gm = fxpress.capture(model, (x,))
    res = export_onnx(gm, (x,), path=None)
    assert res.path is None
    assert len(res.output_names) == 2 and len(res.max_abs_diff) == 2
    assert all(d <= 1e-4 for d in res.max_abs_diff)
    out, hidden = res.session()(torch.randn(5, 32))
    assert out.shape == (5, 5) and hidden.shape == (5, 64)


def test_explicit_dynamic_shapes_win_over_dynamic_batch(tmp_path):
    model = _mlp()
    gm = fxpress.capture(model, (torch.randn(2, 32),))
    res = export_onnx(gm, (torch.randn(2, 32),), tmp_path / "m.onnx", dynamic_batch=True, dynamic_shapes=({0: None},), check=False)
    assert _input_dims(res.model) == [2, 32]
    assert res.max_abs_diff is None


def test_graph_that_fixed_its_batch_exports_static_with_one_warning():
    class Flatten(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 3)

        def forward(self, x):
            return self.fc(x.reshape(x.shape[0], -1))

    x = torch.randn(2, 3, 4)
    gm = fxpress.capture(Flatten().eval(), (x,))
    (reshape,) = [n for n in gm.graph.nodes if n.target in (torch.ops.aten.reshape.default, torch.ops.aten.view.default)]
    reshape.args = (reshape.args[0], [2, 12])  # as a careless rewrite would: the batch is now baked in
    gm.recompile()
    with pytest.warns(UserWarning, match="specializes its dynamic dims") as record:
        res = export_onnx(gm, (x,), path=None)
    assert len([w for w in record if "specializes" in str(w.message)]) == 1
    assert res.dynamic_shapes is None and _input_dims(res.model) == [2, 3, 4]
    assert res.max_abs_diff[0] <= 1e-4


# ---- parity failures -----------------------------------------------------------------------------------


def test_zero_tolerance_reports_float_rounding_as_parity_error(tmp_path):
    # onnxruntime's MLAS and torch's BLAS sum a 512-wide dot product in different orders, so the
    # outputs differ in the last bits; with atol = rtol = 0 that honest difference must be reported.
    model = _mlp(width=512)
    path = tmp_path / "exact.onnx"
    with pytest.raises(OnnxParityError) as info:
        export_onnx(model, torch.randn(4, 32), path, atol=0.0, rtol=0.0)
    msg = str(info.value)
    assert "output" in msg and "max |ort - torch| = " in msg and str(path) in msg
    assert "allowed 0" in msg
    worst = float(msg.split("max |ort - torch| = ")[1].split()[0])
    assert 0 < worst < 1e-4


def test_parity_check_names_worst_difference_against_another_model():
    res = export_onnx(_mlp(seed=0), torch.randn(2, 32), path=None)
    x = torch.randn(3, 32)
    with torch.no_grad():
        other = list(_mlp(seed=1)(x))  # a different model's outputs stand in for a wrong export
    ort = list(res.session()(x))
    diffs = [(o.double() - t.double()).abs().max().item() for o, t in zip(ort, other)]
    bounds = [1e-4 + 1e-4 * t.abs().max().item() for t in other]
    worst = max(range(2), key=lambda i: diffs[i] - bounds[i])
    with pytest.raises(OnnxParityError) as info:
        compare_parity(other, ort, res.output_names, atol=1e-4, rtol=1e-4, where="m.onnx")
    msg = str(info.value)
    assert f"output {worst} ({res.output_names[worst]!r})" in msg
    assert f"max |ort - torch| = {diffs[worst]:.3g} > allowed {bounds[worst]:.3g}" in msg
    assert "m.onnx" in msg and "1 more output(s)" in msg


def test_parity_check_rejects_count_and_shape_mismatch():
    a = torch.zeros(2, 3)
    with pytest.raises(OnnxParityError, match="2 output"):
        compare_parity([a], [a, a], ["y", "z"], atol=0, rtol=0, where="f.onnx")
    with pytest.raises(OnnxParityError, match="shape"):
        compare_parity([a], [torch.zeros(3, 2)], ["y"], atol=0, rtol=0, where="f.onnx")
    nan = torch.tensor([float("nan"), 1.0])
    assert compare_parity([nan], [nan.clone()], ["y"], atol=0, rtol=0, where="f.onnx") == [0.0]
    with pytest.raises(OnnxParityError):
        compare_parity([torch.tensor([0.0, 1.0])], [nan], ["y"], atol=1, rtol=1, where="f.onnx")


# ---- opsets and bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [11, 17])
def test_old_opset_rejected(opset):
    with pytest.raises(ValueError, match="int4 >= 21"):
        export_onnx(_mlp(), torch.randn(2, 32), path=None, opset=opset)


def test_opset_21_exports():
    res = export_onnx(_mlp(), torch.randn(2, 32), path=None, opset=21)
    assert res.opset == 21


def test_int4_graph_chooses_opset_21():
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(2)
    y = graph.call_function(torch.ops.aten.to.dtype, (x, torch.int4))
    graph.output(y)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    assert _choose_opset(gm, None) == 21
    with pytest.raises(ValueError, match="int4"):
        _choose_opset(gm, 18)


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError):
        export_onnx(_mlp(), "not a tensor", tmp_path / "m.onnx")
    with pytest.raises(TypeError):
        export_onnx(lambda x: x, torch.randn(2, 32), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="is a directory"):
        export_onnx(_mlp(), torch.randn(2, 32), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_training_mode_graph_is_refused():
    model = _cnn().train()
    with pytest.raises(ValueError, match="training mode.*model.eval"):
        export_onnx(model, torch.randn(2, 3, 16, 16), path=None)
    assert model.bn1.num_batches_tracked.item() == 0  # refused before anything ran it in training mode


def test_large_model_path_uses_external_data(tmp_path, monkeypatch):
    # Models over the 2 GB protobuf limit are saved with external data and checked by path; pretend
    # every model is large to exercise that path with a small one.
    monkeypatch.setattr(onnx_export, "_LARGE_MODEL_BYTES", 0)
    x = torch.randn(2, 3, 16, 16)
    res = export_onnx(_cnn(), x, tmp_path / "big.onnx")
    assert [p.name for p in tmp_path.iterdir() if p != res.path]  # the weights file next to it
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in res.model.graph.initializer)
    assert res.max_abs_diff[0] <= 1e-4
    in_memory = export_onnx(_cnn(), x, path=None)
    assert in_memory.path is None and in_memory.max_abs_diff[0] <= 1e-4  # checked from a temporary file
    with torch.no_grad():
        _close(in_memory.session()(x), _cnn()(x))


# ---- OnnxRuntimeModule and op counting ----------------------------------------------------------------


def test_onnxruntime_module_round_trip(cnn_export):
    model, res = cnn_export
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    for source in (res.path, str(res.path), res.model, res.model.SerializeToString()):
        ort_mod = OnnxRuntimeModule(source, intra_op_threads=1, optimization_level="basic")
        assert ort_mod.input_names == ["x"] and ort_mod.output_names == res.output_names
        _close(ort_mod(x), ref)
    ort_mod = OnnxRuntimeModule(res.path)
    _close(ort_mod(x=x), ref)
    _close(ort_mod(x.transpose(2, 3).contiguous().transpose(2, 3)), ref)  # non-contiguous input
    assert ort_mod(x.requires_grad_()).dtype == torch.float32


def test_onnxruntime_module_errors(cnn_export, tmp_path):
    _, res = cnn_export
    ort_mod = res.session()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(TypeError, match="takes 1 input"):
        ort_mod(x, x)
    with pytest.raises(TypeError, match="takes 1 input"):
        ort_mod()
    with pytest.raises(TypeError, match="unknown input"):
        ort_mod(y=x)
    with pytest.raises(ValueError, match="float64"):
        ort_mod(x.double())
    with pytest.raises(ValueError, match="optimization_level"):
        OnnxRuntimeModule(res.path, optimization_level="max")
    with pytest.raises(FileNotFoundError):
        OnnxRuntimeModule(tmp_path / "missing.onnx")
    with pytest.raises(TypeError):
        OnnxRuntimeModule(42)


def test_optimized_op_counts_and_optimized_model_path(cnn_export, tmp_path):
    _, res = cnn_export
    before = count_ops(res.path)
    after = optimized_op_counts(res.path)
    assert isinstance(after, collections.Counter)
    assert sum(after.values()) <= sum(before.values())
    assert after["Conv"] + after["FusedConv"] == 2
    out = tmp_path / "opt" / "optimized.onnx"
    OnnxRuntimeModule(res.model, optimization_level="extended", optimized_model_path=out)
    assert count_ops(out) == after


# ---- a real architecture -------------------------------------------------------------------------------


@pytest.mark.slow
def test_resnet18_export_parity(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()  # random weights: nothing is downloaded
    res = export_onnx(model, torch.randn(1, 3, 224, 224), tmp_path / "resnet18.onnx")
    assert res.max_abs_diff[0] <= 1e-4
    assert count_ops(res.path)["Conv"] == 20
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
    diff = (res.session()(x) - ref).abs().max().item()
    assert diff <= 1e-4
