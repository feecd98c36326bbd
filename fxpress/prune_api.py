"""User functions for structured channel pruning: ``channel_groups`` to inspect, ``prune`` to shrink.

    groups = fxpress.channel_groups(model, (x,))   # every group, the tensor dims it ties, why frozen ones are
    print(groups.summary())
    pruned = fxpress.prune(model, (x,), ratio=0.5, importance="l2", round_to=8, ignore=["fc"])
    pruned(x)                                        # same output shape, smaller tensors
    print(fxpress.prune_report(pruned))              # params/MACs before and after, per tensor, frozen groups

``prune`` captures the model (a GraphModule from ``fxpress.capture`` is copied, never edited), runs the
``channel-prune`` pass ``iterative_steps`` times towards the target ratio through the PassManager (so
the graph is verified after each step), and returns the pruned GraphModule; it runs on any batch size
like the captured one and exports with ``fxpress.export_onnx``.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .ir.capture import capture, normalize_inputs
from .ir.channels import ChannelAnalysis, analyze_channels, resolve_ignore
from .passes.manager import PassManager
from .passes.prune.channel_prune import ChannelPrune, PruneReport, validate_options

__all__ = ["channel_groups", "prune", "prune_report"]


def _graph(model: Any, inputs: tuple) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule) and any("val" in n.meta for n in model.graph.nodes):
        return copy.deepcopy(model)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module or a captured GraphModule, got {type(model).__name__}")
    return capture(model, inputs, share_weights=False)


def _ignore_names(model: Any, ignore: Sequence[Any]) -> list[str]:
    if isinstance(ignore, (str, torch.nn.Module)):
        ignore = [ignore]
    names = []
    modules = None
    for item in ignore:
        if isinstance(item, str):
            names.append(item)
        elif isinstance(item, torch.nn.Module):
            if modules is None:
                modules = {id(m): n for n, m in model.named_modules()} if isinstance(model, torch.nn.Module) else {}
            name = modules.get(id(item))
            if not name:
                raise ValueError(f"ignored layer {type(item).__name__} is not a submodule of the model (or is the model itself)")
            names.append(name)
        else:
            raise TypeError(f"ignore takes module paths, node names or submodules, got {type(item).__name__}")
    return names


def channel_groups(model: torch.nn.Module, example_inputs: Any, *, ignore: Sequence[Any] = (), layer_norm: str = "approximate") -> ChannelAnalysis:
    """The channel groups of ``model`` (captured on ``example_inputs``): ``.groups``, ``.prunable``,
    ``.frozen`` (each with ``why_not``), ``.summary()``."""
    inputs = normalize_inputs(example_inputs)
    names = _ignore_names(model, ignore)
    gm = model if isinstance(model, fx.GraphModule) and any("val" in n.meta for n in model.graph.nodes) else _graph(model, inputs)
    return analyze_channels(gm, layer_norm=layer_norm, ignore=names)


def prune(
    model: torch.nn.Module,
    example_inputs: Any,
    ratio: float = 0.5,
    *,
    importance: str | Callable = "l2",
    reduction: str = "mean",
    global_pruning: bool = False,
    round_to: int = 1,
    min_channels: int = 1,
    max_ratio: float = 1.0,
    ignore: Sequence[Any] = (),
    iterative_steps: int = 1,
    layer_norm: str = "approximate",
    factors: str = "inner",
    loss_fn: Callable | None = None,
    batch: Any = None,
    seed: int = 0,
    verify: bool = True,
    step_callback: Callable[[fx.GraphModule, int], None] | None = None,
) -> fx.GraphModule:
    """Remove ``ratio`` of the channels of every prunable group; return the pruned GraphModule.

    ratio: fraction of each group's channels removed (of all channels with ``global_pruning``), in [0, 1);
        where a dim is a product of groups (see ``factors``) the dim, not each factor, loses ``ratio``.
    importance: "l1", "l2", "bn_scale", "random", "taylor", "lamp", or ``f(analysis, group) -> scores``.
    reduction: how a group's parameters combine into one score per channel ("mean", "sum", "max").
    round_to: keep a multiple of this many channels in every activation channel dim that shrinks
        (for a factor of a product dim, the multiple that keeps the product a multiple of it).
    min_channels: keep at least this many channels per group.
    max_ratio: with global pruning, the most any group may lose.
    ignore: layers whose output channels stay (module paths like "fc", submodules, or node names);
        a name that matches nothing is a ValueError.
    iterative_steps: reach the ratio in this many steps (importance recomputed each step;
        ``step_callback(gm, step)`` runs after each, e.g. to fine-tune).
    layer_norm: "approximate" prunes through layer/rms norms (their statistics change), "freeze" does not.
    factors: where a tensor dim is the product of two prunable groups -- a grouped convolution's
        groups x channels per group, attention's heads x head dim -- the ratio applies to the dim, and
        this picks the factor that shrinks: "inner" (default: channels per group and head dims; every
        group and head stays, as Torch-Pruning), "outer" (whole groups and whole heads, head dims
        kept) or "balanced" (each of k factors keeps (1 - ratio) ** (1/k)). A grouped conv's MACs
        fall to (1 - ratio) ** 2 with "inner", to (1 - ratio) with "outer".
    loss_fn, batch: the Taylor criterion's loss of the outputs (default: their sum) and batch
        (default: ``example_inputs``).
    The report: ``prune_report(pruned)``.
    """
    validate_options(ratio, importance, round_to, min_channels, max_ratio, reduction, factors)
    if isinstance(iterative_steps, bool) or not isinstance(iterative_steps, int) or iterative_steps < 1:
        raise ValueError(f"iterative_steps must be an integer >= 1, got {iterative_steps!r}")
    inputs = normalize_inputs(example_inputs)
    names = _ignore_names(model, ignore)
    gm = _graph(model, inputs)
    resolve_ignore(gm, names)  # a bad ignore fails before any work
    taylor_batch = normalize_inputs(batch) if batch is not None else inputs
    reports: list[PruneReport] = []
    kept_fraction = 1.0
    for step in range(1, iterative_steps + 1):
        target = 1.0 - ratio * step / iterative_steps
        step_ratio = 1.0 - target / kept_fraction if kept_fraction > 0 else 0.0
        kept_fraction = target
        p = ChannelPrune(
            ratio=min(max(step_ratio, 0.0), 0.999999),
            importance=importance,
            reduction=reduction,
            global_pruning=global_pruning,
            round_to=round_to,
            min_channels=min_channels,
            max_ratio=max_ratio,
            ignore=names,
            layer_norm=layer_norm,
            factors=factors,
            example_inputs=taylor_batch if importance == "taylor" else None,
            loss_fn=loss_fn,
            seed=seed + step - 1,
        )
        n_before = len(gm.meta.get("fxpress", {}).get("prune_reports", []))
        gm, _ = PassManager([p], verify=verify).run(gm, inputs)
        reports.extend(gm.meta.get("fxpress", {}).get("prune_reports", [])[n_before:])
        if step_callback is not None:
            step_callback(gm, step)
    merged = _merge(reports, ratio, iterative_steps)
    gm.meta.setdefault("fxpress", {})["prune_report"] = merged
    if ratio > 0 and not merged.layers:
        warnings.warn(f"fxpress.prune: {merged.notes[-1]} (see fxpress.prune_report for the frozen groups)", stacklevel=2)
    return gm


def _merge(reports: list[PruneReport], ratio: float, steps: int) -> PruneReport:
    first, last = reports[0], reports[-1]
    merged = PruneReport(
        ratio, first.importance, first.params_before, last.params_after, first.macs_before, last.macs_after,
        steps=steps, plan=first.plan if steps == 1 else None,
    )
    shapes: dict[str, Any] = {}
    for r in reports:
        for c in r.layers:
            before = shapes[c.target].before if c.target in shapes else c.before
            shapes[c.target] = type(c)(c.target, before, c.after)
        merged.rewrites += r.rewrites
        merged.notes += [n for n in r.notes if n not in merged.notes]
        merged.approximate += [a for a in r.approximate if a not in merged.approximate]
    merged.layers = list(shapes.values())
    merged.pruned_groups = last.pruned_groups if steps == 1 else [g for r in reports for g in r.pruned_groups]
    merged.frozen_groups = first.frozen_groups
    if not any(r.layers for r in reports):
        merged.notes.append("nothing was pruned" + (": " + "; ".join(first.notes) if first.notes else ""))
    return merged


def prune_report(pruned: fx.GraphModule) -> PruneReport:
    """The report ``prune`` attached to the graph it returned."""
    rep = getattr(pruned, "meta", {}).get("fxpress", {}).get("prune_report")
    if rep is None:
        raise ValueError("this graph was not produced by fxpress.prune (no prune report attached)")
    return rep
