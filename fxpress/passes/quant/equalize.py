"""cross-layer-equalization: rescale the channels between two layers so their weight ranges match.

Cross-layer equalization (CLE, Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction"). Before::

    y = aten.conv2d(x, W1, b1);  r = aten.relu(y);  z = aten.conv2d(r, W2, b2)

After::

    y = aten.conv2d(x, W1 / s, b1 / s);  r = aten.relu(y);  z = aten.conv2d(r, W2 * s, b2)

where ``s`` scales output channel i of the first layer by 1/s_i and input channel i of the second
by s_i. With r1_i = max|W1[i, ...]| (the range of output channel i of the first layer) and
r2_i = max|W2[:, i, ...]| (the range of input channel i of the second),

    s_i = sqrt(r1_i * r2_i) / r2_i          →   r1_i / s_i = r2_i * s_i = sqrt(r1_i * r2_i)

so the two ranges of every channel become equal (their geometric mean), and channels whose range
was tiny next to the layer's widest channel no longer collapse to a few quantization levels. A
channel whose range is 0 in either layer keeps s_i = 1.

Chains: conv → conv, conv → depthwise/grouped conv (input channel i of a grouped conv is column
i mod (C_in/groups) of the rows of group i div (C_in/groups)), linear → linear, through any of

* positively homogeneous per-channel ops: relu, leaky_relu (f(x/s) = f(x)/s for s > 0), max/avg
  pooling, dropout (eval), clone;
* bounded activations relu6 / hardtanh(a, b): not homogeneous, but
  clamp(x/s, a, b) = clamp(x, a·s, b·s)/s, so they are rewritten (exactly) to
  ``aten.clamp.Tensor(x, a/s, b/s)`` with per-channel bounds (option ``bounded_activations``;
  off: such chains are skipped). These clamps, like relu6 before them, run in float between the
  int8 layers.

Every op on the chain must feed only the next one. Anything else between the two layers (a residual
add, an unfolded batch norm, a flatten that mixes channels with positions, gelu/silu/hardswish, a
second consumer of the first layer's output) breaks the identity, and the pair is skipped with the
reason. Overlapping pairs (conv → dw conv → conv) are equalized in turn, repeated until no scale
moves by more than ``min_change`` (at most ``iterations`` rounds).

Preconditions: weights and biases are constants; transposed convolutions are not handled. Runs on
the float graph after fold-batch-norm (so BN scales are part of W) and before insert-observers.

Numerics: exact up to float rounding (scales and new weights computed in float64 and stored in
float32), checked by the pass manager at 1e-4.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ...ir.graph import add_constant, get_attr_value, node_label, op_name, set_attr_value
from ...ir.report import PassReport
from ..base import Pass, register_pass
from ..fold_batch_norm import CONVS, GROUPS_ARG, LINEARS

__all__ = ["CrossLayerEqualization", "equalization_pairs"]

aten = torch.ops.aten

# f(x / s) = f(x) / s per channel for s > 0
HOMOGENEOUS = frozenset(
    {
        aten.relu.default, aten.relu_.default, aten.leaky_relu.default, aten.leaky_relu_.default,
        aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
        aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default,
        aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default,
        aten.dropout.default, aten.clone.default, aten.contiguous.default,
    }
)
BOUNDED = frozenset({aten.relu6.default, aten.hardtanh.default, aten.hardtanh_.default, aten.clamp.Tensor})
LAYERS = CONVS | LINEARS


@dataclass
class _Pair:
    first: fx.Node
    second: fx.Node
    chain: list[fx.Node] = field(default_factory=list)  # ops between them, in order

    def label(self) -> str:
        return " → ".join([node_label(self.first), *(op_name(n) for n in self.chain), node_label(self.second)])


def _groups(node: fx.Node) -> int:
    if node.target in LINEARS:
        return 1
    return int(node.args[GROUPS_ARG]) if len(node.args) > GROUPS_ARG else int(node.kwargs.get("groups", 1))


def _const(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return get_attr_value(gm, node.target)
    return None


def _bounds(node: fx.Node) -> tuple[float, float] | None:
    """(min, max) of a relu6/hardtanh with scalar bounds, None if it is not one."""
    if node.target == aten.relu6.default:
        return 0.0, 6.0
    if node.target in (aten.hardtanh.default, aten.hardtanh_.default):
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
        return float(lo), float(hi)
    return None


def _chain_reason(gm: fx.GraphModule, node: fx.Node, bounded: bool) -> str | None:
    """Why ``node`` (between two layers) breaks the per-channel scaling identity; None if it keeps it."""
    if node.op != "call_function":
        return f"the input is {node.op} {node.name}, not a layer"
    if node.target in HOMOGENEOUS:
        return None
    if node.target in BOUNDED:
        if not bounded:
            return f"{op_name(node)} is bounded (clamp(x/s) ≠ clamp(x)/s) and bounded_activations=False"
        if node.target == aten.clamp.Tensor:
            lo, hi = (node.args[1] if len(node.args) > 1 else None), (node.args[2] if len(node.args) > 2 else None)
            if all(b is None or _const(gm, b) is not None for b in (lo, hi)):
                return None
            return "clamp with bounds computed in the graph"
        return None
    name = op_name(node)
    if node.target in (aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor):
        return f"{name} (a residual/elementwise sum) sits between the layers: scaling one operand's channels breaks it"
    if "batch_norm" in name:
        return f"an unfolded {name} sits between the layers (run fold-batch-norm first)"
    if node.target in (aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        return f"{name} between the layers may mix channels with other dims"
    return f"{name} is not positively homogeneous per channel (f(x/s) ≠ f(x)/s)"


def _find_pair(gm: fx.GraphModule, second: fx.Node, bounded: bool) -> tuple[_Pair | None, str]:
    if _const(gm, second.args[1]) is None:
        return None, "weight is not a constant"
    chain: list[fx.Node] = []
    cur = second.args[0]
    while isinstance(cur, fx.Node) and not (cur.op == "call_function" and cur.target in LAYERS):
        reason = _chain_reason(gm, cur, bounded)
        if reason:
            return None, reason
        if len(cur.users) != 1:
            return None, f"{cur.name} ({op_name(cur)}) also feeds {len(cur.users) - 1} other node(s)"
        chain.append(cur)
        cur = cur.args[0]
    if not isinstance(cur, fx.Node):
        return None, "input is not a tensor node"
    first = cur
    if len(first.users) != 1:
        return None, f"{first.name}'s output also feeds {len(first.users) - 1} other node(s) (e.g. a residual branch)"
    if (first.target in LINEARS) != (second.target in LINEARS):
        return None, "a conv and a linear meet (channels are mixed with positions between them)"
    w1 = _const(gm, first.args[1])
    if w1 is None:
        return None, f"{first.name}'s weight is not a constant"
    bias = first.args[2] if len(first.args) > 2 else None
    if "bias" in first.kwargs or (bias is not None and _const(gm, bias) is None):
        return None, f"{first.name}'s bias is not a constant"
    w2 = _const(gm, second.args[1])
    if w2.shape[1] * _groups(second) != w1.shape[0]:
        return None, f"channel counts differ ({w1.shape[0]} out vs {w2.shape[1] * _groups(second)} in)"
    return _Pair(first, second, list(reversed(chain))), ""


def equalization_pairs(gm: fx.GraphModule, *, bounded_activations: bool = True) -> tuple[list[_Pair], list[tuple[fx.Node, str]]]:
    """The (first, second) layer pairs CLE can rescale, and the layers refused with the reason."""
    pairs, refused = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LAYERS:
            continue
        pair, reason = _find_pair(gm, node, bounded_activations)
        if pair is not None:
            pairs.append(pair)
        else:
            refused.append((node, reason))
    return pairs, refused


def _out_ranges(w: torch.Tensor) -> torch.Tensor:
    return w.abs().reshape(w.shape[0], -1).amax(1)


def _in_view(w: torch.Tensor, groups: int) -> torch.Tensor:
    """W2 as [groups, out_per_group, in_per_group, rest]."""
    out, cpg = w.shape[0], w.shape[1]
    return w.reshape(groups, out // groups, cpg, -1)


def _in_ranges(w: torch.Tensor, groups: int) -> torch.Tensor:
    return _in_view(w, groups).abs().amax(dim=(1, 3)).reshape(-1)


def _scale_in(w: torch.Tensor, groups: int, s: torch.Tensor) -> torch.Tensor:
    v = _in_view(w, groups)
    return (v * s.reshape(groups, 1, w.shape[1], 1)).reshape(w.shape)


def _own(gm: fx.GraphModule, user: fx.Node, index: int) -> str:
    """Make the constant at ``user.args[index]`` private to ``user``; return its attribute name."""
    node = user.args[index]
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == node.target]
    if len(readers) == 1 and len(node.users) == 1:
        return node.target
    new = add_constant(gm, f"{node.target}_equalized", get_attr_value(gm, node.target).clone(), before=user)
    user.update_arg(index, new)
    return new.target


@register_pass
class CrossLayerEqualization(Pass):
    """Equalize per-channel weight ranges of adjacent conv/linear layers (exact in float)."""

    name = "cross-layer-equalization"
    exact = True
    run_after = ("fold-batch-norm", "fold-constants")
    run_before = ("insert-observers",)

    def __init__(self, iterations: int = 20, min_change: float = 1e-3, bounded_activations: bool = True):
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        self.iterations = iterations
        self.min_change = min_change
        self.bounded_activations = bounded_activations

    def run(self, gm: fx.GraphModule, report: PassReport) -> None:
        pairs, refused = equalization_pairs(gm, bounded_activations=self.bounded_activations)
        for node, reason in refused:
            report.skip(node_label(node), f"not equalized with the layer before: {reason}")
        if not pairs:
            return
        # float64 working copies of every weight/bias involved; written back once at the end
        weights: dict[fx.Node, torch.Tensor] = {}
        biases: dict[fx.Node, torch.Tensor | None] = {}
        for p in pairs:
            for layer in (p.first, p.second):
                if layer not in weights:
                    weights[layer] = get_attr_value(gm, layer.args[1].target).detach().double()
                    b = layer.args[2] if len(layer.args) > 2 else None
                    biases[layer] = get_attr_value(gm, b.target).detach().double() if isinstance(b, fx.Node) else None
        total = {id(p): torch.ones(weights[p.first].shape[0], dtype=torch.float64) for p in pairs}
        spread_before = {id(p): _spread(_out_ranges(weights[p.first])) for p in pairs}
        rounds = 0
        for rounds in range(1, self.iterations + 1):
            moved = 0.0
            for p in pairs:
                w1, w2 = weights[p.first], weights[p.second]
                g2 = _groups(p.second)
                r1, r2 = _out_ranges(w1), _in_ranges(w2, g2)
                ok = (r1 > 0) & (r2 > 0)
                s = torch.where(ok, torch.sqrt(r1 * r2) / torch.where(ok, r2, 1.0), torch.ones_like(r1))
                weights[p.first] = w1 / s.reshape(-1, *([1] * (w1.dim() - 1)))
                if biases[p.first] is not None:
                    biases[p.first] = biases[p.first] / s
                weights[p.second] = _scale_in(w2, g2, s)
                total[id(p)] *= s
                moved = max(moved, float((s - 1).abs().max()))
            if moved < self.min_change:
                break
        for layer, w in weights.items():
            set_attr_value(gm, _own(gm, layer, 1), w.to(get_attr_value(gm, layer.args[1].target).dtype))
            if biases[layer] is not None:
                target = _own(gm, layer, 2)
                set_attr_value(gm, target, biases[layer].to(get_attr_value(gm, target).dtype))
        for p in pairs:
            s = total[id(p)]
            for op in p.chain:
                if op.target in BOUNDED:
                    self._rescale_bounds(gm, op, p.first, s)
            after = _spread(_out_ranges(weights[p.first]))
            report.change(
                f"{p.label()}: {s.numel()} channels, range spread (max/min channel range) "
                f"{spread_before[id(p)]:.3g} → {after:.3g}, scales in [{float(s.min()):.3g}, {float(s.max()):.3g}]",
                kind="equalized pairs",
            )
        report.note(f"{len(pairs)} pairs equalized in {rounds} round(s)")
        gm.graph.lint()
        gm.recompile()

    @staticmethod
    def _rescale_bounds(gm: fx.GraphModule, op: fx.Node, first: fx.Node, s: torch.Tensor) -> None:
        """relu6/hardtanh(a, b) → clamp.Tensor(x, a/s, b/s); an existing clamp's bounds are divided by s."""
        ndim = first.meta["val"].dim()
        shape = [-1] + [1] * (ndim - 2) if first.target in CONVS else [-1]
        if op.target == aten.clamp.Tensor:
            for i in (1, 2):
                b = op.args[i] if len(op.args) > i else None
                if b is not None:
                    target = _own(gm, op, i)
                    old = get_attr_value(gm, target)
                    set_attr_value(gm, target, (old.double() / s.reshape(shape)).to(old.dtype), parameter=False)
            return
        lo, hi = _bounds(op)
        dtype = first.meta["val"].dtype
        stem = f"{first.name}_clamp"
        lo_n = add_constant(gm, f"{stem}_min", (lo / s).reshape(shape).to(dtype), before=op)
        hi_n = add_constant(gm, f"{stem}_max", (hi / s).reshape(shape).to(dtype), before=op)
        with gm.graph.inserting_before(op):
            clamp = gm.graph.call_function(aten.clamp.Tensor, (op.args[0], lo_n, hi_n))
        clamp.meta = {**op.meta}
        op.replace_all_uses_with(clamp)
        gm.graph.erase_node(op)


def _spread(r: torch.Tensor) -> float:
    r = r[r > 0]
    return float(r.max() / r.min()) if r.numel() else 1.0
