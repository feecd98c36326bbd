"""sparsify: zero individual weights of conv / linear / matmul layers (unstructured or N:M).

What is rewritten: the *values* of the weight constants, nothing else. The graph keeps its ops
and shapes; every chosen weight tensor is replaced by ``W * mask`` (same shape, dtype, device, a
parameter stays a parameter with its ``requires_grad``)::

    y = aten.linear(x, W[64, 128], b)          # W dense
    y = aten.linear(x, W'[64, 128], b)         # W' = W * mask: 50 % exact zeros, still dense

Which weights: the weight operand of ``aten.linear``, ``aten.conv{1,2,3}d``,
``aten.conv_transpose{1,2,3}d``, ``aten.convolution``, and the constant operand of
``aten.matmul`` / ``mm`` / ``bmm`` / ``addmm`` (found through ``t`` / ``transpose`` / ``permute``).
A constant that is also read by any other op (a tied embedding, a weight reused as data) is
skipped with the reason, as are non-float weights, weights computed in the graph (a dequantize in
front: sparsify before quantizing), ignored layers and layers under ``min_params`` weights.

Patterns (importance = |W|, or |W| * ||X_j||_2 with ``importance="wanda"``):

- ``"unstructured"``: the ``round(sparsity * n)`` least important weights become zero, ranked
  per layer (``scope="layer"``), over all chosen layers together (``"global"``: one threshold, so
  layers end at different sparsities), or per output slice of each weight (``"output"``: every
  output channel / neuron loses the same fraction; Wanda's comparison group; a 1-d matmul operand
  is one slice).
- ``"N:M"`` (``"2:4"``, ``"1:4"``, ``"4:8"``, ...): in every run of M consecutive weights along
  the reduction dim keep the N most important, zero the rest; sparsity is 1 - N/M exactly. The
  reduction dim is the input-channel dim: a linear's dim 1; a conv's dim 1 (input channels at
  each kernel position, as NVIDIA's ASP / cuSPARSELt / TensorRT lay out sparse convs); a
  transposed conv's dim 0; a matmul constant's dim -2 (``x @ W``) or -1 (``W @ x``). Layers whose
  reduction dim is not a multiple of M are skipped with the reason.

Wanda (Sun et al. 2023): ||X_j||_2 is the L2 norm of input channel j over the calibration batches
(every token / batch row / spatial position), given as ``activation_norms`` {consumer node name:
per-channel RMS} from ``input_channel_norms`` (the RMS ranks as the norm within a layer and keeps
layers comparable for scope="global"). For a conv the norm of a channel over all spatial
positions stands in for the norms of its shifted windows (an approximation; zero padding is not
seen).

What runs faster -- honestly: nothing on CPU. The weights stay dense tensors that hold zeros,
because that is what ONNX / onnxruntime and inductor run: neither onnxruntime's CPU kernels nor
inductor's CPU code generation skip zeros, so latency is unchanged, and the .onnx file has the same
size (zeros compress well under gzip/zip). 2:4 pays off only on NVIDIA Ampere or newer GPUs, where
``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt / CUTLASS) runs linears on the sparse
tensor cores (``fxpress.sparsify(..., semi_structured=True)`` does that conversion). Unstructured
sparsity is a step towards smaller compressed files and towards structured pruning, and a
research baseline; it is not a speed-up here.

Numerics: not exact by design. What holds exactly (tests check it): the result computes what the
original computes with ``W * mask`` in place of each chosen W, and sparsity 0 changes nothing.
The mask is not kept: fine-tuning afterwards lets zeros grow back (``sparsity_report`` shows it).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.fx as fx

from ...ir.channels import _module_path, resolve_ignore
from ...ir.graph import get_attr_value, op_name
from ...ir.report import PassReport
from ..base import Pass, register_pass
from .channel_prune import _set_tensor

__all__ = [
    "Sparsify",
    "SparsityReport",
    "LayerSparsity",
    "WeightLayer",
    "find_weight_layers",
    "input_channel_norms",
    "measure_sparsity",
    "nm_mask",
    "parse_pattern",
    "validate_sparsity_options",
    "SCOPES",
    "SPARSITY_IMPORTANCES",
]

aten = torch.ops.aten

SCOPES = ("layer", "global", "output")
SPARSITY_IMPORTANCES = ("magnitude", "wanda")

_CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
          aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding}
_CONV_TRANSPOSES = {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}
_MATMULS = {aten.matmul.default, aten.mm.default, aten.bmm.default}
_VIEWS = {aten.t.default, aten.transpose.int, aten.permute.default}


# ---------------------------------------------------------------------------------------------
# options


def parse_pattern(pattern: Any) -> tuple[int, int] | None:
    """None for "unstructured", (n, m) for "N:M" (or a tuple (n, m)); a ValueError otherwise."""
    if pattern == "unstructured":
        return None
    nm = None
    if isinstance(pattern, str):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
        if match:
            nm = int(match.group(1)), int(match.group(2))
    elif isinstance(pattern, (tuple, list)) and len(pattern) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in pattern):
        nm = int(pattern[0]), int(pattern[1])
    if nm is None:
        raise ValueError(
            f"unknown sparsity pattern {pattern!r}: use 'unstructured' or an N:M pattern such as '2:4' "
            "(keep N of every M consecutive weights along the reduction dim)"
        )
    n, m = nm
    if m < 2 or not 1 <= n < m:
        raise ValueError(f"pattern '{n}:{m}' is not a sparsity pattern: N:M keeps N of every M weights, so 1 <= N < M (e.g. '2:4')")
    return nm


def validate_sparsity_options(sparsity: Any, pattern: Any, scope: Any, importance: Any, min_params: Any) -> tuple[float, tuple[int, int] | None]:
    """Check the options; return (the sparsity to reach, (n, m) or None). ``sparsity=None`` means
    0.5 for unstructured and 1 - N/M for an N:M pattern (which fixes it: another value is an error)."""
    nm = parse_pattern(pattern)
    if sparsity is not None and (isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"sparsity must be a number in [0, 1) (the fraction of weights set to zero), got {sparsity!r}")
    if nm is not None:
        n, m = nm
        fixed = 1.0 - n / m
        if sparsity is not None and not math.isclose(float(sparsity), fixed, abs_tol=1e-9):
            raise ValueError(
                f"pattern '{n}:{m}' keeps {n} of every {m} weights, i.e. sparsity {fixed:g} exactly; got sparsity={sparsity!r}. "
                f"Leave sparsity unset with an N:M pattern, or use pattern='unstructured' for sparsity {sparsity!r}."
            )
        sparsity = fixed
    elif sparsity is None:
        sparsity = 0.5
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(map(repr, SCOPES))}, got {scope!r}")
    if nm is not None and scope != "layer":
        raise ValueError(
            f"scope={scope!r} applies to unstructured sparsity only: an N:M pattern keeps N of every M weights "
            "in every group of every layer alike. Use scope='layer' (the default) with an N:M pattern."
        )
    if importance not in SPARSITY_IMPORTANCES:
        raise ValueError(f"unknown importance {importance!r} for sparsity; choose one of {', '.join(map(repr, SPARSITY_IMPORTANCES))}")
    if isinstance(min_params, bool) or not isinstance(min_params, int) or min_params < 0:
        raise ValueError(f"min_params must be an integer >= 0 (layers with fewer weights are skipped), got {min_params!r}")
    return float(sparsity), nm


def pattern_name(nm: tuple[int, int] | None) -> str:
    return "unstructured" if nm is None else f"{nm[0]}:{nm[1]}"


# ---------------------------------------------------------------------------------------------
# finding the weights


@dataclass
class WeightUse:
    """One op reading a weight constant as its weight operand (dims are dims of the stored tensor)."""

    node: fx.Node
    red_dim: int  # the reduction (input-channel) dim
    out_dim: int | None  # the output dim (None for a 1-d matmul operand)
    act: fx.Node | None  # the activation operand
    act_dim: int  # its channel dim
    groups: int = 1  # a conv's groups (activation channels of group g feed rows of group g)


@dataclass
class WeightLayer:
    """A weight constant (``target``) and the ops that read it; ``problem`` says why it cannot be
    sparsified whatever the options (another kind of reader, a non-float dtype)."""

    target: str
    uses: list[WeightUse] = field(default_factory=list)
    problem: str | None = None

    @property
    def name(self) -> str:
        """The module path of the reading op(s), else their node names."""
        names = []
        for u in self.uses:
            n = _module_path(u.node) or u.node.name
            if n not in names:
                names.append(n)
        return ", ".join(names)

    @property
    def op(self) -> str:
        return ", ".join(sorted({op_name(u.node) for u in self.uses}))

    @property
    def red_dim(self) -> int | None:
        dims = {u.red_dim for u in self.uses}
        return dims.pop() if len(dims) == 1 else None

    @property
    def out_dim(self) -> int | None:
        dims = {u.out_dim for u in self.uses}
        return dims.pop() if len(dims) == 1 else None


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _source(arg: Any) -> tuple[fx.Node, list[int]] | None:
    """The get_attr node an operand comes from through t/transpose/permute, and for each operand dim
    the stored dim it is; None when the operand is computed."""
    chain = []
    cur = arg
    while isinstance(cur, fx.Node) and cur.op == "call_function" and cur.target in _VIEWS:
        chain.append(cur)
        cur = cur.args[0]
    if not (isinstance(cur, fx.Node) and cur.op == "get_attr"):
        return None
    val = cur.meta.get("val")
    nd = val.dim() if isinstance(val, torch.Tensor) else None
    if nd is None:
        return None
    perm = list(range(nd))
    for v in reversed(chain):
        if v.target == aten.t.default:
            perm = perm[::-1]
        elif v.target == aten.transpose.int:
            d0, d1 = (int(d) % len(perm) for d in v.args[1:3])
            perm[d0], perm[d1] = perm[d1], perm[d0]
        else:
            perm = [perm[int(d) % len(perm)] for d in v.args[1]]
    return cur, perm


def _ndim(x: Any) -> int | None:
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _weight_operands(node: fx.Node) -> list[tuple[int, int, int | None, Any, int, int]] | None:
    """(weight arg index, reduction dim, output dim, activation, its channel dim, groups) in operand
    dims, per weight operand the op may have; None when the op reads no weight."""
    t = node.target
    if t == aten.linear.default:
        return [(1, 1, 0, node.args[0], -1, 1)]
    if t in _CONVS:
        return [(1, 1, 0, node.args[0], 1, int(_arg(node, 6, "groups", 1)))]
    if t in _CONV_TRANSPOSES:
        return [(1, 0, 1, node.args[0], 1, 1)]
    if t == aten.convolution.default:
        transposed, groups = bool(_arg(node, 6, "transposed", False)), int(_arg(node, 8, "groups", 1))
        return [(1, 0, 1, node.args[0], 1, 1)] if transposed else [(1, 1, 0, node.args[0], 1, groups)]
    if t in _MATMULS or t == aten.addmm.default:
        a, b = (1, 2) if t == aten.addmm.default else (0, 1)
        first, second = node.args[a], node.args[b]
        out = []
        if _source(second) is not None:  # x @ W: W[..., K, N] reduces over K
            wd = _ndim(second) or 2
            out.append((b, 0 if wd == 1 else -2, None if wd == 1 else -1, first, -1, 1))
        elif _source(first) is not None:  # W @ x: W[..., M, K] reduces over K; x's channels are its dim -2
            wd, xd = _ndim(first) or 2, _ndim(second) or 2
            out.append((a, -1, None if wd == 1 else -2, second, 0 if xd == 1 else -2, 1))
        return out
    return None


_LAYER_OPS = {aten.linear.default, aten.convolution.default, *_CONVS, *_CONV_TRANSPOSES}


def find_weight_layers(gm: fx.GraphModule) -> tuple[list[WeightLayer], list[tuple[str, str]]]:
    """Every weight constant read by a conv / linear / matmul (in graph order), and the conv/linear
    ops whose weight is not a constant, each with the reason."""
    layers: dict[str, WeightLayer] = {}
    computed: list[tuple[str, str]] = []
    accounted: set[tuple[fx.Node, fx.Node]] = set()  # (get_attr or view node, reading node)
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        operands = _weight_operands(node)
        if operands is None:
            continue
        if not operands or all(_source(node.args[i]) is None for i, *_ in operands):
            if node.target in _LAYER_OPS:
                w = node.args[1]
                what = op_name(w) if isinstance(w, fx.Node) else type(w).__name__
                computed.append((_label(node), f"its weight is computed in the graph ({what}), not a constant: sparsify before quantizing"))
            continue
        for index, red, out, act, act_dim, groups in operands:
            src = _source(node.args[index])
            if src is None:
                continue
            attr, perm = src
            layer = layers.setdefault(attr.target, WeightLayer(attr.target))
            nd = len(perm)
            layer.uses.append(WeightUse(node, perm[red % nd], None if out is None else perm[out % nd], act, act_dim, groups))
            cur = node.args[index]
            accounted.add((cur, node))
            while cur is not attr:
                accounted.add((cur.args[0], cur))
                cur = cur.args[0]
    attrs: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in layers:
            attrs.setdefault(node.target, []).append(node)
    for target, layer in layers.items():
        value = get_attr_value(gm, target)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            layer.problem = f"not a float tensor ({getattr(value, 'dtype', type(value).__name__)})"
            continue
        others = []
        for a in attrs.get(target, []):
            others += _other_readers(a, accounted)
        if others:
            layer.problem = "also read by " + ", ".join(others[:3]) + (" ..." if len(others) > 3 else "") + " (a shared weight)"
    return list(layers.values()), computed


def _other_readers(node: fx.Node, accounted: set) -> list[str]:
    out = []
    for user in node.users:
        if (node, user) in accounted:
            if user.op == "call_function" and user.target in _VIEWS:
                out += _other_readers(user, accounted)
            continue
        out.append(f"{op_name(user)} ({user.name})")
    return out


def _label(node: fx.Node) -> str:
    path = _module_path(node)
    return f"{node.name} ({path})" if path else node.name


# ---------------------------------------------------------------------------------------------
# calibration statistics


def input_channel_norms(gm: fx.GraphModule, batches: Iterable[tuple]) -> dict[str, torch.Tensor]:
    """The RMS of every input channel j, ||X_j||_2 / sqrt(rows), of every conv / linear / matmul
    reading a weight constant, over ``batches`` (each the graph's positional inputs), keyed by the
    reading node's name. The graph is run by an ``fx.Interpreter``: nothing is inserted into it.

    Within a layer this ranks weights exactly as Wanda's ||X_j||_2; dividing by sqrt(rows) (the
    samples times the positions a channel is seen at) makes layers comparable for scope="global",
    where a raw norm would favour convs on large feature maps over a classifier head."""
    layers, _ = find_weight_layers(gm)
    watch = {u.node: (u.act, u.act_dim) for layer in layers for u in layer.uses if isinstance(u.act, fx.Node)}
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            if n in watch:
                act, dim = watch[n]
                x = self.env.get(act)
                if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
                    d = dim % x.dim()
                    flat = x.detach().double().movedim(d, -1).reshape(-1, x.shape[d])
                    sq = flat.pow(2).sum(0)
                    sums[n.name] = sums[n.name] + sq if n.name in sums else sq
                    rows[n.name] = rows.get(n.name, 0) + flat.shape[0]
            return super().run_node(n)

    seen = 0
    with torch.no_grad():
        for args in batches:  # the graph's placeholders are the flattened inputs
            _Recorder(gm).run(*torch.utils._pytree.tree_leaves(tuple(args)))
            seen += 1
    if seen == 0:
        raise ValueError("the calibration data yielded no batches; give a non-empty DataLoader or list of batches")
    return {name: (s / rows[name]).sqrt().float() for name, s in sums.items()}


# ---------------------------------------------------------------------------------------------
# masks


def nm_mask(scores: torch.Tensor, dim: int, n: int, m: int) -> torch.Tensor:
    """Keep mask: in every run of ``m`` consecutive entries along ``dim`` the ``n`` highest scores."""
    moved = scores.movedim(dim, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    top = groups.topk(n, dim=-1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(moved.shape).movedim(-1, dim)


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep mask for a flat score vector without its ``k`` lowest entries (exactly k, ties by index)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        keep[torch.argsort(scores.reshape(-1), stable=True)[:k]] = False
    return keep.reshape(scores.shape)


def _count(x: float) -> int:
    return int(math.floor(x + 0.5))


def _is_semi_structured(t: Any) -> bool:
    from torch.sparse import SparseSemiStructuredTensor

    return isinstance(t, SparseSemiStructuredTensor)


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t.to_dense() if _is_semi_structured(t) else t.detach()


def nm_conforms(w: torch.Tensor, dim: int, n: int, m: int) -> bool | None:
    """Whether every run of ``m`` along ``dim`` has at most ``n`` nonzeros (None: dim not a multiple of m)."""
    if w.dim() == 0 or w.shape[dim] % m:
        return None
    moved = (_dense(w) != 0).movedim(dim, -1)
    counts = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m).sum(-1)
    return bool((counts <= n).all())


# ---------------------------------------------------------------------------------------------
# the report


@dataclass
class LayerSparsity:
    """One weight constant as measured: ``pattern`` is what sparsify applied (None: left dense);
    ``conforms`` whether it satisfies the N:M pattern checked (None: not checked / not applicable)."""

    layer: str
    target: str
    op: str
    shape: tuple[int, ...]
    total: int
    zeros: int
    pattern: str | None = None
    conforms: bool | None = None
    semi_structured: bool = False

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0


@dataclass
class SparsityReport:
    """What sparsify did, measured from the weight tensors (see ``fxpress.sparsity_report``).

    sparsity: zeros / weights over the sparsified layers; weight_sparsity: over every conv / linear /
    matmul weight (sparsified or not); param_sparsity: over every float parameter of the model
    (biases, norm scales, ... included; buffers such as running statistics are not counted).
    """

    pattern: str | None
    target: float | None
    scope: str | None = None
    importance: str | None = None
    layers: list[LayerSparsity] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    params_total: int = 0
    params_zero: int = 0

    @property
    def sparsified(self) -> list[LayerSparsity]:
        return [layer for layer in self.layers if layer.pattern is not None]

    @property
    def sparsity(self) -> float:
        total = sum(layer.total for layer in self.sparsified)
        return sum(layer.zeros for layer in self.sparsified) / total if total else 0.0

    @property
    def weight_sparsity(self) -> float:
        total = sum(layer.total for layer in self.layers)
        return sum(layer.zeros for layer in self.layers) / total if total else 0.0

    @property
    def param_sparsity(self) -> float:
        return self.params_zero / self.params_total if self.params_total else 0.0

    def layer(self, name: str) -> LayerSparsity:
        """A layer by weight target ("fc.weight") or layer name ("fc")."""
        for layer in self.layers:
            if name in (layer.target, layer.layer):
                return layer
        raise KeyError(f"no weight layer {name!r}; layers: {', '.join(layer.target for layer in self.layers)}")

    def __str__(self) -> str:
        head = "sparsity: " + ("no sparsify record (measured only)" if self.pattern is None else
                               f"pattern {self.pattern}, target {self.target:.1%}"
                               + (f", scope {self.scope}" if self.scope and self.pattern == "unstructured" else "")
                               + (f", importance {self.importance}" if self.importance else ""))
        done = self.sparsified
        lines = [head]
        if self.pattern is not None:
            lines.append(f"  sparsified layers: {len(done)} of {len(self.layers)}, achieved {self.sparsity:.2%} "
                         f"({sum(x.zeros for x in done):,} of {sum(x.total for x in done):,} weights zero)")
        lines += [
            f"  all conv/linear/matmul weights: {self.weight_sparsity:.2%} zero; all parameters: {self.param_sparsity:.2%} zero "
            f"({self.params_zero:,} of {self.params_total:,})",
        ]
        if self.layers:
            rows = [(x.layer or x.target, x.target, "x".join(map(str, x.shape)), f"{x.zeros:,}/{x.total:,}", f"{x.sparsity:.1%}",
                     (x.pattern or "dense") + ("" if x.conforms is None else (" ok" if x.conforms else " VIOLATED"))
                     + (" semi-structured" if x.semi_structured else "")) for x in self.layers[:80]]
            head_row = ("layer", "weight", "shape", "zeros", "sparsity", "pattern")
            widths = [max(len(r[i]) for r in [head_row, *rows]) for i in range(len(head_row))]
            fmt = lambda r: "    " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
            lines += ["  layers:", fmt(head_row)] + [fmt(r) for r in rows]
            if len(self.layers) > 80:
                lines.append(f"    ... {len(self.layers) - 80} more")
        if self.skipped:
            lines.append("  skipped:")
            lines += [f"    {where}: {why}" for where, why in self.skipped[:50]]
            if len(self.skipped) > 50:
                lines.append(f"    ... {len(self.skipped) - 50} more")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def measure_sparsity(gm: fx.GraphModule, layers: Sequence[WeightLayer] | None = None, nm: tuple[int, int] | None = None) -> SparsityReport:
    """Zeros of every weight constant (and of all parameters) counted from the tensors; with ``nm``
    each layer's ``conforms`` says whether it satisfies that N:M pattern."""
    if layers is None:
        layers, _ = find_weight_layers(gm)
    rep = SparsityReport(None, None)
    for layer in layers:
        value = get_attr_value(gm, layer.target)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        dense = _dense(value)
        conforms = None
        if nm is not None and layer.red_dim is not None:
            conforms = nm_conforms(dense, layer.red_dim, *nm)
        rep.layers.append(LayerSparsity(
            layer.name, layer.target, layer.op, tuple(value.shape), value.numel(), int((dense == 0).sum()),
            conforms=conforms, semi_structured=_is_semi_structured(value),
        ))
    for value in gm.parameters():
        if value.is_floating_point():
            dense = _dense(value)
            rep.params_total += dense.numel()
            rep.params_zero += int((dense == 0).sum())
    return rep


# ---------------------------------------------------------------------------------------------
# the pass


@register_pass
class Sparsify(Pass):
    """Zero weights of conv / linear / matmul layers in place of their values (see the module docstring).

    sparsity: fraction of weights zeroed, in [0, 1); None means 0.5 for unstructured and 1 - N/M
        for an N:M pattern (which fixes it: another value is a ValueError).
    pattern: "unstructured" or "N:M" ("2:4": keep 2 of every 4 along the reduction dim).
    scope: "layer", "global" (one threshold over all chosen layers) or "output" (per output
        slice); N:M patterns take "layer" only.
    ignore: module paths or node names of layers left dense (a name matching nothing is a ValueError).
    min_params: skip layers with fewer weights than this.
    importance: "magnitude" (|W|) or "wanda" (|W| * ||X_j||, needs ``activation_norms``).
    activation_norms: {reading node name: per-input-channel L2 norm} from ``input_channel_norms``.
    """

    name = "sparsify"
    exact = False

    def __init__(
        self,
        sparsity: float | None = None,
        pattern: str = "unstructured",
        scope: str = "layer",
        ignore: Sequence[str] = (),
        min_params: int = 0,
        importance: str = "magnitude",
        activation_norms: Mapping[str, torch.Tensor] | None = None,
    ):
        self.sparsity, self.nm = validate_sparsity_options(sparsity, pattern, scope, importance, min_params)
        if importance == "wanda" and activation_norms is None:
            raise ValueError("importance='wanda' needs activation_norms (per input channel L2 norms from input_channel_norms)")
        self.scope = scope
        self.ignore = tuple(ignore)
        self.min_params = min_params
        self.importance = importance
        self.activation_norms = dict(activation_norms or {})

    def run(self, gm: fx.GraphModule, report: PassReport) -> None:
        ignored = {n: name for name, nodes in resolve_ignore(gm, self.ignore).items() for n in nodes}
        layers, computed = find_weight_layers(gm)
        pattern = pattern_name(self.nm)
        rep = SparsityReport(pattern, self.sparsity, self.scope, self.importance)
        skipped: list[tuple[str, str]] = list(computed)
        chosen: list[tuple[WeightLayer, torch.Tensor, torch.Tensor]] = []  # (layer, weight, score)
        for layer in layers:
            value = get_attr_value(gm, layer.target)
            why = self._why_not(layer, value, ignored)
            if why:
                skipped.append((f"{layer.name} [{layer.target}]", why))
                continue
            score = value.detach().abs().float()
            if self.importance == "wanda":
                score = score * self._activation_scale(layer, tuple(value.shape))
            chosen.append((layer, value, score))
        keeps = self._masks(chosen)
        zeros_before = {layer.target: int((w == 0).sum()) for layer, w, _ in chosen}
        for (layer, w, _), keep in zip(chosen, keeps):
            if not bool(keep.all()):
                _set_tensor(gm, layer.target, torch.where(keep.to(w.device), w.detach(), torch.zeros((), dtype=w.dtype, device=w.device)))
        measured = measure_sparsity(gm, layers, self.nm)
        done = {layer.target for layer, _, _ in chosen}
        for x in measured.layers:
            if x.target in done:
                x.pattern = pattern
            else:
                x.conforms = None
        rep.layers = measured.layers
        rep.params_total, rep.params_zero = measured.params_total, measured.params_zero
        rep.skipped = skipped
        zeroed = 0
        for x in rep.sparsified:
            new = x.zeros - zeros_before[x.target]
            zeroed += new
            if new > 0:
                report.change(f"{x.layer} [{x.target}]: {x.zeros:,}/{x.total:,} weights zero ({x.sparsity:.1%}, {pattern})", "layers sparsified")
        for where, why in skipped:
            report.skip(where, why)
        report.counts["weights zeroed"] = zeroed
        if not chosen:
            rep.notes.append("no weight was sparsified" + (": every candidate was skipped" if layers else ": the graph has no conv/linear/matmul weight"))
        elif zeroed == 0:
            rep.notes.append(f"the chosen layers already met {pattern} sparsity {self.sparsity:g}: nothing changed")
        rep.notes.append("weights stay dense tensors holding zeros: no speed-up from onnxruntime or inductor on CPU"
                         + ("; 2:4 runs faster only via torch.sparse.to_sparse_semi_structured on NVIDIA Ampere+ GPUs" if self.nm == (2, 4) else ""))
        for n in rep.notes:
            report.note(n)
        report.note(f"achieved {rep.sparsity:.2%} over {len(rep.sparsified)} layers; {rep.weight_sparsity:.2%} of all layer weights")
        gm.meta.setdefault("fxpress", {})["sparsity_report"] = rep

    def _why_not(self, layer: WeightLayer, value: Any, ignored: Mapping[fx.Node, str]) -> str | None:
        if layer.problem:
            return layer.problem
        for u in layer.uses:
            if u.node in ignored:
                return f"ignored ({ignored[u.node]!r})"
        if value.numel() < self.min_params:
            return f"{value.numel()} weights < min_params={self.min_params}"
        if self.nm is not None:
            n, m = self.nm
            if layer.red_dim is None:
                return "its readers reduce over different dims, so no N:M grouping fits all of them"
            size = value.shape[layer.red_dim]
            if size % m:
                return f"the reduction dim (dim {layer.red_dim}, size {size}) is not a multiple of {m}, so {n}:{m} groups do not fit"
        if self.scope == "output" and self.nm is None and len({u.out_dim for u in layer.uses}) != 1:
            return "its readers have different output dims, so scope='output' is undefined for it"
        if self.importance == "wanda":
            missing = [u.node.name for u in layer.uses if u.node.name not in self.activation_norms]
            if missing:
                return f"no activation statistics for {', '.join(missing)} (the calibration run never reached it)"
            try:
                self._activation_scale(layer, tuple(value.shape))
            except (RuntimeError, ValueError) as exc:
                return f"activation statistics do not fit the weight: {exc}"
        return None

    def _activation_scale(self, layer: WeightLayer, shape: tuple[int, ...]) -> torch.Tensor:
        total = None
        for u in layer.uses:
            norms = self.activation_norms[u.node.name].float()
            if u.groups > 1:  # conv weight [O, C/g, k...]: rows of group g read channels g*C/g ... (g+1)*C/g - 1
                o, cg = shape[0], shape[1]
                scale = norms.view(u.groups, cg).repeat_interleave(o // u.groups, dim=0).view(o, cg, *[1] * (len(shape) - 2))
            else:
                if norms.numel() != shape[u.red_dim]:
                    raise ValueError(f"{norms.numel()} channels vs {shape[u.red_dim]} in dim {u.red_dim}")
                view = [1] * len(shape)
                view[u.red_dim] = -1
                scale = norms.view(view)
            total = scale.pow(2) if total is None else total + scale.pow(2)
        return total.sqrt()

    def _masks(self, chosen: list[tuple[WeightLayer, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        if self.nm is not None:
            return [nm_mask(s, layer.red_dim, *self.nm) for layer, _, s in chosen]
        if self.scope == "global":
            if not chosen:
                return []
            flat = torch.cat([s.reshape(-1).cpu() for _, _, s in chosen])
            keep = _lowest(flat, _count(self.sparsity * flat.numel()))
            sizes = [s.numel() for _, _, s in chosen]
            return [k.view(s.shape) for k, (_, _, s) in zip(keep.split(sizes), chosen)]
        out = []
        for layer, _, s in chosen:
            if self.scope == "output" and layer.out_dim is not None and s.dim() > 1:
                rows = s.movedim(layer.out_dim, 0)
                flat = rows.reshape(rows.shape[0], -1)
                k = _count(self.sparsity * flat.shape[1])
                keep = torch.ones_like(flat, dtype=torch.bool)
                if k:
                    keep.scatter_(1, torch.argsort(flat, dim=1, stable=True)[:, :k], False)
                out.append(keep.reshape(rows.shape).movedim(0, layer.out_dim))
            else:
                out.append(_lowest(s, _count(self.sparsity * s.numel())))
        return out
