"""A decomposed layer as a short chain of ops, runnable eagerly and emittable into the graph.

Every decomposition builds a ``Factorization``: a list of ``FactorOp`` (conv2d, linear, reshape,
permute, add) applied in order to the layer's input. The same chain computes the output error the
pass reports (``apply``), the parameters and MACs it costs (``cost``: the MAC convention of
``fxpress.ir.cost``, shapes from a meta-device run), and the nodes inserted into the graph
(``emit``), so what is reported is what runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from ...ir.graph import add_constant, get_attr_value
from .layers import DECOMPOSED, Layer

__all__ = ["FactorOp", "Conv", "OuterConv", "Linear", "Reshape", "Permute", "Slice", "AddBias", "Factorization", "emit", "padded_conv"]

aten = torch.ops.aten


class FactorOp:
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        return []

    def macs(self, x_shape: tuple[int, ...], y_shape: tuple[int, ...]) -> int:
        return 0

    def emit(self, graph: fx.Graph, x: fx.Node, consts: dict[str, fx.Node]) -> fx.Node:
        raise NotImplementedError

    def to(self, **kw) -> "FactorOp":
        return self


def _cast(t: torch.Tensor | None, kw: dict) -> torch.Tensor | None:
    return t.to(**kw) if t is not None else None


@dataclass
class Conv(FactorOp):
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    stride: tuple[int, int] = (1, 1)
    padding: Any = (0, 0)  # [ph, pw] or "same"/"valid"
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias_node: fx.Node | None = None  # reuse the original bias attribute instead of a copy

    def apply(self, x):
        pad = self.padding if isinstance(self.padding, str) else list(self.padding)
        return F.conv2d(x, self.weight, self.bias, list(self.stride), pad, list(self.dilation), self.groups)

    def tensors(self):
        out = [("weight", self.weight)]
        if self.bias is not None and self.bias_node is None:
            out.append(("bias", self.bias))
        return out

    def macs(self, x_shape, y_shape):
        return math.prod(y_shape) * int(self.weight.shape[1]) * int(self.weight.shape[2]) * int(self.weight.shape[3])

    def emit(self, graph, x, consts):
        bias = self.bias_node if self.bias_node is not None else consts.get("bias")
        pad = self.padding if isinstance(self.padding, str) else list(self.padding)
        target = aten.conv2d.padding if isinstance(pad, str) else aten.conv2d.default
        return graph.call_function(target, (x, consts["weight"], bias, list(self.stride), pad, list(self.dilation), self.groups))

    def to(self, **kw):
        return Conv(_cast(self.weight, kw), _cast(self.bias, kw), self.stride, self.padding, self.dilation, self.groups, self.bias_node)


@dataclass
class OuterConv(FactorOp):
    """A depthwise convolution whose kh x kw kernel is the per-channel outer product of two stored
    factors, ``col[R, 1, kh, 1] * row[R, 1, 1, kw]``, computed in the graph (an ``aten.mul`` of the two
    constants, R*kh*kw multiplies per call) and run as one convolution: what is stored is the
    factors (R*(kh + kw) numbers), what runs is one depthwise pass instead of a kh x 1 then a 1 x kw
    one (CP's fused form; see cp_conv.py). ``fold-constants`` (run by ``fxpress.quantize``, or by a
    later ``decompose``) turns the product into a stored R*kh*kw kernel."""

    col: torch.Tensor
    row: torch.Tensor
    stride: tuple[int, int] = (1, 1)
    padding: Any = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def kernel(self) -> torch.Tensor:
        return self.col * self.row

    def apply(self, x):
        return F.conv2d(x, self.kernel(), None, list(self.stride), list(self.padding), list(self.dilation), self.groups)

    def tensors(self):
        return [("col", self.col), ("row", self.row)]

    def macs(self, x_shape, y_shape):
        return math.prod(y_shape) * int(self.col.shape[1]) * int(self.col.shape[2]) * int(self.row.shape[3])

    def emit(self, graph, x, consts):
        k = graph.call_function(aten.mul.Tensor, (consts["col"], consts["row"]))
        return graph.call_function(aten.conv2d.default, (x, k, None, list(self.stride), list(self.padding), list(self.dilation), self.groups))

    def to(self, **kw):
        return OuterConv(_cast(self.col, kw), _cast(self.row, kw), self.stride, self.padding, self.dilation, self.groups)


@dataclass
class Linear(FactorOp):
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    bias_node: fx.Node | None = None

    def apply(self, x):
        return F.linear(x, self.weight, self.bias)

    def tensors(self):
        out = [("weight", self.weight)]
        if self.bias is not None and self.bias_node is None:
            out.append(("bias", self.bias))
        return out

    def macs(self, x_shape, y_shape):
        return math.prod(y_shape) * int(self.weight.shape[1])

    def emit(self, graph, x, consts):
        bias = self.bias_node if self.bias_node is not None else consts.get("bias")
        return graph.call_function(aten.linear.default, (x, consts["weight"], bias))

    def to(self, **kw):
        return Linear(_cast(self.weight, kw), _cast(self.bias, kw), self.bias_node)


@dataclass
class Reshape(FactorOp):
    shape: list[int]  # -1 stands for the (dynamic) leading size

    def apply(self, x):
        return x.reshape(self.shape)

    def emit(self, graph, x, consts):
        return graph.call_function(aten.reshape.default, (x, list(self.shape)))


@dataclass
class Permute(FactorOp):
    dims: list[int]

    def apply(self, x):
        return x.permute(self.dims)

    def emit(self, graph, x, consts):
        return graph.call_function(aten.permute.default, (x, list(self.dims)))


@dataclass
class Slice(FactorOp):
    """``x[..., start:start + length]`` along ``dim`` (drops the extra row or column a symmetric
    padding adds where the layer pads one side more)."""

    dim: int
    start: int
    length: int

    def apply(self, x):
        return x.narrow(self.dim, self.start, self.length)

    def emit(self, graph, x, consts):
        return graph.call_function(aten.slice.Tensor, (x, self.dim, self.start, self.start + self.length))


def padded_conv(weight, bias, stride, pads_h: tuple[int, int], pads_w: tuple[int, int], dilation, groups,
                out_hw: tuple[int, int] | None = None, bias_node=None, outer: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[FactorOp]:
    """A convolution padding (top, bottom) x (left, right) zeros. Symmetric per axis: numeric padding.
    Asymmetric (PyTorch's "same" with an even kernel, stride 1): the larger side on both, then a
    slice drops the extra output row/column. (Not ``constant_pad_nd``: fake-tensor propagation of
    it pins a dynamic batch to the sample's size in torch 2.14, and so does ``conv2d.padding``.)
    ``outer=(col, row)``: an ``OuterConv`` (kernel computed from the two factors; no bias) instead."""
    pad = [max(pads_h), max(pads_w)]
    first: FactorOp = (OuterConv(outer[0], outer[1], stride, pad, dilation, groups) if outer is not None
                       else Conv(weight, bias, stride, pad, dilation, groups, bias_node=bias_node))
    ops: list[FactorOp] = [first]
    for dim, (lo, hi) in ((2, pads_h), (3, pads_w)):
        if lo != hi:
            if out_hw is None:
                raise ValueError("asymmetric padding needs the output size")
            ops.append(Slice(dim, hi - lo if hi > lo else 0, out_hw[dim - 2]))
    return ops


@dataclass
class AddBias(FactorOp):
    bias: torch.Tensor
    bias_node: fx.Node | None = None

    def apply(self, x):
        return x + self.bias

    def tensors(self):
        return [] if self.bias_node is not None else [("bias", self.bias)]

    def emit(self, graph, x, consts):
        bias = self.bias_node if self.bias_node is not None else consts["bias"]
        return graph.call_function(aten.add.Tensor, (x, bias))

    def to(self, **kw):
        return AddBias(_cast(self.bias, kw), self.bias_node)


@dataclass
class Factorization:
    """A layer's replacement: ops in order, the ranks that define it, and what it cost to find."""

    method: str
    ranks: Any
    ops: list[FactorOp]
    weight_error: float | None = None  # ||W - W_hat|| / ||W|| (None where not defined, e.g. whitened)
    notes: list[str] = field(default_factory=list)

    def apply(self, x: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        for op in self.ops:
            if dtype is not None:
                op = op.to(dtype=dtype)
                x = x.to(dtype)
            x = op.apply(x)
        return x

    def params(self, layer: Layer) -> int:
        n = sum(t.numel() for op in self.ops for _, t in op.tensors())
        # the original bias is reused (not copied) by the last op: it still counts
        return n + (layer.bias.numel() if layer.bias is not None and self._reuses_bias() else 0)

    def _reuses_bias(self) -> bool:
        return any(getattr(op, "bias_node", None) is not None for op in self.ops)

    def macs(self, layer: Layer) -> int:
        x = torch.empty(layer.in_shape, device="meta")
        total = 0
        for op in self.ops:
            y = op.to(device="meta").apply(x)
            total += op.macs(tuple(x.shape), tuple(y.shape))
            x = y
        return total


def _stem(gm: fx.GraphModule, layer: Layer, method: str) -> str:
    """Where the factors live: next to the original weight when that sits in a module
    (``layer1.0.conv1.tucker.0.weight``), else at the top level (``w_tucker.0.weight``)."""
    target = layer.weight_node.target
    parent = target.rsplit(".", 1)[0] if "." in target else ""
    if parent:
        try:
            if isinstance(get_attr_value(gm, parent), torch.nn.Module):
                return f"{parent}.{method}"
        except AttributeError:
            pass
    return f"{target.replace('.', '_')}_{method}"


def emit(gm: fx.GraphModule, layer: Layer, fac: Factorization, *, requires_grad: bool) -> list[fx.Node]:
    """Replace ``layer.node`` by the factor chain; return the new call nodes. Meta is not refreshed."""
    node = layer.node
    graph = gm.graph
    stem = _stem(gm, layer, fac.method.replace("-", "_"))
    meta = {k: node.meta[k] for k in ("nn_module_stack", "stack_trace", "source_fn_stack") if k in node.meta}
    new_nodes = []
    x = node.args[0]
    for i, op in enumerate(fac.ops):
        consts = {}
        for name, t in op.tensors():
            c = add_constant(gm, f"{stem}.{i}.{name}", t.detach().contiguous(), before=node)
            value = get_attr_value(gm, c.target)
            if isinstance(value, torch.nn.Parameter):
                value.requires_grad_(requires_grad)
            consts[name] = c
        last = node.prev
        with graph.inserting_before(node):
            x = op.emit(graph, x, consts)
        # every call an op emitted (OuterConv: its kernel product too) is marked as a factor
        cur = last.next
        while cur is not node:
            if cur.op == "call_function":
                cur.meta.update(meta)
                cur.meta[DECOMPOSED] = fac.method
                new_nodes.append(cur)
            cur = cur.next
    node.replace_all_uses_with(x)
    graph.erase_node(node)
    # drop the original weight when nothing reads it any more (the bias is reused by the last op)
    for const in (layer.weight_node, layer.bias_node):
        if const is not None and not const.users:
            target = const.target
            graph.erase_node(const)
            if not any(n.op == "get_attr" and n.target == target for n in graph.nodes):
                mod_path, _, leaf = target.rpartition(".")
                mod = get_attr_value(gm, mod_path) if mod_path else gm
                if hasattr(mod, leaf):
                    delattr(mod, leaf)
    return new_nodes
