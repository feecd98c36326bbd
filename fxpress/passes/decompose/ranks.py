"""Rank selection rules shared by the decomposition passes.

- ``energy_rank(s, energy)``: the smallest rank whose singular values hold ``energy`` of the squared
  spectrum (``sum(s[:r]**2) >= energy * sum(s**2)``).
- ``evbmf_rank(M)``: empirical variational Bayes matrix factorization (Nakajima et al., JMLR 2013),
  the analytic global solution with the noise variance estimated by a bounded 1-D search. It returns
  the number of singular values above the estimated noise threshold, and **never 0**: where the
  spectrum looks like pure noise (random weights do), the rank is 1 and ``evbmf_rank`` says so.
- ``round_rank(r, full, round_to)``: ranks become multiples of ``round_to`` (hardware-friendly
  GEMM/conv widths) where the dimension is big enough (``full >= 2 * round_to``); never 0, never above
  ``full``.
- ``rank_grid(full, round_to, limit)``: the candidate ranks a search walks (at most ``limit``).
- ``validate_rule`` checks the user's ``rank=`` / ``energy=`` options and says how to fix them.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["energy_rank", "evbmf_rank", "round_rank", "rank_grid", "validate_rule", "RULE_HELP", "solver_context", "svd", "gram_eigh", "singular_values"]

# Below this many weight elements an SVD/ALS runs on one thread: multi-threaded LAPACK on small
# matrices gains nothing and, on a loaded machine, spins: an SVD of a 64 x 288 kernel took 0.5 s on
# two busy cores with 2 threads and 6 ms with one (measured; the library's tests hit this).
SINGLE_THREAD_BELOW = 1 << 22
BIG_GRAM = 1 << 20


@contextlib.contextmanager
def solver_context(numel: int):
    """One thread for small decompositions (see SINGLE_THREAD_BELOW); tensorly's chatter silenced."""
    before = torch.get_num_threads()
    if numel < SINGLE_THREAD_BELOW and before > 1:
        torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*n_eigenvecs.*", category=UserWarning)
            yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)

RULE_HELP = (
    "rank= takes an int (the rank; Tucker also a (r_out, r_in) pair), a float in (0, 1) (the fraction of "
    "each layer's parameters to keep), 'evbmf' (estimated from the weights), or a dict {layer: rank}; "
    "energy= takes a float in (0, 1] (the fraction of the squared singular values to keep)"
)


def gram_eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, >= 0) and eigenvectors of ``M M^T``; in float32 from BIG_GRAM
    elements on (a large kernel's spectrum needs no more for choosing ranks, and its factors stay
    consistent: ``B A = U U^T M`` for the orthonormal U), returned in M's dtype."""
    if M.numel() >= BIG_GRAM and M.dtype == torch.float64:
        f = M.float()
        lam, U = torch.linalg.eigh(f @ f.T)
        lam, U = lam.double(), U.double()
    else:
        lam, U = torch.linalg.eigh(M @ M.T)
    return lam.flip(0).clamp_min(0), U.flip(1)


def singular_values(M: torch.Tensor) -> torch.Tensor:
    """Singular values, descending (from the smaller Gram's eigenvalues for large matrices)."""
    if min(M.shape) < 192:
        return torch.linalg.svdvals(M)
    G = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
    if M.numel() >= BIG_GRAM and G.dtype == torch.float64:
        G = G.float()
    return torch.linalg.eigvalsh(G).to(M.dtype).flip(0).clamp_min(0).sqrt()


def svd(M: torch.Tensor, *, gram_from: int = 192) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``M = U diag(s) Vh``. Where the smaller side is ``gram_from`` or more, through the
    eigendecomposition of the smaller Gram matrix (``M M^T`` or ``M^T M``), 5-20x faster than LAPACK's
    gesdd on conv unfoldings (512 x 4608: 0.2 s vs 2.3 s on one thread; see ``gram_eigh`` for the
    precision of large ones); singular values below
    1e-10 of the largest come out as 0 with zero singular vectors on the other side."""
    m, n = M.shape
    if min(m, n) < gram_from:
        return torch.linalg.svd(M, full_matrices=False)
    if m > n:
        V, s, Uh = svd(M.T, gram_from=gram_from)
        return Uh.T, s, V.T
    lam, U = gram_eigh(M)
    s = lam.sqrt()
    keep = s > 1e-10 * s[0].clamp_min(1e-300)
    inv = torch.where(keep, 1.0 / s.clamp_min(1e-300), torch.zeros_like(s))
    Vh = inv[:, None] * (U.T @ M)
    return U, torch.where(keep, s, torch.zeros_like(s)), Vh


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest r with sum(s[:r]^2) >= energy * sum(s^2) (s sorted descending); at least 1."""
    e = s.double() ** 2
    total = float(e.sum())
    if total <= 0:
        return 1
    cum = torch.cumsum(e, 0) / total
    r = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype)).item()) + 1
    return max(1, min(r, len(s)))


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    return 0.5 * (x - (1 + alpha) + np.sqrt(np.maximum((x - (1 + alpha)) ** 2 - 4 * alpha, 0.0)))


def _evb_objective(sigma2: float, L: int, M: int, s: np.ndarray, residual: float, xubar: float) -> float:
    H = len(s)
    alpha = L / M
    x = s**2 / (M * sigma2)
    z1 = x[x > xubar]
    z2 = x[x <= xubar]
    tau_z1 = _tau(z1, alpha)
    z2 = np.maximum(z2, 1e-300)
    term1 = np.sum(z2 - np.log(z2))
    term2 = np.sum(z1 - tau_z1)
    term3 = np.sum(np.log((tau_z1 + 1) / z1))
    term4 = alpha * np.sum(np.log(tau_z1 / alpha + 1))
    return float(term1 + term2 + term3 + term4 + residual / (M * sigma2) + (L - H) * np.log(sigma2))


def evbmf_rank(matrix: torch.Tensor, s: torch.Tensor | None = None) -> int:
    """EVBMF rank of ``matrix`` (or of a matrix of that shape with singular values ``s``); >= 1."""
    from scipy.optimize import minimize_scalar  # tensorly depends on scipy

    L, M = sorted(int(d) for d in matrix.shape)
    if s is None:
        s = torch.linalg.svdvals(matrix.double())
    s = s.double().cpu().numpy()[:L]
    H = L
    if L < 2 or not np.isfinite(s).all() or s[0] <= 0:
        return 1
    alpha = L / M
    tauubar = 2.5129 * math.sqrt(alpha)
    xubar = (1 + tauubar) * (1 + alpha / tauubar)
    eH_ub = int(min(math.ceil(L / (1 + alpha)) - 1, H)) - 1
    eH_ub = max(0, min(eH_ub, L - 2))
    residual = 0.0
    upper = (np.sum(s**2) + residual) / (L * M)
    lower = max(s[eH_ub + 1] ** 2 / (M * xubar), float(np.mean(s[eH_ub + 1 :] ** 2)) / M)
    if not lower < upper:
        lower = upper * 1e-6
    res = minimize_scalar(_evb_objective, args=(L, M, s, residual, xubar), bounds=[lower, upper], method="bounded")
    sigma2 = float(res.x)
    threshold = math.sqrt(M * sigma2 * (1 + tauubar) * (1 + alpha / tauubar))
    return max(1, int(np.sum(s > threshold)))


def round_rank(r: int, full: int, round_to: int) -> int:
    """``r`` rounded to the nearest multiple of ``round_to`` where ``full`` is big enough; in [1, full]."""
    r = max(1, min(int(r), full))
    if round_to > 1 and full >= 2 * round_to and r < full:
        r = max(round_to, int(round(r / round_to)) * round_to)
    return max(1, min(r, full))


def rank_grid(full: int, round_to: int, limit: int = 256) -> list[int]:
    """Candidate ranks in [1, full] (multiples of round_to where the dimension is big enough), at most
    ``limit`` of them (evenly thinned, the full rank always included), ascending."""
    step = round_to if round_to > 1 and full >= 2 * round_to else 1
    ranks = list(range(step, full + 1, step))
    if not ranks or ranks[-1] != full:
        ranks.append(full)
    if len(ranks) > limit:
        idx = np.unique(np.round(np.geomspace(1, len(ranks), limit)).astype(int) - 1)
        ranks = [ranks[i] for i in idx]
        if ranks[-1] != full:
            ranks.append(full)
    return ranks


def validate_rule(rank: Any, energy: Any) -> None:
    """Raise ValueError naming what is wrong with ``rank=`` / ``energy=``."""
    if rank is not None and energy is not None:
        raise ValueError("give either rank= or energy=, not both")
    if energy is not None:
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not (0.0 < float(energy) <= 1.0):
            raise ValueError(f"energy must be a number in (0, 1] (the fraction of spectral energy kept), got {energy!r}")
    if rank is None:
        return
    if isinstance(rank, dict):
        for k, v in rank.items():
            if not isinstance(k, str):
                raise ValueError(f"rank dict keys are layer names (node names or module paths), got {k!r}")
            validate_rule(v, None)
        return
    if isinstance(rank, bool):
        raise ValueError(f"rank must not be a bool. {RULE_HELP}")
    if isinstance(rank, int):
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}. {RULE_HELP}")
        return
    if isinstance(rank, float):
        if not (0.0 < rank < 1.0):
            raise ValueError(f"a float rank is the fraction of each layer's parameters kept and must be in (0, 1), got {rank}. {RULE_HELP}")
        return
    if isinstance(rank, (tuple, list)):
        if not rank or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rank):
            raise ValueError(f"a rank tuple holds ints >= 1, got {rank!r}. {RULE_HELP}")
        return
    if isinstance(rank, str):
        if rank.lower() != "evbmf":
            raise ValueError(f"unknown rank rule {rank!r}. {RULE_HELP}")
        return
    raise ValueError(f"cannot read rank={rank!r}. {RULE_HELP}")
