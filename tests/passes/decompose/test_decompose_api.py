"""fxpress.decompose / decompose_report: budgets, rank rules, tolerance, bad input, ONNX parity,
decompose -> quantize -> ONNX, prune -> decompose, and a digits CNN fine-tuned after decomposition."""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxpress
from fxpress.backends import optimized_op_counts
from fxpress.ir.cost import count_params, total_macs

from decompose_helpers import MLP, SmallCNN, convs, linears, rel


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    m = SmallCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    calib = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    return m, x, calib, fxpress.capture(m, (x,))


def test_params_budget_met_and_reported(cnn):
    m, x, calib, gm = cnn
    small = fxpress.decompose(gm, (x,), "auto", budget={"params": 0.5}, calibration=calib, progress=False)
    rep = fxpress.decompose_report(small)
    assert rep.budget_met and count_params(small) <= 0.5 * rep.params_before
    assert rep.params_after == count_params(small) and rep.macs_after == total_macs(small)
    assert rep.decomposed and all(r.output_error is not None and r.ranks for r in rep.decomposed)
    assert all(r.reason for r in rep.skipped)
    text = str(rep)
    for what in ("budget params <= 0.5: met", "output err", "model output relative error", "left alone"):
        assert what in text, text
    # the end-to-end error reported is the one measured on the calibration batches
    ref = torch.cat([m(c) for c in calib])
    got = torch.cat([small(c) for c in calib])
    assert rep.output_error == pytest.approx(rel(got, ref), rel=1e-3)
    assert small(torch.randn(5, 3, 16, 16)).shape == (5, 10)  # dynamic batch kept
    assert gm.graph is not small.graph and convs(gm) == 4  # the captured graph is untouched


def test_macs_budget_and_onnx_parity(cnn, tmp_path):
    m, x, calib, gm = cnn
    small = fxpress.decompose(gm, (x,), "auto", budget={"macs": 0.6}, progress=False)
    rep = fxpress.decompose_report(small)
    assert rep.budget_met and total_macs(small) <= 0.6 * rep.macs_before
    assert "example inputs" in rep.error_data
    exported = fxpress.export_onnx(small, (x,), tmp_path / "small.onnx")
    assert max(exported.max_abs_diff) < 1e-3
    sess = exported.session()
    x7 = torch.randn(7, 3, 16, 16)
    torch.testing.assert_close(torch.as_tensor(sess(x7)), small(x7), atol=1e-4, rtol=1e-4)


def test_decompose_quantize_onnx_pipeline(cnn, tmp_path):
    m, x, calib, gm = cnn
    small = fxpress.decompose(gm, (x,), "tucker", rank=0.5, progress=False)
    n_convs = convs(small)
    assert n_convs > 4
    q = fxpress.quantize(small, (x,), calibration=calib, config="int8_static", progress=False)
    exported = fxpress.export_onnx(q, (x,), tmp_path / "small_int8.onnx", rtol=0.05)
    counts = optimized_op_counts(exported.path)
    assert counts.get("QLinearConv", 0) >= n_convs - 1, counts
    assert rel(q(calib[0]), small(calib[0])) < 0.2


def test_prune_then_decompose(cnn):
    m, x, calib, gm = cnn
    pruned = fxpress.prune(gm, (x,), ratio=0.25)
    small = fxpress.decompose(pruned, (x,), "auto", budget={"params": 0.6}, progress=False)
    assert fxpress.decompose_report(small).budget_met
    assert small(x).shape == (2, 10)


def test_auto_ratio_picks_per_layer_method(cnn):
    m, x, calib, gm = cnn
    small = fxpress.decompose(gm, (x,), "auto", rank=0.5, round_to=1, progress=False)
    rep = fxpress.decompose_report(small)
    assert {r.method for r in rep.decomposed} >= {"svd"} and rep.decomposed
    assert all(r.params_after <= 0.5 * r.params_before for r in rep.decomposed)


def test_auto_with_cp_trials_takes_cp_where_it_is_better():
    """A kernel of exact CP rank 12: at 9.5% of its params CP rank 12 fits (840 params) and reproduces
    it; Tucker-2 would need ranks (12, 12) (2,064) and spatial SVD rank 12 (2,304)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("or,ir,hr,wr->oihw", *(torch.randn(n, 12) for n in (32, 32, 3, 3))))
    x = torch.randn(2, 32, 8, 8)
    small = fxpress.decompose(conv, (x,), ["auto", "cp"], rank=0.095, round_to=1, progress=False,
                              method_options={"cp": {"iterations": 500, "restarts": 3}})
    (rec,) = fxpress.decompose_report(small).decomposed
    assert rec.method == "cp" and rec.ranks == 12 and rec.output_error < 1e-2, rec
    assert convs(small) == 3  # 1x1 -> one depthwise 3x3 (its kernel the product of the stored factors) -> 1x1


def test_tolerance_rolls_back_and_replans(cnn):
    m, x, calib, gm = cnn
    small = fxpress.decompose(gm, (x,), "auto", budget={"params": 0.7}, tolerance=0.3, calibration=calib, progress=False)
    rep = fxpress.decompose_report(small)
    assert all(r.output_error <= 0.3 for r in rep.decomposed)
    if not rep.budget_met:
        assert any("rolled back" in r.reason for r in rep.skipped) and "not met" in str(rep)


def test_explicit_methods_and_energy(cnn):
    m, x, calib, gm = cnn
    for method, kw in (("spatial-svd", dict(energy=0.9)), ("cp", dict(rank=8)), ("svd", dict(rank="evbmf"))):
        small = fxpress.decompose(gm, (x,), method, progress=False, method_options={"cp": {"iterations": 20}}, **kw)
        rep = fxpress.decompose_report(small)
        assert all(r.method in (method, "tucker") for r in rep.decomposed), rep
        assert small(x).shape == (2, 10)
    cp = fxpress.decompose(gm, (x,), "cp", budget={"params": 0.5}, progress=False, method_options={"cp": {"iterations": 20}})
    assert fxpress.decompose_report(cp).budget_met


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="tuker", rank=4), "unknown decomposition method 'tuker'. Did you mean 'tucker'"),
    (dict(budget={"params": 0.0}), r"fraction in \(0, 1\]"),
    (dict(budget={"params": 1.5}), r"fraction in \(0, 1\]"),
    (dict(budget={"flops": 0.5}), "use {'params': f} or {'macs': f}"),
    (dict(budget={"params": 0.5}, rank=4), "give one of budget=, rank= or energy="),
    (dict(), "say how much to decompose"),
    (dict(rank=0.0), r"in \(0, 1\)"),
    (dict(energy=1.5), r"energy must be a number in \(0, 1\]"),
    (dict(rank=4, layers=["nope"]), r"\['nope'\] match no convolution or linear layer"),
    (dict(budget={"params": 0.01}), r"cannot be met .* Raise the budget to >= 0\.\d+"),
    (dict(method="svd", budget={"params": 0.5}), "use method='auto' to allow more layer kinds"),
])
def test_bad_input_is_a_clear_value_error(cnn, kwargs, match):
    m, x, calib, gm = cnn
    with pytest.raises(ValueError, match=match):
        fxpress.decompose(gm, (x,), progress=False, **kwargs)


def test_layers_and_exclude(cnn):
    m, x, calib, gm = cnn
    small = fxpress.decompose(gm, (x,), "auto", rank=8, exclude=["c2", "fc1"], progress=False)
    rep = fxpress.decompose_report(small)
    assert {r.module for r in rep.decomposed}.isdisjoint({"c2", "fc1"})
    small = fxpress.decompose(gm, (x,), "auto", rank=8, layers=["c3"], progress=False)
    assert [r.module for r in fxpress.decompose_report(small).decomposed] == ["c3"]


def test_report_needs_a_decomposed_graph(cnn):
    with pytest.raises(ValueError, match="not produced by fxpress.decompose"):
        fxpress.decompose_report(cnn[3])


def test_mlp_whitened_budget():
    torch.manual_seed(0)
    m = MLP(sizes=(64, 128, 128, 10)).eval()
    mix = torch.randn(64, 12)
    calib = [torch.randn(64, 12) @ mix.T for _ in range(3)]
    small = fxpress.decompose(m, (calib[0][:2],), "svd", budget={"params": 0.5}, calibration=calib, progress=False)
    rep = fxpress.decompose_report(small)
    assert rep.budget_met and linears(small) > 3
    assert any("activation-aware" in n for r in rep.decomposed for n in r.notes)
    assert rep.output_error < 0.2


class TinyDigits(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1, stride=2)
        self.c3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = F.relu(self.c3(x))
        return self.fc(x.mean((2, 3)))


def _train(model, params, x, y, epochs, lr, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def test_digits_decompose_half_params_then_finetune():
    """Real data: a CNN trained on sklearn's digits, decomposed to half its parameters and fine-tuned
    for a few epochs, loses at most one accuracy point."""
    pytest.importorskip("sklearn")
    from fxpress.demo import accuracy, load_digits_tensors

    torch.manual_seed(0)
    xtr, ytr, xte, yte = load_digits_tensors(seed=0)
    model = TinyDigits()
    _train(model, model.parameters(), xtr, ytr, epochs=12, lr=3e-3)
    model.eval()
    base = accuracy(model, xte, yte)
    assert base > 95
    calib = [xtr[i : i + 128] for i in range(0, 512, 128)]
    small = fxpress.decompose(model, (xte[:1],), "auto", budget={"params": 0.5}, calibration=calib, progress=False)
    rep = fxpress.decompose_report(small)
    assert rep.budget_met and count_params(small) <= 0.5 * count_params(model)
    assert all(p.requires_grad for p in small.parameters())
    _train(small, small.parameters(), xtr, ytr, epochs=4, lr=1e-3)
    after = accuracy(small, xte, yte)
    assert after >= base - 1.0, (base, accuracy, str(rep))


@pytest.mark.slow
def test_resnet18_budget():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = tv.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    small = fxpress.decompose(m, (x,), ["tucker", "svd"], budget={"macs": 0.5}, progress=False)
    rep = fxpress.decompose_report(small)
    assert rep.budget_met and total_macs(small) <= 0.5 * rep.macs_before
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert len(rep.layers) == 21
