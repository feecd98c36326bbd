"""The layers decomposition works on: ``aten.conv2d`` and ``aten.linear`` nodes with constant weights.

``find_layers(gm, kinds)`` returns a ``Layer`` per candidate node (its weight, bias, geometry and the
sizes of its input and output at the captured sample) and, for the nodes of those kinds that cannot
be decomposed, the reason (computed weight, tied weight, 1-D/3-D convolution, already a factor of an
earlier decomposition, ...). Sizes are concrete: a dynamic batch is read at its hint, like
``fxpress.ir.cost`` does, so costs are those of the captured sample.

A ``Layer`` can run itself eagerly (``layer.apply(x)``), which is the reference for the output errors
the passes report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import optimization_hint

from ...ir.graph import get_attr_value, node_label

__all__ = ["Layer", "find_layers", "conv_out_size", "DECOMPOSED", "CONV2D", "LINEAR", "module_path"]

aten = torch.ops.aten
CONV2D = {aten.conv2d.default, aten.conv2d.padding}
OTHER_CONVS = {aten.conv1d.default, aten.conv1d.padding, aten.conv3d.default, aten.conv3d.padding}
LINEAR = {aten.linear.default}
DECOMPOSED = "fxpress_decomposed"  # meta key on the nodes a decomposition emitted: the method's name


def _size(s: Any) -> int:
    return int(optimization_hint(s)) if isinstance(s, torch.SymInt) else int(s)


def _pair(v: Any, default: int) -> tuple[int, int]:
    if v is None:
        return (default, default)
    if isinstance(v, int):
        return (v, v)
    v = [int(x) for x in v]
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def conv_out_size(size: int, kernel: int, stride: int, pad_total: int, dilation: int) -> int:
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


def module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return path.replace("L['self'].", "").replace("L['self']", "")
    return ""


@dataclass(eq=False)
class Layer:
    """One decomposable node. Convolution fields are unused for linears."""

    node: fx.Node
    kind: str  # "conv2d" | "linear"
    weight: torch.Tensor
    bias: torch.Tensor | None
    weight_node: fx.Node
    bias_node: fx.Node | None
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def module(self) -> str:
        return module_path(self.node)

    @property
    def label(self) -> str:
        return node_label(self.node)

    # ---- geometry --------------------------------------------------------------------------

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        """Input channels (conv: all groups together) or features (linear)."""
        return int(self.weight.shape[1]) * (self.groups if self.kind == "conv2d" else 1)

    @property
    def kernel(self) -> tuple[int, int]:
        return (int(self.weight.shape[2]), int(self.weight.shape[3])) if self.kind == "conv2d" else (1, 1)

    @property
    def rows(self) -> int:
        """Linear: how many vectors one call multiplies (all leading dims at the sample)."""
        return math.prod(self.in_shape[:-1])

    @property
    def batch(self) -> int:
        return self.in_shape[0]

    @property
    def in_hw(self) -> tuple[int, int]:
        return (self.in_shape[2], self.in_shape[3])

    @property
    def out_hw(self) -> tuple[int, int]:
        return (self.out_shape[2], self.out_shape[3])

    def pads(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """((top, bottom), (left, right)): the zeros added per side. PyTorch's "same" puts
        ``total // 2`` before and the rest after, so an even kernel pads asymmetrically."""
        if isinstance(self.padding, str):
            if self.padding == "valid":
                return (0, 0), (0, 0)
            out = []
            for d, k in zip(self.dilation, self.kernel):
                total = d * (k - 1)
                out.append((total // 2, total - total // 2))
            return out[0], out[1]
        return (self.padding[0], self.padding[0]), (self.padding[1], self.padding[1])

    def mid_hw(self) -> tuple[int, int]:
        """Spatial size after the height-only half of a separable split: (H_out, W_in)."""
        return (self.out_hw[0], self.in_hw[1])

    def describe(self) -> str:
        if self.kind == "linear":
            return f"linear {self.in_features}->{self.out_features}"
        kh, kw = self.kernel
        extra = []
        if self.stride != (1, 1):
            extra.append(f"s{self.stride[0]}" if self.stride[0] == self.stride[1] else f"s{self.stride}")
        if self.dilation != (1, 1):
            extra.append(f"d{self.dilation}")
        if self.groups != 1:
            extra.append(f"g{self.groups}")
        return f"conv {self.in_features}->{self.out_features} {kh}x{kw}" + (" " + " ".join(extra) if extra else "")

    # ---- cost and reference ----------------------------------------------------------------

    def params(self) -> int:
        return self.weight.numel() + (self.bias.numel() if self.bias is not None else 0)

    def macs(self) -> int:
        if self.kind == "linear":
            return self.rows * self.out_features * self.in_features
        kh, kw = self.kernel
        return math.prod(self.out_shape) * int(self.weight.shape[1]) * kh * kw

    def apply(self, x: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        w, b = self.weight.detach(), self.bias.detach() if self.bias is not None else None
        if dtype is not None:
            x, w, b = x.to(dtype), w.to(dtype), (b.to(dtype) if b is not None else None)
        if self.kind == "linear":
            return F.linear(x, w, b)
        padding = self.padding if isinstance(self.padding, str) else list(self.padding)
        return F.conv2d(x, w, b, list(self.stride), padding, list(self.dilation), self.groups)


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if i < len(node.args):
        return node.args[i]
    return node.kwargs.get(name, default)


def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(_size(s) for s in val.shape)


def _constant(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = get_attr_value(gm, node.target)
        if isinstance(value, torch.Tensor):
            return value
    return None


def _readers(gm: fx.GraphModule, target: str) -> int:
    return sum(len(n.users) for n in gm.graph.find_nodes(op="get_attr") if n.target == target)


def find_layers(gm: fx.GraphModule, kinds: tuple[str, ...] = ("conv2d", "linear")) -> tuple[list[Layer], list[tuple[fx.Node, str]]]:
    """Candidate layers of the given kinds, and (node, why not) for the others of those kinds."""
    layers: list[Layer] = []
    skipped: list[tuple[fx.Node, str]] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in OTHER_CONVS and "conv2d" in kinds:
            skipped.append((node, f"{node.target._schema.name.split('::')[-1]}: only 2-D convolutions are decomposed"))
            continue
        kind = "conv2d" if node.target in CONV2D else "linear" if node.target in LINEAR else None
        if kind is None or kind not in kinds:
            continue
        why = None
        if node.meta.get(DECOMPOSED):
            why = f"a factor of an earlier decomposition ({node.meta[DECOMPOSED]})"
        w_node, b_node = node.args[1], _arg(node, 2, "bias")
        weight = None if why else _constant(gm, w_node)
        bias = _constant(gm, b_node) if b_node is not None else None
        if why:
            pass
        elif weight is None:
            why = "weight is computed in the graph, not a constant"
        elif not weight.is_floating_point():
            why = f"weight is {weight.dtype} (already quantized)"
        elif b_node is not None and bias is None:
            why = "bias is computed in the graph, not a constant"
        elif _readers(gm, w_node.target) > 1:
            why = f"weight {w_node.target} is shared with another op (tied); decomposing one use would add parameters"
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        if why is None and (in_shape is None or out_shape is None):
            why = "no shape information (meta['val']) on the node or its input"
        if why is None and kind == "conv2d" and (len(in_shape) != 4 or weight.dim() != 4):
            why = "unbatched 2-D convolution (3-D input)"
        if why is not None:
            skipped.append((node, why))
            continue
        layer = Layer(node, kind, weight, bias, w_node, b_node, in_shape, out_shape)
        if kind == "conv2d":
            layer.stride = _pair(_arg(node, 3, "stride", 1), 1)
            pad = _arg(node, 4, "padding", 0)
            layer.padding = pad if isinstance(pad, str) else _pair(pad, 0)
            layer.dilation = _pair(_arg(node, 5, "dilation", 1), 1)
            layer.groups = int(_arg(node, 6, "groups", 1))
        layers.append(layer)
    return layers, skipped
