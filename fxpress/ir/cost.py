"""A static cost model over the captured IR: parameters, bytes, and MACs/FLOPs per node.

Conventions (the same as ``torch.utils.flop_counter.FlopCounterMode`` where both count):

- **MACs** (multiply-accumulates) are counted for the contraction ops only: convolutions (1-3d,
  grouped/depthwise, the ``.padding`` variants, ``aten.convolution``), transposed convolutions,
  ``linear``, ``mm``/``addmm``/``bmm``/``baddbmm``/``matmul`` and scaled-dot-product attention
  (``Q Kᵀ`` and ``P V``: ``B·H·L·S·(E + Eᵥ)``). A convolution costs
  ``out.numel() · C_in/groups · prod(kernel)``; a transposed one ``in.numel() · C_out/groups ·
  prod(kernel)``; a linear/matmul ``out.numel() · K``.
- **FLOPs of a MAC op are 2 × MACs**, and nothing else: bias adds, the scale and softmax inside
  attention are not counted. This is exactly what ``FlopCounterMode`` reports, so the two agree on
  the MAC-heavy ops (tests check it on resnet18 and the small models).
- Other ops count **FLOPs only** (``macs == 0``), a rough but stated figure that FlopCounterMode
  leaves out entirely: 1 per output element for pointwise ops (``Tag.pointwise``: add, mul, relu,
  gelu, ...; copies such as ``clone`` and ``_to_copy`` count 0), 2 per element for batch norm (a
  per-channel scale and shift at inference), 5 per element for layer/group/instance norm (mean,
  variance, normalize, affine), 3 per element for softmax, ``prod(kernel)`` per output element for
  pooling, 1 per input element for reductions and adaptive average pooling. Shape and data-movement
  ops (view, permute, cat, slice, embedding lookups, ...) cost 0.
- Sizes come from each node's ``meta["val"]``; a symbolic size (the dynamic batch) is evaluated at
  its hint, i.e. the size of the sample the graph was captured with. Capture at the batch size you
  want costs for, or scale: every count is linear in the batch.
- ``params`` of a node are the elements of the constant tensors (``get_attr`` inputs) it reads
  directly; a tensor read by two nodes (tied weights) counts at both, while ``count_params``
  counts each distinct tensor once.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import optimization_hint

from .graph import get_attr_value, op_name

__all__ = ["NodeCost", "count_params", "param_bytes", "node_costs", "total_macs", "total_flops", "graph_batch", "per_sample", "macs_per_sample"]

aten = torch.ops.aten


@dataclass(frozen=True)
class NodeCost:
    node_name: str
    op: str
    macs: int
    flops: int
    params: int


# ---------------------------------------------------------------------------------------------
# parameters


def _counted_tensors(obj: torch.nn.Module, buffers: bool) -> list[torch.Tensor]:
    """The distinct tensors ``count_params``/``param_bytes`` count (see their docstrings)."""
    seen: dict[int, torch.Tensor] = {}
    if isinstance(obj, fx.GraphModule):
        param_ids = {id(p) for p in obj.parameters()}
        for node in obj.graph.find_nodes(op="get_attr"):
            if not node.users:
                continue  # a dead read (e.g. num_batches_tracked in an eval graph) computes nothing
            value = get_attr_value(obj, node.target)
            if not isinstance(value, torch.Tensor):
                continue
            if buffers or id(value) in param_ids or _is_quantized_weight(value):
                seen.setdefault(id(value), value)
        return list(seen.values())
    if not isinstance(obj, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module or a captured GraphModule, got {type(obj).__name__}")
    for t in obj.parameters():
        seen.setdefault(id(t), t)
    if buffers:
        for t in obj.buffers():
            seen.setdefault(id(t), t)
    return list(seen.values())


def _is_quantized_weight(t: torch.Tensor) -> bool:
    # fxpress stores quantized weights as narrow-integer buffers (nn.Parameter must be float);
    # int64/int32 buffers are indices (position ids, counters), not weights.
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool and t.element_size() <= 2


def count_params(obj: torch.nn.Module, *, buffers: bool = False) -> int:
    """Number of parameter elements, each distinct tensor once (tied weights count once).

    For an eager module: its ``parameters()`` (plus ``buffers()`` with ``buffers=True``), the usual
    convention (torchvision's resnet18 has 11,689,512).
    For a captured GraphModule: the tensors that live ``get_attr`` nodes read (what the graph
    computes with; attributes nothing uses are ignored) and that are parameters, plus 8/16-bit
    integer tensors, because fxpress keeps quantized weights as int8 buffers (an nn.Parameter must be
    floating point). Batch-norm statistics and index buffers (position ids) are buffers, so a freshly
    captured model counts the same as the eager one; ``buffers=True`` counts every live tensor.
    """
    return sum(t.numel() for t in _counted_tensors(obj, buffers))


def param_bytes(obj: torch.nn.Module, *, buffers: bool = False) -> int:
    """Bytes of the tensors ``count_params`` counts (``buffers=True``: the full inference state)."""
    return sum(t.numel() * t.element_size() for t in _counted_tensors(obj, buffers))


# ---------------------------------------------------------------------------------------------
# MACs / FLOPs


def _size(s: Any) -> int:
    if isinstance(s, torch.SymInt):
        return int(optimization_hint(s))
    return int(s)


def _numel(t: torch.Tensor) -> int:
    return math.prod(_size(s) for s in t.shape)


def _shape(t: torch.Tensor) -> list[int]:
    return [_size(s) for s in t.shape]


def _val(node: Any) -> torch.Tensor | None:
    if isinstance(node, fx.Node):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return val
    return None


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if i < len(node.args):
        return node.args[i]
    return node.kwargs.get(name, default)


def _require(node: fx.Node, *vals: Any) -> None:
    if any(v is None for v in vals):
        raise ValueError(
            f"node {node.name} ({op_name(node)}) has no tensor meta['val'] on itself or its inputs; "
            "costs are computed from the shapes a captured graph carries (run refresh_meta after editing)"
        )


def _conv_macs(node: fx.Node, transposed: bool) -> int:
    x, w, out = _val(node.args[0]), _val(node.args[1]), _val(node)
    _require(node, x, w, out)
    kernel = math.prod(_shape(w)[2:])
    per_group = _size(w.shape[1])  # C_in/groups for conv, C_out/groups for conv_transpose
    return (_numel(x) if transposed else _numel(out)) * per_group * kernel


def _convolution_macs(node: fx.Node) -> int:
    return _conv_macs(node, transposed=bool(_arg(node, 6, "transposed", False)))


def _contraction_macs(a_index: int):
    def macs(node: fx.Node) -> int:
        a, out = _val(node.args[a_index]), _val(node)
        _require(node, a, out)
        return _numel(out) * _size(a.shape[-1])

    return macs


def _linear_macs(node: fx.Node) -> int:
    w, out = _val(node.args[1]), _val(node)
    _require(node, w, out)
    return _numel(out) * _size(w.shape[-1])


def _attention_macs(node: fx.Node) -> int:
    q, k, v = (_val(a) for a in node.args[:3])
    out = node.meta.get("val")
    if isinstance(out, (tuple, list)):  # the _flash/_efficient variants return (out, logsumexp, ...)
        out = out[0]
    _require(node, q, k, v, out)
    L, E = _size(q.shape[-2]), _size(q.shape[-1])
    S, Ev = _size(k.shape[-2]), _size(v.shape[-1])
    batch_heads = _numel(out) // max(L * Ev, 1)
    return batch_heads * L * S * (E + Ev)


_MAC_OPS: dict[Any, Any] = {}
for _op in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
            aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding):
    _MAC_OPS[_op] = lambda n: _conv_macs(n, transposed=False)
for _op in (aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input):
    _MAC_OPS[_op] = lambda n: _conv_macs(n, transposed=True)
_MAC_OPS[aten.convolution.default] = _convolution_macs
_MAC_OPS[aten._convolution.default] = _convolution_macs
_MAC_OPS[aten.linear.default] = _linear_macs
_MAC_OPS[aten.mm.default] = _contraction_macs(0)
_MAC_OPS[aten.bmm.default] = _contraction_macs(0)
_MAC_OPS[aten.matmul.default] = _contraction_macs(0)
_MAC_OPS[aten.addmm.default] = _contraction_macs(1)
_MAC_OPS[aten.baddbmm.default] = _contraction_macs(1)
for _name in ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
              "_scaled_dot_product_flash_attention_for_cpu"):
    _packet = getattr(aten, _name, None)
    if _packet is not None:
        _MAC_OPS[_packet.default] = _attention_macs

_COPIES = {"clone", "_to_copy", "copy", "copy_", "contiguous", "alias", "lift_fresh_copy", "detach", "to"}
_NORMS_2 = {"batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
            "native_batch_norm", "_batch_norm_with_update", "_batch_norm_no_update"}
_NORMS_5 = {"layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "instance_norm", "rms_norm"}
_SOFTMAX = {"softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax"}
_POOLS = {"max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices",
          "avg_pool1d", "avg_pool2d", "avg_pool3d"}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "prod", "var", "std", "norm", "linalg_vector_norm",
               "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d",
               "adaptive_max_pool2d", "logsumexp", "argmax", "argmin"}


def _base_name(target: torch._ops.OpOverload) -> str:
    return target._schema.name.split("::")[-1]


def _is_pointwise(target: torch._ops.OpOverload) -> bool:
    if torch.Tag.pointwise in target.tags:
        return True
    name = _base_name(target)
    if name.endswith("_") and not name.startswith("_"):  # in-place variants are not always tagged
        packet = getattr(torch.ops.aten, name[:-1], None) if target.namespace == "aten" else None
        overload = getattr(packet, target._overloadname, None) if packet is not None else None
        return overload is not None and torch.Tag.pointwise in overload.tags
    return False


def _out_numel(node: fx.Node) -> int:
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        val = val[0] if val else None
    return _numel(val) if isinstance(val, torch.Tensor) else 0


def _other_flops(node: fx.Node) -> int:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return 0  # getitem, sym_size and other Python-level calls move no data
    name = _base_name(target)
    if name in _COPIES:
        return 0
    if name in _NORMS_2:
        return 2 * _out_numel(node)
    if name in _NORMS_5:
        return 5 * _out_numel(node)
    if name in _SOFTMAX:
        return 3 * _out_numel(node)
    if name in _POOLS:
        kernel = _arg(node, 1, "kernel_size")
        k = math.prod(kernel) if isinstance(kernel, (list, tuple)) else int(kernel or 1)
        return k * _out_numel(node)
    if name in _REDUCTIONS:
        x = _val(node.args[0]) if node.args else None
        return _numel(x) if x is not None else 0
    if _is_pointwise(target):
        return _out_numel(node)
    return 0


def _params_read(gm: fx.GraphModule, node: fx.Node) -> int:
    total = 0
    for inp in node.all_input_nodes:
        if inp.op == "get_attr":
            value = get_attr_value(gm, inp.target)
            if isinstance(value, torch.Tensor):
                total += value.numel()
    return total


def node_costs(gm: fx.GraphModule) -> list[NodeCost]:
    """One ``NodeCost`` per call node of a captured graph, in graph order (see module docstring)."""
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"node_costs takes a captured GraphModule, got {type(gm).__name__}; capture the model first")
    costs = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        if node.op == "call_function" and node.target is operator.getitem:
            macs = flops = 0
        elif node.target in _MAC_OPS:
            macs = _MAC_OPS[node.target](node)
            flops = 2 * macs
        else:
            macs, flops = 0, _other_flops(node) if node.op == "call_function" else 0
        costs.append(NodeCost(node.name, op_name(node), macs, flops, _params_read(gm, node)))
    return costs


def total_macs(gm: fx.GraphModule, costs: Iterable[NodeCost] | None = None) -> int:
    """Sum of MACs over the graph (at the captured sample's sizes)."""
    return sum(c.macs for c in (costs if costs is not None else node_costs(gm)))


def total_flops(gm: fx.GraphModule, costs: Iterable[NodeCost] | None = None) -> int:
    """Sum of FLOPs over the graph: 2 × MACs of the contraction ops plus the other ops' estimates."""
    return sum(c.flops for c in (costs if costs is not None else node_costs(gm)))


def graph_batch(gm: fx.GraphModule) -> tuple[int, bool]:
    """The batch size ``fxpress.ir.cost`` counts a graph's MACs at, and whether that batch is dynamic.

    The batch is dim 0 of the graph's tensor inputs at the size the cost model evaluates it at (a
    symbolic dim at its hint: for a loaded .pt2, the batch-2 sample it was saved with). A dynamic dim 0
    is the batch; with static shapes, dim 0 of the first input of 2 or more dims. 1 when there is none.
    """
    vals = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]
    vals = [v for v in vals if isinstance(v, torch.Tensor) and v.dim() >= 1]
    for v in vals:
        if isinstance(v.shape[0], torch.SymInt):
            return max(int(optimization_hint(v.shape[0], fallback=1)), 1), True
    for v in vals:
        if v.dim() >= 2:
            return max(int(v.shape[0]), 1), False
    return 1, False


def per_sample(count: int, batch: int) -> int:
    """A MAC or FLOP count taken at ``batch`` samples, per sample (the counts are linear in the batch)."""
    return count // batch if count % batch == 0 else round(count / batch)


def macs_per_sample(gm: fx.GraphModule) -> int:
    """``total_macs`` divided by the batch it was counted at (``graph_batch``): the same for a graph
    captured at batch 1 and one saved with a batch-2 sample."""
    return per_sample(total_macs(gm), graph_batch(gm)[0])
