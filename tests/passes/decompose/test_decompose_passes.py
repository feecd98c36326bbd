"""The five decomposition passes: structure (op counts, negative cases with reasons), numerics
(exact at full or true rank for every conv geometry, reported errors equal measured ones, analytic
costs equal fxpress.ir.cost), rank rules."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxpress
from fxpress.ir.cost import count_params, node_costs
from fxpress.passes.decompose import find_layers
from fxpress.passes.decompose.layers import DECOMPOSED
from fxpress.passes.decompose.ranks import evbmf_rank, rank_grid, round_rank

from decompose_helpers import MLP, ConvNet, FunctionalConv, SmallCNN, convs, linears, rel, run_pass

CONV_TARGETS = {torch.ops.aten.conv2d.default, torch.ops.aten.conv2d.padding}

GEOMETRIES = {
    "plain": dict(),
    "stride2": dict(stride=2),
    "asym-padding": dict(padding=(1, 2)),
    "dilation": dict(dilation=2, padding=2),
    "groups": dict(groups=4, cin=32, cout=32),
    "no-bias": dict(bias=False),
    "same-even-kernel": dict(padding="same", k=4),
    "valid": dict(padding="valid"),
    "stride-pad-dil-groups-nobias": dict(stride=2, padding=(2, 1), dilation=(2, 1), groups=2, bias=False),
}


class AllGeometries(nn.Module):
    """One conv per geometry, all fed the same input, outputs concatenated: one capture covers all."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleDict()
        for name, kw in GEOMETRIES.items():
            kw = dict(kw)
            cin, cout, k = kw.pop("cin", 16), kw.pop("cout", 32), kw.pop("k", 3)
            self.convs[name.replace("-", "_")] = nn.Conv2d(cin, cout, k, **kw)

    def forward(self, x):
        outs = []
        for conv in self.convs.values():
            xin = torch.cat([x, x], 1) if conv.in_channels == 32 else x
            outs.append(conv(xin).flatten(1))
        return torch.cat(outs, 1)


def _low_rank(conv: nn.Conv2d, method: str, r: int) -> None:
    """Give the conv a kernel of exact (multilinear / separable / CP) rank r per group."""
    W = conv.weight
    g = conv.groups
    co, ci, kh, kw = W.shape[0] // g, W.shape[1], W.shape[2], W.shape[3]
    parts = []
    for _ in range(g):
        if method == "tucker":
            core = torch.randn(r, r, kh, kw)
            parts.append(torch.einsum("abhw,oa,ib->oihw", core, torch.randn(co, r), torch.randn(ci, r)))
        elif method == "spatial-svd":
            parts.append(torch.einsum("rih,orw->oihw", torch.randn(r, ci, kh), torch.randn(co, r, kw)))
        else:
            parts.append(torch.einsum("or,ir,hr,wr->oihw", torch.randn(co, r), torch.randn(ci, r), torch.randn(kh, r), torch.randn(kw, r)))
    with torch.no_grad():
        W.copy_(torch.cat(parts) / 4)


@pytest.mark.parametrize("method,pass_name,n_convs,rank,extra", [
    ("tucker", "tucker-conv", 3, (3, 3), {}),
    ("spatial-svd", "spatial-svd-conv", 2, 3, {}),
    ("cp", "cp-conv", 3, 3, {}),  # fused: 1x1 -> depthwise kh x kw (kernel = col * row, computed) -> 1x1
    ("cp", "cp-conv", 4, 3, {"depthwise": "separable"}),  # 1x1 -> kh x 1 -> 1 x kw -> 1x1
])
def test_conv_geometries_exact_at_true_rank(method, pass_name, n_convs, rank, extra):
    """Stride, per-axis padding, dilation, groups, no bias, 'same' with an even kernel, 'valid':
    a kernel of exact rank r is reproduced by the factor chain (any batch size)."""
    m = AllGeometries().eval()
    for conv in m.convs.values():
        _low_rank(conv, method, 3)
    x = torch.randn(2, 16, 12, 12)
    gm = fxpress.capture(m, (x,))
    opts = dict(rank=rank, calibration=[x], **extra)
    if method == "cp":
        opts.update(restarts=1, iterations=150, tol=1e-10, fallback=False)
    out, rep = run_pass(gm, pass_name, (x,), **opts)
    assert rep.counts["layers decomposed"] == len(GEOMETRIES), rep
    assert convs(out) == n_convs * len(GEOMETRIES)
    assert all(n.meta.get(DECOMPOSED) == method for n in out.graph.nodes if n.op == "call_function" and n.target in CONV_TARGETS)
    tol = 1e-3 if method == "cp" else 1e-5
    assert rel(out(x), m(x)) < tol
    for rec in out.meta["fxpress"]["decompose_records"]:
        assert rec.output_error < tol, rec
    x5 = torch.randn(5, 16, 12, 12)  # the captured batch dim stays dynamic
    assert rel(out(x5), m(x5)) < tol


@pytest.mark.parametrize("pass_name", ["tucker-conv", "spatial-svd-conv"])
def test_full_rank_reconstructs_functional_conv(pass_name):
    """F.conv2d (no module), per-axis padding/stride/dilation, rectangular kernel: exact at full rank."""
    m = FunctionalConv().eval()
    x = torch.randn(2, 8, 11, 13)
    out, rep = run_pass(fxpress.capture(m, (x,)), pass_name, (x,), rank=10**6, only_cheaper=False)
    assert rep.counts["layers decomposed"] == 1
    torch.testing.assert_close(out(x), m(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pass_name,n_linears", [("svd-linear", 6), ("tt-linear", 2 * 3 + 1)])
def test_linear_full_rank_exact(pass_name, n_linears):
    m = MLP(sizes=(48, 64, 64, 10)).eval()
    x = torch.randn(3, 48)
    out, rep = run_pass(fxpress.capture(m, (x,)), pass_name, (x,), rank=10**6, only_cheaper=False)
    assert linears(out) == n_linears
    torch.testing.assert_close(out(x), m(x), atol=1e-5, rtol=1e-5)
    x7 = torch.randn(7, 48)
    torch.testing.assert_close(out(x7), m(x7), atol=1e-5, rtol=1e-5)
    if pass_name == "tt-linear":  # 10 outputs do not split into 3 factors
        assert any("does not split" in why for _, why in rep.skipped)


def test_tt_linear_3d_input_and_no_bias():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 64, bias=False)

        def forward(self, x):
            return self.fc(x)

    m = Seq().eval()
    x = torch.randn(2, 5, 64)
    out, rep = run_pass(fxpress.capture(m, (x,)), "tt-linear", (x,), rank=10**6, only_cheaper=False, cores=2)
    assert rep.counts["layers decomposed"] == 1
    torch.testing.assert_close(out(x), m(x), atol=1e-5, rtol=1e-5)
    y = torch.randn(4, 5, 64)
    torch.testing.assert_close(out(y), m(y), atol=1e-5, rtol=1e-5)


def test_reported_errors_match_measured():
    """Single-layer models: the output error the record reports is the model's measured error, and the
    weight error is ||W - W_hat|| / ||W|| of the emitted factors."""
    torch.manual_seed(1)
    m = ConvNet(cin=16, cout=32, stride=2).eval()
    x = torch.randn(4, 16, 12, 12)
    captured = fxpress.capture(m, (x,))
    for pass_name, rank in (("tucker-conv", (8, 8)), ("spatial-svd-conv", 8), ("cp-conv", 12)):
        gm = copy.deepcopy(captured)
        out, rep = run_pass(gm, pass_name, (x,), rank=rank, calibration=[x])
        rec = out.meta["fxpress"]["decompose_records"][-1]
        assert rec.status == "decomposed", rec
        assert rec.output_error == pytest.approx(rel(out(x), m(x)), rel=1e-4)
        assert 0 < rec.weight_error < 1
    m = MLP(sizes=(64, 64, 8)).eval()
    x = torch.randn(16, 64)
    out, rep = run_pass(fxpress.capture(m, (x,)), "svd-linear", (x,), rank=16, layers=["layers.0"], calibration=[x])
    rec = out.meta["fxpress"]["decompose_records"][-1]
    # the first layer's output in the decomposed graph: run its two factor linears by hand
    first, second = (p for n, p in out.named_parameters() if n.startswith("layers.0.svd"))
    y_hat = F.linear(F.linear(x, first), second, m.layers[0].bias)
    assert rec.output_error == pytest.approx(rel(y_hat, m.layers[0](x)), rel=1e-4)


def test_costs_match_ir_cost():
    """The analytic params/MACs a record reports are what fxpress.ir.cost counts on the new nodes."""
    m = SmallCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    captured = fxpress.capture(m, (x,))
    for pass_name, rank in (("tucker-conv", 8), ("spatial-svd-conv", 8), ("cp-conv", 8), ("svd-linear", 8), ("tt-linear", 4)):
        gm = copy.deepcopy(captured)
        opts = dict(cores=2) if pass_name == "tt-linear" else dict(iterations=10) if pass_name == "cp-conv" else {}
        out, rep = run_pass(gm, pass_name, (x,), rank=rank, only_cheaper=False, **opts)
        costs = {c.node_name: c for c in node_costs(out)}
        records = [r for r in out.meta["fxpress"]["decompose_records"] if r.status == "decomposed"]
        assert records, rep
        for rec in records:
            method = rec.method
            new = [n.name for n in out.graph.nodes if n.meta.get(DECOMPOSED) == method and n.meta.get("nn_module_stack")
                   and list(n.meta["nn_module_stack"].values())[-1][0] == rec.module]
            assert sum(costs[n].macs for n in new) == rec.macs_after, (pass_name, rec)
            assert sum(costs[n].params for n in new) == rec.params_after, (pass_name, rec)


def test_not_cheaper_left_alone_with_reason():
    m = MLP(sizes=(16, 8, 4)).eval()
    x = torch.randn(2, 16)
    gm = fxpress.capture(m, (x,))
    out, rep = run_pass(gm, "svd-linear", (x,), rank=8)
    assert linears(out) == 2 and not rep.changed
    reasons = dict(rep.skipped)
    assert any("not cheaper" in why and "params" in why for why in reasons.values()), reasons
    records = out.meta["fxpress"]["decompose_records"]
    assert all(r.status == "skipped" and r.reason for r in records)


def test_negative_cases_report_why():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.pw = nn.Conv2d(8, 8, 1)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.sep = nn.Conv2d(8, 8, (3, 1), padding=(1, 0))
            self.c1d = nn.Conv1d(8, 8, 3)
            self.tied = nn.Linear(8, 8)

        def forward(self, x):
            y = self.sep(self.dw(self.pw(x)))
            z = self.c1d(y.mean(3))
            w = self.tied(z.mean(2))
            return self.tied(w) + F.linear(w, w.t() @ w)  # tied weight; a computed weight

    m = Odd().eval()
    x = torch.randn(2, 8, 6, 6)
    gm = fxpress.capture(m, (x,))
    _, rep = run_pass(gm, "spatial-svd-conv", (x,), rank=1)
    why = " | ".join(w for _, w in rep.skipped)
    assert "1x1 kernel" in why and "already separable" in why and "only 2-D convolutions" in why
    _, rep = run_pass(fxpress.capture(m, (x,)), "tucker-conv", (x,), rank=1)
    assert any("depthwise" in w for _, w in rep.skipped)
    _, rep = run_pass(fxpress.capture(m, (x,)), "svd-linear", (x,), rank=1)
    why = " | ".join(w for _, w in rep.skipped)
    assert "shared with another op" in why and "computed in the graph" in why


def test_decomposed_factors_are_not_decomposed_again():
    m = ConvNet().eval()
    x = torch.randn(2, 16, 12, 12)
    gm, _ = run_pass(fxpress.capture(m, (x,)), "tucker-conv", (x,), rank=4)
    out, rep = run_pass(gm, "spatial-svd-conv", (x,), rank=1)
    assert not rep.changed and all("earlier decomposition" in w for _, w in rep.skipped)


def test_tolerance_rolls_back():
    m = ConvNet().eval()
    x = torch.randn(2, 16, 12, 12)
    out, rep = run_pass(fxpress.capture(m, (x,)), "tucker-conv", (x,), rank=2, calibration=[x], tolerance=0.05)
    assert convs(out) == 1 and not rep.changed
    assert "rolled back: output error" in rep.skipped[0][1]
    torch.testing.assert_close(out(x), m(x))


def test_cp_falls_back_to_tucker_when_it_does_not_converge():
    m = ConvNet(cin=16, cout=32).eval()
    x = torch.randn(2, 16, 12, 12)
    out, rep = run_pass(fxpress.capture(m, (x,)), "cp-conv", (x,), rank=40, iterations=1, restarts=1, tol=1e-12, calibration=[x])
    rec = out.meta["fxpress"]["decompose_records"][-1]
    assert rec.status == "decomposed" and rec.method == "tucker", rec
    assert any("did not converge" in n for n in rec.notes) and any("fell back to Tucker-2" in n for n in rec.notes)
    assert rec.params_after <= ConvNet(cin=16, cout=32).conv.weight.numel()
    assert convs(out) >= 2


def test_cp_time_limit_stops_early():
    m = ConvNet(cin=16, cout=32).eval()
    x = torch.randn(2, 16, 12, 12)
    out, rep = run_pass(fxpress.capture(m, (x,)), "cp-conv", (x,), rank=12, iterations=100000, time_limit=0.3, tol=1e-15, restarts=1)
    rec = out.meta["fxpress"]["decompose_records"][-1]
    assert rec.status == "decomposed"
    assert any("did not converge" in n or "before converging" in n for n in rec.notes)


def test_whitened_svd_beats_plain_on_correlated_inputs():
    torch.manual_seed(0)
    m = MLP(sizes=(64, 64, 8)).eval()
    mix = torch.randn(64, 8)
    calib = [torch.randn(128, 8) @ mix.T + 0.01 * torch.randn(128, 64) for _ in range(2)]
    x = calib[0]
    plain, _ = run_pass(fxpress.capture(m, (x,)), "svd-linear", (x,), rank=8, layers=["layers.0"], calibration=calib, whiten=False)
    white, _ = run_pass(fxpress.capture(m, (x,)), "svd-linear", (x,), rank=8, layers=["layers.0"], calibration=calib)
    e_plain = plain.meta["fxpress"]["decompose_records"][-1].output_error
    e_white = white.meta["fxpress"]["decompose_records"][-1].output_error
    assert e_white < 0.2 * e_plain, (e_white, e_plain)


def test_rank_rules():
    m = MLP(sizes=(64, 64, 64, 8)).eval()
    x = torch.randn(2, 64)
    captured = fxpress.capture(m, (x,))
    out, _ = run_pass(copy.deepcopy(captured), "svd-linear", (x,), rank=0.5, round_to=8)
    recs = out.meta["fxpress"]["decompose_records"]
    assert [r.ranks for r in recs] == [8, 8, 3]  # 64x64: 16 * 128 + 64 > 0.5 * 4160; 64->8: too small to round
    assert all(r.params_after <= 0.5 * r.params_before for r in recs)
    out, _ = run_pass(copy.deepcopy(captured), "svd-linear", (x,), energy=0.5)
    assert any(r.status == "decomposed" for r in out.meta["fxpress"]["decompose_records"])
    out, _ = run_pass(copy.deepcopy(captured), "svd-linear", (x,), rank={"layers.1": 4})
    recs = out.meta["fxpress"]["decompose_records"]
    assert [(r.module, r.ranks) for r in recs] == [("layers.1", 4)]
    out, rep = run_pass(copy.deepcopy(captured), "svd-linear", (x,), rank="evbmf")
    assert all(r.ranks >= 1 for r in out.meta["fxpress"]["decompose_records"])


def test_evbmf_never_zero_and_finds_planted_rank():
    torch.manual_seed(0)
    assert evbmf_rank(torch.randn(64, 128) * 1e-3) >= 1
    assert evbmf_rank(torch.zeros(8, 8)) == 1
    assert evbmf_rank(torch.randn(3, 3)) >= 1
    planted = torch.randn(64, 5) @ torch.randn(5, 128) + 0.05 * torch.randn(64, 128)
    assert evbmf_rank(planted) == 5


def test_rank_rounding():
    assert round_rank(13, 64, 8) == 16 and round_rank(3, 64, 8) == 8 and round_rank(13, 12, 8) == 12
    assert round_rank(5, 10, 8) == 5  # too small a layer to round
    assert rank_grid(64, 8) == [8, 16, 24, 32, 40, 48, 56, 64]
    grid = rank_grid(4096, 1, 64)
    assert len(grid) <= 65 and grid[-1] == 4096 and grid[0] == 1


def test_bad_pass_options():
    with pytest.raises(ValueError, match="fraction of each layer's parameters"):
        fxpress.passes.get_pass("svd-linear", rank=1.5)
    with pytest.raises(ValueError, match="unknown rank rule"):
        fxpress.passes.get_pass("tucker-conv", rank="vbmf")
    with pytest.raises(ValueError, match="either rank= or energy="):
        fxpress.passes.get_pass("tucker-conv", rank=3, energy=0.9)
    with pytest.raises(ValueError, match="tolerance"):
        fxpress.passes.get_pass("tucker-conv", rank=3, tolerance=-1)


def test_find_layers_geometry():
    m = FunctionalConv(padding="same", stride=1, k=(2, 3)).eval()
    gm = fxpress.capture(m, (torch.randn(1, 8, 9, 9),))
    (layer,), _ = find_layers(gm)
    assert layer.padding == "same" and layer.kernel == (2, 3) and layer.dilation == (1, 2)
    assert layer.params() == count_params(gm)



def test_tucker_matches_tensorly_partial_tucker():
    """Our HOOI (Gram-matrix eigenvectors) is tensorly's partial_tucker, only faster."""
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    from fxpress.passes.decompose.tucker_conv import partial_tucker2

    torch.manual_seed(0)
    W = torch.randn(24, 16, 3, 3, dtype=torch.float64)
    core, (u0, u1) = partial_tucker2(W, 8, 6, iterations=20)
    with tl.backend_context("pytorch"):
        (ref_core, (r0, r1)), _ = partial_tucker(W, rank=[8, 6], modes=[0, 1], n_iter_max=20, init="svd", tol=1e-7)
    ours = torch.einsum("abhw,oa,ib->oihw", core, u0, u1)
    theirs = torch.einsum("abhw,oa,ib->oihw", ref_core, r0, r1)
    assert (ours - W).norm() / W.norm() == pytest.approx(((theirs - W).norm() / W.norm()).item(), abs=1e-6)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
