"""tt-linear: a large linear layer as a tensor-train (TT-matrix) of d small cores.

With ``out = o_1 ... o_d`` and ``in = i_1 ... i_d`` (balanced factorizations), the weight is viewed as a
d-way tensor with modes ``(o_k, i_k)`` and decomposed by TT-SVD (tensorly's ``tensor_train``)::

    W[(o_1..o_d), (i_1..i_d)] ~ G_1[1, o_1, i_1, r_1] G_2[r_1, o_2, i_2, r_2] ... G_d[r_{d-1}, o_d, i_d, 1]

Before::

    y = aten.linear(x, W[out, in], b)

After (d = 3; each core applied as a linear over its (i_k, r_k) pair, cores from last to first)::

    t = aten.reshape(x, [-1, i_1, i_2, i_3])
    t = aten.linear(t, G_3[(r_2 o_3), (i_3 r_3)])             # [N, i_1, i_2, r_2 o_3]
    t = aten.reshape(t, [-1, i_1, i_2, r_2, o_3]); t = aten.permute(t, [0, 1, 4, 2, 3])
    t = aten.reshape(t, [-1, i_1, o_3, i_2 * r_2])
    ... (G_2, G_1 alike)
    y = aten.add(aten.reshape(t, [-1, out]), b)               # then back to x's leading dims

(Novikov et al. 2015.) The leading dims of ``x`` may hold one dynamic size (the batch); a layer whose
input has another dynamic dim is left alone. ``cores`` sets d; a dimension that cannot be split into
d factors >= 2 leaves the layer alone.

Rank rules: an int is the largest TT rank (capped by the unfoldings); a ratio of the parameters; for
``energy=``/``"evbmf"`` each TT-SVD step picks its rank from the spectrum of its unfolding.

Numerics: at full TT ranks the chain equals the linear up to float rounding; truncated, the TT-SVD
error is at most ``sqrt(sum_k tail_k^2)`` over the steps (Oseledets 2011). Weight and output errors
are measured and reported. TT trades MACs for parameters: the cheaper check often rejects it for
small inputs and batch-1 GEMV shapes favour it only for large matrices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..base import register_pass
from .activations import LayerInputs
from .common import DecomposePass
from .layers import Layer
from .ops import AddBias, Factorization, Linear, Permute, Reshape
from .ranks import energy_rank, evbmf_rank, rank_grid, svd

__all__ = ["TtLinear", "factor_dim"]


def factor_dim(n: int, d: int) -> list[int] | None:
    """``n`` as d factors >= 2, as balanced as possible (descending); None if impossible."""
    best: list[int] | None = None

    def rec(rest: int, k: int, start: int, acc: list[int]) -> None:
        nonlocal best
        if k == 1:
            if rest >= max(start, 2):
                cand = sorted(acc + [rest], reverse=True)
                if best is None or (cand[0], sum(cand)) < (best[0], sum(best)):
                    best = cand
            return
        f = max(start, 2)
        while f ** k <= rest:
            if rest % f == 0:
                rec(rest // f, k - 1, f, acc + [f])
            f += 1

    rec(n, d, 2, [])
    return best


@dataclass
class TtAnalysis:
    outs: list[int]
    ins: list[int]
    caps: list[int]  # the largest useful rank at each of the d-1 bonds
    first: tuple | None = None  # (s, Vh) of the first TT-SVD unfolding, for predicted errors
    norm2: float = 0.0


@register_pass
class TtLinear(DecomposePass):
    """Tensor-train (TT-matrix) decomposition of linear layers: see the module docstring.

    cores: the number of TT cores d (both dimensions are split into d factors).
    """

    name = "tt-linear"
    method = "tt"
    kinds = ("linear",)

    def __init__(self, rank: Any = None, *, cores: int = 3, **options):
        super().__init__(rank, **options)
        if isinstance(cores, bool) or not isinstance(cores, int) or cores < 2:
            raise ValueError(f"cores must be an integer >= 2, got {cores!r}")
        self.cores = cores

    def applicable(self, layer: Layer) -> str | None:
        outs, ins = factor_dim(layer.out_features, self.cores), factor_dim(layer.in_features, self.cores)
        if outs is None or ins is None:
            bad = layer.out_features if outs is None else layer.in_features
            return f"{bad} does not split into {self.cores} factors >= 2 (try cores=2)"
        val = layer.node.args[0].meta.get("val")
        if val is not None and any(isinstance(s, torch.SymInt) for s in list(val.shape)[1:-1]):
            return "input has a dynamic dimension other than the batch"
        return None

    def analyze(self, layer: Layer, inputs: LayerInputs | None) -> TtAnalysis:
        outs, ins = factor_dim(layer.out_features, self.cores), factor_dim(layer.in_features, self.cores)
        modes = [o * i for o, i in zip(outs, ins)]
        caps = [min(math.prod(modes[: k + 1]), math.prod(modes[k + 1 :])) for k in range(self.cores - 1)]
        return TtAnalysis(outs, ins, caps)

    def _shape(self, layer: Layer) -> tuple[list[int], list[int], list[int]]:
        a = self.analyze(layer, None)
        return a.outs, a.ins, a.caps

    def full_rank(self, layer: Layer) -> int:
        return max(self._shape(layer)[2])

    def _ranks(self, layer: Layer, r: int) -> list[int]:
        caps = self._shape(layer)[2]
        return [1] + [min(r, c) for c in caps] + [1]

    def normalize_rank(self, layer: Layer, rank: Any) -> tuple[int, ...]:
        if isinstance(rank, (tuple, list)):
            caps = self._shape(layer)[2]
            inner = list(rank)[1:-1] if len(rank) == self.cores + 1 else list(rank)
            if len(inner) != len(caps):
                raise ValueError(f"{layer.label}: a TT rank tuple has {len(caps)} inner ranks (or {len(caps) + 2} with the 1s at the ends), got {rank!r}")
            return tuple([1] + [max(1, min(int(r), c)) for r, c in zip(inner, caps)] + [1])
        return tuple(self._ranks(layer, max(1, int(rank))))

    def candidates(self, layer: Layer) -> list[tuple[int, ...]]:
        return [tuple(self._ranks(layer, r)) for r in rank_grid(self.full_rank(layer), self.round_to, 48)]

    def cost(self, layer: Layer, ranks: tuple[int, ...]) -> tuple[int, int]:
        outs, ins, _ = self._shape(layer)
        d = self.cores
        params = sum(ranks[k] * outs[k] * ins[k] * ranks[k + 1] for k in range(d))
        params += layer.bias.numel() if layer.bias is not None else 0
        macs = 0
        for k in range(d - 1, -1, -1):  # rows of step k: prod(i_<k) * prod(o_>k)
            rows = layer.rows * math.prod(ins[:k]) * math.prod(outs[k + 1 :])
            macs += rows * ranks[k] * outs[k] * ins[k] * ranks[k + 1]
        return params, macs

    def _tensor(self, layer: Layer, a: TtAnalysis) -> torch.Tensor:
        d = self.cores
        W = layer.weight.detach().double().reshape(*a.outs, *a.ins)
        perm = [j for k in range(d) for j in (k, d + k)]
        return W.permute(perm).reshape([o * i for o, i in zip(a.outs, a.ins)])

    def _rule_ranks(self, layer: Layer, a: TtAnalysis, pick) -> tuple[int, ...]:
        """TT-SVD sweep choosing each bond's rank with ``pick(unfolding, singular values)``."""
        T = self._tensor(layer, a)
        modes = list(T.shape)
        ranks = [1]
        C = T.reshape(modes[0], -1)
        for k in range(self.cores - 1):
            C = C.reshape(ranks[-1] * modes[k], -1)
            U, s, Vh = torch.linalg.svd(C, full_matrices=False)
            r = max(1, min(pick(C, s), a.caps[k], len(s)))
            ranks.append(r)
            C = s[:r, None] * Vh[:r]
        return tuple(ranks + [1])

    def predicted_error(self, layer: Layer, a: TtAnalysis, ranks: tuple[int, ...]) -> float:
        """The relative error of TT-SVD at ``ranks``: the sweep's discarded singular values,
        ``sqrt(sum_k tail_k^2) / ||W||``, exact for TT-SVD (each step's left factor is orthonormal,
        so the discarded parts are orthogonal; Oseledets 2011) -- what ``factorize`` (tensorly's
        tensor_train, the same sweep) then achieves. The first unfolding's SVD is computed once."""
        if a.first is None:
            T = self._tensor(layer, a)
            if T.numel() >= 1 << 24:
                T = T.float()
            a.norm2 = float((T.double() ** 2).sum())
            _, s0, vh0 = svd(T.reshape(T.shape[0], -1))
            a.first = (s0, vh0)
        if a.norm2 <= 0:
            return 0.0
        s0, vh0 = a.first
        modes = [o * i for o, i in zip(a.outs, a.ins)]
        r = min(int(ranks[1]), len(s0))
        tail = float((s0[r:].double() ** 2).sum())
        C = s0[:r, None] * vh0[:r]
        for k in range(1, self.cores - 1):
            C = C.reshape(r * modes[k], -1)
            _, s, vh = svd(C)
            r = min(int(ranks[k + 1]), len(s))
            tail += float((s[r:].double() ** 2).sum())
            C = s[:r, None] * vh[:r]
        return min(1.0, max(tail, 0.0) ** 0.5 / a.norm2**0.5)

    def energy_rank(self, layer: Layer, a: TtAnalysis, energy: float) -> tuple[int, ...]:
        return self._rule_ranks(layer, a, lambda C, s: energy_rank(s, energy))

    def evbmf_rank(self, layer: Layer, a: TtAnalysis) -> tuple[tuple[int, ...], list[str]]:
        ranks = self._rule_ranks(layer, a, lambda C, s: evbmf_rank(C, s))
        return ranks, (["EVBMF found no signal above the noise estimate at a bond; rank 1 there"] if 1 in ranks[1:-1] else [])

    def factorize(self, layer: Layer, ranks: tuple[int, ...], a: TtAnalysis) -> Factorization:
        import tensorly as tl
        from tensorly.decomposition import tensor_train

        d = self.cores
        T = self._tensor(layer, a)
        with tl.backend_context("pytorch"):
            tt = tensor_train(T.contiguous(), rank=list(ranks))
            factors = [f.contiguous() for f in tt.factors]
            rec = tl.tt_to_tensor(tt)
        ranks = tuple([1] + [int(f.shape[2]) for f in factors[:-1]] + [1])  # tensorly may cap them
        err = ((rec - T).norm() / T.norm()).item() if T.norm() > 0 else 0.0
        return Factorization(self.method, ranks, self._ops(layer, a, ranks, [f.to(layer.weight.dtype) for f in factors]), weight_error=err)

    def template(self, layer: Layer, ranks: tuple[int, ...]) -> list:
        a = self.analyze(layer, None)
        modes = [o * i for o, i in zip(a.outs, a.ins)]
        factors = [torch.randn(ranks[k], modes[k], ranks[k + 1], dtype=layer.weight.dtype) for k in range(self.cores)]
        return self._ops(layer, a, tuple(ranks), factors)

    def _ops(self, layer: Layer, a: TtAnalysis, ranks: tuple[int, ...], factors: list[torch.Tensor]) -> list:
        d = self.cores
        outs, ins = a.outs, a.ins
        dtype = layer.weight.dtype
        lead = list(layer.in_shape[:-1])
        ops: list = [Reshape([-1, *ins])]
        for k in range(d - 1, -1, -1):
            G = factors[k].reshape(ranks[k], outs[k], ins[k], ranks[k + 1])
            Wk = G.reshape(ranks[k] * outs[k], ins[k] * ranks[k + 1])
            ops.append(Linear(Wk.to(dtype)))
            # now [N, ins[:k], outs[k+1:], ranks[k] * outs[k]]; next: [N, ins[:k-1], outs[k:], ins[k-1] * ranks[k]]
            n_in, n_out = k, d - 1 - k
            ops.append(Reshape([-1, *ins[:k], *outs[k + 1 :], ranks[k], outs[k]]))
            base = 1 + n_in + n_out  # index of r_{k-1}; o_k at base + 1
            if k > 0:
                dims = [0, *range(1, k), base + 1, *range(1 + n_in, base), k, base]
                ops.append(Permute(dims))
                ops.append(Reshape([-1, *ins[: k - 1], *outs[k:], ins[k - 1] * ranks[k]]))
            else:
                dims = [0, base + 1, *range(1, base), base]  # r_0 = 1 goes in the reshape below
                ops.append(Permute(dims))
        out_shape = [-1, layer.out_features] if len(lead) == 1 else [-1, *lead[1:], layer.out_features]
        ops.append(Reshape(out_shape))
        if layer.bias is not None:
            ops.append(AddBias(layer.bias, layer.bias_node))
        return ops
