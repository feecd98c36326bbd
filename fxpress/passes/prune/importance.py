"""Channel importance and the choice of channels to remove, per channel group.

A group's channels sit in several parameter dims (a conv's output rows, a batch norm's scale, the
next layer's input columns, ...). Each criterion scores every *position* of each parameter dim the
group occurs in, sums the positions that belong to the same channel (a head owns head_dim positions
of a projection, a flattened conv channel owns H*W input features of the next linear), and the
group's score is a reduction (mean, sum or max) over those members:

==========  ================================================================================
``l1``      sum of |w| over the channel's slice (parameters only, never running statistics)
``l2``      sum of w^2 over the channel's slice (the squared group norm, as Torch-Pruning)
``bn_scale``  |gamma| of the batch norms in the group; groups without a batch norm fall back to l2
``random``  uniform random scores (seeded)
``taylor``  first-order Taylor: sum of |w * dL/dw| over the slice, from one batch and a loss
            (the sum of the outputs when no loss is given)
``lamp``    l2 scores normalised per group by LAMP: s_i / sum of the scores >= s_i
==========  ================================================================================

Selection: locally each group removes ``floor(size * ratio)`` of its lowest-scoring channels;
globally the scores are made comparable (divided by the group's mean score; LAMP scores are already
comparable) and the lowest ``ratio`` of all prunable channels go, at most ``max_ratio`` of any group.
Either way a group keeps at least ``min_channels`` channels and, with ``round_to``, a multiple of it.
Groups that are factors of a product space (a grouped conv's groups x channels per group, attention's
heads x head dim) take a *share* of the ratio so that the tensor dim, not each factor, shrinks by
``ratio`` (``ChannelAnalysis.product_shares``): a group with share ``e`` keeps ``(1 - ratio) ** e`` of
its channels (e = 0: kept whole), and globally the budget is the sum of those local removals. With
``round_to`` a factor rounds to the multiple that keeps each activation dim it occurs in a multiple
of ``round_to`` (``ChannelAnalysis.round_units``): 32 groups x 3 channels is a multiple of 8.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx

from ...ir.channels import ChannelAnalysis, ChannelGroup
from ...ir.graph import get_attr_value

__all__ = ["IMPORTANCES", "group_scores", "select_channels", "compute_gradients"]

IMPORTANCES = ("l1", "l2", "bn_scale", "random", "taylor", "lamp")
REDUCTIONS = ("mean", "sum", "max")

_BN_OPS = {"batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "native_batch_norm",
           "_native_batch_norm_legit_functional", "instance_norm", "_batch_norm_with_update", "_batch_norm_no_update"}


def _bn_weights(gm: fx.GraphModule) -> set[str]:
    """Attribute targets used as a batch norm's scale (gamma)."""
    out = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            if node.target._schema.name.split("::")[-1] in _BN_OPS and len(node.args) > 1:
                w = node.args[1]
                if isinstance(w, fx.Node) and w.op == "get_attr":
                    out.add(w.target)
    return out


def compute_gradients(gm: fx.GraphModule, inputs: tuple, loss_fn: Callable[[Any], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Gradients of a loss (default: the sum of all outputs) w.r.t. every floating-point parameter."""
    params = dict(gm.named_parameters())
    saved = {name: p.requires_grad for name, p in params.items()}
    buffers = [(b, b.clone()) for b in gm.buffers()]
    try:
        for p in params.values():
            if p.is_floating_point():
                p.requires_grad_(True)
                p.grad = None
        with torch.enable_grad():
            out = gm(*inputs)
            if loss_fn is not None:
                loss = loss_fn(out)
            else:
                leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
                loss = sum(t.sum() for t in leaves)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError("the Taylor criterion needs a scalar loss; loss_fn(outputs) returned "
                                 f"{type(loss).__name__} {tuple(getattr(loss, 'shape', ()))}")
            loss.backward()
        return {name: p.grad.detach().clone() for name, p in params.items() if p.grad is not None}
    finally:
        for name, p in params.items():
            p.grad = None
            p.requires_grad_(saved[name])
        with torch.no_grad():
            for b, copy in buffers:
                b.copy_(copy)


def _position_scores(w: torch.Tensor, dim: int, kind: str, grad: torch.Tensor | None) -> torch.Tensor:
    w = w.detach().double()
    if kind == "l1":
        s = w.abs()
    elif kind in ("l2", "lamp"):
        s = w * w
    elif kind == "taylor":
        if grad is None:
            s = torch.zeros_like(w)
        else:
            s = (w * grad.double()).abs()
    elif kind == "bn_scale":
        s = w.abs()
    else:
        raise ValueError(kind)
    if s.dim() == 0:
        return s.reshape(1)
    other = [d for d in range(s.dim()) if d != dim]
    return s.sum(dim=other) if other else s


def group_scores(
    analysis: ChannelAnalysis,
    group: ChannelGroup,
    importance: str | Callable = "l2",
    *,
    reduction: str = "mean",
    grads: Mapping[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    bn_weights: set[str] | None = None,
    param_ids: set[int] | None = None,
) -> tuple[torch.Tensor, str]:
    """Per-channel importance of a group (float64, length ``group.size``) and the criterion used.

    ``importance`` may also be a callable ``f(analysis, group) -> Tensor[group.size]``.
    """
    n = int(group.size)
    if callable(importance):
        s = torch.as_tensor(importance(analysis, group), dtype=torch.float64).reshape(-1)
        if s.numel() != n:
            raise ValueError(f"custom importance returned {s.numel()} scores for group #{group.id} of {n} channels")
        return s, getattr(importance, "__name__", "custom")
    if importance not in IMPORTANCES:
        raise ValueError(f"unknown importance {importance!r}; choose one of {', '.join(IMPORTANCES)} or pass a callable")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    if importance == "random":
        return torch.rand(n, generator=generator, dtype=torch.float64), "random"
    kind = importance
    if param_ids is None:
        param_ids = {id(p) for p in analysis.gm.parameters()}
    members = []
    for target, dim, coords in analysis.param_coords(group):
        w = get_attr_value(analysis.gm, target)
        if id(w) not in param_ids or not w.is_floating_point():
            continue  # running statistics and other buffers carry no importance
        if kind == "bn_scale" and target not in (bn_weights or set()):
            continue
        members.append((target, dim, coords, w))
    if kind == "bn_scale" and not members:
        return group_scores(analysis, group, "l2", reduction=reduction, grads=grads, param_ids=param_ids)[0], "l2 (no batch norm in group)"
    vectors = []
    for target, dim, coords, w in members:
        pos = _position_scores(w, dim, kind, (grads or {}).get(target))
        valid = coords >= 0
        v = torch.zeros(n, dtype=torch.float64)
        v.index_add_(0, coords[valid], pos[valid])
        vectors.append(v)
    if not vectors:
        return torch.zeros(n, dtype=torch.float64), f"{kind} (no parameter)"
    stacked = torch.stack(vectors)
    s = {"mean": stacked.mean(0), "sum": stacked.sum(0), "max": stacked.amax(0)}[reduction]
    if kind == "lamp":
        s = _lamp(s)
    return s, kind


def _lamp(s: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(s)
    sorted_s = s[order]
    tail = torch.flip(torch.cumsum(torch.flip(sorted_s, [0]), 0), [0])  # sum of scores >= each
    out = torch.empty_like(s)
    out[order] = sorted_s / tail.clamp_min(1e-300)
    return out


def _keep_count(n: int, n_prune: int, unit: int, min_channels: int) -> int:
    keep = n - n_prune
    if unit > 1:
        keep = min(n, math.ceil(keep / unit) * unit)
    return max(keep, min(min_channels, n))


def _removal(n: int, ratio: float, share: float) -> int:
    """Channels removed from a group of ``n`` whose keep fraction is ``(1 - ratio) ** share``."""
    if share <= 0:
        return 0
    frac = ratio if share == 1 else 1.0 - (1.0 - ratio) ** share
    return math.floor(n * frac + 1e-9)


def select_channels(
    scores: Mapping[ChannelGroup, torch.Tensor],
    ratio: float,
    *,
    global_pruning: bool = False,
    round_to: int = 1,
    min_channels: int = 1,
    max_ratio: float = 1.0,
    comparable: bool = False,
    shares: Mapping[ChannelGroup, float] | None = None,
    round_units: Mapping[ChannelGroup, int] | None = None,
) -> dict[ChannelGroup, torch.Tensor]:
    """The kept channel indices (sorted) of every group that loses channels.

    comparable: scores are already comparable across groups (LAMP, random); otherwise global
    ranking divides each group's scores by their mean.
    shares: per group, the exponent of its keep fraction (``ChannelAnalysis.product_shares``):
    a group keeps ``(1 - ratio) ** share`` of its channels (default 1; 0: the group is not pruned).
    round_units: per group, the multiple its kept count is rounded up to (default ``round_to``;
    ``ChannelAnalysis.round_units`` makes every activation dim a multiple of ``round_to``).
    """
    plan: dict[ChannelGroup, torch.Tensor] = {}
    if ratio <= 0:
        return plan
    share = {g: (1.0 if shares is None else shares.get(g, 1.0)) for g in scores}
    live = {g: s for g, s in scores.items() if share[g] > 0}
    counts: dict[ChannelGroup, int] = {}
    if not global_pruning:
        for g, s in live.items():
            counts[g] = _removal(s.numel(), ratio, share[g])
    else:
        flat, owner = [], []
        for g, s in live.items():
            norm = s if comparable else s / s.mean().clamp_min(1e-300)
            flat.append(norm)
            owner.extend([g] * s.numel())
        if flat:
            allv = torch.cat(flat)
            # the budget: what local pruning would remove (before rounding), ranked across groups
            budget = sum(s.numel() * (ratio if share[g] == 1 else 1.0 - (1.0 - ratio) ** share[g]) for g, s in live.items())
            k = math.floor(budget + 1e-9)
            order = torch.argsort(allv, stable=True)[:k].tolist()
            for i in order:
                counts[owner[i]] = counts.get(owner[i], 0) + 1
        for g, s in live.items():
            counts[g] = min(counts.get(g, 0), math.floor(s.numel() * max_ratio + 1e-9))
    for g, s in live.items():
        n = s.numel()
        unit = round_to if round_units is None else round_units.get(g, round_to)
        keep = _keep_count(n, counts.get(g, 0), unit, min_channels)
        if keep >= n:
            continue
        top = torch.argsort(s, descending=True, stable=True)[:keep]
        plan[g] = torch.sort(top).values
    return plan
