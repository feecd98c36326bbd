"""channel-prune: structured channel pruning that physically shrinks the graph's tensors.

Before (a conv feeding a batch norm and the next conv; group #7 = 64 channels)::

    y = aten.conv2d(x, W1[64, 32, 3, 3], b1[64]); z = aten.batch_norm(y, g[64], b[64], m[64], v[64], ...)
    u = aten.conv2d(aten.relu(z), W2[128, 64, 3, 3]); h = aten.view(u, [s0, 128 * 7 * 7]) ...

After pruning half of group #7::

    y = aten.conv2d(x, W1[32, 32, 3, 3], b1[32]); z = aten.batch_norm(y, g[32], b[32], m[32], v[32], ...)
    u = aten.conv2d(aten.relu(z), W2[128, 32, 3, 3]) ...

Steps: ``analyze_channels`` (fxpress.ir.channels) finds the groups; importance.py scores the
prunable ones and picks the channels to keep; every parameter and buffer is ``index_select``-ed
along each dim where a pruned group occurs (per the group's layout: blocks for flattened channels
and heads, strided for head dims); the shape constants of the graph are rewritten by each op's rule
(view/reshape/expand/unflatten sizes, split sizes, slice bounds, group counts, ``layer_norm``'s
normalized_shape, the attention scale); ``meta["val"]`` is refreshed.

Preconditions: a captured graph (``fxpress.capture``). Nothing else: ops without a channel rule
freeze the groups they touch, and the report says which and why.

Numerics: not exact by design (channels are removed). What holds exactly (tests check it):
pruning no channel leaves the outputs unchanged, and the pruned graph computes what the original
computes with the removed channels' parameters zeroed -- except for groups through layer_norm /
rms_norm, whose statistics change (the report marks them approximate).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from ...ir.channels import FACTOR_POLICIES, KERNEL_WINDOW, ChannelAnalysis, ChannelGroup, PruningPlan, analyze_channels
from ...ir.cost import count_params, total_macs
from ...ir.graph import get_attr_value
from ...ir.report import PassReport, SizeRatios
from ...ir.verify import refresh_meta
from ..base import Pass, register_pass
from .importance import IMPORTANCES, _bn_weights, compute_gradients, group_scores, select_channels

__all__ = ["ChannelPrune", "PruneReport", "LayerChange", "apply_plan", "mask_plan", "validate_options"]


@dataclass
class LayerChange:
    """A parameter or buffer whose shape changed."""

    target: str
    before: tuple[int, ...]
    after: tuple[int, ...]


@dataclass
class PruneReport(SizeRatios):
    """What one pruning run did (``prune`` merges the steps of an iterative run)."""

    ratio: float
    importance: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    layers: list[LayerChange] = field(default_factory=list)
    pruned_groups: list[tuple[str, int, int]] = field(default_factory=list)  # (description, before, after)
    frozen_groups: list[tuple[str, str]] = field(default_factory=list)  # (description, why)
    approximate: list[str] = field(default_factory=list)
    rewrites: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    steps: int = 1
    plan: PruningPlan | None = field(default=None, repr=False)

    def __deepcopy__(self, memo: dict) -> "PruneReport":
        # The plan is a read-only record of the analysis of the graph *before* pruning (it holds
        # that graph's nodes and fake tensors, which cannot be copied); copies share it.
        fields = {f.name: (self.plan if f.name == "plan" else copy.deepcopy(getattr(self, f.name), memo)) for f in dataclasses.fields(self)}
        return type(self)(**fields)

    def layer_table(self) -> list[tuple[str, str]]:
        """Per layer (a module whose ``weight`` changed): weight dims 0 and 1 before -> after, i.e.
        output and input channels of conv/linear (per group for grouped convs; transposed convs
        have them the other way round), the channels of a norm."""
        rows = []
        for c in self.layers:
            if not c.target.endswith("weight") or not c.before:
                continue
            layer = c.target.rpartition(".")[0] or c.target
            parts = []
            if c.before[0] != c.after[0]:
                parts.append(f"out {c.before[0]} -> {c.after[0]}")
            if len(c.before) > 1 and c.before[1] != c.after[1]:
                parts.append(f"in {c.before[1]} -> {c.after[1]}")
            if parts:
                rows.append((layer, ", ".join(parts)))
        return rows

    def __str__(self) -> str:
        lines = [
            f"channel pruning: ratio {self.ratio}, importance {self.importance}"
            + (f", {self.steps} steps" if self.steps > 1 else ""),
            f"  params {self.params_before:,} -> {self.params_after:,} ({self.params_ratio:.3f}x)",
            f"  MACs   {self.macs_before:,} -> {self.macs_after:,} ({self.macs_ratio:.3f}x)",
            f"  {len(self.pruned_groups)} groups pruned, {len(self.frozen_groups)} groups with parameters frozen",
        ]
        table = self.layer_table()
        if table:
            lines.append("  layers (channels):")
            width = max(len(name) for name, _ in table[:60])
            for name, what in table[:60]:
                lines.append(f"    {name.ljust(width)}  {what}")
            if len(table) > 60:
                lines.append(f"    ... {len(table) - 60} more")
        if self.layers:
            lines.append("  tensors:")
            for c in self.layers[:60]:
                lines.append(f"    {c.target}: {list(c.before)} -> {list(c.after)}")
            if len(self.layers) > 60:
                lines.append(f"    ... {len(self.layers) - 60} more")
        if self.frozen_groups:
            lines.append("  frozen groups:")
            for desc, why in self.frozen_groups[:30]:
                lines.append(f"    {desc} -- {why}")
            if len(self.frozen_groups) > 30:
                lines.append(f"    ... {len(self.frozen_groups) - 30} more")
        if self.approximate:
            lines.append("  approximate (normalization statistics change): " + "; ".join(self.approximate[:5])
                         + (f" ... ({len(self.approximate)})" if len(self.approximate) > 5 else ""))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def validate_options(ratio: Any, importance: Any, round_to: Any, min_channels: Any, max_ratio: Any, reduction: Any,
                     factors: Any = "inner") -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0.0 <= float(ratio) < 1.0):
        raise ValueError(f"ratio must be a number in [0, 1) (the fraction of channels removed per group), got {ratio!r}")
    if factors not in FACTOR_POLICIES:
        raise ValueError(f"factors must be one of {', '.join(map(repr, FACTOR_POLICIES))} (which factor of a product of "
                         f"channel groups, e.g. heads x head dim, takes the ratio), got {factors!r}")
    if not callable(importance) and importance not in IMPORTANCES:
        raise ValueError(f"unknown importance {importance!r}; choose one of {', '.join(IMPORTANCES)} or pass a callable")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be an integer >= 1, got {round_to!r}")
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(f"min_channels must be an integer >= 1, got {min_channels!r}")
    if not isinstance(max_ratio, (int, float)) or not (0.0 < float(max_ratio) <= 1.0):
        raise ValueError(f"max_ratio must be in (0, 1], got {max_ratio!r}")
    if reduction not in ("mean", "sum", "max"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'max', got {reduction!r}")


def _set_tensor(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Replace an attribute keeping its kind: a parameter stays a parameter (with its requires_grad)."""
    *path, leaf = target.split(".")
    mod = gm
    for part in path:
        mod = getattr(mod, part)
    old = getattr(mod, leaf)
    if leaf in mod._parameters:
        mod._parameters[leaf] = torch.nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = value.detach().clone()
    else:
        setattr(mod, leaf, value.detach().clone())


def apply_plan(gm: fx.GraphModule, analysis: ChannelAnalysis, plan: PruningPlan) -> tuple[list[LayerChange], list[str]]:
    """Shrink parameters/buffers and rewrite shape constants per ``plan``; refresh ``meta["val"]``."""
    changes = []
    for target, per_dim in plan.param_kept().items():
        value = get_attr_value(gm, target)
        before = tuple(value.shape)
        new = value
        for d, idx in enumerate(per_dim):
            if idx is not None:
                new = new.index_select(d, idx.to(new.device))
        _set_tensor(gm, target, new)
        changes.append(LayerChange(target, before, tuple(new.shape)))
    rewrites = analysis.rewrite_shapes(plan)
    gm.graph.lint()
    gm.recompile()
    refresh_meta(gm)
    return changes, rewrites


def _describe(g: ChannelGroup) -> str:
    return g.describe(3)


@register_pass
class ChannelPrune(Pass):
    """Remove ``ratio`` of the channels of every prunable group (see the module docstring).

    ratio: fraction of channels removed per group (local) or overall (global), in [0, 1); a product
        dim's factors share it (see ``factors``).
    importance: l1, l2, bn_scale, random, taylor, lamp, or ``f(analysis, group) -> scores``.
    reduction: how a group's members combine (mean, sum, max).
    global_pruning: rank channels across groups instead of within each group.
    round_to: keep a multiple of this many channels in every activation channel dim a group shrinks.
    min_channels: keep at least this many channels per group.
    factors: where a tensor dim is a product of prunable groups (grouped conv: groups x channels per
        group; attention: heads x head dim), which shrink so that the dim loses ``ratio``: "inner"
        (channels per group, head dims; as Torch-Pruning), "outer" (whole groups, whole heads) or
        "balanced" (each of k factors keeps (1 - ratio) ** (1/k)).
    max_ratio: with global pruning, remove at most this fraction of any group.
    ignore: module paths or node names whose output channels are kept.
    layer_norm: "approximate" (prune through layer/rms norms) or "freeze".
    example_inputs, loss_fn: a batch (and a loss of the outputs) for the Taylor criterion.
    seed: for the random criterion.
    """

    name = "channel-prune"
    exact = False

    def __init__(
        self,
        ratio: float = 0.5,
        importance: str | Callable = "l2",
        reduction: str = "mean",
        global_pruning: bool = False,
        round_to: int = 1,
        min_channels: int = 1,
        max_ratio: float = 1.0,
        ignore: Sequence[str] = (),
        layer_norm: str = "approximate",
        example_inputs: Any = None,
        loss_fn: Callable | None = None,
        seed: int = 0,
        factors: str = "inner",
    ):
        validate_options(ratio, importance, round_to, min_channels, max_ratio, reduction, factors)
        if importance == "taylor" and example_inputs is None:
            raise ValueError("the taylor importance needs example_inputs (a batch to take gradients on)")
        self.ratio = float(ratio)
        self.importance = importance
        self.reduction = reduction
        self.global_pruning = global_pruning
        self.round_to = round_to
        self.min_channels = min_channels
        self.max_ratio = float(max_ratio)
        self.ignore = tuple(ignore)
        self.layer_norm = layer_norm
        self.example_inputs = example_inputs
        self.loss_fn = loss_fn
        self.seed = seed
        self.factors = factors

    def run(self, gm: fx.GraphModule, report: PassReport) -> None:
        analysis = analyze_channels(gm, layer_norm=self.layer_norm, ignore=self.ignore)
        prep = self.select(gm, analysis)
        plan_groups = prep.pop("keep")
        rep: PruneReport = prep["report"]
        for n in analysis.notes + rep.notes:
            report.note(n)
        for desc, why in rep.frozen_groups:
            report.skip(desc, why)
        if not plan_groups:
            if not analysis.prunable:
                why = "no prunable channel group: " + _no_group_reason(analysis)
            else:
                why = f"ratio {self.ratio} removes no channel from the {len(analysis.prunable)} prunable groups"
            report.note(why)
            rep.notes.append(why)
            gm.meta.setdefault("fxpress", {}).setdefault("prune_reports", []).append(rep)
            return
        plan = PruningPlan(analysis, {g.leaf: kept for g, kept in plan_groups.items()})
        rep.plan = plan
        changes, rewrites = apply_plan(gm, analysis, plan)
        rep.layers = changes
        rep.rewrites = rewrites
        rep.params_after = count_params(gm)
        rep.macs_after = total_macs(gm)
        for g, kept in plan_groups.items():
            rep.pruned_groups.append((_describe(g), int(g.size), int(kept.numel())))
            report.change(f"group #{g.id}: {g.size} -> {kept.numel()} channels ({_describe(g)})", "groups pruned")
        report.counts["channels removed"] = sum(int(g.size) - int(k.numel()) for g, k in plan_groups.items())
        for r in rewrites:
            report.note(f"rewrote {r}")
        report.note(f"params {rep.params_before:,} -> {rep.params_after:,}, MACs {rep.macs_before:,} -> {rep.macs_after:,}")
        gm.meta.setdefault("fxpress", {}).setdefault("prune_reports", []).append(rep)

    def select(self, gm: fx.GraphModule, analysis: ChannelAnalysis) -> dict:
        """Score and select (no change to ``gm``): {"keep": {group: kept}, "report": PruneReport}."""
        name = self.importance if isinstance(self.importance, str) else getattr(self.importance, "__name__", "custom")
        rep = PruneReport(self.ratio, name, count_params(gm), count_params(gm), total_macs(gm), total_macs(gm))
        for g in analysis.frozen:
            if g.frozen == [KERNEL_WINDOW] or not isinstance(g.size, int) or g.size < 2:
                continue
            if not any(p.is_parameter for p in g.params):
                continue  # dims of buffers only (index tables, position ids): not channels
            rep.frozen_groups.append((_describe(g), g.why_not or ""))
        grads = None
        if self.importance == "taylor":
            grads = compute_gradients(gm, tuple(self.example_inputs), self.loss_fn)
        gen = torch.Generator().manual_seed(self.seed)
        bn = _bn_weights(gm)
        param_ids = {id(p) for p in gm.parameters()}
        scores: dict[ChannelGroup, torch.Tensor] = {}
        used = set()
        shares = analysis.product_shares(self.factors)
        whole = [g for g, e in shares.items() if e == 0]
        if whole and self.ratio > 0:
            rep.notes.append(
                f"factors={self.factors!r}: {len(whole)} groups are factors of product dims (conv groups, attention "
                f"heads, ...) that keep all their channels while the other factor shrinks, e.g. {_describe(whole[0])}")
        units = analysis.round_units(self.round_to, shares) if self.round_to > 1 else None
        for g in analysis.prunable:
            if shares.get(g, 1.0) == 0:
                continue
            s, crit = group_scores(analysis, g, self.importance, reduction=self.reduction, grads=grads, generator=gen, bn_weights=bn, param_ids=param_ids)
            scores[g] = s
            used.add(crit)
            if g.approximate:
                rep.approximate.append(f"#{g.id}: {g.approximate[0]}")
        if len(used) > 1:
            rep.notes.append("criteria used: " + ", ".join(sorted(used)))
        keep = select_channels(
            scores,
            self.ratio,
            global_pruning=self.global_pruning,
            round_to=self.round_to,
            min_channels=self.min_channels,
            max_ratio=self.max_ratio,
            comparable=self.importance in ("lamp", "random"),
            shares=shares,
            round_units=units,
        )
        rep.approximate = [a for a in rep.approximate if any(f"#{g.id}:" in a for g in keep)]
        return {"keep": keep, "report": rep}


def _no_group_reason(analysis: ChannelAnalysis) -> str:
    frozen = [g for g in analysis.frozen if g.frozen and g.frozen != [KERNEL_WINDOW]]
    if not analysis.groups:
        return "the graph has no parameters"
    if not frozen:
        return "every group with parameters has a single channel"
    reasons: dict[str, int] = {}
    for g in frozen:
        for r in g.frozen:
            reasons[r] = reasons.get(r, 0) + 1
    top = sorted(reasons.items(), key=lambda kv: -kv[1])[:5]
    return "every group with parameters is frozen: " + "; ".join(f"{r} ({n} groups)" for r, n in top)


def mask_plan(gm: fx.GraphModule, plan: PruningPlan) -> fx.GraphModule:
    """A copy of the *unpruned* graph ``gm`` with the parameters of the channels ``plan`` removes set
    to zero (soft pruning). Buffers (running statistics) are left alone.

    The pruned graph computes exactly what this masked graph computes, except through groups marked
    approximate (layer/rms norm statistics): that is the correctness oracle of the tests.
    """
    import copy

    masked = copy.deepcopy(gm)
    param_ids = {id(p) for p in masked.parameters()}
    with torch.no_grad():
        for target, per_dim in plan.param_kept().items():
            t = get_attr_value(masked, target)
            if id(t) not in param_ids:
                continue
            for d, idx in enumerate(per_dim):
                if idx is None:
                    continue
                keep = torch.zeros(t.shape[d], dtype=torch.bool)
                keep[idx] = True
                shape = [1] * t.dim()
                shape[d] = -1
                t.mul_(keep.view(shape).to(t.dtype))
    return masked
