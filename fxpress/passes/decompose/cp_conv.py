"""cp-conv: CP decomposition of a convolution into 1x1 -> depthwise kh x kw (its kernel the product of
the two spatial CP factors; or kh x 1 -> 1 x kw with ``depthwise="separable"``) -> 1x1.

Before::

    y = aten.conv2d(x, W[Co, Ci/g, kh, kw], b, [sh, sw], [ph, pw], [dh, dw], g)

After (rank r per group; ``depthwise="fused"``, the default)::

    t = aten.conv2d(x, B^T[g*r, Ci/g, 1, 1], None, [1, 1], [0, 0], [1, 1], g)
    k = aten.mul(C^T[g*r, 1, kh, 1], D^T[g*r, 1, 1, kw])                           # [g*r, 1, kh, kw]
    t = aten.conv2d(t, k, None, [sh, sw], [ph, pw], [dh, dw], g*r)                  # one depthwise pass
    y = aten.conv2d(t, (A*lambda)[Co, r, 1, 1], b, [1, 1], [0, 0], [1, 1], g)

or, with ``depthwise="separable"`` (Lebedev et al.'s form, and TensorLy-Torch's)::

    t = aten.conv2d(t, C^T[g*r, 1, kh, 1], None, [sh, 1], [ph, 0], [dh, 1], g*r)   # depthwise kh x 1
    t = aten.conv2d(t, D^T[g*r, 1, 1, kw], None, [1, sw], [0, pw], [1, dw], g*r)   # depthwise 1 x kw

with ``W[o, i, h, w] ~ sum_r lambda_r A[o, r] B[i, r] C[h, r] D[w, r]`` per group (Lebedev et al. 2015),
from tensorly's ``parafac`` (CP-ALS). Stride, padding and dilation split by axis as in spatial-svd-conv.

Why fused by default: both forms store the same numbers (the factors C and D, r*(kh + kw) per
group), compute the same function, and differ only in how the depthwise part runs. On CPU a
depthwise convolution is memory-bound, so one kh x kw pass over the r channels beats a kh x 1 pass
plus a 1 x kw pass although it does kh*kw instead of kh + kw multiply-adds per pixel: measured on
this project's 2-core AVX-512 machine, eager PyTorch, one thread, batch 1, the whole chain
1x1 -> depthwise -> 1x1: 64->64 3x3 at 56x56, rank 69: 0.99 ms fused vs 3.0 ms separable; rank 141
at 28x28: 0.76 vs 0.91 ms; 64->128 at 112x112, rank 93: 14.9 vs 18.6 ms; the 3->64 7x7 stride-2
stem at 224x224, rank 30: 3.5 vs 11.4 ms. The product ``k`` is computed on every call (r*kh*kw
multiplies; TensorLy-Torch likewise rebuilds its Tucker core from factors on every call);
``fold-constants`` (``fxpress.quantize`` runs it) stores it instead, which adds r*(kh*kw - kh - kw)
numbers per group. MACs are counted for the convolution that runs (kh*kw per output pixel and channel).

CP-ALS is iterative and may not converge. Limits: ``iterations`` per attempt and ``time_limit``
seconds per layer (checked through parafac's callback); ``restarts`` attempts (the first from the
SVD initialization, the others random), the best kept. A layer whose best attempt is not finite, or
did not converge and is worse than Tucker-2 at the same parameter count, is decomposed by Tucker-2
instead (the record says so). 1x1 kernels are left to tucker-conv.

Rank rules: an int; a ratio of the parameters; ``energy=``/``"evbmf"`` take the larger of the two
Tucker mode ranks the rule gives (as jacobgil's scripts do), since CP ranks have no spectrum.

Numerics: not exact at any rank in general (a CP rank is not bounded by the unfoldings); the
achieved weight error and the output error are reported.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from ..base import register_pass
from .activations import LayerInputs
from .common import DecomposePass
from .layers import Layer
from .ops import Conv, Factorization, padded_conv
from .tucker_conv import TuckerAnalysis, TuckerConv

__all__ = ["CpConv"]


def cp_cost(layer: Layer, r: int, fused: bool = True) -> tuple[int, int]:
    g, ci, co = layer.groups, layer.in_features // layer.groups, layer.out_features
    kh, kw = layer.kernel
    n = layer.batch
    (hi, wi), (ho, wo) = layer.in_hw, layer.out_hw
    bias = layer.bias.numel() if layer.bias is not None else 0
    R = g * r
    params = R * ci + R * kh + R * kw + co * r + bias
    depthwise = ho * wo * R * kh * kw if fused else ho * wi * R * kh + ho * wo * R * kw
    macs = n * (hi * wi * R * ci + depthwise + ho * wo * co * r)
    return params, macs


@register_pass
class CpConv(DecomposePass):
    """CP (1x1 -> depthwise kh x kw from two stored factors -> 1x1) of convolutions: see the module docstring.

    iterations: CP-ALS iterations per attempt; time_limit: seconds per layer over all attempts;
    restarts: attempts (SVD init, then random); tol: the convergence threshold on the change of the
    relative error between iterations; seed: of the random restarts; fallback: use Tucker-2 when CP fails.
    depthwise: "fused" (one depthwise kh x kw pass, its kernel computed from the factors) or
        "separable" (kh x 1 then 1 x kw); see the module docstring.
    curve_points: how many ranks a model-wide budget tries per layer (each one CP-ALS run; see
        ``curve``): CP's errors are only known after decomposing.
    """

    name = "cp-conv"
    method = "cp"
    kinds = ("conv2d",)

    def __init__(self, rank: Any = None, *, iterations: int = 200, time_limit: float = 20.0, restarts: int = 2,
                 tol: float = 1e-6, seed: int = 0, fallback: bool = True, depthwise: str = "fused", curve_points: int = 4,
                 **options):
        super().__init__(rank, **options)
        if depthwise not in ("fused", "separable"):
            raise ValueError(f"depthwise must be 'fused' or 'separable', got {depthwise!r}")
        if isinstance(curve_points, bool) or not isinstance(curve_points, int) or curve_points < 1:
            raise ValueError(f"curve_points must be an integer >= 1, got {curve_points!r}")
        self.fused = depthwise == "fused"
        self.curve_points = curve_points
        for name, v in (("iterations", iterations), ("restarts", restarts)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or tol <= 0:
            raise ValueError(f"tol must be a number > 0 (tensorly's parafac needs one to report its errors), got {tol!r}")
        if not isinstance(time_limit, (int, float)) or time_limit <= 0:
            raise ValueError(f"time_limit must be a number of seconds > 0, got {time_limit!r}")
        self.iterations, self.time_limit, self.restarts = iterations, float(time_limit), restarts
        self.tol, self.seed, self.fallback = float(tol), seed, fallback
        self._tucker = TuckerConv(round_to=self.round_to)

    def applicable(self, layer: Layer) -> str | None:
        if layer.kernel == (1, 1):
            return "1x1 kernel: CP adds nothing to an SVD (use tucker-conv or svd)"
        if layer.groups > 1 and layer.in_features // layer.groups == 1:
            return "depthwise convolution: one input channel per group, nothing to factor"
        return None

    def analyze(self, layer: Layer, inputs: LayerInputs | None) -> TuckerAnalysis:
        return self._tucker.analyze(layer, inputs)

    def full_rank(self, layer: Layer) -> int:
        g = layer.groups
        co, ci = layer.out_features // g, layer.in_features // g
        kh, kw = layer.kernel
        return max(1, min(co * ci * kh * kw // max(co + ci + kh + kw, 1) + 1, 4096))

    def normalize_rank(self, layer: Layer, rank: Any) -> int:
        r = rank[0] if isinstance(rank, (tuple, list)) else rank
        return max(1, int(r))

    def cost(self, layer: Layer, rank: int) -> tuple[int, int]:
        return cp_cost(layer, rank, self.fused)

    def curve(self, layer: Layer, a: TuckerAnalysis) -> list[tuple[int, float]]:
        """Errors at ``curve_points`` ranks for a model-wide budget: the largest ranks keeping 3/4, 3/8,
        3/16, ... of the layer's parameters, each decomposed (CP-ALS, time-limited, cached: the
        pass re-uses the rank the plan takes). A rank where CP falls back to Tucker-2 is left out."""
        p0 = layer.params()
        ranks = []
        for i in range(self.curve_points):
            fits = self.frontier(layer, 0.75 * p0 / 2**i)
            if fits and fits[-1] not in ranks:
                ranks.append(fits[-1])
        out = []
        for r in sorted(ranks):
            fac = self.cached_factorization(layer, r, a)
            if fac.method == self.method and fac.weight_error is not None:
                out.append((r, fac.weight_error))
        return out

    def energy_rank(self, layer: Layer, a: TuckerAnalysis, energy: float) -> int:
        return max(self._tucker.energy_rank(layer, a, energy))

    def evbmf_rank(self, layer: Layer, a: TuckerAnalysis) -> tuple[int, list[str]]:
        rank, notes = self._tucker.evbmf_rank(layer, a)
        return max(rank), notes

    def _parafac(self, Wg: torch.Tensor, r: int, deadline: float) -> tuple[Any, float, bool, int]:
        """Best of the restarts: (cp tensor, relative error, converged, iterations)."""
        import tensorly as tl
        from tensorly.decomposition import parafac

        best = None
        for attempt in range(self.restarts):
            if attempt and time.perf_counter() > deadline:
                break
            errors: list[float] = []
            timed_out = [False]

            def callback(_cp, err, errors=errors, timed_out=timed_out):
                errors.append(float(err))
                timed_out[0] = time.perf_counter() > deadline
                return timed_out[0]

            init = "svd" if attempt == 0 else "random"
            with tl.backend_context("pytorch"):
                try:
                    cp = parafac(Wg, r, n_iter_max=self.iterations, init=init, tol=self.tol,
                                 random_state=self.seed + attempt, callback=callback, normalize_factors=True)
                    rec = tl.cp_to_tensor(cp)
                except (RuntimeError, ValueError, FloatingPointError, np.linalg.LinAlgError):
                    continue
            norm = float(Wg.norm())
            err = float((rec - Wg).norm()) / norm if norm > 0 else 0.0
            if not math.isfinite(err):
                continue
            # tensorly stops when the error changes by less than tol; the callback also saw the init
            converged = not timed_out[0] and len(errors) >= 3 and abs(errors[-1] - errors[-2]) < self.tol
            if best is None or err < best[1]:
                best = (cp, err, converged, max(len(errors) - 1, 0))
        return best if best is not None else (None, float("inf"), False, 0)

    def factorize(self, layer: Layer, rank: int, a: TuckerAnalysis) -> Factorization:
        g = layer.groups
        co = layer.out_features // g
        W = layer.weight.detach().double()
        deadline = time.perf_counter() + self.time_limit
        per_group = []
        worst_err, all_converged, iters = 0.0, True, 0
        for Wg in W.chunk(g, 0):
            cp, err, converged, n = self._parafac(Wg.contiguous(), rank, deadline)
            if cp is None:
                per_group = None
                break
            per_group.append(cp)
            worst_err, iters = max(worst_err, err), max(iters, n)
            all_converged &= converged
        notes: list[str] = []
        if per_group is not None:
            A, B, C, D = [], [], [], []
            for cp in per_group:
                lam, (fa, fb, fc, fd) = cp
                A.append(fa * lam[None, :])
                B.append(fb)
                C.append(fc)
                D.append(fd)
            W_hat = torch.cat([torch.einsum("or,ir,hr,wr->oihw", a_, b_, c_, d_) for a_, b_, c_, d_ in zip(A, B, C, D)])
            err = ((W_hat - W).norm() / W.norm()).item() if W.norm() > 0 else 0.0
        failed = per_group is None
        if not failed and not all_converged and self.fallback:
            t_rank = self._tucker_at(layer, cp_cost(layer, rank, self.fused)[0], a)
            t_err = self._tucker.predicted_error(layer, a, t_rank) if t_rank is not None else None
            if t_err is not None and t_err < err:
                failed = True
                notes.append(f"CP-ALS did not converge in {iters} iterations / {self.time_limit:g} s (error {err:.3g}); "
                             f"Tucker-2 at the same parameters does better ({t_err:.3g})")
        elif per_group is None:
            notes.append("CP-ALS failed (no finite result in any restart)")
        if failed:
            if not self.fallback:
                raise RuntimeError(f"CP decomposition of {layer.label} failed and fallback=False")
            t_rank = self._tucker_at(layer, cp_cost(layer, rank, self.fused)[0], a)
            if t_rank is None:
                t_rank = self._tucker.normalize_rank(layer, 1)
            fac = self._tucker.factorize(layer, t_rank, a)
            fac.notes = notes + [f"fell back to Tucker-2 ranks {t_rank}"] + fac.notes
            return fac
        if not all_converged:
            notes.append(f"CP-ALS stopped at its limit ({iters} iterations / {self.time_limit:g} s) before converging; kept (better than Tucker-2)")
        dtype = layer.weight.dtype
        first = torch.cat([b.T for b in B])[:, :, None, None].to(dtype)
        col = torch.cat([c.T for c in C])[:, None, :, None].to(dtype)
        row = torch.cat([d.T for d in D])[:, None, None, :].to(dtype)
        last = torch.cat([a_ for a_ in A])[:, :, None, None].reshape(g * co, rank, 1, 1).to(dtype)
        return Factorization(self.method, rank, self._ops(layer, rank, first, col, row, last), weight_error=err, notes=notes)

    def _ops(self, layer: Layer, rank: int, first, col, row, last) -> list:
        g = layer.groups
        (sh, sw), (dh, dw) = layer.stride, layer.dilation
        pads_h, pads_w = layer.pads()
        R = g * rank
        if self.fused:
            depthwise = padded_conv(None, None, (sh, sw), pads_h, pads_w, (dh, dw), R, out_hw=layer.out_hw, outer=(col, row))
        else:
            depthwise = [*padded_conv(col, None, (sh, 1), pads_h, (0, 0), (dh, 1), R, out_hw=layer.mid_hw()),
                         *padded_conv(row, None, (1, sw), (0, 0), pads_w, (1, dw), R, out_hw=layer.out_hw)]
        return [
            Conv(first, None, (1, 1), [0, 0], (1, 1), g),
            *depthwise,
            Conv(last, layer.bias, (1, 1), [0, 0], (1, 1), g, bias_node=layer.bias_node),
        ]

    def template(self, layer: Layer, rank: int) -> list:
        g = layer.groups
        ci, co = layer.in_features // g, layer.out_features // g
        kh, kw = layer.kernel
        R = g * rank
        z = lambda *shape: torch.randn(*shape, dtype=layer.weight.dtype)  # noqa: E731
        return self._ops(layer, rank, z(R, ci, 1, 1), z(R, 1, kh, 1), z(R, 1, 1, kw), z(g * co, rank, 1, 1))

    def _tucker_at(self, layer: Layer, params: int, a: TuckerAnalysis) -> Any:
        """The Tucker-2 ranks with the lowest predicted error at no more than ``params`` parameters."""
        best = None
        for r in self._tucker.candidates(layer):
            p, _ = self._tucker.cost(layer, r)
            if p <= params:
                e = self._tucker.predicted_error(layer, a, r)
                if best is None or e < best[0]:
                    best = (e, r)
        return best[1] if best else None
