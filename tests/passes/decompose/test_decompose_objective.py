"""Cost on the target (objective=, measured latency, CP's fused depthwise form), data-aware Tucker-2 /
spatial SVD, error curves for CP and TT under a model-wide budget, and diagonal whitening of wide linears."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fxpress
from fxpress.ir.cost import count_params
from fxpress.passes.decompose import find_layers
from fxpress.passes.decompose.activations import collect_inputs
from fxpress.passes.decompose.latency import LatencyModel, Option, aligned, choose
from fxpress.passes.decompose.ops import OuterConv
from fxpress.passes.decompose.tt_linear import TtLinear
from fxpress.passes.decompose.tucker_conv import TuckerConv

from decompose_helpers import MLP, ConvNet, convs, rel, run_pass

aten = torch.ops.aten


def _fake_latency(fast_multiple: int, calls: list):
    """A latency 'measurement' where chains whose widths are multiples of ``fast_multiple`` run 3x
    faster: per op, weight elements, divided by 3 where every channel count is aligned."""

    def latency(layer, chains):
        calls.append(len(chains))
        out = {}
        for key, ops in chains.items():
            if ops is None:
                out[key] = float(layer.weight.numel())
                continue
            total = 0.0
            for op in ops:
                w = getattr(op, "weight", None)
                if w is None:
                    continue
                widths = [int(w.shape[0])] + ([int(w.shape[1])] if w.shape[1] > 1 else [])
                total += w.numel() / (3.0 if all(c % fast_multiple == 0 for c in widths) else 1.0)
            out[key] = total
        return out

    return latency


def test_objective_balanced_trades_a_little_error_for_measured_speed():
    """At a parameter ratio, objective='error' takes the lowest predicted error; 'balanced' weighs the
    (here: fake, deterministic) measured latency and takes a SIMD-aligned rank that is much faster for
    slightly more error, and the report says what was measured."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    x = torch.randn(1, 64, 16, 16)
    kw = dict(rank=0.3, round_to=1, progress=False)
    by_error = fxpress.decompose(conv, (x,), "tucker", objective="error", **kw)
    calls: list = []
    balanced = fxpress.decompose(conv, (x,), "tucker", objective="balanced", latency=_fake_latency(16, calls), **kw)
    (e,) = fxpress.decompose_report(by_error).decomposed
    (b,) = fxpress.decompose_report(balanced).decomposed
    assert calls, "the balanced objective timed nothing"
    assert not aligned(e.ranks, 16) and aligned(b.ranks, 16), (e.ranks, b.ranks)
    assert e.weight_error < b.weight_error < 1.1 * e.weight_error
    assert b.params_after <= 0.3 * conv.weight.numel()
    assert any(n.startswith("objective balanced") and "lowest-error option" in n for n in b.notes), b.notes
    # objective='error' never times anything; a bad objective is a clear error
    with pytest.raises(ValueError, match="objective must be one of"):
        fxpress.decompose(conv, (x,), "tucker", objective="fast", **kw)


def test_choose_rule_and_shortlist():
    layer = find_layers(fxpress.capture(ConvNet(), (torch.randn(1, 16, 8, 8),)))[0][0]
    opts = [Option("tucker", (30, 30), 100, 1000, 0.50), Option("tucker", (32, 32), 100, 1000, 0.51),
            Option("tucker", (8, 8), 10, 100, 0.95)]
    ms = {(30, 30): 2.0, (32, 32): 1.0, (8, 8): 0.1}
    latency = lambda layer, chains: {k: (ms[opts_by_key[k].rank] if k != "layer" else 3.0) for k in chains}  # noqa: E731
    opts_by_key = {}

    def template(o):
        opts_by_key[len(opts_by_key)] = o
        return []

    best, info = choose(layer, opts, "balanced", latency, template)
    # loss(0.51) * 1.0**b < loss(0.50) * 2.0**b (loss ratio 1.047 < 2**0.14); (8, 8)'s loss is outside the shortlist
    assert best.rank == (32, 32) and info["timed"] == 2
    opts_by_key.clear()
    best, _ = choose(layer, opts, "error", latency, template)
    assert best.rank == (30, 30)


def test_latency_model_times_chains_and_caches():
    m = ConvNet(cin=16, cout=32).eval()
    x = torch.randn(1, 16, 16, 16)
    (layer,), _ = find_layers(fxpress.capture(m, (x,)))
    tucker = TuckerConv()
    model = LatencyModel(rounds=2, repeat=2)
    chains = {"a": tucker.template(layer, (8, 8)), "b": tucker.template(layer, (16, 16)), "layer": None}
    ms = model(layer, chains)
    assert set(ms) == {"a", "b", "layer"} and all(v > 0 for v in ms.values())
    timed = model.timed
    assert model(layer, chains) == ms and model.timed == timed  # served from the cache


def test_cp_fused_depthwise_stores_the_factors():
    """CP's default form runs one depthwise kh x kw convolution whose kernel is computed from the two
    stored factors: same parameters as the separable form, same function, one conv fewer; quantize
    (fold-constants) materializes the kernel and exports to ONNX."""
    torch.manual_seed(0)
    m = ConvNet(cin=16, cout=32).eval()
    x = torch.randn(2, 16, 12, 12)
    captured = fxpress.capture(m, (x,))
    fused, _ = run_pass(copy.deepcopy(captured), "cp-conv", (x,), rank=8, iterations=30)
    sep, _ = run_pass(copy.deepcopy(captured), "cp-conv", (x,), rank=8, iterations=30, depthwise="separable")
    assert count_params(fused) == count_params(sep) == 8 * (16 + 3 + 3 + 32) + 32
    assert convs(fused) == 3 and convs(sep) == 4
    muls = [n for n in fused.graph.nodes if n.op == "call_function" and n.target == aten.mul.Tensor]
    assert len(muls) == 1 and all(u.target == aten.conv2d.default for u in muls[0].users)
    torch.testing.assert_close(fused(x), sep(x), atol=1e-4, rtol=1e-4)
    (rf,), (rs,) = ([r for r in g.meta["fxpress"]["decompose_records"] if r.status == "decomposed"] for g in (fused, sep))
    assert rf.macs_after > rs.macs_after  # kh*kw vs kh + kw per pixel in the depthwise part, counted honestly
    q = fxpress.quantize(fused, (x,), calibration=[x], config="int8_static", progress=False)
    assert rel(q(x), fused(x)) < 0.2
    op = OuterConv(torch.randn(4, 1, 3, 1), torch.randn(4, 1, 1, 3), groups=4, padding=[1, 1])
    t = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(op.apply(t), torch.nn.functional.conv2d(t, op.col * op.row, padding=1, groups=4))


class _Correlated:
    """Conv inputs driven by 6 latent channels (spatially smooth), mixed into 32, plus a little noise."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.mix = torch.randn(32, 6, generator=g)
        self.g = g

    def batch(self, n=16):
        z = torch.nn.functional.avg_pool2d(torch.randn(n, 6, 12, 12, generator=self.g), 3, 1, 1)
        return torch.einsum("ij,njhw->nihw", self.mix, z) + 0.05 * torch.randn(n, 32, 12, 12, generator=self.g)


@pytest.mark.parametrize("method,rank", [("tucker", (12, 8)), ("tucker", (48, 8)), ("spatial-svd", 8)])
def test_data_aware_conv_beats_weight_only_on_correlated_inputs(method, rank):
    """With calibration data, Tucker-2 and spatial SVD fit the layer's outputs (input factor from the
    whitened kernel, the rest by regression on the outputs): lower output error than the weight-only
    decomposition at the same ranks, on calibration batches and on held-out ones."""
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 48, 3, padding=1).eval()
    data = _Correlated()
    calib = [data.batch() for _ in range(4)]
    held_out = data.batch(32)
    got = {}
    for aware in (False, True):
        m = fxpress.decompose(conv, (calib[0],), method, rank=rank, calibration=calib, whiten=aware, round_to=1, progress=False)
        (rec,) = fxpress.decompose_report(m).decomposed
        assert rec.ranks == rank
        with torch.no_grad():
            got[aware] = (rec.output_error, rel(m(held_out), conv(held_out)), rec.notes)
    (cal_w, test_w, _), (cal_d, test_d, notes) = got[False], got[True]
    assert cal_d < 0.7 * cal_w and test_d < 0.7 * test_w, got
    assert any("fitted on the outputs" in n for n in notes), notes


def test_data_aware_is_exact_at_full_rank_and_reports_too_few_samples():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1, stride=2).eval()
    x = torch.randn(8, 16, 10, 10)
    gm = fxpress.capture(conv, (x,))
    out, _ = run_pass(copy.deepcopy(gm), "tucker-conv", (x,), rank=(24, 16), calibration=[x], data_aware=True, only_cheaper=False, ridge=0.0)
    assert rel(out(x), conv(x)) < 1e-6
    small = torch.randn(1, 16, 4, 4)  # 4 output positions: far too few for a regression
    out, _ = run_pass(fxpress.capture(conv, (small,)), "tucker-conv", (small,), rank=(8, 8), calibration=[small], data_aware=True)
    (rec,) = out.meta["fxpress"]["decompose_records"]
    assert any("too few" in n for n in rec.notes), rec.notes


class TwoConvs(nn.Module):
    """One kernel of exact CP rank 4 (cheap to keep), one random (costly to cut)."""

    def __init__(self):
        super().__init__()
        self.easy = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.hard = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        with torch.no_grad():
            self.easy.weight.copy_(torch.einsum("or,ir,hr,wr->oihw", *(torch.randn(n, 4) for n in (32, 32, 3, 3))) / 4)

    def forward(self, x):
        return self.hard(self.easy(x))


def test_cp_budget_allocates_by_error_curves():
    """Under a model-wide budget CP layers get error curves (trial decompositions at curve_points
    ranks), so the greedy allocator cuts the layer that loses least: the exact-rank-4 kernel is cut
    hard at almost no error, the random one is kept larger. One uniform ratio would cut both alike."""
    torch.manual_seed(0)
    m = TwoConvs().eval()
    x = torch.randn(2, 32, 8, 8)
    small = fxpress.decompose(m, (x,), "cp", budget={"params": 0.4}, round_to=1, progress=False, objective="error",
                              method_options={"cp": {"iterations": 100, "restarts": 1, "curve_points": 4}})
    rep = fxpress.decompose_report(small)
    assert rep.budget_met
    recs = {r.module: r for r in rep.decomposed}
    assert set(recs) == {"easy", "hard"} and all(r.method == "cp" for r in recs.values()), rep
    ratio = {k: r.params_after / r.params_before for k, r in recs.items()}
    assert ratio["easy"] < 0.5 * ratio["hard"], ratio
    assert recs["easy"].weight_error < 0.05


def test_tt_predicted_error_is_the_tt_svd_error_and_budgets_use_it():
    torch.manual_seed(0)
    m = MLP(sizes=(64, 64, 8)).eval()
    x = torch.randn(4, 64)
    (layer, _), _ = find_layers(fxpress.capture(m, (x,)))
    tt = TtLinear(cores=2)
    a = tt.analyze(layer, None)
    for ranks in ((1, 4, 1), (1, 16, 1), (1, 40, 1)):
        assert tt.predicted_error(layer, a, ranks) == pytest.approx(tt.factorize(layer, ranks, a).weight_error, abs=1e-6)
    tt3 = TtLinear(cores=3)
    a3 = tt3.analyze(layer, None)
    ranks = (1, 6, 5, 1)
    assert tt3.predicted_error(layer, a3, ranks) == pytest.approx(tt3.factorize(layer, ranks, a3).weight_error, abs=1e-6)
    small = fxpress.decompose(m, (x,), "tt", budget={"params": 0.7}, round_to=1, progress=False, method_options={"tt": {"cores": 2}})
    rep = fxpress.decompose_report(small)
    assert rep.budget_met and all(r.method == "tt" for r in rep.decomposed)


def test_wide_linear_gets_diagonal_whitening_reported():
    """Past whiten_max_features the full input second moment is not collected (it would be in x in):
    the layer is whitened by its per-feature RMS, which still beats plain SVD when features have
    unequal scales, and the report says so."""
    torch.manual_seed(0)
    m = MLP(sizes=(48, 48, 8)).eval()
    scale = torch.logspace(-2, 1, 48)
    calib = [torch.randn(64, 48) * scale for _ in range(2)]
    gm = fxpress.capture(m, (calib[0],))
    (layer, _), _ = find_layers(gm)
    stats = collect_inputs(gm, calib, {layer.name: "linear"}, diag=[layer.name])
    assert stats[layer.name].gram is None and stats[layer.name].sq.shape == (48,)
    errs = {}
    for opts in (dict(whiten=False), dict(whiten_max_features=16), dict()):
        out, _ = run_pass(copy.deepcopy(gm), "svd-linear", (calib[0],), rank=6, layers=["layers.0"], calibration=calib, **opts)
        rec = out.meta["fxpress"]["decompose_records"][-1]
        errs[tuple(opts)] = (rec.output_error, rec.notes)
    plain, diag, full = errs[("whiten",)], errs[("whiten_max_features",)], errs[()]
    assert diag[0] < 0.8 * plain[0] and full[0] <= diag[0] * 1.05, errs
    assert any("diagonal whitening" in n and "whiten_max_features=16" in n for n in diag[1]), diag[1]
    small = fxpress.decompose(m, (calib[0],), "svd", rank=6, calibration=calib, progress=False,
                              method_options={"svd": {"whiten_max_features": 16}}, layers=["layers.0"])
    assert "diagonal whitening" in str(fxpress.decompose_report(small))
