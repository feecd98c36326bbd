"""Quantization debugging: per-node SQNR, per-layer sensitivity, automatic float fallback.

The test model is a 4-layer MLP quantized with per-tensor int8 weights, where one layer (fc3) was
made sensitive: one weight is 100x the largest other, so per-tensor rounding sends nearly all of
fc3's weights to 0. Every other layer quantizes well (> 35 dB). Expectations:

* compare_nodes, local mode: fc3 has the lowest SQNR; cumulative mode: SQNR drops by > 10 dB at
  fc3 relative to fc2 and stays low after it.
* sensitivity: fc3 ranks first, > 5 dB below the next layer (measured ~9 dB).
* auto_fallback with a 30 dB target: all-quantized is below it; keeping fc3 alone in float meets
  it; the report says so.

Activations use min/max observers so each quantization trial takes milliseconds.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from models import conv_bn_relu_cnn

import fxpress
from fxpress import OpQuant, QuantConfig, TensorSpec
from fxpress.passes.quant.debug import FallbackReport, NodeSQNR, auto_fallback, compare_nodes, float_graph, sensitivity, sqnr

PER_TENSOR = QuantConfig(
    default=OpQuant("static", TensorSpec(observer="minmax"), TensorSpec(dtype=torch.int8, symmetric=True, axis=None, observer="minmax"))
)


class FourLayers(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = (nn.Linear(d, d) for _ in range(4))
        with torch.no_grad():
            self.fc3.weight[0, 0] = 100 * self.fc3.weight.abs().max()

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = F.relu(self.fc3(x))
        return self.fc4(x)


def setup():
    model = FourLayers().eval()
    calib = [torch.randn(16, 32) for _ in range(4)]
    return model, (calib[0],), calib


def by_name(rows: list[NodeSQNR]) -> dict[str, float]:
    return {r.node: r.sqnr_db for r in rows}


def test_sqnr_definition():
    y = torch.ones(100)
    assert sqnr(y, y) == math.inf
    assert sqnr(y, y * 1.1) == pytest.approx(20.0)  # 10% error → 20 dB


def test_compare_nodes_finds_the_sensitive_layer():
    model, x, calib = setup()
    qm = fxpress.quantize(model, x, calibration=calib, config=PER_TENSOR, progress=False)
    local = compare_nodes(model, qm, calib[:2], mode="local")
    names = [r.node for r in local]
    assert names == ["linear", "linear_1", "linear_2", "linear_3"]  # the quantizable ops, in graph order
    worst = min(local, key=lambda r: r.sqnr_db)
    assert worst.node == "linear_2"  # fc3
    assert all(s > 35 for n, s in by_name(local).items() if n != "linear_2")
    cumulative = by_name(compare_nodes(model, qm, calib[:2]))
    assert cumulative["linear_1"] - cumulative["linear_2"] > 10
    assert cumulative["linear_3"] < cumulative["linear_1"] - 10
    # the first layer sees only the model input: both modes agree there
    assert cumulative["linear"] == pytest.approx(by_name(local)["linear"])


def test_compare_nodes_accepts_captured_and_prepared_float_graphs():
    model, x, calib = setup()
    prepared = fxpress.prepare(model, x, PER_TENSOR, equalize=True)  # CLE rescales fc1..fc3 channels
    fxpress.calibrate(prepared, calib, progress=False)
    reference = float_graph(prepared)
    qm = fxpress.convert(prepared)
    from_model = by_name(compare_nodes(model, qm, calib[0]))  # replays fold + CLE on a fresh capture
    from_graph = by_name(compare_nodes(fxpress.capture(model, x), qm, calib[0]))
    from_prepared = by_name(compare_nodes(reference, qm, calib[0]))
    assert from_model.keys() == from_graph.keys() == from_prepared.keys()
    for name in from_model:
        assert from_model[name] == pytest.approx(from_graph[name], abs=0.01)
        assert from_model[name] == pytest.approx(from_prepared[name], abs=0.01)
    assert min(from_model.values()) > 0  # the equalized intermediate tensors were matched, not garbage
    everything = compare_nodes(reference, qm, calib[0], all_nodes=True)
    assert len(everything) > len(from_model)  # relus too


def test_sensitivity_ranks_the_sensitive_layer_first():
    model, x, calib = setup()
    ranking = sensitivity(model, x, calib, PER_TENSOR)
    assert [r.node for r in ranking][0] == "linear_2"
    assert ranking[1].sqnr_db - ranking[0].sqnr_db > 5
    assert len(ranking) == 4


def test_auto_fallback_meets_the_target_and_reports():
    model, x, calib = setup()
    qm, report = auto_fallback(model, x, calib, PER_TENSOR, target_sqnr=30.0)
    assert isinstance(report, FallbackReport)
    assert report.initial_sqnr_db < 30 <= report.sqnr_db and report.met
    assert report.fallbacks == ["linear_2 (fc3)"]
    assert report.trials[0][0] == 0 and report.trials[-1] == (1, report.sqnr_db)
    text = str(report)
    assert "1 of 4 layers kept in float" in text and "fc3" in text
    q = fxpress.quant_report(qm)
    assert q.quantized("linear") == 3
    assert any("fc3" in node and "kept float by config" in why for node, _, why in q.float_ops)
    held_out = torch.randn(64, 32)
    assert sqnr(model(held_out), qm(held_out)) > 25  # not just on the calibration batches


def test_auto_fallback_already_good_changes_nothing():
    model, x, calib = setup()
    qm, report = auto_fallback(model, x, calib, PER_TENSOR, target_sqnr=0.0)
    assert report.met and not report.fallbacks and report.sensitivity == []
    assert fxpress.quant_report(qm).quantized("linear") == 4


def test_auto_fallback_unreachable_target_returns_best_and_says_not_met():
    model, x, calib = setup()
    qm, report = auto_fallback(model, x, calib, PER_TENSOR, target_sqnr=500.0, max_fallback=2)
    assert not report.met and len(report.fallbacks) <= 2 and "NOT met" in str(report)
    assert report.sqnr_db == max(s for _, s in report.trials)


def test_quantize_target_sqnr():
    model, x, calib = setup()
    qm = fxpress.quantize(model, x, calibration=calib, config=PER_TENSOR, target_sqnr=30.0, progress=False)
    report = qm.meta["fxpress"]["fallback_report"]
    assert report.met and report.fallbacks == ["linear_2 (fc3)"]
    with pytest.raises(ValueError, match="calibration"):
        fxpress.quantize(model, x, config=PER_TENSOR, target_sqnr=30.0)


def test_compare_nodes_rejects_bad_mode():
    model, x, calib = setup()
    qm = fxpress.quantize(model, x, calibration=calib, config=PER_TENSOR, progress=False)
    with pytest.raises(ValueError, match="mode"):
        compare_nodes(model, qm, x, mode="sideways")


def test_auto_fallback_checks_names_and_keeps_those_of_folded_batch_norms():
    """A nodes / ignore name that matches nothing is a ValueError; the path of a batch norm (a match
    in the model, folded away before the trials) does not break the trials on the folded graph."""
    model, x, calib = setup()
    with pytest.raises(ValueError, match=r"QuantConfig.nodes keys not found in the model: 'fc9' \(did you mean"):
        auto_fallback(model, x, calib, dataclasses.replace(PER_TENSOR, nodes={"fc9": None}), target_sqnr=30.0)
    model, args = conv_bn_relu_cnn()
    data = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    cfg = dataclasses.replace(PER_TENSOR, nodes={"bn1": None}, ignore=["bn2", "conv3"])
    qm, report = auto_fallback(model, args, data, cfg, target_sqnr=500.0, max_fallback=1)
    assert len(report.trials) == 2 and len(report.fallbacks) == 1
    assert any(why == "ignored by config ('conv3')" for _, _, why in fxpress.quant_report(qm).float_ops)
