"""Quantization passes, one behaviour per test: insert-observers, convert-to-qdq, fold-weight-quant,
fold-qdq, quantize-bias.

Tiers (DESIGN.md): structure (op counts before/after, and a case where the rule must not fire),
numerics, and backend (ONNX / onnxruntime, in ``test_quant_onnx.py``).

Numerics bounds used here:

* insert-observers, fold-weight-quant, fold-qdq: exact (``torch.equal``): observers return their
  input, and folding precomputes the very same rounding.
* convert-to-qdq (int8 static, histogram-MSE activations, per-channel int8 weights): SQNR of the
  quantized vs the float output >= 30 dB on the small test models, calibrated on 8 batches from
  the input distribution and evaluated on a fresh batch (measured 38-52 dB; 30 dB is roughly the
  point where a per-tensor uint8 activation range is visibly wrong).
* quantize-bias: the bias moves by at most half a step of ``x_scale * w_scale`` per channel.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from models import concat_block, conv_bn_relu_cnn, mlp, residual_block

import fxpress
from fxpress import QuantConfig
from fxpress.passes import PassManager, get_pass
from fxpress.passes.quant.convert_to_qdq import qdq_ops
from fxpress.passes.quant.insert_observers import OBSERVER_ROOT, SharedObserver
from fxpress.passes.quant.observers import CalibrationError, Observer

aten = torch.ops.aten
qd = qdq_ops()
Q_T, DQ_T = qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default
Q_C, DQ_C = qd.quantize_per_channel.default, qd.dequantize_per_channel.default
CONV, LINEAR = aten.conv2d.default, aten.linear.default


# ---------------------------------------------------------------------------------------------
# helpers


def calls(gm: fx.GraphModule, *targets) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def observer_nodes(gm: fx.GraphModule, kind: type | None = None) -> list[fx.Node]:
    found = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(OBSERVER_ROOT + ".")]
    if kind is not None:
        found = [n for n in found if isinstance(gm.get_submodule(n.target), kind)]
    return found


def is_observer(gm: fx.GraphModule, node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and str(node.target).startswith(OBSERVER_ROOT + ".")


def batches(args: tuple, n: int = 8) -> list[torch.Tensor]:
    return [torch.randn_like(args[0]) for _ in range(n)]


def prepared(factory_or_model, args=None, config="int8_static", *, calibrate: bool = True, **kw):
    if args is None:
        model, args = factory_or_model()
    else:
        model = factory_or_model
    p = fxpress.prepare(model, args, config, **kw)
    if calibrate:
        fxpress.calibrate(p, batches(args), progress=False)
    return model, args, p


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum().clamp_min(1e-30)))


def float_output_users(node: fx.Node) -> bool:
    return any(u.op == "output" for u in node.users)


# ---------------------------------------------------------------------------------------------
# small models for single behaviours


class TwoBranchCat(nn.Module):
    """conv+relu and conv added, concatenated with a third conv, average pooled, flattened, linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(12 * 4 * 4, 10)

    def forward(self, x):
        s = F.relu(self.a(x)) + self.b(x)
        y = torch.cat([s, self.c(x)], dim=1)
        y = F.avg_pool2d(y, 2)
        return self.fc(y.view(y.shape[0], -1))


class FloatReader(nn.Module):
    """The input feeds a quantized conv and a float sigmoid; flatten(x) feeds a linear and a float tanh."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(3 * 6 * 6, 5)

    def forward(self, x):
        f = x.flatten(1)
        return self.conv(x), torch.sigmoid(x), self.fc(f), torch.tanh(f)


class ReluNotFused(nn.Module):
    """The conv output is read by the relu and by a second conv: the relu cannot be fused."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return F.relu(y) + self.conv2(y)


class SharedConv(nn.Module):
    """One conv module applied twice: one weight, two consumers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(F.relu(self.conv(x)))


class WideMLP(nn.Module):
    """in_features multiples of 32 (group size of int4 weight-only) plus a conv front end."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 80)
        self.fc3 = nn.Linear(80, 10)

    def forward(self, x):
        h = F.relu(self.conv(x)).flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(h)))))


def wide_mlp(batch=4):
    return WideMLP().eval(), (torch.randn(batch, 1, 4, 4),)


# =============================================================================================
# insert-observers: structure


def test_observers_on_inputs_and_outputs_of_every_quantized_op():
    """conv, linear, add, cat, avg_pool: every activation input is observed; every output read by
    another op is observed (after its relu); weights get per-channel observers."""
    model = TwoBranchCat().eval()
    x = torch.randn(2, 3, 8, 8)
    _, _, p = prepared(model, (x,), calibrate=False)
    ops = calls(p, CONV, LINEAR, aten.add.Tensor, aten.cat.default, aten.avg_pool2d.default)
    assert len(ops) == 7  # 3 conv, linear, add, cat, avg_pool
    for op in ops:
        inputs = op.args[0] if op.target == aten.cat.default else op.args[:1 if op.target in (CONV, LINEAR, aten.avg_pool2d.default) else 2]
        for a in inputs:
            assert is_observer(p, a), f"{op.name} reads unobserved {a}"
        if op.target in (CONV, LINEAR):
            w = p.get_submodule(op.args[1].target)
            assert isinstance(w, Observer) and w.axis == 0 and w.dtype == torch.int8, op.name
        out = op
        if len(op.users) == 1 and next(iter(op.users)).target == aten.relu.default:
            out = next(iter(op.users))
        if not float_output_users(out):
            assert all(is_observer(p, u) for u in out.users), f"{out.name} output is not observed"
    # the model output (the linear) stays float by default
    (linear,) = calls(p, LINEAR)
    assert list(linear.users)[0].op == "output"
    report = p.meta["fxpress"]["prepare_report"]["insert-observers"]
    assert report.counts["static ops"] == 7 and not report.skipped
    # weights of 4 conv/linear + 7 activations (x, relu(a)+b's inputs, cat inputs, pool in/out); view shares
    assert len(observer_nodes(p, SharedObserver)) == 1
    assert len(observer_nodes(p)) == report.counts["observers"] + 4


def test_prepared_graph_is_exact():
    """Observers return their input: the prepared graph computes bit-for-bit what the folded float graph does."""
    model, args, p = prepared(conv_bn_relu_cnn, calibrate=False)
    folded, _ = PassManager(["fold-constants", "fold-batch-norm", "eliminate-dead-code"]).run(fxpress.capture(model, args), args)
    x = torch.randn_like(args[0])
    with torch.no_grad():
        assert torch.equal(p(x), folded(x))


def test_shape_ops_share_the_producer_observer():
    """max_pool / flatten / view get a SharedObserver pointing at their producer's observer, and
    after convert their Q/DQ carry exactly the producer's qparams (no new qparams)."""
    model, args, p = prepared(conv_bn_relu_cnn)
    shared = observer_nodes(p, SharedObserver)
    by_op = {n.args[0].target: p.get_submodule(n.target) for n in shared}
    assert set(by_op) == {aten.max_pool2d.default, aten.flatten.using_ints}
    for node in shared:
        op = node.args[0]
        producer_obs = op.args[0]
        assert is_observer(p, producer_obs)
        root = p.get_submodule(producer_obs.target)
        source = p.get_submodule(f"{OBSERVER_ROOT}.{p.get_submodule(node.target).source}")
        assert source is root or isinstance(root, SharedObserver)
    n_act = len([n for n in observer_nodes(p) if n.args[0].op != "get_attr"])
    q = fxpress.convert(p)
    for op in calls(q, aten.max_pool2d.default, aten.flatten.using_ints):
        dq_in = op.args[0]
        (q_out,) = op.users
        assert dq_in.target == DQ_T and q_out.target == Q_T
        assert dq_in.args[1:] == q_out.args[1:], f"{op.name} requantizes"
    # distinct activation qparams = non-shared activation observers
    scales = {(n.args[1], n.args[2]) for n in calls(q, Q_T)}
    assert len(scales) == n_act - len(shared) == 5


def test_view_shares_qparams_in_a_custom_model():
    model = TwoBranchCat().eval()
    x = torch.randn(2, 3, 8, 8)
    _, _, p = prepared(model, (x,))
    (view_obs,) = observer_nodes(p, SharedObserver)
    assert view_obs.args[0].target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
    pool_obs = view_obs.args[0].args[0]
    assert pool_obs.args[0].target == aten.avg_pool2d.default
    assert p.get_submodule(view_obs.target).source == str(pool_obs.target).split(".", 1)[1]


def test_relu_is_fused_observer_after_it():
    _, _, p = prepared(conv_bn_relu_cnn, calibrate=False)
    for conv in calls(p, CONV):
        (relu,) = conv.users  # no observer between conv and relu
        assert relu.target == aten.relu.default
        (obs,) = relu.users
        assert is_observer(p, obs)


def test_relu_not_fused_when_conv_output_has_other_readers():
    """Negative case: conv → (relu, conv2): the observer sits right after the conv."""
    model = ReluNotFused().eval()
    x = torch.randn(2, 3, 6, 6)
    _, _, p = prepared(model, (x,), calibrate=False)
    conv = calls(p, CONV)[0]
    (obs,) = conv.users
    assert is_observer(p, obs)
    assert {u.target for u in obs.users} >= {aten.relu.default, CONV}


def test_model_outputs_stay_float_by_default_and_quantize_on_request():
    model, args = residual_block()
    _, _, p = prepared(model, args)
    (out,) = p.graph.output_node().args[0]
    assert not is_observer(p, out) and out.target == aten.relu.default
    q = fxpress.convert(p)
    (out,) = q.graph.output_node().args[0]
    assert out.target == aten.relu.default  # the float add + relu result, no Q/DQ on the output

    _, _, p2 = prepared(model, args, QuantConfig(quantize_outputs=True))
    (out2,) = p2.graph.output_node().args[0]
    assert is_observer(p2, out2) and out2.args[0].target == aten.relu.default  # after the fused relu
    q2 = fxpress.convert(p2)
    (out2,) = q2.graph.output_node().args[0]
    assert out2.target == DQ_T
    assert len(calls(q2, Q_T)) == len(calls(q, Q_T)) + 1


def test_float_consumers_keep_the_exact_float_value():
    """x feeds a quantized conv and a float sigmoid; flatten(x) a quantized linear and a float tanh:
    the float ops read the unquantized tensors (bit-exact), the quantized ones the Q/DQ'd ones."""
    model = FloatReader().eval()
    x = torch.randn(2, 3, 6, 6)
    _, _, p = prepared(model, (x,))
    q = fxpress.convert(p)
    with torch.no_grad():
        conv_q, sig_q, fc_q, tanh_q = q(x)
        conv_f, sig_f, fc_f, tanh_f = model(x)
    assert torch.equal(sig_q, sig_f)
    assert torch.equal(tanh_q, tanh_f)
    assert not torch.equal(conv_q, conv_f) and sqnr(conv_f, conv_q) > 30
    assert not torch.equal(fc_q, fc_f) and sqnr(fc_f, fc_q) > 30
    (sig,) = calls(q, aten.sigmoid.default)
    assert sig.args[0].op == "placeholder"
    (tanh,) = calls(q, aten.tanh.default)
    assert tanh.args[0].target == aten.flatten.using_ints and tanh.args[0].args[0].op == "placeholder"


@pytest.mark.parametrize(
    "cfg, node_label, reason",
    [
        (QuantConfig(ignore=["conv2"]), "conv2d_1 (conv2)", "ignored by config ('conv2')"),  # module path
        (QuantConfig(ignore=["conv2d_2"]), "conv2d_2 (conv3)", "ignored by config ('conv2d_2')"),  # node name
        (QuantConfig(ignore=["linear"]), "linear (fc)", "ignored by config ('linear')"),  # op kind
        (QuantConfig(op_types={"linear": None}), "linear (fc)", "kept float by config (op_types['linear'])"),
        (QuantConfig(nodes={"conv1": None}), "conv2d (conv1)", "kept float by config (nodes['conv1'])"),
        (QuantConfig(nodes={"conv2d_1": None}), "conv2d_1 (conv2)", "kept float by config (nodes['conv2d_1'])"),
        (QuantConfig(op_kinds=("conv",)), "linear (fc)", "linear is left out of config.op_kinds"),
    ],
    ids=["ignore-path", "ignore-node", "ignore-kind", "op_types-none", "nodes-path", "nodes-name", "op_kinds"],
)
def test_overrides_keep_ops_float_with_reason_in_report(cfg, node_label, reason):
    model, args, p = prepared(conv_bn_relu_cnn, config=cfg)
    skipped = p.meta["fxpress"]["prepare_report"]["insert-observers"].skipped
    assert (node_label, reason) in skipped
    node = next(n for n in p.graph.nodes if n.name == node_label.split(" ")[0])
    # neither its weight nor (for a non-shared input) its activation got a fresh observer
    if node.target in (CONV, LINEAR):
        assert not is_observer(p, node.args[1])
    q = fxpress.convert(p)
    report = fxpress.quant_report(q)
    assert any(label == node_label and why == reason for label, _, why in report.float_ops), str(report)
    assert reason in str(report)
    node = next(n for n in q.graph.nodes if n.name == node_label.split(" ")[0])
    if node.target in (CONV, LINEAR):
        assert node.args[1].op == "get_attr" and node.args[1].meta["val"].dtype == torch.float32
    with torch.no_grad():
        assert sqnr(model(*args), q(*args)) > 30


def test_module_path_prefix_ignores_a_whole_submodule():
    model, args = residual_block()
    _, _, p = prepared(model, args, QuantConfig(ignore=["down"]))
    skipped = p.meta["fxpress"]["prepare_report"]["insert-observers"].skipped
    assert skipped == [("conv2d_2 (down.0)", "ignored by config ('down')")]


def test_node_override_mixes_modes():
    """nodes={'fc': 'int8_weight_only'} in a static config: that linear runs weight-only."""
    model, args, p = prepared(conv_bn_relu_cnn, config=QuantConfig(nodes={"fc": "int8_weight_only"}))
    q = fxpress.convert(p)
    report = fxpress.quant_report(q)
    assert report.per_kind["linear"]["weight-only int8"] == 1
    assert report.per_kind["conv"]["int8 static"] == 3


@pytest.mark.parametrize("preset, n_weight_obs", [("int8_dynamic", 3), ("int8_weight_only", 4), ("int4_weight_only", 2)])
def test_dynamic_and_weight_only_insert_only_weight_observers(preset, n_weight_obs):
    model, args = wide_mlp()
    _, _, p = prepared(model, args, preset, calibrate=False)
    obs = observer_nodes(p)
    assert len(obs) == n_weight_obs
    assert all(o.args[0].op == "get_attr" for o in obs)  # weights only, no activation observers
    skipped = dict(p.meta["fxpress"]["prepare_report"]["insert-observers"].skipped)
    if preset == "int8_dynamic":
        assert skipped["conv2d (conv)"] == "conv is not quantized in dynamic mode"
    if preset == "int4_weight_only":
        assert skipped["conv2d (conv)"] == "per-group weights are for linear layers"
        assert skipped["linear_2 (fc3)"] == "in_features 80 is not a multiple of group_size 32"


def test_unsupported_operands_are_reported_not_silently_skipped():
    """Negative case: add with a scalar, and an int cat, are not quantized and say why."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x, idx):
            return self.conv(x) + 1.0, torch.cat([idx, idx])

    x, idx = torch.randn(2, 3, 4, 4), torch.arange(4)
    _, _, p = prepared(M().eval(), (x, idx), calibrate=False)
    reasons = dict(p.meta["fxpress"]["prepare_report"]["insert-observers"].skipped)
    assert any("scalar" in why for why in reasons.values()), reasons
    assert any("not a float tensor" in why for why in reasons.values()), reasons


# =============================================================================================
# convert-to-qdq


def _convert_only(p):
    cfg = p.meta["fxpress"]["quant_config"]
    result = get_pass("convert-to-qdq", config=cfg)(p)
    return result.gm, result.report


def test_convert_qdq_counts_and_observers_gone():
    model, args, p = prepared(conv_bn_relu_cnn)
    n_act = len([o for o in observer_nodes(p) if o.args[0].op != "get_attr"])
    n_w = len(observer_nodes(p)) - n_act
    assert (n_act, n_w) == (7, 4)
    q, report = _convert_only(p)
    assert len(calls(q, Q_T)) == len(calls(q, DQ_T)) == n_act
    assert len(calls(q, Q_C)) == len(calls(q, DQ_C)) == n_w
    assert not observer_nodes(q) and not hasattr(q, OBSERVER_ROOT)
    assert report.counts["quantized weights"] == 4 and report.counts["quantized activations"] == 7
    for n in calls(q, CONV, LINEAR):
        assert n.args[0].target == DQ_T and n.args[1].target == DQ_C
        assert n.args[1].args[0].args[0].op == "get_attr"  # DQ(Q(float W)) before fold-weight-quant


def test_per_channel_weight_qparams():
    model, args, p = prepared(conv_bn_relu_cnn)
    q, _ = _convert_only(p)
    for qn in calls(q, Q_C):
        w = getattr_path(q, qn.args[0].target)
        scale, zp = getattr_path(q, qn.args[1].target), getattr_path(q, qn.args[2].target)
        axis, qmin, qmax, dtype = qn.args[3:]
        assert (axis, qmin, qmax, dtype) == (0, -128, 127, torch.int8)
        assert scale.shape == (w.shape[0],) and torch.equal(zp, torch.zeros_like(zp))
        # symmetric: max |W| of each output channel maps to 127.5 steps
        torch.testing.assert_close(scale, w.abs().flatten(1).amax(1) / 127.5)


def getattr_path(m, target: str):
    for part in target.split("."):
        m = getattr(m, part)
    return m


@pytest.mark.parametrize("factory", [conv_bn_relu_cnn, residual_block, concat_block, mlp], ids=lambda f: f.__name__)
def test_int8_static_sqnr(factory):
    model, args = factory(batch=4)
    q = fxpress.quantize(model, args, calibration=batches(args), progress=False)
    x = torch.randn_like(args[0])
    with torch.no_grad():
        s = sqnr(model(x), q(x))
    assert s >= 30, f"{factory.__name__}: SQNR {s:.1f} dB"
    # and the convert really quantized (an unquantized graph would be exact: SQNR ~ inf)
    assert s < 80 and calls(q, Q_T)


def test_convert_without_calibration_raises_clear_error():
    _, _, p = prepared(conv_bn_relu_cnn, calibrate=False)
    with pytest.raises(CalibrationError, match=r"calibration was skipped: 5 of \d+ observers never saw data") as info:
        fxpress.convert(p, verify=False)
    assert "prepared(batch)" in str(info.value)


@pytest.mark.parametrize("preset, mode, min_sqnr", [("int8_weight_only", "weight-only int8", 35), ("int4_weight_only", "weight-only int4", 15)])
def test_weight_only_graphs(preset, mode, min_sqnr):
    model, args = wide_mlp()
    q = fxpress.quantize(model, args, config=preset, progress=False)  # no calibration needed
    assert not calls(q, Q_T, qd.quantize_per_tensor.tensor)  # activations stay float
    report = fxpress.quant_report(q)
    n_lin = 3 if preset == "int8_weight_only" else 2
    assert report.per_kind["linear"][mode] == n_lin
    assert mode in str(report)
    if preset == "int4_weight_only":
        (dq,) = {n.target for n in q.graph.nodes if n.op == "call_function" and "dequantize" in str(n.target)}
        assert dq == qd.dequantize_per_channel_group.default
        for n in calls(q, dq):
            w = getattr_path(q, n.args[0].target)
            assert w.dtype == torch.int8 and int(w.min()) >= -8 and int(w.max()) <= 7
    x = torch.randn_like(args[0])
    with torch.no_grad():
        s = sqnr(model(x), q(x))
    assert min_sqnr <= s < 80, f"{preset}: SQNR {s:.1f} dB"


def test_int8_dynamic_chooses_qparams_per_batch():
    model, args = mlp(batch=4)
    q = fxpress.quantize(model, args, config="int8_dynamic", progress=False)
    assert len(calls(q, qd.choose_qparams.tensor)) == 3
    assert len(calls(q, qd.quantize_per_tensor.tensor)) == 3
    assert not calls(q, Q_T)  # no static activation qparams
    assert fxpress.quant_report(q).per_kind["linear"]["int8 dynamic"] == 3
    # the range follows each batch: a 100x larger input is quantized as well as the sample one
    for scale in (1.0, 100.0):
        x = torch.randn(4, 16) * scale
        with torch.no_grad():
            assert sqnr(model(x), q(x)) > 30, scale


# =============================================================================================
# fold-weight-quant


def test_fold_weight_quant_stores_int8_and_is_exact():
    model, args, p = prepared(conv_bn_relu_cnn)
    q, _ = _convert_only(p)
    x = torch.randn_like(args[0])
    with torch.no_grad():
        before = q(x)
    n_dq = len(calls(q, DQ_C))
    result = get_pass("fold-weight-quant")(q)
    assert result.modified and result.report.counts["folded weights"] == 4
    assert not calls(q, Q_C) and len(calls(q, DQ_C)) == n_dq
    assert len(calls(q, Q_T)) == 7  # negative case: activation quantize ops are not constants, not folded
    with torch.no_grad():
        assert torch.equal(q(x), before)
    sd = q.state_dict()
    float_w = {k: v for k, v in model.state_dict().items() if k.endswith("weight") and v.dim() > 1}
    for name, w in float_w.items():
        assert sd[name].dtype == torch.int8 and sd[name].shape == w.shape, name
    int8_bytes = sum(v.numel() for k, v in sd.items() if v.dtype == torch.int8)
    float_bytes = sum(w.numel() * w.element_size() for w in float_w.values())
    assert int8_bytes * 4 == float_bytes
    assert get_pass("fold-weight-quant")(q).modified is False  # nothing left to fold


def test_shared_weight_is_folded_once():
    model = SharedConv().eval()
    x = torch.randn(2, 4, 6, 6)
    _, _, p = prepared(model, (x,))
    assert len(calls(p, CONV)) == 2
    q = fxpress.convert(p)
    assert len(calls(q, DQ_C)) == 2
    int8 = {k: v for k, v in q.state_dict().items() if v.dtype == torch.int8}
    assert len(int8) == 1, list(int8)  # one integer copy of the shared weight, no float copy left
    assert not [k for k, v in q.state_dict().items() if v.is_floating_point() and v.dim() == 4]
    with torch.no_grad():
        assert sqnr(model(x), q(x)) > 30


# =============================================================================================
# fold-qdq


class _RoundTrip(nn.Module):
    """x → Q(s1) → DQ(s1) → Q(s2) → DQ(s2): with s1 == s2 the middle pair is a no-op."""

    def __init__(self, s1, z1, s2, z2):
        super().__init__()
        self.p1, self.p2 = (s1, z1), (s2, z2)

    def forward(self, x):
        q = qd.quantize_per_tensor(x, *self.p1, 0, 255, torch.uint8)
        d = qd.dequantize_per_tensor(q, *self.p1, 0, 255, torch.uint8)
        q2 = qd.quantize_per_tensor(d, *self.p2, 0, 255, torch.uint8)
        return qd.dequantize_per_tensor(q2, *self.p2, 0, 255, torch.uint8) * 2


def _fold_qdq(s1, z1, s2, z2):
    x = torch.randn(3, 5) * 2
    gm = fxpress.capture(_RoundTrip(s1, z1, s2, z2), (x,))
    assert len(calls(gm, Q_T)) == 2 and len(calls(gm, DQ_T)) == 2
    with torch.no_grad():
        before = gm(x)
    result = get_pass("fold-qdq")(gm)
    with torch.no_grad():
        assert torch.equal(gm(x), before)  # exact either way
    return gm, result


def test_fold_qdq_removes_equal_round_trip():
    gm, result = _fold_qdq(0.02, 128, 0.02, 128)
    assert result.modified and result.report.counts["folded pairs"] == 1
    assert len(calls(gm, Q_T)) == 1 and len(calls(gm, DQ_T)) == 1


@pytest.mark.parametrize("second", [(0.03, 128), (0.02, 120)], ids=["scale", "zero-point"])
def test_fold_qdq_keeps_a_real_requantization(second):
    gm, result = _fold_qdq(0.02, 128, *second)
    assert not result.modified
    assert len(calls(gm, Q_T)) == 2 and len(calls(gm, DQ_T)) == 2
    assert len(result.report.notes) == 1 and "different qparams" in result.report.notes[0]


def test_fold_qdq_is_a_no_op_on_a_converted_graph():
    """convert shares qparams through shape ops instead of emitting DQ→Q pairs: nothing to fold."""
    _, _, p = prepared(conv_bn_relu_cnn)
    q = fxpress.convert(p)
    assert q.meta["fxpress"]["convert_report"]["fold-qdq"].summary() == "no change"
    for n in calls(q, Q_T, Q_C):
        assert n.args[0].target not in (DQ_T, DQ_C)


# =============================================================================================
# quantize-bias (the lowering export_onnx applies; ONNX-level checks in test_quant_onnx.py)


def _with_int32_bias(q):
    lowered, report = PassManager(["quantize-bias"], verify=False).run(q)
    return lowered, report["quantize-bias"]


def test_quantize_bias_int32_at_x_scale_times_w_scale():
    model, args = conv_bn_relu_cnn()
    q = fxpress.quantize(model, args, calibration=batches(args), progress=False)
    x = torch.randn_like(args[0])
    with torch.no_grad():
        before = q(x)
    biases = {n.name: getattr_path(q, n.args[2].target).clone() for n in calls(q, CONV, LINEAR)}
    lowered, report = _with_int32_bias(q)
    assert report.counts["int32 biases"] == 4 and not report.skipped
    for n in calls(lowered, CONV, LINEAR):
        b = n.args[2]
        assert b.target == DQ_C and b.args[3:] == (0, -(2**31), 2**31 - 1, torch.int32)
        b_q = getattr_path(lowered, b.args[0].target)
        b_scale = getattr_path(lowered, b.args[1].target)
        assert b_q.dtype == torch.int32
        x_scale = torch.tensor(float(n.args[0].args[1]), dtype=torch.float32)
        w_scale = getattr_path(lowered, n.args[1].args[1].target)
        assert torch.equal(b_scale, x_scale * w_scale)  # bit-exact, as onnxruntime computes it
        err = (b_q.float() * b_scale - biases[n.name]).abs()
        assert bool((err <= b_scale / 2 + 1e-12).all()), n.name
    with torch.no_grad():
        after = lowered(x)
    assert sqnr(before, after) > 50  # only the bias rounding changed


def test_quantize_bias_skips_weight_only_and_dynamic():
    """Negative case: no static input scale, so the bias stays float and the report says why."""
    model, args = wide_mlp()
    for preset in ("int8_weight_only", "int8_dynamic"):
        q = fxpress.quantize(model, args, config=preset, progress=False)
        lowered, report = _with_int32_bias(q)
        assert not report.changed and report.skipped
        assert all(why == "input or weight is not statically quantized; bias stays float" for _, why in report.skipped)
        assert not any(v.dtype == torch.int32 for v in lowered.state_dict().values())
