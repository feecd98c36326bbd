"""Calibration observers: coverage, zero points, clipping quality, growth, state, distributed reduce."""

from __future__ import annotations

import copy
import math
import os
import socket
from datetime import timedelta

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxpress.ir.qparams import qparams_from_range
from fxpress.passes.quant.observers import (
    OBSERVERS,
    CalibrationError,
    Observer,
    HistogramMSEObserver,
    _bin_counts,
    _grid_error_table,
    _grid_sq_errors,
    _kl_scores,
    _sq_error_integral,
    make_observer,
)

KINDS = list(OBSERVERS)
PER_CHANNEL = ["minmax", "moving_average", "histogram_mse"]
HIST_KINDS = ["histogram_mse", "entropy", "percentile"]
CONFIGS = {  # name: (dtype, symmetric)
    "u8_affine": (torch.uint8, False),
    "i8_affine": (torch.int8, False),
    "i8_sym": (torch.int8, True),
    "u8_sym": (torch.uint8, True),
}


def fq_mse(qp, x):
    return float(((qp.fake_quantize(x) - x) ** 2).mean())


def heavy_tailed(n=200_000, outliers=20, scale=60.0):
    x = torch.distributions.Laplace(0.0, 1.0).sample((n,))
    x[torch.randperm(n)[:outliers]] = scale * torch.sign(torch.randn(outliers))
    return x


def assert_zero_exact(qp):
    if qp.axis is None:
        z = torch.zeros(3)
    else:
        shape = [2] * (qp.axis + 1)
        shape[qp.axis] = qp.scale.numel()
        z = torch.zeros(shape)
    assert torch.equal(qp.fake_quantize(z), z)
    assert bool(((qp.zero_point >= qp.quant_min) & (qp.zero_point <= qp.quant_max)).all())


# ---------------------------------------------------------------------------------------------
# coverage and zero points


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("bits", [None, 4])
def test_minmax_covers_the_data(config, bits):
    dtype, symmetric = CONFIGS[config]
    obs = make_observer("minmax", dtype=dtype, symmetric=symmetric, bits=bits)
    batches = [torch.randn(1000) * 3 + 1, torch.randn(500) * 0.1 - 2, torch.rand(200) * 7]
    for b in batches:
        assert obs(b) is b
    x = torch.cat(batches)
    assert float(obs.min_val) == float(x.min()) and float(obs.max_val) == float(x.max())
    qp = obs.qparams()
    if bits:
        assert (qp.quant_min, qp.quant_max) == ((-8, 7) if dtype == torch.int8 else (0, 15))
    # no clipping: every value is within half a step of its quantized value
    assert float((qp.fake_quantize(x) - x).abs().max()) <= float(qp.scale) / 2 * (1 + 1e-4)
    assert_zero_exact(qp)


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("config", ["u8_affine", "i8_sym"])
def test_minmax_per_channel_covers_each_channel(axis, config):
    dtype, symmetric = CONFIGS[config]
    obs = make_observer("minmax", dtype=dtype, symmetric=symmetric, axis=axis)
    x = torch.randn(4, 6, 5) * torch.arange(1, 7).reshape(1, 6, 1)
    x2 = torch.randn(4, 6, 5) * 2
    obs(x)
    obs(x2)
    qp = obs.qparams()
    ax = axis % 3
    assert qp.axis == ax and qp.scale.shape == (x.shape[ax],)
    both = torch.cat([x, x2], dim=0 if ax != 0 else 1)
    dims = tuple(d for d in range(3) if d != ax)
    assert torch.equal(obs.min_val, both.amin(dim=dims)) and torch.equal(obs.max_val, both.amax(dim=dims))
    err = (qp.fake_quantize(both) - both).abs()
    assert bool((err <= qp._broadcast(qp.scale, 3) / 2 * (1 + 1e-4)).all())
    assert_zero_exact(qp)


def relu_like(n=50_000):
    return (torch.randn(n) * 2).relu()


@pytest.mark.parametrize("kind", KINDS)
def test_uint8_affine_on_relu_data_has_zero_point_0(kind):
    obs = make_observer(kind, dtype=torch.uint8, symmetric=False)
    for _ in range(3):
        obs(relu_like())
    qp = obs.qparams()
    assert int(qp.zero_point) == 0
    assert 0 < float(qp.scale) * 255 <= float(obs.max_val) * (1 + 1e-6)
    assert_zero_exact(qp)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_zero_is_exact_and_symmetric_zero_point(kind, config):
    dtype, symmetric = CONFIGS[config]
    obs = make_observer(kind, dtype=dtype, symmetric=symmetric)
    obs(torch.randn(20_000) * 2 + 0.5)
    obs(torch.randn(20_000) - 0.3)
    qp = obs.qparams()
    assert qp.scale.dim() == 0 and qp.axis is None and qp.dtype == dtype
    assert_zero_exact(qp)
    if symmetric:
        assert int(qp.zero_point) == (0 if dtype == torch.int8 else 128)
    # the range is never wider than the data (plus zero)
    assert float(qp.scale) <= (float(obs.max_val) - float(obs.min_val)) / ((qp.quant_max - qp.quant_min) / 2) + 1e-6


@pytest.mark.parametrize("kind", PER_CHANNEL)
@pytest.mark.parametrize("config", ["u8_affine", "i8_sym", "i8_affine"])
def test_per_channel_kinds(kind, config):
    dtype, symmetric = CONFIGS[config]
    obs = make_observer(kind, dtype=dtype, symmetric=symmetric, axis=0)
    w = torch.randn(16, 8, 3, 3) * torch.linspace(0.01, 3, 16).reshape(16, 1, 1, 1)
    if config == "u8_affine":
        w = w.relu()
    obs(w)
    qp = obs.qparams()
    assert qp.axis == 0 and qp.scale.shape == (16,) and qp.zero_point.shape == (16,)
    assert_zero_exact(qp)
    if symmetric:
        assert bool((qp.zero_point == 0).all())
    if config == "u8_affine":
        assert bool((qp.zero_point == 0).all())
    # per-channel scales follow the channels' magnitudes
    assert float(qp.scale[-1]) > 50 * float(qp.scale[0])


@pytest.mark.parametrize("kind", ["entropy", "percentile"])
def test_per_tensor_only_kinds_reject_axis(kind):
    with pytest.raises(ValueError, match="per-tensor only"):
        make_observer(kind, axis=0)


def test_int16_and_narrow_ranges():
    x = torch.randn(10_000)
    obs = make_observer("minmax", dtype=torch.int16, symmetric=True)
    obs(x)
    qp = obs.qparams()
    assert (qp.quant_min, qp.quant_max, int(qp.zero_point)) == (-32768, 32767, 0)
    assert fq_mse(qp, x) < 1e-8
    obs = make_observer("histogram_mse", dtype=torch.int8, symmetric=True, quant_min=-127, quant_max=127)
    obs(x)
    qp = obs.qparams()
    assert (qp.quant_min, qp.quant_max, int(qp.zero_point)) == (-127, 127, 0)
    obs = make_observer("percentile", dtype=torch.uint8, bits=4)
    obs(x)
    assert (obs.qparams().quant_min, obs.qparams().quant_max) == (0, 15)
    assert make_observer("minmax", dtype="int8").dtype == torch.int8


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=64),
    kind=st.sampled_from(KINDS),
    config=st.sampled_from(list(CONFIGS)),
)
def test_any_data_gives_valid_qparams(values, kind, config):
    dtype, symmetric = CONFIGS[config]
    obs = make_observer(kind, dtype=dtype, symmetric=symmetric)
    x = torch.tensor(values)
    obs(x)
    qp = obs.qparams()
    assert bool(torch.isfinite(qp.scale)) and float(qp.scale) > 0
    assert_zero_exact(qp)
    if kind == "minmax":
        tol = float(qp.scale) / 2 * (1 + 1e-4) + 1e-3 * float(x.abs().max()) * 2**-20
        assert float((qp.fake_quantize(x) - x).abs().max()) <= tol


# ---------------------------------------------------------------------------------------------
# clipping quality


@pytest.mark.parametrize("config", ["u8_affine", "i8_sym"])
def test_histogram_mse_beats_minmax_on_heavy_tails(config):
    dtype, symmetric = CONFIGS[config]
    # MSE-optimal clipping pays off when outliers are rare: a Laplace bulk with one outlier,
    # and Student-t samples (with 20 outliers at ±60 among 200k, keeping them is MSE-optimal)
    x = heavy_tailed(outliers=1)
    t = torch.distributions.StudentT(2.5).sample((200_000,))
    for data in (x, t):
        mm = make_observer("minmax", dtype=dtype, symmetric=symmetric)
        mse = make_observer("histogram_mse", dtype=dtype, symmetric=symmetric)
        for chunk in data.chunk(4):
            mm(chunk)
            mse(chunk)
        e_mm, e_mse = fq_mse(mm.qparams(), data), fq_mse(mse.qparams(), data)
        assert e_mse < 0.9 * e_mm, (e_mse, e_mm)
        # and no ratio on a fine grid of clipping ranges does clearly better
        lo0, hi0 = min(float(data.min()), 0.0), max(float(data.max()), 0.0)
        best = min(
            fq_mse(qparams_from_range(torch.tensor(r * lo0), torch.tensor(r * hi0), dtype, symmetric=symmetric), data)
            for r in torch.linspace(0.01, 1, 200).tolist()
        )
        assert e_mse <= best * 1.05, (e_mse, best)


def test_histogram_mse_on_relu_data_close_to_best():
    x = relu_like(200_000) ** 2  # long right tail, half exact zeros
    obs = make_observer("histogram_mse")
    obs(x)
    e = fq_mse(obs.qparams(), x)
    best = min(fq_mse(qparams_from_range(torch.tensor(0.0), torch.tensor(r * float(x.max())), torch.uint8, symmetric=False), x) for r in torch.linspace(0.02, 1, 200).tolist())
    assert e <= best * 1.05 and e < fq_mse(_mm(x), x)


def _mm(x):
    obs = make_observer("minmax")
    obs(x)
    return obs.qparams()


@pytest.mark.parametrize("kind", ["entropy", "percentile"])
@pytest.mark.parametrize("config", ["u8_affine", "i8_sym"])
def test_entropy_and_percentile_clip_outliers(kind, config):
    dtype, symmetric = CONFIGS[config]
    x = heavy_tailed(outliers=10, scale=200.0)
    obs = make_observer(kind, dtype=dtype, symmetric=symmetric)
    obs(x)
    qp = obs.qparams()
    hi = float(qp.scale) * (qp.quant_max - int(qp.zero_point))
    assert hi < 0.2 * 200.0  # the outliers are clipped
    assert hi > float(x.abs().quantile(0.99))  # the bulk is not
    bulk = x[x.abs() < 20]
    assert fq_mse(qp, bulk) < 0.1 * fq_mse(_mm(x), bulk)


def test_percentile_matches_the_data_quantiles():
    x = torch.randn(300_000) * 2 + 1
    sym = make_observer("percentile", dtype=torch.int8, symmetric=True, percentile=99.9)
    aff = make_observer("percentile", percentile=99.0)
    for chunk in x.chunk(3):
        sym(chunk)
        aff(chunk)
    t = float(sym.qparams().scale) * 127.5
    assert t == pytest.approx(float(x.abs().quantile(0.999)), rel=0.01)
    lo, hi = (float(v) for v in aff._range())
    assert lo == pytest.approx(float(x.quantile(0.01)), rel=0.01)
    assert hi == pytest.approx(float(x.quantile(0.99)), rel=0.01)


def test_entropy_kl_matches_reference_implementation():
    """The O(bins·n) KL scores equal a direct bin-by-bin implementation of the TensorRT recipe."""

    def reference(h, n):
        h = h.double()
        out = []
        for i in range(n, h.numel() + 1):
            p = h[:i].clone()
            p[-1] += h[i:].sum()
            group = (torch.arange(i) * n) // i
            q = torch.zeros(i, dtype=torch.float64)
            for c in range(n):
                m = group == c
                nz = m & (p > 0)
                if nz.any():
                    q[nz] = max(float(h[:i][m].sum()), 1e-4) / nz.sum()  # 1e-4: the smoothing count
            pn, qn = p / p.sum(), q / q.sum()
            k = pn > 0
            out.append(float((pn[k] * (pn[k].log() - qn[k].log())).sum()))
        return torch.tensor(out, dtype=torch.float64)

    for trial, n in enumerate([16, 8, 32]):
        data = torch.distributions.StudentT(2.0).sample((5000,)).abs().clamp(max=30) if trial != 1 else torch.randn(5000).abs()
        h = torch.histc(data, 200, 0, float(data.max())).double()
        if trial == 2:
            h[60:90] = 0  # empty stretches: groups with no mass, P without Q
        i, fast = _kl_scores(h, n)
        ref = reference(h, n)
        finite = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(fast), finite)
        # (the reference also normalizes Q by the smoothing count; the grouped form by the data alone)
        torch.testing.assert_close(fast[finite], ref[finite], rtol=0, atol=1e-6)
        assert int(i[int(fast.argmin())]) == n + int(ref.argmin())


def test_expected_error_integral_matches_numeric_integration():
    s = torch.tensor([[0.05], [0.2], [1.3]], dtype=torch.float64)
    z = torch.tensor([[3.0], [-10.0], [0.0]], dtype=torch.float64)
    u = torch.tensor([[-30.0, -2.1, -0.33, 0.0, 1.7, 7.0, 25.0]], dtype=torch.float64)
    v = u + torch.tensor([[0.5, 0.07, 0.9, 0.01, 2.5, 3.0, 10.0]], dtype=torch.float64)
    got = _sq_error_integral(u, v, s, z, -128, 127)
    t = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    for r in range(3):
        for c in range(u.shape[1]):
            x = u[0, c] + (v[0, c] - u[0, c]) * t
            q = (torch.round(x / s[r, 0]) + z[r, 0]).clamp(-128, 127)
            e2 = (((q - z[r, 0]) * s[r, 0] - x) ** 2).mean() * (v[0, c] - u[0, c])
            assert float(got[r, c]) == pytest.approx(float(e2), rel=1e-3, abs=1e-12)


def _bin_integral_errors(obs, lo, hi):
    """The expected squared error of each candidate range under the observer's histogram, integrated bin by bin (slow, exact)."""
    counts, h_lo, h_hi = obs._hist_without_zeros()
    width = (h_hi - h_lo) / obs.bins
    nz = counts > 0
    u = (h_lo + width * torch.arange(obs.bins, dtype=torch.float64))[nz]
    density = counts[nz] / width
    qp = qparams_from_range(lo.to(torch.float32), hi.to(torch.float32), obs.dtype, symmetric=obs.symmetric, quant_min=obs.quant_min, quant_max=obs.quant_max)
    s, z = qp.scale.to(torch.float64)[:, None], qp.zero_point.to(torch.float64)[:, None]
    out = [
        (_sq_error_integral(u[None], (u + width)[None], s[k : k + 64], z[k : k + 64], obs.quant_min, obs.quant_max) * density[None]).sum(1)
        for k in range(0, s.shape[0], 64)
    ]
    return torch.cat(out)


def _reference_mse_range(obs):
    """The per-tensor search as first written: every candidate of the coarse and the local grid integrated over all 2048 bins."""
    lo0, hi0 = min(float(obs.min_val), 0.0), max(float(obs.max_val), 0.0)
    if obs.symmetric:
        lo0, hi0 = -max(-lo0, hi0), max(-lo0, hi0)
    base = HistogramMSEObserver._BASE_RATIOS

    def evaluate(a, b):
        return _bin_integral_errors(obs, a * lo0, b * hi0)

    def around(r):
        i = min(int(torch.searchsorted(base, torch.tensor(r, dtype=torch.float64))), base.numel() - 1)
        return float(base[max(i - 1, 0)]), float(base[min(i + 1, base.numel() - 1)])

    if obs.symmetric:
        err = evaluate(base, base)
        fine = torch.linspace(*around(float(base[int(err.argmin())])), 41, dtype=torch.float64)
        r_lo = r_hi = float(fine[int(evaluate(fine, fine).argmin())])
    else:
        ones = torch.ones_like(base)
        r_lo_c, r_hi_c = torch.cat([base, ones, base]), torch.cat([base, base, ones])
        err = evaluate(r_lo_c, r_hi_c)
        k = int(err.argmin())
        ga, gb = torch.meshgrid(
            torch.linspace(*around(float(r_lo_c[k])), 21, dtype=torch.float64), torch.linspace(*around(float(r_hi_c[k])), 21, dtype=torch.float64), indexing="ij"
        )
        ga, gb = ga.reshape(-1), gb.reshape(-1)
        fine_err = evaluate(ga, gb)
        k2 = int(fine_err.argmin())
        r_lo, r_hi = (float(ga[k2]), float(gb[k2])) if float(fine_err[k2]) <= float(err[k]) else (float(r_lo_c[k]), float(r_hi_c[k]))
    return torch.tensor(r_lo * lo0, dtype=torch.float32), torch.tensor(r_hi * hi0, dtype=torch.float32)


def _realistic(name, n=100_000):
    g = torch.Generator().manual_seed(1234)
    if name == "gaussian":
        return torch.randn(n, generator=g) * 0.7 + 0.2
    if name == "laplace":
        u = torch.rand(n, generator=g) - 0.5
        return -torch.sign(u) * torch.log1p(-2 * u.abs())
    if name == "relu":  # about half exact zeros
        return (torch.randn(n, generator=g) * 2 + 0.3).relu()
    if name == "student_t":  # long tails
        return torch.randn(n, generator=g) / torch.sqrt(torch.distributions.Chi2(2.5).sample((n,)) / 2.5)
    if name == "outliers":  # a gaussian bulk and a few far outliers, one side
        x = torch.randn(n, generator=g)
        x[:30] = 40 + torch.rand(30, generator=g) * 20
        return x
    if name == "bimodal":
        return torch.cat([torch.randn(n // 3, generator=g) * 0.3 - 2.5, torch.randn(n - n // 3, generator=g) * 0.8 + 4.0])
    raise ValueError(name)


REALISTIC = ["gaussian", "laplace", "relu", "student_t", "outliers", "bimodal"]
SEARCH_CONFIGS = {  # name: make_observer options
    "u8_affine": dict(dtype=torch.uint8),
    "i8_sym": dict(dtype=torch.int8, symmetric=True),
    "u4_affine": dict(dtype=torch.uint8, bits=4),
    "i4_sym": dict(dtype=torch.int8, symmetric=True, bits=4),
    "i4_affine": dict(dtype=torch.int8, bits=4),
    "i16_10bit_sym": dict(dtype=torch.int16, symmetric=True, bits=10),
    "i16_sym": dict(dtype=torch.int16, symmetric=True),  # 65536 levels: still integrated over the bins
}


@pytest.mark.parametrize("config", list(SEARCH_CONFIGS))
def test_fast_mse_search_matches_the_exhaustive_reference(config):
    # the per-tensor search evaluates each candidate in O(levels) instead of O(bins); the ranges it
    # picks must be as good as the bin-by-bin search's (within 0.5% expected error, in practice equal)
    torch.manual_seed(0)
    for name in REALISTIC:
        x = _realistic(name)
        obs = make_observer("histogram_mse", **SEARCH_CONFIGS[config])
        for chunk in x.chunk(3):
            obs(chunk)
        lo, hi = obs._range()
        ref_lo, ref_hi = _reference_mse_range(obs)
        e, e_ref = _bin_integral_errors(obs, torch.stack([lo, ref_lo]), torch.stack([hi, ref_hi])).tolist()
        assert e <= e_ref * 1.005 + 1e-12, (name, e, e_ref, (float(lo), float(hi)), (float(ref_lo), float(ref_hi)))
        # and on the data itself (not just under the histogram's piecewise-uniform model)
        mse = lambda a, b: fq_mse(qparams_from_range(a, b, obs.dtype, symmetric=obs.symmetric, quant_min=obs.quant_min, quant_max=obs.quant_max), x)  # noqa: E731
        assert mse(lo, hi) <= mse(ref_lo, ref_hi) * 1.01 + 1e-12, name


def test_grid_errors_equal_the_bin_integrals():
    # the O(levels) form of the expected error against the bin-by-bin integral, for random candidates,
    # including grids reaching beyond the histogram on either side and histograms away from 0
    torch.manual_seed(0)
    data = [torch.randn(50_000), (torch.randn(50_000) * 3).relu() ** 2, torch.rand(50_000) + 100.0, -torch.rand(50_000) * 3 - 1, heavy_tailed(50_000)]
    for x in data:
        for options in (dict(), dict(dtype=torch.int8, symmetric=True), dict(bits=4), dict(dtype=torch.int8, bits=2), dict(dtype=torch.int16, bits=11)):
            obs = make_observer("histogram_mse", **options)
            obs(x)
            counts, h_lo, h_hi = obs._hist_without_zeros()
            lo0, hi0 = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
            ra, rb = torch.rand(200, dtype=torch.float64) ** 3, torch.rand(200, dtype=torch.float64) ** 3
            ra[:2], rb[:2] = 1.0, 1.0
            lo, hi = ra * lo0 - torch.rand(200, dtype=torch.float64) * (ra < 0.1), rb * hi0 + torch.rand(200, dtype=torch.float64) * (rb < 0.1)
            ref = _bin_integral_errors(obs, lo, hi)
            qp = qparams_from_range(lo.to(torch.float32), hi.to(torch.float32), obs.dtype, symmetric=obs.symmetric, quant_min=obs.quant_min, quant_max=obs.quant_max)
            width = (h_hi - h_lo) / obs.bins
            got = _grid_sq_errors(_grid_error_table(counts), h_lo, width, qp.scale.double(), qp.zero_point.double(), obs.quant_min, obs.quant_max)
            torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-9 * float(ref.max()))


@pytest.mark.parametrize("bits", [None, 4])
def test_per_channel_mse_search_for_weights(bits):
    w = torch.randn(32, 2048)
    w[::4] = torch.distributions.StudentT(3.0).sample((8, 2048))  # heavy tails in every fourth channel
    mm = make_observer("minmax", dtype=torch.int8, symmetric=True, axis=0, bits=bits)
    obs = make_observer("histogram_mse", dtype=torch.int8, symmetric=True, axis=0, bits=bits)
    for _ in range(3):  # weights are observed on every calibration batch: stored once
        mm(w)
        obs(w)
    assert obs.data.shape == (32, 2048) and int(obs.num_batches) == 3
    qm, qs = mm.qparams(), obs.qparams()
    per_ch = lambda qp: ((qp.fake_quantize(w) - w) ** 2).mean(1)  # noqa: E731
    assert bool((per_ch(qs) <= per_ch(qm) * (1 + 1e-6)).all())  # ratio 1 (min/max) is a candidate
    if bits == 4:  # at 4 bits clipping pays off, most on the heavy-tailed channels
        assert float(per_ch(qs).mean()) < 0.7 * float(per_ch(qm).mean())
        assert float(per_ch(qs)[::4].mean()) < 0.5 * float(per_ch(qm)[::4].mean())
    ratio = qs.scale / qm.scale
    assert float(ratio.min()) >= 0.3 - 1e-6 and float(ratio.max()) <= 1 + 1e-6
    # exhaustive check on two channels
    grid = torch.linspace(0.3, 1.0, 100)
    for c in (4, 5):
        top = w[c].abs().max()
        errs = [fq_mse(qparams_from_range(-r * top, r * top, torch.int8, symmetric=True, quant_min=qm.quant_min, quant_max=qm.quant_max), w[c]) for r in grid]
        assert float(per_ch(qs)[c]) == pytest.approx(min(errs), rel=1e-5)


def test_per_channel_mse_keeps_distinct_batches_up_to_the_cap():
    obs = make_observer("histogram_mse", dtype=torch.int8, symmetric=True, axis=1, max_samples=4 * 100)
    for _ in range(5):
        obs(torch.randn(10, 4, 3))
    assert obs.data.shape == (4, 100)  # 150 columns seen, capped at 100 per channel
    assert obs.qparams().axis == 1


# ---------------------------------------------------------------------------------------------
# histogram growth


@pytest.mark.parametrize("kind", HIST_KINDS)
@pytest.mark.parametrize("config", ["u8_affine", "i8_sym"])
def test_histogram_growth_matches_one_batch(kind, config):
    dtype, symmetric = CONFIGS[config]
    batches = [torch.randn(20_000), torch.randn(20_000) * 4 + 3, torch.randn(20_000) * 0.5 - 6, torch.distributions.Laplace(0.0, 2.0).sample((20_000,))]
    grown = make_observer(kind, dtype=dtype, symmetric=symmetric)
    for b in batches:
        grown(b)
    whole = make_observer(kind, dtype=dtype, symmetric=symmetric)
    x = torch.cat(batches)
    whole(x)
    qg, qw = grown.qparams(), whole.qparams()
    tol = 0.1 if kind == "entropy" else 0.03  # entropy's KL curve is flat and bumpy near its minimum
    assert float(qg.scale) == pytest.approx(float(qw.scale), rel=tol)
    assert abs(int(qg.zero_point) - int(qw.zero_point)) <= 3
    assert fq_mse(qg, x) == pytest.approx(fq_mse(qw, x), rel=tol)


def test_histogram_growth_rebins_exactly():
    obs = make_observer("histogram_mse", bins=256)
    a, b, c = torch.rand(10_000), torch.rand(10_000) * 3 - 2.5, torch.rand(10_000) * 10
    for t in (a, b, c):
        obs(t)
    x = torch.cat([a, b, c])
    assert float(obs.histogram.sum()) == x.numel()
    lo, hi = float(obs.hist_min), float(obs.hist_max)
    assert lo <= float(x.min()) and hi >= float(x.max())
    assert (float(x.max()) - float(x.min())) >= 0.5 * (hi - lo) * (1 - 1e-6)  # at least half the bins used
    direct = _bin_counts(x, lo, hi, 256).double()
    # old bins map whole into new ones: only values within float rounding of an edge may move
    assert float((obs.histogram - direct).abs().sum()) <= 1e-3 * x.numel()
    assert float(obs.min_val) == float(x.min()) and float(obs.max_val) == float(x.max())


def test_histogram_handles_constant_and_tiny_first_batches():
    obs = make_observer("histogram_mse")
    obs(torch.zeros(1000))
    obs(torch.full((10,), 1e-3))
    obs(torch.randn(1000) * 5)
    qp = obs.qparams()
    assert float(obs.histogram.sum()) == 2010 and bool(torch.isfinite(qp.scale))
    assert_zero_exact(qp)
    allzero = make_observer("entropy")
    allzero(torch.zeros(100))
    assert_zero_exact(allzero.qparams())


# ---------------------------------------------------------------------------------------------
# moving average


@pytest.mark.parametrize("axis", [None, 1])
def test_moving_average_follows_the_definition(axis):
    c = 0.1
    obs = make_observer("moving_average", axis=axis, averaging_constant=c)
    batches = [torch.randn(8, 3, 5) * (i + 1) + i for i in range(6)]
    dims = None if axis is None else (0, 2)
    bmin = lambda b: b.min() if dims is None else b.amin(dim=dims)  # noqa: E731
    bmax = lambda b: b.max() if dims is None else b.amax(dim=dims)  # noqa: E731
    lo, hi = bmin(batches[0]), bmax(batches[0])
    for b in batches[1:]:
        lo = lo + c * (bmin(b) - lo)
        hi = hi + c * (bmax(b) - hi)
    for b in batches:
        obs(b)
    torch.testing.assert_close(obs.min_val, lo)
    torch.testing.assert_close(obs.max_val, hi)
    assert obs.averaging_constant == c and make_observer("moving_average").averaging_constant == 0.01


# ---------------------------------------------------------------------------------------------
# what is not recorded


@pytest.mark.parametrize("kind", KINDS)
def test_fake_meta_and_disabled_inputs_change_nothing(kind):
    from torch._subclasses.fake_tensor import FakeTensorMode

    obs = make_observer(kind)
    obs(torch.randn(1000))
    before = copy.deepcopy(obs.state_dict())
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.randn(1000) * 100)
        assert obs(fake) is fake
        made_inside = torch.randn(1000) * 100  # a fake tensor too, created under the mode
        assert obs(made_inside) is made_inside
    meta = torch.empty(1000, device="meta")
    assert obs(meta) is meta
    obs.enabled = False
    real = torch.randn(1000) * 100
    assert obs(real) is real
    after = obs.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    obs.enabled = True
    obs(real)
    assert int(obs.num_batches) == 2


class _Observed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.obs = make_observer("histogram_mse")
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(self.obs(x))


def test_calibrating_through_torch_compile_records_and_export_does_not():
    m = _Observed()
    compiled = torch.compile(m, backend="eager")
    compiled(torch.randn(2, 4))
    compiled(torch.randn(2, 4) * 3)
    assert int(m.obs.num_batches) == 2  # recorded outside the graph
    for strict in (False, True):
        ep = torch.export.export(m, (torch.randn(2, 4) * 100,), strict=strict)
        assert int(m.obs.num_batches) == 2 and float(m.obs.max_val) < 50
        assert not any("aminmax" in str(n.target) or "bincount" in str(n.target) for n in ep.graph.nodes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind,axis", [(k, None) for k in KINDS] + [(k, 0) for k in PER_CHANNEL])
def test_observers_follow_the_input_device(kind, axis):
    obs = make_observer(kind, axis=axis, dtype=torch.int8, symmetric=True)
    x = torch.randn(8, 1000, device="cuda")
    obs(x)
    obs(x * 2)
    qp = obs.qparams()
    assert qp.scale.device.type == "cuda" and all(b.device.type == "cuda" for b in obs.buffers())
    cpu = make_observer(kind, axis=axis, dtype=torch.int8, symmetric=True)
    cpu(x.cpu())
    cpu(x.cpu() * 2)
    torch.testing.assert_close(qp.scale.cpu(), cpu.qparams().scale, rtol=1e-3, atol=0)


def test_nonfinite_values_are_ignored():
    for kind in ("minmax", "histogram_mse"):
        obs = make_observer(kind)
        x = torch.randn(1000)
        x[::100] = math.nan
        x[5] = math.inf
        with pytest.warns(RuntimeWarning, match="NaN or inf"):
            obs(x)
        qp = obs.qparams()
        assert bool(torch.isfinite(qp.scale)) and float(obs.max_val) < 10
    pc = make_observer("minmax", axis=0)
    y = torch.randn(4, 10)
    y[1, 3] = -math.inf
    with pytest.warns(RuntimeWarning):
        pc(y)
    assert bool(torch.isfinite(pc.min_val).all())


@pytest.mark.parametrize("kind,axis", [("minmax", None), ("minmax", 0), ("histogram_mse", None), ("histogram_mse", 0), ("moving_average", 0)])
def test_calibrating_under_inference_mode_keeps_normal_buffers(kind, axis):
    obs = make_observer(kind, axis=axis)
    with torch.inference_mode():
        obs(torch.randn(4, 100))
        obs(torch.randn(4, 100) * 3)
    assert not any(b.is_inference() for b in obs.buffers())
    obs(torch.randn(4, 100) * 5)  # in place, outside inference mode
    assert int(obs.num_batches) == 3 and obs.qparams() is not None


def test_low_precision_inputs_and_bad_inputs():
    obs = make_observer("histogram_mse")
    x = torch.randn(1000, dtype=torch.bfloat16)
    assert obs(x) is x
    assert obs.min_val.dtype == torch.float32
    with pytest.raises(TypeError, match="floating-point"):
        obs(torch.arange(10))
    pc = make_observer("minmax", axis=1)
    pc(torch.randn(2, 3))
    with pytest.raises(ValueError, match="channels"):
        pc(torch.randn(2, 4))
    with pytest.raises(ValueError, match="out of range"):
        make_observer("minmax", axis=3)(torch.randn(2, 3))


# ---------------------------------------------------------------------------------------------
# errors and configuration


@pytest.mark.parametrize("kind", KINDS)
def test_never_calibrated_raises_a_helpful_error(kind):
    obs = make_observer(kind)
    assert not obs.calibrated
    with pytest.raises(CalibrationError, match="run calibration batches through the prepared model first") as info:
        obs.qparams()
    assert kind in str(info.value)
    obs(torch.empty(0))  # an empty batch is not calibration
    assert not obs.calibrated


def test_unknown_kind_and_bad_options():
    with pytest.raises(ValueError, match=r"did you mean 'minmax'.*known kinds: minmax, moving_average"):
        make_observer("minmx")
    with pytest.raises(ValueError, match="known kinds"):
        make_observer("kl")
    assert type(make_observer("histogram-mse")).kind == "histogram_mse"
    with pytest.raises(TypeError, match="takes no option 'bins'.*its options: bits, quant_min, quant_max"):
        make_observer("minmax", bins=100)
    with pytest.raises(TypeError, match="did you mean 'percentile'"):
        make_observer("percentile", percentil=99.0)
    with pytest.raises(TypeError, match="kind must be a string"):
        make_observer(3)
    with pytest.raises(TypeError, match="symmetric"):
        make_observer("minmax", symmetric="yes")
    with pytest.raises(TypeError, match="bins must be an int"):
        make_observer("entropy", bins=2048.0)
    with pytest.raises(ValueError, match="uint8, torch.int8 or torch.int16"):
        make_observer("minmax", dtype=torch.float32)
    with pytest.raises(ValueError, match="bits must be between 2 and 8"):
        make_observer("minmax", dtype=torch.int8, bits=9)
    with pytest.raises(ValueError, match="either bits or quant_min"):
        make_observer("minmax", bits=4, quant_min=0)
    with pytest.raises(ValueError, match="below quant_max"):
        make_observer("minmax", quant_min=10, quant_max=5)
    with pytest.raises(ValueError, match="percentile must be in"):
        make_observer("percentile", percentile=150)
    with pytest.raises(ValueError, match="averaging_constant"):
        make_observer("moving_average", averaging_constant=0.0)
    assert set(OBSERVERS) == {"minmax", "moving_average", "histogram_mse", "entropy", "percentile"}
    assert all(issubclass(cls, Observer) and isinstance(cls(), torch.nn.Module) for cls in OBSERVERS.values())


def test_extra_repr():
    obs = make_observer("histogram_mse", dtype=torch.int8, symmetric=True)
    assert "kind=histogram_mse" in repr(obs) and "range=None" in repr(obs) and "batches=0" in repr(obs)
    obs(torch.tensor([-1.5, 2.0]))
    text = repr(obs)
    assert "dtype=torch.int8" in text and "range=[-1.5, 2]" in text and "batches=1" in text
    pc = make_observer("minmax", axis=0, bits=4, dtype=torch.int8)
    pc(torch.randn(3, 4))
    assert "channels=3" in repr(pc) and "bits=4" in repr(pc)


# ---------------------------------------------------------------------------------------------
# state


CASES = [(kind, None) for kind in KINDS] + [(kind, 0) for kind in PER_CHANNEL]


@pytest.mark.parametrize("kind,axis", CASES)
def test_state_dict_round_trip_and_deepcopy(kind, axis):
    obs = make_observer(kind, dtype=torch.int8, symmetric=True, axis=axis)
    obs(torch.randn(8, 50))
    obs(torch.randn(8, 50) * 2)
    fresh = make_observer(kind, dtype=torch.int8, symmetric=True, axis=axis)
    fresh.load_state_dict(obs.state_dict())
    assert fresh.calibrated and int(fresh.num_batches) == 2
    for other in (fresh, copy.deepcopy(obs)):
        a, b = obs.qparams(), other.qparams()
        assert torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point) and a.axis == b.axis
    # a loaded observer keeps calibrating where the original left off
    fresh(torch.randn(8, 50))
    assert int(fresh.num_batches) == 3


def test_negative_axis_survives_state_dict():
    obs = make_observer("minmax", axis=-1)
    obs(torch.randn(2, 3, 4))
    fresh = make_observer("minmax", axis=-1)
    fresh.load_state_dict(obs.state_dict())
    assert fresh.qparams().axis == 2 and fresh.qparams().scale.shape == (4,)


# ---------------------------------------------------------------------------------------------
# distributed


@pytest.mark.parametrize("kind,axis", CASES)
def test_all_reduce_is_a_noop_without_torch_distributed(kind, axis):
    import torch.distributed as dist

    assert not (dist.is_available() and dist.is_initialized())
    obs = make_observer(kind, axis=axis)
    assert obs.all_reduce_() is obs  # uncalibrated
    obs(torch.randn(4, 100))
    before = copy.deepcopy(obs.state_dict())
    assert obs.all_reduce_() is obs
    for k, v in obs.state_dict().items():
        assert torch.equal(v, before[k])


DIST_CASES = {
    "minmax": ("minmax", {}),
    "minmax_pc": ("minmax", {"axis": 1}),
    "minmax_one_rank": ("minmax", {"dtype": torch.int8, "symmetric": True}),  # rank 1 sees nothing
    "moving_average": ("moving_average", {}),
    "moving_average_pc": ("moving_average", {"axis": 1, "dtype": torch.int8, "symmetric": True}),
    "histogram_mse": ("histogram_mse", {}),
    "histogram_mse_pc": ("histogram_mse", {"axis": 1, "dtype": torch.int8, "symmetric": True}),
    "histogram_mse_weight": ("histogram_mse", {"axis": 0, "dtype": torch.int8, "symmetric": True}),
    "entropy": ("entropy", {}),
    "entropy_relu": ("entropy", {}),
    "histogram_mse_relu": ("histogram_mse", {}),
    "percentile": ("percentile", {"dtype": torch.int8, "symmetric": True}),
}


def _dist_data():
    g = torch.Generator().manual_seed(1)
    data = {}
    weight = torch.randn(6, 20, generator=g)
    for name in DIST_CASES:
        if name == "histogram_mse_weight":
            data[name] = [[weight, weight], [weight]]
            continue
        ranks = []
        for r in range(2):  # the ranks see data of different ranges
            ranks.append([torch.randn(16, 6, generator=g) * (1 + 2 * r) + r * (2.0 if "pc" not in name else 0.0) for _ in range(3)])
            if name.endswith("relu"):
                ranks[-1] = [b.relu() for b in ranks[-1]]
        if name == "minmax_one_rank":
            ranks[1] = []
        data[name] = ranks
    return data


def _observe_all(name, batches):
    kind, opts = DIST_CASES[name]
    obs = make_observer(kind, **opts)
    for b in batches:
        obs(b)
    return obs


def _dist_worker(rank, world, port, outdir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        out = {}
        for name, ranks in _dist_data().items():
            obs = _observe_all(name, ranks[rank])
            obs.all_reduce_()
            qp = obs.qparams()
            out[name] = (qp.scale, qp.zero_point, int(obs.num_batches), obs.state_dict())
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_all_reduce_with_two_gloo_processes(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    # fork where available: the workers start with torch and fxpress already imported (seconds
    # saved per process); they use only the CPU, so forking is safe even after CUDA was used here
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_dist_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method=method)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    data = _dist_data()
    for name in DIST_CASES:
        (s0, z0, n0, sd0), (s1, z1, n1, _) = r0[name], r1[name]
        assert torch.equal(s0, s1) and torch.equal(z0, z1), name  # every rank computes identical qparams
        assert n0 == n1 == sum(len(b) for b in data[name])
        if name.startswith("moving_average"):
            a, b = _observe_all(name, data[name][0]), _observe_all(name, data[name][1])
            kind, opts = DIST_CASES[name]
            ref = qparams_from_range((a.min_val + b.min_val) / 2, (a.max_val + b.max_val) / 2, opts.get("dtype", torch.uint8), symmetric=opts.get("symmetric", False), axis=opts.get("axis"))
            torch.testing.assert_close(s0, ref.scale)
            assert torch.equal(z0, ref.zero_point), name
            continue
        single = _observe_all(name, data[name][0] + data[name][1])
        ref = single.qparams()
        if name.startswith("minmax") or name in ("histogram_mse_pc", "histogram_mse_weight"):  # exact statistics
            torch.testing.assert_close(s0, ref.scale, rtol=1e-6, atol=0)
            assert torch.equal(z0, ref.zero_point), name
        else:  # histograms re-binned onto a common range
            assert float(s0) == pytest.approx(float(ref.scale), rel=0.05), name
            assert abs(int(z0) - int(ref.zero_point)) <= 3, name
            assert float(sd0["histogram"].sum()) == float(single.histogram.sum())
            assert float(sd0["min_val"]) == float(single.min_val) and float(sd0["max_val"]) == float(single.max_val)
            assert float(sd0["zeros"]) == float(single.zeros)
    # identical weights on both ranks are kept once
    assert r0["histogram_mse_weight"][3]["data"].shape == (6, 20)
