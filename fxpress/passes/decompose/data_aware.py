"""Data-aware convolution decompositions: minimise the error on the layer's outputs, not its weights.

With calibration data, tucker-conv and spatial-svd-conv (``data_aware=True``; ``fxpress.decompose``
turns it on when ``calibration=`` is given) use the layer's input activations:

1. **Input side: whitening.** ``C = E[x x^T]`` is the second moment of the input channels over all
   pixels of all calibration batches (damped by ``damping * mean(eig(C))``) and ``S = C^(1/2)``. The
   convolution of ``x`` with ``W`` equals that of the whitened ``z = S^-1 x`` with ``W' = W x_in S``
   (``W'[o, i] = sum_j W[o, j] S[j, i]``), and ``z`` has white channels, so the truncation error of
   ``W'`` (Frobenius) is the output error if pixels were also uncorrelated. The rank search ranks by
   it (predicted errors, spectra), and the input factor is taken from ``W'``: Tucker-2's first 1x1 is
   ``P = U_in'^T S^-1``, spatial SVD's kh x 1 factor ``(S^-1 x I_kh) U_r' sqrt(s_r)``. (Zhang et al.,
   "Accelerating Very Deep Convolutional Networks for Classification and Detection", 2016, and the
   activation-whitened SVD of svd-linear.)
2. **Output side: fitted on the outputs.** With the input factor fixed, what follows it is linear in
   the patches ``u`` it produces (Tucker-2: the kh x kw patches of ``P x``; spatial SVD: the 1 x kw
   patches of the kh x 1 convolution's output), and the layer's true output ``y = W * x`` (bias
   aside; it is kept exactly) is known on the calibration samples. Tucker-2's core and output factor
   are the **reduced-rank regression** of ``y`` on ``u``: ``M = E[y u^T] E[u u^T]^-1``, the output
   factor the top ``r_out`` eigenvectors of the covariance of the fitted outputs ``M E[u u^T] M^T``,
   the core ``U_out^T M`` -- the least output error over all (output factor, core) pairs for that
   input factor. Spatial SVD's 1 x kw factor is the least-squares ``M`` itself. A small ridge
   (``ridge * mean(diag E[u u^T])``) keeps the solve stable. This needs many more sample positions
   than unknowns per output: with fewer than ``4 x`` the patch size, step 2 is skipped and the
   whitened factors of step 1 are kept (the record says so).

At full ranks (and no ridge) both reproduce the layer. Grouped convolutions are decomposed from
the weights only (the record says so).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layers import Layer

__all__ = ["whitening", "patch_moments", "fit", "reduced_rank", "enough", "MIN_POSITIONS_PER_UNKNOWN"]

MIN_POSITIONS_PER_UNKNOWN = 4


def whitening(gram: torch.Tensor, rows: int, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S^-1) with ``S = (C + damping * mean(eig C) I)^(1/2)`` for ``C = gram / rows``, float64."""
    C = gram.double() / max(rows, 1)
    lam, Q = torch.linalg.eigh(C)
    lam = lam.clamp_min(0)
    lam = lam + damping * lam.mean().clamp_min(1e-12)
    root = lam.sqrt()
    return (Q * root) @ Q.T, (Q / root) @ Q.T


def whitened_inputs(layer: Layer, inputs, enabled: bool, damping: float) -> tuple:
    """(S, S_inv, samples, note) for a data-aware conv decomposition: the input whitening and the
    sampled activations when calibration statistics exist and the conv is ungrouped; Nones (with
    the reason in ``note`` for a grouped conv) otherwise."""
    if not enabled or inputs is None or inputs.gram is None:
        return None, None, None, ""
    if layer.groups > 1:
        return None, None, None, "grouped convolution: decomposed from the weights only (data-aware is for groups=1)"
    S, S_inv = whitening(inputs.gram, inputs.rows, damping)
    return S, S_inv, inputs.sample(), ""


def _patches(t: torch.Tensor, kernel: tuple[int, int], stride, dilation, pads_h, pads_w) -> torch.Tensor:
    """[N * L, C * kh * kw]: the patches a convolution with this geometry reads (asymmetric padding ok)."""
    if any(pads_h) or any(pads_w):
        t = F.pad(t, (pads_w[0], pads_w[1], pads_h[0], pads_h[1]))
    cols = F.unfold(t, kernel, dilation=tuple(dilation), padding=0, stride=tuple(stride))  # [N, C*kh*kw, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def patch_moments(layer: Layer, x: torch.Tensor, first, kernel, stride, dilation, pads_h, pads_w,
                  chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(E[u u^T], E[y u^T], positions)`` over the samples ``x``: ``u`` the patches of ``first(x)``
    read by a convolution of this geometry, ``y`` the layer's output without bias, float64."""
    uu = yu = None
    n = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            xb = x[i:i + chunk].double()
            u = _patches(first(xb), kernel, stride, dilation, pads_h, pads_w)
            y = layer.apply(xb, dtype=torch.float64)
            if layer.bias is not None:
                y = y - layer.bias.detach().double()[None, :, None, None]
            y = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
            if y.shape[0] != u.shape[0]:
                raise ValueError(f"patch count {u.shape[0]} != output positions {y.shape[0]} (geometry mismatch)")
            a, b = u.T @ u, y.T @ u
            uu, yu = (a, b) if uu is None else (uu + a, yu + b)
            n += u.shape[0]
    return uu / n, yu / n, n


def fit(uu: torch.Tensor, yu: torch.Tensor, ridge: float) -> torch.Tensor:
    """Least squares ``M = E[y u^T] (E[u u^T] + ridge * mean(diag) I)^-1``."""
    d = uu.shape[0]
    lam = ridge * float(torch.diagonal(uu).mean().clamp_min(1e-300))
    A = uu + lam * torch.eye(d, dtype=uu.dtype)
    return torch.linalg.solve(A, yu.T).T  # A symmetric: (A^-1 yu^T)^T = yu A^-1


def reduced_rank(uu: torch.Tensor, yu: torch.Tensor, r: int, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_out [Co, r] orthonormal, K [r, d]) minimising ``E||y - U_out K u||^2``: the least-squares
    ``M``, then the top-r eigenvectors of the fitted outputs' covariance ``M E[u u^T] M^T``."""
    M = fit(uu, yu, ridge)
    cov = M @ uu @ M.T
    lam, V = torch.linalg.eigh((cov + cov.T) / 2)
    U = V.flip(1)[:, :r]
    return U, U.T @ M


def enough(positions: int, unknowns: int) -> bool:
    return positions >= MIN_POSITIONS_PER_UNKNOWN * unknowns
