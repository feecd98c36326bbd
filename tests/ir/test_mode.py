"""gm.train()/gm.eval() on captured graphs switch batch norm and dropout like the eager module."""

import copy

import pytest
import torch
from torch import nn

import fxpress
from fxpress.ir.mode import enable_train_eval, set_training

aten = torch.ops.aten


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(288, 4)
    ).eval()


def _flags(gm):
    bn = [n.args[5] for n in gm.graph.nodes if n.target is aten.batch_norm.default]
    drop = [n.args[2] for n in gm.graph.nodes if n.target is aten.dropout.default]
    return bn, drop


def test_train_and_eval_match_the_eager_module():
    model, x = _model(), torch.randn(4, 3, 8, 8)
    gm = fxpress.capture(model, (x,), share_weights=False)
    assert _flags(gm) == ([False], [False]) and not gm.training

    assert gm.train() is gm and gm.training
    assert _flags(gm) == ([True], [True])
    model.train()
    torch.manual_seed(1)
    got = gm(x)
    torch.manual_seed(1)
    want = model(x)
    torch.testing.assert_close(got, want)  # same dropout mask, batch statistics
    torch.testing.assert_close(gm.get_buffer("1.running_mean"), model[1].running_mean)  # stats updated once each

    gm.eval()
    model.eval()
    assert _flags(gm) == ([False], [False]) and not gm.training
    torch.testing.assert_close(gm(x), model(x))


def test_modes_survive_deepcopy():
    gm = fxpress.capture(_model(), (torch.randn(2, 3, 8, 8),))
    twice = copy.deepcopy(copy.deepcopy(gm))
    twice.train()
    assert _flags(twice) == ([True], [True]) and _flags(gm) == ([False], [False])


def test_pass_manager_results_can_train():
    gm = fxpress.capture(_model(), (torch.randn(2, 3, 8, 8),))
    out, _ = fxpress.PassManager(["eliminate-dead-code"]).run(gm)
    out.train()
    assert _flags(out) == ([True], [True])


def test_inference_batch_norm_op_becomes_a_training_one():
    model, x = _model()[:2], torch.randn(4, 3, 8, 8)  # (decomposition drops eval-mode dropout entirely)
    ep = torch.export.export(model, (x,)).run_decompositions()
    gm = enable_train_eval(ep.module())
    assert any(n.target is aten._native_batch_norm_legit_no_training.default for n in gm.graph.nodes)
    assert set_training(gm, True) >= 1
    assert not any(n.target is aten._native_batch_norm_legit_no_training.default for n in gm.graph.nodes)
    model.train()
    torch.manual_seed(3)
    got = gm(x)
    torch.manual_seed(3)
    torch.testing.assert_close(got, model(x))


def test_export_refuses_a_graph_in_training_mode(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    gm = fxpress.capture(_model(), (x,)).train()
    with pytest.raises(ValueError, match=r"training mode.*\.eval\(\)"):
        fxpress.export_onnx(gm, (x,), tmp_path / "m.onnx")
    gm.eval()
    fxpress.export_onnx(gm, (x,), tmp_path / "m.onnx")


def test_share_weights_false_copies_every_tensor():
    model, x = _model(), torch.randn(2, 3, 8, 8)
    shared = fxpress.capture(model, (x,))
    owned = fxpress.capture(model, (x,), share_weights=False)
    originals = {id(t) for t in (*model.parameters(), *model.buffers())}
    assert {id(t) for t in shared.parameters()} <= originals
    assert not originals & {id(t) for t in (*owned.parameters(), *owned.buffers())}
    assert all(p.requires_grad for p in owned.parameters())
    torch.testing.assert_close(owned(x), model(x))
