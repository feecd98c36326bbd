"""spatial-svd-conv: a kh x kw convolution becomes a kh x 1 one followed by a 1 x kw one.

Before::

    y = aten.conv2d(x, W[Co, Ci/g, kh, kw], b, [sh, sw], [ph, pw], [dh, dw], g)

After (rank r per group)::

    t = aten.conv2d(x, V[g*r, Ci/g, kh, 1], None, [sh, 1], [ph, 0], [dh, 1], g)
    y = aten.conv2d(t, H[Co, r, 1, kw], b, [1, sw], [0, pw], [1, dw], g)

Per group, the kernel is unfolded to ``M[(i, h), (o, w)] = W[o, i, h, w]`` and ``M ~ U_r S_r V_r^T``:
``V[r, i, h] = (U_r sqrt(S_r))[(i, h), r]`` and ``H[o, r, w] = (sqrt(S_r) V_r^T)[r, (o, w)]``; then
``sum_r V[r, i, h] H[o, r, w]`` is the rank-r approximation of ``W[o, i, h, w]`` (Jaderberg et al. 2014,
AIMET's spatial SVD). Stride, padding and dilation split by axis, so any of them (and "same"/"valid"
string padding, grouped convolutions, bias or none) keep their meaning: the first convolution has no
bias, so the zero padding of its output in width equals the zero padding of the input. An even
kernel's asymmetric "same" padding becomes the larger side on both and a slice of the extra row/column.

Cheaper when ``r * (Ci*kh + Co*kw) < Co*Ci*kh*kw`` per group (MACs: the first runs at H_out x W_in).
1x1 and already separable (kh or kw = 1) kernels are left alone.

Numerics: at full rank ``min(Ci*kh, Co*kw)`` the composition equals the convolution up to float
rounding; at rank r the relative weight error is ``sqrt(sum_{i>r} s_i^2 / sum s_i^2)`` over all groups.

Data-aware (``data_aware=True`` with calibration inputs; ``fxpress.decompose`` with ``calibration=``):
the SVD is of the input-whitened unfolding ``(C^(1/2) x I_kh) M`` (its spectrum is what the rank
search reads), the kh x 1 factor is mapped back through ``C^(-1/2)``, and the 1 x kw factor is the
least-squares fit of the layer's outputs on the kh x 1 convolution's outputs over the calibration
samples (data_aware.py): the least output error for that first factor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..base import register_pass
from .activations import LayerInputs
from .common import DecomposePass
from .layers import Layer
from .ops import Factorization, padded_conv
from .data_aware import MIN_POSITIONS_PER_UNKNOWN, enough, fit, patch_moments, whitened_inputs
from .ranks import energy_rank, evbmf_rank, round_rank, singular_values, svd

__all__ = ["SpatialSvdConv"]


@dataclass
class SpatialAnalysis:
    """The unfolded kernels and their singular values; vectors only when a rank is decomposed
    (a rank search over a whole model needs the spectra of every layer, the vectors of few)."""

    M: list[torch.Tensor]
    s: list[torch.Tensor]
    total: float
    S: torch.Tensor | None = None  # data-aware: the input whitening C^(1/2), its inverse, the samples
    S_inv: torch.Tensor | None = None
    samples: torch.Tensor | None = None
    note: str = ""

    def merged_s(self) -> torch.Tensor:
        """The groups' singular values pooled and sorted (energy over the whole layer)."""
        return torch.cat(self.s).sort(descending=True).values


def _unfold(W: torch.Tensor) -> torch.Tensor:
    co, ci, kh, kw = W.shape
    return W.permute(1, 2, 0, 3).reshape(ci * kh, co * kw)


def _whiten_rows(M: torch.Tensor, S: torch.Tensor, kh: int) -> torch.Tensor:
    """``(S x I_kh) M`` for rows indexed (i, h): mixes the input channels, each tap apart."""
    ci = S.shape[0]
    return torch.einsum("ij,jhc->ihc", S, M.reshape(ci, kh, -1)).reshape(ci * kh, -1)


@register_pass
class SpatialSvdConv(DecomposePass):
    """kh x kw -> (kh x 1, 1 x kw) by SVD of the unfolded kernel: see the module docstring."""

    name = "spatial-svd-conv"
    method = "spatial-svd"
    kinds = ("conv2d",)

    def __init__(self, rank: Any = None, *, data_aware: bool = False, damping: float = 0.01, ridge: float = 1e-4, **options):
        """data_aware: with calibration inputs, minimise the output error on them (module docstring);
        damping / ridge: of the input whitening and of the output fit, relative to their scale."""
        super().__init__(rank, **options)
        for name, v in (("damping", damping), ("ridge", ridge)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        self.data_aware, self.damping, self.ridge = bool(data_aware), float(damping), float(ridge)

    def wants_gram(self, layer: Layer) -> bool:
        return self.data_aware

    def applicable(self, layer: Layer) -> str | None:
        kh, kw = layer.kernel
        if kh == 1 and kw == 1:
            return "1x1 kernel: nothing to split spatially (tucker-conv decomposes 1x1 convolutions)"
        if kh == 1 or kw == 1:
            return f"{kh}x{kw} kernel is already separable"
        return None

    def _groups(self, layer: Layer) -> list[torch.Tensor]:
        return list(layer.weight.detach().double().chunk(layer.groups, 0))

    def analyze(self, layer: Layer, inputs: LayerInputs | None) -> SpatialAnalysis:
        Ms = [_unfold(Wg) for Wg in self._groups(layer)]
        S, S_inv, samples, note = whitened_inputs(layer, inputs, self.data_aware, self.damping)
        if S is not None:
            Ms = [_whiten_rows(Ms[0], S, layer.kernel[0])]
        sv = [singular_values(M) for M in Ms]
        total = float(sum((M**2).sum() for M in Ms))
        return SpatialAnalysis(Ms, sv, total, S, S_inv, samples, note)

    def full_rank(self, layer: Layer) -> int:
        kh, kw = layer.kernel
        g = layer.groups
        return min(layer.in_features // g * kh, layer.out_features // g * kw)

    def cost(self, layer: Layer, rank: int) -> tuple[int, int]:
        kh, kw = layer.kernel
        g, ci, co = layer.groups, layer.in_features // layer.groups, layer.out_features
        bias = layer.bias.numel() if layer.bias is not None else 0
        params = g * rank * ci * kh + co * rank * kw + bias
        (ho, wo), (_, wi) = layer.out_hw, layer.in_hw
        n = layer.batch
        macs = n * ho * wi * g * rank * ci * kh + n * ho * wo * co * rank * kw
        return params, macs

    def energy_rank(self, layer: Layer, a: SpatialAnalysis, energy: float) -> int:
        r = max(energy_rank(s, energy) for s in a.s)
        return round_rank(r, self.full_rank(layer), self.round_to)

    def evbmf_rank(self, layer: Layer, a: SpatialAnalysis) -> tuple[int, list[str]]:
        r = max(evbmf_rank(M, s) for M, s in zip(a.M, a.s))
        notes = ["EVBMF found no signal above the noise estimate; rank 1"] if r == 1 else []
        return round_rank(r, self.full_rank(layer), self.round_to), notes

    def predicted_error(self, layer: Layer, a: SpatialAnalysis, rank: int) -> float:
        if a.total <= 0:
            return 0.0
        tail = sum(float((s[rank:] ** 2).sum()) for s in a.s)
        return (tail / a.total) ** 0.5

    def factorize(self, layer: Layer, rank: int, a: SpatialAnalysis) -> Factorization:
        kh, kw = layer.kernel
        g = layer.groups
        ci, co = layer.in_features // g, layer.out_features // g
        verts, horis = [], []
        for M in a.M:
            u, s, vh = svd(M)
            root = s[:rank].sqrt()
            left = u[:, :rank] * root
            if a.S_inv is not None:  # back from the whitened rows: (S^-1 x I_kh) U_r sqrt(s_r)
                left = _whiten_rows(left, a.S_inv, kh)
            vert = left.T.reshape(rank, ci, kh, 1)                          # [r, ci, kh, 1]
            hori = (root[:, None] * vh[:rank]).reshape(rank, co, kw)        # [r, co, kw]
            verts.append(vert)
            horis.append(hori.permute(1, 0, 2).reshape(co, rank, 1, kw))    # [co, r, 1, kw]
        V, H = torch.cat(verts), torch.cat(horis)
        notes = [a.note] if a.note else []
        if a.S is not None:
            notes.append("data-aware: first factor from the input-whitened kernel")
            if a.samples is not None:
                H, note = self._fit_second(layer, V, H, a)
                notes.append(note)
        W = layer.weight.detach().double()
        W_hat = torch.cat([
            torch.einsum("rih,orw->oihw", V[j * rank:(j + 1) * rank, :, :, 0], H[j * co:(j + 1) * co, :, 0, :]) for j in range(g)
        ])
        err = ((W_hat - W).norm() / W.norm()).item() if W.norm() > 0 else 0.0
        dtype = layer.weight.dtype
        return Factorization(self.method, rank, self._ops(layer, V.to(dtype), H.to(dtype)), weight_error=err, notes=notes)

    def _fit_second(self, layer: Layer, V: torch.Tensor, H: torch.Tensor, a: SpatialAnalysis) -> tuple[torch.Tensor, str]:
        """The 1 x kw factor fitted to the layer's outputs on the samples, given the kh x 1 one."""
        kh, kw = layer.kernel
        pads_h, pads_w = layer.pads()
        (sh, sw), (dh, dw) = layer.stride, layer.dilation
        vertical = padded_conv(V, None, (sh, 1), pads_h, (0, 0), (dh, 1), 1, out_hw=layer.mid_hw())

        def first(t):
            for op in vertical:
                t = op.apply(t)
            return t

        uu, yu, n = patch_moments(layer, a.samples, first, (1, kw), (1, sw), (1, dw), (0, 0), pads_w)
        if not enough(n, uu.shape[0]):
            return H, (f"second factor from the weights: {n:,} sample positions are too few to fit {uu.shape[0]:,} "
                       f"unknowns per output (needs {MIN_POSITIONS_PER_UNKNOWN}x)")
        M = fit(uu, yu, self.ridge)  # [co, r * kw]
        return M.reshape(H.shape), f"second factor fitted on the outputs ({n:,} sample positions)"

    def _ops(self, layer: Layer, V: torch.Tensor, H: torch.Tensor) -> list:
        g = layer.groups
        pads_h, pads_w = layer.pads()
        (sh, sw), (dh, dw) = layer.stride, layer.dilation
        return [
            *padded_conv(V, None, (sh, 1), pads_h, (0, 0), (dh, 1), g, out_hw=layer.mid_hw()),
            *padded_conv(H, layer.bias, (1, sw), (0, 0), pads_w, (1, dw), g, out_hw=layer.out_hw, bias_node=layer.bias_node),
        ]

    def template(self, layer: Layer, rank: int) -> list:
        kh, kw = layer.kernel
        g = layer.groups
        ci, co = layer.in_features // g, layer.out_features // g
        z = lambda *shape: torch.randn(*shape, dtype=layer.weight.dtype)  # noqa: E731
        return self._ops(layer, z(g * rank, ci, kh, 1), z(g * co, rank, 1, kw))
