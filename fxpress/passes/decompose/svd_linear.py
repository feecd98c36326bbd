"""svd-linear: a linear layer becomes two thinner ones (truncated SVD, optionally activation-aware).

Before::

    y = aten.linear(x, W[out, in], b)

After (rank r)::

    t = aten.linear(x, A[r, in])          # A = sqrt(S_r) V_r^T  (times S^-1 when whitened)
    y = aten.linear(t, B[out, r], b)      # B = U_r sqrt(S_r)

Cheaper when ``r * (in + out) < in * out``; otherwise the layer is left alone and the report says so.

Data-aware (whitened) SVD, when ``calibration=`` is given: with ``C = X^T X / n`` the second moment
of the layer's inputs (all rows of all calibration batches), damped by ``damping * mean(eig(C))``,
and ``S = C^(1/2)``, the SVD is of ``W S``; then ``||X W^T - X W_r^T||_F^2 = n * sum_{i>r} s_i^2``, so
the rank search ranks by the error on the outputs rather than on the weights (SVD-LLM / ASVD).

Wide layers (more than ``whiten_max_features`` inputs, default 8192): the full second moment is
in x in float64 (25088 inputs, vgg's first classifier layer: 5.0 GB) and its eigendecomposition
takes minutes, so only its diagonal is collected and ``S = diag(sqrt(C_ii))`` (per-feature RMS
scaling, as ASVD does): exact at full rank like the full whitening, output-aware for features of
unequal scale, blind to their correlations. The record says which whitening a layer got and why.

Numerics: at full rank the product ``B A`` is ``W`` up to float rounding (whitened: up to the
conditioning of ``S``); at rank r the relative weight error is ``sqrt(sum_{i>r} s_i^2 / sum s_i^2)``
(of ``W S`` when whitened). The output error on the calibration inputs is measured and reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..base import register_pass
from .activations import LayerInputs
from .common import DecomposePass
from .layers import Layer
from .ops import Factorization, Linear
from .ranks import energy_rank, evbmf_rank, round_rank, singular_values, svd

__all__ = ["SvdLinear", "svd_analysis"]

_FLOAT64_LIMIT = 1 << 31  # out * in * min(out, in) above which the SVD runs in float32 (time)


@dataclass
class SvdAnalysis:
    """The matrix to truncate (``W``, or ``W S`` when whitened) and its singular values; the vectors
    are computed when a rank is decomposed (a model-wide rank search needs only the spectra)."""

    M: torch.Tensor
    s: torch.Tensor
    S_inv: torch.Tensor | None  # whitening: W ~ U_r diag(s_r) Vh_r S^-1 (a vector where S is diagonal)
    whitened: bool
    kind: str = ""  # "full" | "diagonal" | "" (plain)
    _vectors: tuple | None = None

    def vectors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._vectors is None:
            self._vectors = svd(self.M)
        return self._vectors


WHITEN_MAX_FEATURES = 8192  # the input second moment is in x in; beyond this: diagonal whitening


def svd_analysis(weight: torch.Tensor, gram: torch.Tensor | None = None, rows: int = 0, damping: float = 0.01,
                 sq: torch.Tensor | None = None) -> SvdAnalysis:
    """``gram``: full whitening by ``C^(1/2)``; ``sq`` (per-feature sums of squares): diagonal."""
    W = weight.detach()
    big = W.shape[0] * W.shape[1] * min(W.shape) > _FLOAT64_LIMIT
    dtype = torch.float32 if big else torch.float64
    W = W.to(dtype)
    S_inv = None
    kind = ""
    if gram is not None and rows > 0:
        C = (gram / rows).to(dtype)
        lam, Q = torch.linalg.eigh(C)
        lam = lam.clamp_min(0) + damping * lam.clamp_min(0).mean().clamp_min(1e-12)
        root = lam.sqrt()
        S = (Q * root) @ Q.T
        S_inv = (Q / root) @ Q.T
        W = W @ S
        kind = "full"
    elif sq is not None and rows > 0:
        var = (sq / rows).to(dtype).clamp_min(0)
        root = (var + damping * var.mean().clamp_min(1e-12)).sqrt()
        S_inv = 1.0 / root  # a vector: the diagonal
        W = W * root[None, :]
        kind = "diagonal"
    return SvdAnalysis(W, singular_values(W), S_inv, S_inv is not None, kind)


def svd_factors(a: SvdAnalysis, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) with B @ A the rank-r approximation, balanced by sqrt(s)."""
    U, s, Vh = a.vectors()
    root = s[:r].sqrt()
    A = root[:, None] * Vh[:r]
    if a.S_inv is not None:
        A = A * a.S_inv[None, :] if a.S_inv.dim() == 1 else A @ a.S_inv
    B = U[:, :r] * root[None, :]
    return A, B


def tail_error(s: torch.Tensor, r: int) -> float:
    e = s.double() ** 2
    total = float(e.sum())
    return (float(e[r:].sum()) / total) ** 0.5 if total > 0 else 0.0


@register_pass
class SvdLinear(DecomposePass):
    """Truncated SVD of linear layers (activation-aware with calibration data): see the module docstring.

    whiten: use the calibration inputs' second moment (default True when calibration is given).
    damping: added to the second moment's eigenvalues, relative to their mean.
    whiten_max_features: above this many input features the whitening is diagonal (module docstring).
    """

    name = "svd-linear"
    method = "svd"
    kinds = ("linear",)

    def __init__(self, rank: Any = None, *, whiten: bool = True, damping: float = 0.01,
                 whiten_max_features: int = WHITEN_MAX_FEATURES, **options):
        super().__init__(rank, **options)
        if not (isinstance(damping, (int, float)) and damping >= 0):
            raise ValueError(f"damping must be a number >= 0, got {damping!r}")
        if isinstance(whiten_max_features, bool) or not isinstance(whiten_max_features, int) or whiten_max_features < 1:
            raise ValueError(f"whiten_max_features must be an integer >= 1, got {whiten_max_features!r}")
        self.whiten = whiten
        self.damping = float(damping)
        self.whiten_max_features = whiten_max_features

    def wants_gram(self, layer: Layer) -> bool:
        return self.whiten

    def wants_full_gram(self, layer: Layer) -> bool:
        return layer.in_features <= self.whiten_max_features

    def analyze(self, layer: Layer, inputs: LayerInputs | None) -> SvdAnalysis:
        use = inputs is not None and self.whiten
        return svd_analysis(layer.weight, inputs.gram if use else None, inputs.rows if inputs is not None else 0, self.damping,
                            sq=inputs.sq if use else None)

    def full_rank(self, layer: Layer) -> int:
        return min(layer.out_features, layer.in_features)

    def cost(self, layer: Layer, rank: int) -> tuple[int, int]:
        i, o = layer.in_features, layer.out_features
        bias = layer.bias.numel() if layer.bias is not None else 0
        return rank * (i + o) + bias, layer.rows * rank * (i + o)

    def energy_rank(self, layer: Layer, a: SvdAnalysis, energy: float) -> int:
        return round_rank(energy_rank(a.s, energy), self.full_rank(layer), self.round_to)

    def evbmf_rank(self, layer: Layer, a: SvdAnalysis) -> tuple[int, list[str]]:
        r = evbmf_rank(layer.weight, torch.linalg.svdvals(layer.weight.detach().double()) if a.whitened else a.s)
        notes = ["EVBMF found no signal above the noise estimate; rank 1"] if r == 1 else []
        return round_rank(r, self.full_rank(layer), self.round_to), notes

    def predicted_error(self, layer: Layer, a: SvdAnalysis, rank: int) -> float:
        return tail_error(a.s, rank)

    def template(self, layer: Layer, rank: int) -> list:
        dtype = layer.weight.dtype
        return [Linear(torch.randn(rank, layer.in_features, dtype=dtype)),
                Linear(torch.randn(layer.out_features, rank, dtype=dtype), layer.bias)]

    def factorize(self, layer: Layer, rank: int, a: SvdAnalysis) -> Factorization:
        A, B = svd_factors(a, rank)
        dtype = layer.weight.dtype
        W_hat = (B @ A).to(torch.float64)
        W = layer.weight.detach().double()
        err = ((W_hat - W).norm() / W.norm()).item() if W.norm() > 0 else 0.0
        ops = [Linear(A.to(dtype)), Linear(B.to(dtype), layer.bias, bias_node=layer.bias_node)]
        notes = []
        if a.kind == "full":
            notes.append("activation-aware (whitened) SVD")
        elif a.kind == "diagonal":
            n = layer.in_features
            notes.append(f"diagonal whitening (per-feature RMS, as ASVD), not full: {n} input features > whiten_max_features="
                         f"{self.whiten_max_features} (the full {n}x{n} float64 second moment would take {n * n * 8 / 2**30:.1f} GiB "
                         "and minutes to decompose)")
        return Factorization(self.method, rank, ops, weight_error=err, notes=notes)
