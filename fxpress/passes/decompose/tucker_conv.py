"""tucker-conv: Tucker-2 decomposition of a convolution into 1x1 -> kh x kw core -> 1x1.

Before::

    y = aten.conv2d(x, W[Co, Ci/g, kh, kw], b, stride, padding, dilation, g)

After (ranks (r_out, r_in) per group)::

    t = aten.conv2d(x, P[g*r_in, Ci/g, 1, 1], None, [1, 1], [0, 0], [1, 1], g)       # U_in^T
    u = aten.conv2d(t, K[g*r_out, r_in, kh, kw], None, stride, padding, dilation, g)  # the core
    y = aten.conv2d(u, Q[Co, r_out, 1, 1], b, [1, 1], [0, 0], [1, 1], g)             # U_out

with ``W[o, i, h, w] ~ sum_{a, b} U_out[o, a] U_in[i, b] K[a, b, h, w]`` per group: tensorly's
``partial_tucker`` over the two channel modes (HOOI, initialized by the truncated HOSVD; Kim et al.
2016). The first 1x1 has no bias, so padding its output with zeros equals padding the input: stride,
padding, dilation and groups all go on the core unchanged ("same"/"valid" become numbers; an even
kernel's asymmetric "same" the larger side on both and a slice of the extra row/column). Where a rank is the
full channel count, its 1x1 factor is folded into the core (Tucker-1: e.g. the RGB stem keeps its 3
input channels and becomes core -> 1x1).

1x1 kernels: Tucker-2 of a 1x1 kernel is an SVD; the layer becomes two 1x1 convolutions of rank r,
the first carrying stride/padding (``rank`` is then one int).

Cheaper when the factors hold fewer parameters and MACs than the kernel (the first 1x1 runs at the
input resolution, which matters with stride 2); otherwise the layer is left alone.

Numerics: at full ranks the composition equals the convolution up to float rounding; the rank
search ranks by the HOSVD truncation error ``sqrt(1 - ||W x_0 U_out^T x_1 U_in^T||^2 / ||W||^2)``,
which HOOI's result never exceeds; the achieved weight error and the output error are reported.

Data-aware (``data_aware=True`` with calibration inputs; ``fxpress.decompose`` with ``calibration=``):
the spectra and the input factor come from the input-whitened kernel ``W x_in C^(1/2)``, the core and
output factor from a reduced-rank regression of the layer's outputs on the calibration samples
(data_aware.py): the least output error for that input factor, not the least weight error.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

from ..base import register_pass
from .activations import LayerInputs
from .common import DecomposePass
from .layers import Layer
from .ops import Conv, Factorization, padded_conv
from .data_aware import MIN_POSITIONS_PER_UNKNOWN, enough, patch_moments, reduced_rank, whitened_inputs
from .ranks import energy_rank, evbmf_rank, rank_grid, round_rank, svd, gram_eigh

__all__ = ["TuckerConv", "tucker_cost"]


@dataclass
class TuckerAnalysis:
    pointwise: bool
    s_out: list[torch.Tensor]  # per group: mode-0 singular values (pointwise: the matrix's)
    s_in: list[torch.Tensor]
    cum: list[torch.Tensor] | None  # per group: cum[a, b] = energy kept at ranks (a, b) (HOSVD)
    total: float
    U: list[torch.Tensor] | None = None  # pointwise only: the SVD
    Vh: list[torch.Tensor] | None = None
    S: torch.Tensor | None = None  # data-aware: the input whitening C^(1/2), its inverse, the samples
    S_inv: torch.Tensor | None = None
    samples: torch.Tensor | None = None
    note: str = ""  # why a data-aware request was not (fully) honoured


def tucker_cost(layer: Layer, rank: Any) -> tuple[int, int]:
    g, ci, co = layer.groups, layer.in_features // layer.groups, layer.out_features // layer.groups
    kh, kw = layer.kernel
    n = layer.batch
    (hi, wi), (ho, wo) = layer.in_hw, layer.out_hw
    bias = layer.bias.numel() if layer.bias is not None else 0
    if kh == 1 and kw == 1:
        r = rank
        return g * r * ci + g * co * r + bias, n * ho * wo * g * r * (ci + co)
    r_out, r_in = rank
    params = bias + g * r_out * r_in * kh * kw
    macs = n * ho * wo * g * r_out * r_in * kh * kw
    if r_in < ci:
        params += g * r_in * ci
        macs += n * hi * wi * g * r_in * ci
    if r_out < co:
        params += g * co * r_out
        macs += n * ho * wo * g * co * r_out
    return params, macs


def _left(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and values of a wide unfolding, from the Gram matrix ``M M^T``."""
    if M.shape[0] > M.shape[1]:
        U, s, _ = svd(M)
        return U, s
    lam, U = gram_eigh(M)
    return U, lam.sqrt()


def _unfold(W: torch.Tensor, mode: int) -> torch.Tensor:
    return W.movedim(mode, 0).reshape(W.shape[mode], -1)


@register_pass
class TuckerConv(DecomposePass):
    """Tucker-2 (1x1 -> core -> 1x1) of convolutions: see the module docstring.

    iterations: HOOI iterations of ``partial_tucker`` after the HOSVD initialization (past a few, the
        error barely moves: 0.7367 -> 0.7328 -> 0.7323 at 1 / 5 / 20 on a random 256x256x3x3 kernel).
    data_aware: with calibration inputs, minimise the output error on them (data_aware.py).
    damping / ridge: of the input whitening and of the output regression, relative to their scale.
    """

    name = "tucker-conv"
    method = "tucker"
    kinds = ("conv2d",)

    def __init__(self, rank: Any = None, *, iterations: int = 5, data_aware: bool = False, damping: float = 0.01,
                 ridge: float = 1e-4, **options):
        super().__init__(rank, **options)
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"iterations must be an integer >= 0, got {iterations!r}")
        for name, v in (("damping", damping), ("ridge", ridge)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        self.iterations = iterations
        self.data_aware, self.damping, self.ridge = bool(data_aware), float(damping), float(ridge)

    def wants_gram(self, layer: Layer) -> bool:
        return self.data_aware

    def applicable(self, layer: Layer) -> str | None:
        if layer.groups > 1 and layer.in_features // layer.groups == 1:
            return "depthwise convolution: one input channel per group, nothing to factor"
        return None

    @staticmethod
    def _pointwise(layer: Layer) -> bool:
        return layer.kernel == (1, 1)

    def analyze(self, layer: Layer, inputs: LayerInputs | None) -> TuckerAnalysis:
        W = layer.weight.detach().double()
        S, S_inv, samples, note = whitened_inputs(layer, inputs, self.data_aware, self.damping)
        if S is not None:
            W = torch.einsum("oihw,ij->ojhw", W, S)  # the kernel seen by whitened inputs
        a = self._spectra(layer, W)
        a.S, a.S_inv, a.samples, a.note = S, S_inv, samples, note
        return a

    def _spectra(self, layer: Layer, W: torch.Tensor) -> TuckerAnalysis:
        groups = list(W.chunk(layer.groups, 0))
        total = float(sum((Wg**2).sum() for Wg in groups))
        if self._pointwise(layer):
            U, S, V = [], [], []
            for Wg in groups:
                u, s, vh = svd(Wg[:, :, 0, 0])
                U.append(u), S.append(s), V.append(vh)
            return TuckerAnalysis(True, S, S, None, total, U, V)
        s_out, s_in, cum = [], [], []
        for Wg in groups:
            u0, s0 = _left(_unfold(Wg, 0))
            u1, s1 = _left(_unfold(Wg, 1))
            core = torch.einsum("oihw,oa,ib->abhw", Wg, u0, u1)
            e = (core**2).sum((2, 3))
            c = torch.zeros(e.shape[0] + 1, e.shape[1] + 1, dtype=e.dtype)
            c[1:, 1:] = e.cumsum(0).cumsum(1)
            s_out.append(s0), s_in.append(s1), cum.append(c)
        return TuckerAnalysis(False, s_out, s_in, cum, total)

    def full_rank(self, layer: Layer) -> Any:
        ci, co = layer.in_features // layer.groups, layer.out_features // layer.groups
        if self._pointwise(layer):
            return min(ci, co)
        return (co, ci)

    def normalize_rank(self, layer: Layer, rank: Any) -> Any:
        ci, co = layer.in_features // layer.groups, layer.out_features // layer.groups
        if self._pointwise(layer):
            r = rank[0] if isinstance(rank, (tuple, list)) else rank
            return round_rank(int(r), min(ci, co), self.round_to)
        r_out, r_in = (rank, rank) if isinstance(rank, int) else (rank[0], rank[-1])
        return (round_rank(r_out, co, self.round_to), round_rank(r_in, ci, self.round_to))

    def candidates(self, layer: Layer) -> list[Any]:
        ci, co = layer.in_features // layer.groups, layer.out_features // layer.groups
        if self._pointwise(layer):
            return rank_grid(min(ci, co), self.round_to)
        return list(itertools.product(rank_grid(co, self.round_to, 20), rank_grid(ci, self.round_to, 20)))

    def cost(self, layer: Layer, rank: Any) -> tuple[int, int]:
        return tucker_cost(layer, rank)

    def frontier(self, layer: Layer, cap: float, metric: str = "params") -> list[Any]:
        """Per output rank (the search grid, and every multiple of 8), the largest input rank that fits
        ``cap``, and its largest multiples of 8 and 16 (see ``DecomposePass.frontier``)."""
        if self._pointwise(layer):
            return super().frontier(layer, cap, metric)
        idx = 0 if metric == "params" else 1
        ci, co = layer.in_features // layer.groups, layer.out_features // layer.groups
        step_i = self.round_to if ci >= 2 * self.round_to else 1
        outs = set(rank_grid(co, self.round_to, 20)) | {co}
        if self.round_to == 1:
            outs |= set(range(8, co + 1, 8))
        out = set()
        for r_out in sorted(outs):
            if tucker_cost(layer, (r_out, ci))[idx] <= cap:
                r_in = ci  # the input factor folded into the core
            else:
                lo, hi = 0, (ci - 1) // step_i
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    if tucker_cost(layer, (r_out, mid * step_i))[idx] <= cap:
                        lo = mid
                    else:
                        hi = mid - 1
                r_in = lo * step_i
            if r_in < 1:
                continue
            out.add((r_out, r_in))
            out |= {(r_out, r_in // m * m) for m in (8, 16) if r_in // m * m >= 1 and m % step_i == 0}
        return sorted(out)

    def energy_rank(self, layer: Layer, a: TuckerAnalysis, energy: float) -> Any:
        if a.pointwise:
            return self.normalize_rank(layer, max(energy_rank(s, energy) for s in a.s_out))
        r_out = max(energy_rank(s, energy) for s in a.s_out)
        r_in = max(energy_rank(s, energy) for s in a.s_in)
        return self.normalize_rank(layer, (r_out, r_in))

    def evbmf_rank(self, layer: Layer, a: TuckerAnalysis) -> tuple[Any, list[str]]:
        groups = list(layer.weight.detach().double().chunk(layer.groups, 0))
        if a.pointwise:
            r = max(evbmf_rank(Wg[:, :, 0, 0], s) for Wg, s in zip(groups, a.s_out))
            rank = self.normalize_rank(layer, r)
            return rank, (["EVBMF found no signal above the noise estimate; rank 1"] if r == 1 else [])
        r_out = max(evbmf_rank(_unfold(Wg, 0), s) for Wg, s in zip(groups, a.s_out))
        r_in = max(evbmf_rank(_unfold(Wg, 1), s) for Wg, s in zip(groups, a.s_in))
        notes = ["EVBMF found no signal above the noise estimate in a mode; rank 1 there"] if min(r_out, r_in) == 1 else []
        return self.normalize_rank(layer, (r_out, r_in)), notes

    def predicted_error(self, layer: Layer, a: TuckerAnalysis, rank: Any) -> float:
        if a.total <= 0:
            return 0.0
        if a.pointwise:
            tail = sum(float((s[rank:] ** 2).sum()) for s in a.s_out)
        else:
            r_out, r_in = rank
            kept = sum(float(c[min(r_out, c.shape[0] - 1), min(r_in, c.shape[1] - 1)]) for c in a.cum)
            tail = a.total - kept
        return max(tail, 0.0) ** 0.5 / a.total**0.5

    def factorize(self, layer: Layer, rank: Any, a: TuckerAnalysis) -> Factorization:
        if a.S is not None and not a.pointwise:
            return self._factorize_data(layer, rank, a)
        g = layer.groups
        dtype = layer.weight.dtype
        pads_h, pads_w = layer.pads()
        W = layer.weight.detach().double()
        if a.pointwise:
            r = rank
            firsts, seconds = [], []
            for u, s, vh in zip(a.U, a.s_out, a.Vh):
                root = s[:r].sqrt()
                first = root[:, None] * vh[:r]
                if a.S_inv is not None:  # whitened SVD: W ~ U_r s_r Vh_r S^-1
                    first = first @ a.S_inv
                firsts.append(first[:, :, None, None])
                seconds.append((u[:, :r] * root)[:, :, None, None])
            P, Q = torch.cat(firsts), torch.cat(seconds)
            W_hat = torch.cat([torch.einsum("ri,or->oi", P[j * r:(j + 1) * r, :, 0, 0], Q.chunk(g, 0)[j][:, :, 0, 0]) for j in range(g)])[:, :, None, None]
            ops = [
                *padded_conv(P.to(dtype), None, layer.stride, pads_h, pads_w, layer.dilation, g, out_hw=layer.out_hw),
                Conv(Q.to(dtype), layer.bias, (1, 1), [0, 0], (1, 1), g, bias_node=layer.bias_node),
            ]
            err = ((W_hat - W).norm() / W.norm()).item() if W.norm() > 0 else 0.0
            notes = ["1x1 kernel: Tucker-2 is an SVD (two 1x1 convolutions)"]
            if a.S_inv is not None:
                notes.append("data-aware: input-whitened SVD")
            elif a.note:
                notes.append(a.note)
            return Factorization(self.method, r, ops, weight_error=err, notes=notes)
        r_out, r_in = rank
        ci, co = layer.in_features // g, layer.out_features // g
        cores, outs, ins, recon = [], [], [], []
        for Wg in W.chunk(g, 0):
            core, (u_out, u_in) = partial_tucker2(Wg, r_out, r_in, self.iterations)
            recon.append(torch.einsum("abhw,oa,ib->oihw", core, u_out, u_in))
            if r_in == ci:  # fold the input factor into the core
                core, u_in = torch.einsum("abhw,ib->aihw", core, u_in), None
            if r_out == co:
                core, u_out = torch.einsum("aihw,oa->oihw", core, u_out), None
            cores.append(core), outs.append(u_out), ins.append(u_in)
        W_hat = torch.cat(recon)
        err = ((W_hat - W).norm() / W.norm()).item() if W.norm() > 0 else 0.0
        P = torch.cat([u.T[:, :, None, None] for u in ins]).to(dtype) if ins[0] is not None else None
        Q = torch.cat([u[:, :, None, None] for u in outs]).to(dtype) if outs[0] is not None else None
        return Factorization(self.method, (r_out, r_in), self._ops(layer, P, torch.cat(cores).to(dtype), Q), weight_error=err,
                             notes=[a.note] if a.note else [])

    def _factorize_data(self, layer: Layer, rank: Any, a: TuckerAnalysis) -> Factorization:
        """Data-aware Tucker-2 (groups=1): input factor from the whitened kernel, core and output
        factor by reduced-rank regression on the calibration samples (data_aware.py)."""
        r_out, r_in = rank
        ci, co = layer.in_features, layer.out_features
        kh, kw = layer.kernel
        W = layer.weight.detach().double()
        core, (u_out, u_in) = partial_tucker2(torch.einsum("oihw,ij->ojhw", W, a.S), r_out, r_in, self.iterations)
        P = u_in.T @ a.S_inv  # [r_in, ci]: whiten (S^-1 x), then project (U_in'^T)
        has_p = r_in < ci
        K = core if has_p else torch.einsum("abhw,bi->aihw", core, P)  # [r_out, r_in or ci, kh, kw]: acts on P x, or x
        U = u_out
        notes = ["data-aware: input factor from the input-whitened kernel"]
        if a.samples is not None:
            pads_h, pads_w = layer.pads()
            first = (lambda t: torch.nn.functional.conv2d(t, P[:, :, None, None])) if has_p else (lambda t: t)
            uu, yu, n = patch_moments(layer, a.samples, first, (kh, kw), layer.stride, layer.dilation, pads_h, pads_w)
            unknowns = uu.shape[0]
            if enough(n, unknowns):
                U, Kf = reduced_rank(uu, yu, r_out, self.ridge)
                K = Kf.reshape(r_out, -1, kh, kw)
                notes.append(f"core and output factor fitted on the outputs ({n:,} sample positions)")
            else:
                notes.append(f"output side from the weights: {n:,} sample positions are too few to fit {unknowns:,} "
                             f"unknowns per output (needs {MIN_POSITIONS_PER_UNKNOWN}x)")
        W_hat = torch.einsum("aihw,oa->oihw", K, U)
        if has_p:
            W_hat = torch.einsum("obhw,bi->oihw", W_hat, P)
        err = ((W_hat - W).norm() / W.norm()).item() if W.norm() > 0 else 0.0
        dtype = layer.weight.dtype
        if r_out == co:
            K_op, Q_op = torch.einsum("aihw,oa->oihw", K, U), None
        else:
            K_op, Q_op = K, U[:, :, None, None].to(dtype)
        ops = self._ops(layer, P[:, :, None, None].to(dtype) if has_p else None, K_op.to(dtype), Q_op)
        return Factorization(self.method, (r_out, r_in), ops, weight_error=err, notes=notes)


    def _ops(self, layer: Layer, P: torch.Tensor | None, K: torch.Tensor, Q: torch.Tensor | None) -> list:
        """1x1 P (none where r_in is full) -> core K -> 1x1 Q (none where r_out is full); the bias on the last."""
        g = layer.groups
        pads_h, pads_w = layer.pads()
        ops = []
        if P is not None:
            ops.append(Conv(P, None, (1, 1), [0, 0], (1, 1), g))
        last_is_core = Q is None
        ops += padded_conv(K, layer.bias if last_is_core else None, layer.stride, pads_h, pads_w, layer.dilation, g,
                           out_hw=layer.out_hw, bias_node=layer.bias_node if last_is_core else None)
        if not last_is_core:
            ops.append(Conv(Q, layer.bias, (1, 1), [0, 0], (1, 1), g, bias_node=layer.bias_node))
        return ops

    def template(self, layer: Layer, rank: Any) -> list:
        g = layer.groups
        ci, co = layer.in_features // g, layer.out_features // g
        kh, kw = layer.kernel
        z = lambda *shape: torch.randn(*shape, dtype=layer.weight.dtype)  # noqa: E731
        if self._pointwise(layer):
            pads_h, pads_w = layer.pads()
            return [*padded_conv(z(g * rank, ci, 1, 1), None, layer.stride, pads_h, pads_w, layer.dilation, g, out_hw=layer.out_hw),
                    Conv(z(g * co, rank, 1, 1), layer.bias, (1, 1), [0, 0], (1, 1), g)]
        r_out, r_in = rank
        P = z(g * r_in, ci, 1, 1) if r_in < ci else None
        Q = z(g * co, r_out, 1, 1) if r_out < co else None
        K = z(g * (r_out if Q is not None else co), r_in if P is not None else ci, kh, kw)
        return self._ops(layer, P, K, Q)


def partial_tucker2(W: torch.Tensor, r_out: int, r_in: int, iterations: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Tucker-2 of a 4-D kernel over its two channel modes: HOSVD initialization, then HOOI sweeps.

    This is tensorly's ``partial_tucker(W, rank=[r_out, r_in], modes=[0, 1], init="svd")`` (a test
    checks they agree), computed with the leading eigenvectors of each unfolding's Gram matrix:
    tensorly 0.10's HOOI loop calls a full LAPACK SVD whatever its ``svd=`` option says, which took
    12 of 15 s on one 512x512x3x3 kernel. Stops early when the error stalls (tol 1e-7, as tensorly).
    """
    W = W.detach().double()
    U0 = _left(_unfold(W, 0))[0][:, :r_out]
    U1 = _left(_unfold(W, 1))[0][:, :r_in]
    norm2 = float((W**2).sum())
    last = None
    for _ in range(iterations):
        U0 = _left(_unfold(torch.einsum("oihw,ib->obhw", W, U1), 0))[0][:, :r_out]
        Y = torch.einsum("oihw,oa->aihw", W, U0)
        U1 = _left(_unfold(Y, 1))[0][:, :r_in]
        err = max(norm2 - float((torch.einsum("aihw,ib->abhw", Y, U1) ** 2).sum()), 0.0) ** 0.5 / max(norm2, 1e-300) ** 0.5
        if last is not None and abs(last - err) < 1e-7:
            break
        last = err
    core = torch.einsum("oihw,oa,ib->abhw", W, U0, U1)
    return core.contiguous(), (U0.contiguous(), U1.contiguous())
