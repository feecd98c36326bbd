"""smooth-quant: move activation outliers of linear layers into their weights (Xiao et al. 2023).

A few input channels of a transformer's linear layers are often 10-100x larger than the rest
(LayerNorm outputs in BERT/OPT/LLaMA). One per-tensor activation scale must then cover the
outliers, and every other channel gets a handful of levels. SmoothQuant divides each input channel
j by a scale s_j and multiplies column j of the weight by it, which is exact:

    y = x · Wᵀ = (x / s) · (W · diag(s))ᵀ

    s_j = max|X_j|^α / max|W_j|^(1-α)        (α = 0.5 by default; max|W_j| over every linear fed)

where max|X_j| is the calibration maximum of |x| in channel j and max|W_j| the largest |weight| in
input column j. α trades activation range for weight range; the weights are quantized per output
channel, so they absorb the larger columns better than a per-tensor activation absorbs outliers.

Before::

    h = aten.layer_norm(x, [d], gamma, beta, eps)
    q = aten.linear(h, Wq, bq);  k = aten.linear(h, Wk, bk);  r = aten.add(x, h)

After (``h`` also feeds the residual add, so the division is a new op in front of the linears)::

    h = aten.layer_norm(x, [d], gamma, beta, eps)
    h_s = aten.mul.Tensor(h, 1 / s)
    q = aten.linear(h_s, Wq · diag(s), bq);  k = aten.linear(h_s, Wk · diag(s), bk);  r = aten.add(x, h)

When every user of the activation is a linear being smoothed, 1/s is folded into its producer
instead and no op is added: into a LayerNorm (gamma / s, beta / s), or into the rows and bias of a
linear that reaches it through relu/dropout-like ops (positively homogeneous per channel:
relu(y/s) = relu(y)/s), which also spares that linear's own int8 output the outliers. A mul is
inserted otherwise; if the activation then comes from a quantized linear, that linear's int8
output still sees the outliers (the report notes it). One scale per input tensor: linears that
share an input share s (computed from all their weights).

Options: ``alpha``; ``statistics`` mapping the name of each linear's input node to max|X_j| (from
``activation_absmax``, run on calibration data before observers are inserted); ``config``: when
given, only linears it quantizes with int8 activations (static or dynamic) are smoothed, since
smoothing only costs weight precision for weight-only quantization; ``min_spread`` (default 4):
smooth only inputs with outlier channels, i.e. whose largest channel max|X_j| is at least this many
times the median one (smoothing evenly spread inputs only trades activation precision for weight
precision, and may cost a float mul); ``only_layer_norm``: smooth only inputs that come from a
LayerNorm. Skipped, with the reason: linears without statistics, with a non-constant weight, or
excluded by the options.

Numerics: exact up to float rounding (computed in float64), checked by the pass manager at 1e-4.
"""

from __future__ import annotations

import operator
from typing import Iterable

import torch
import torch.fx as fx

from ...ir.graph import add_constant, get_attr_value, node_label, set_attr_value
from ...ir.report import PassReport
from ..base import Pass, register_pass
from .bias_correction import ChannelStats, insert_stats
from .config import QuantConfig

__all__ = ["SmoothQuant", "activation_absmax", "smoothable_inputs"]

aten = torch.ops.aten
STATS_ROOT = "smooth_quant_stats"
LAYER_NORMS = frozenset({aten.layer_norm.default})


def _is_const(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def smoothable_inputs(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    """Float tensors that feed linears with constant weights → those linears."""
    found: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == aten.linear.default and _is_const(node.args[1]):
            x = node.args[0]
            val = x.meta.get("val") if isinstance(x, fx.Node) else None
            if isinstance(val, torch.Tensor) and val.is_floating_point():
                found.setdefault(x, []).append(node)
    return found


def activation_absmax(gm: fx.GraphModule, batches: Iterable[tuple[tuple, dict]]) -> dict[str, torch.Tensor]:
    """max|x| per channel of every linear's input over ``batches`` of (args, kwargs); the graph is left as it was."""
    inputs = smoothable_inputs(gm)
    recorders = {x.name: insert_stats(gm, x, users, x.name, STATS_ROOT, channel_dim=-1, positions=False) for x, users in inputs.items()}
    gm.recompile()
    seen = 0
    try:
        with torch.no_grad():
            for args, kwargs in batches:
                gm(*args, **kwargs)
                seen += 1
        stats = {}
        for name, node in recorders.items():
            mod: ChannelStats = gm.get_submodule(node.target)
            if mod.calibrated:
                stats[name] = mod.absmax.clone()
    finally:
        for node in recorders.values():
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        if hasattr(gm, STATS_ROOT):
            delattr(gm, STATS_ROOT)
        gm.recompile()
    if seen == 0:
        raise ValueError("SmoothQuant needs calibration data: the data yielded no batches")
    return stats


def _layer_norm_of(x: fx.Node) -> fx.Node | None:
    """The LayerNorm producing ``x`` with constant gamma and beta (aten.layer_norm, or getitem 0 of native_layer_norm)."""
    ln = x
    if x.op == "call_function" and x.target is operator.getitem and x.args[1] == 0:
        ln = x.args[0]
        if not (ln.op == "call_function" and ln.target == aten.native_layer_norm.default):
            return None
    elif not (x.op == "call_function" and x.target in LAYER_NORMS):
        return None
    gamma = ln.args[2] if len(ln.args) > 2 else None
    beta = ln.args[3] if len(ln.args) > 3 else None
    return ln if _is_const(gamma) and _is_const(beta) else None


def _producer_linear(gm: fx.GraphModule, x: fx.Node, single_users: bool = True) -> fx.Node | None:
    """The linear (constant weight and bias) whose output reaches ``x`` through per-channel
    positively homogeneous ops (relu, dropout, ...; f(x/s) = f(x)/s), each read only by the next."""
    from .equalize import HOMOGENEOUS

    cur = x
    while cur.op == "call_function" and cur.target in HOMOGENEOUS:
        cur = cur.args[0]
        if not isinstance(cur, fx.Node) or (single_users and len(cur.users) != 1):
            return None
    if not (cur.op == "call_function" and cur.target == aten.linear.default and _is_const(cur.args[1])):
        return None
    bias = cur.args[2] if len(cur.args) > 2 else None
    if bias is not None and not _is_const(bias):
        return None
    return cur


def _own(gm: fx.GraphModule, user: fx.Node, index: int) -> str:
    node = user.args[index]
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == node.target]
    if len(readers) == 1 and len(node.users) == 1:
        return node.target
    new = add_constant(gm, f"{node.target}_smoothed", get_attr_value(gm, node.target).clone(), before=user)
    user.update_arg(index, new)
    return new.target


@register_pass
class SmoothQuant(Pass):
    """Divide outlier input channels of linears by s and multiply the weight columns by s (exact)."""

    name = "smooth-quant"
    exact = True
    run_after = ("fold-batch-norm", "fold-constants", "cross-layer-equalization")
    run_before = ("insert-observers",)

    def __init__(
        self,
        statistics: dict[str, torch.Tensor] | None = None,
        alpha: float = 0.5,
        config: QuantConfig | str | dict | None = None,
        only_layer_norm: bool = False,
        min_spread: float = 4.0,
    ):
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.statistics = dict(statistics or {})
        self.alpha = float(alpha)
        self.config = QuantConfig.coerce(config) if config is not None else None
        self.only_layer_norm = only_layer_norm
        self.min_spread = float(min_spread)

    def _eligible(self, linear: fx.Node) -> str | None:
        if self.config is None:
            return None
        spec, reason = self.config.resolve(linear)
        if spec is None:
            return f"not quantized ({reason})"
        if spec.mode not in ("static", "dynamic") or spec.activation is None:
            return f"{spec.mode} quantization keeps activations in float; smoothing would only cost weight precision"
        return None

    def run(self, gm: fx.GraphModule, report: PassReport) -> None:
        if not self.statistics:
            report.note("no statistics given: run activation_absmax(gm, calibration) first and pass statistics=")
        for x, linears in smoothable_inputs(gm).items():
            chosen = []
            for lin in linears:
                reason = self._eligible(lin)
                if reason:
                    report.skip(node_label(lin), reason)
                else:
                    chosen.append(lin)
            if not chosen:
                continue
            ln = _layer_norm_of(x)
            if self.only_layer_norm and ln is None:
                for lin in chosen:
                    report.skip(node_label(lin), "input does not come from a LayerNorm (only_layer_norm=True)")
                continue
            if x.name not in self.statistics:
                for lin in chosen:
                    report.skip(node_label(lin), f"no calibration statistics for its input {x.name}")
                continue
            spread = _spread(self.statistics[x.name].double())
            if spread < self.min_spread:
                for lin in chosen:
                    report.skip(node_label(lin), f"no outlier channels in {x.name} (max|x| spread {spread:.3g} < min_spread {self.min_spread:g})")
                continue
            self._smooth(gm, x, chosen, ln, report)
        if report.changed:
            gm.graph.lint()
            gm.recompile()

    def _smooth(self, gm: fx.GraphModule, x: fx.Node, linears: list[fx.Node], ln: fx.Node | None, report: PassReport) -> None:
        act = self.statistics[x.name].double().cpu()
        weights = [get_attr_value(gm, lin.args[1].target) for lin in linears]
        w_max = torch.stack([w.detach().double().abs().amax(0).cpu() for w in weights]).amax(0)
        ok = (act > 0) & (w_max > 0)
        s = torch.where(ok, act.clamp(min=1e-12).pow(self.alpha) / w_max.clamp(min=1e-12).pow(1 - self.alpha), torch.ones_like(act))
        s = s.clamp(1e-5, 1e5)
        for lin, w in zip(linears, weights):
            set_attr_value(gm, _own(gm, lin, 1), (w.detach().double() * s.to(w.device)).to(w.dtype))
        only_smoothed = all(u in linears for u in x.users)
        prev = _producer_linear(gm, x) if only_smoothed and ln is None else None
        dtype = x.meta["val"].dtype
        if ln is not None and only_smoothed:
            for i in (2, 3):
                target = _own(gm, ln, i)
                old = get_attr_value(gm, target)
                set_attr_value(gm, target, (old.detach().double() / s.to(old.device)).to(old.dtype))
            where = f"folded into {node_label(ln)}"
        elif prev is not None:
            for i in (1, 2):
                if i < len(prev.args) and prev.args[i] is not None:
                    target = _own(gm, prev, i)
                    old = get_attr_value(gm, target)
                    scale = s.reshape(-1, *([1] * (old.dim() - 1))).to(old.device)
                    set_attr_value(gm, target, (old.detach().double() / scale).to(old.dtype))
            where = f"folded into the rows of {node_label(prev)}"
        else:
            inv = add_constant(gm, f"{x.name}_smooth_scale", (1.0 / s).to(dtype), before=linears[0])
            with gm.graph.inserting_after(inv):  # inv sits after x and before the first linear
                mul = gm.graph.call_function(aten.mul.Tensor, (x, inv))
            mul.meta["val"] = x.meta["val"]
            for lin in linears:
                lin.replace_input_with(x, mul)
            others = len(x.users) - 1
            where = f"inserted a mul ({others} other user(s) of {x.name} keep the unscaled tensor)" if others else "inserted a mul"
            if _producer_linear(gm, x, single_users=False) is not None:
                report.note(
                    f"{x.name} is the output of a linear, quantized before the mul sees it: smoothing helps "
                    f"{', '.join(l.name for l in linears)}'s input but not that output's quantization"
                )
        spread_before = _spread(act)
        spread_after = _spread(act / s)
        report.change(
            f"{x.name} → {', '.join(node_label(l) for l in linears)}: {where}; max|x| channel spread "
            f"{spread_before:.3g} → {spread_after:.3g}, s in [{float(s.min()):.3g}, {float(s.max()):.3g}]",
            kind="smoothed inputs",
        )


def _spread(v: torch.Tensor) -> float:
    v = v[v > 0]
    return float(v.max() / v.median()) if v.numel() else 1.0

