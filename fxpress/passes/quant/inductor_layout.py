"""inductor-int8-layout: put a converted Q/DQ graph in the layout inductor's x86 int8 lowering matches.

fxpress's converted graph is laid out for onnxruntime: every int8 op's output is quantized, so a
residual ``add`` reads two dequantized tensors (QLinearAdd). Inductor's x86 int8 lowering (oneDNN
``qconv_pointwise`` / ``qlinear_pointwise``, patterns registered by torchao) instead fuses
``conv → add → relu → quantize`` into one int8 convolution with a ``sum`` post-op, which needs the
conv's output in float. This pass rewrites the graph for that target. It runs in the ``fxpress``
``torch.compile`` backend on the backend's own capture, never on the user's model (whose ONNX layout
it would spoil).

1. A convolution whose only use is a quantize → dequantize pair feeding an ``add`` whose other input
   is a per-tensor dequantize loses that pair (one operand per add, the first that qualifies)::

       c = aten.conv2d(dq(x), dq_w(W), b);  c_d = dq(q(c, s_c, z_c));  y = aten.add_(c_d, dq(r))
   →   c = aten.conv2d(dq(x), dq_w(W), b);                             y = aten.add_(c, dq(r))

   Numerics: the add now reads the conv's exact float output instead of a copy rounded to ``s_c``:
   more precise (the dropped rounding error was up to ``s_c / 2`` per element, plus clipping).
   Linear + add is left as is: inductor's ``qlinear`` binary fusion does not match a dequantized
   extra input, so dropping the pair would not give a fused op (the report says so).

2. A dequantize with several users is duplicated, one per user (PT2E's DuplicateDQPass), so each
   ``dequantize → conv/linear`` is a self-contained pattern. Exact.

3. A bias stored as an int32 constant behind a dequantize (``quantize-bias``, the ONNX lowering) is
   folded back to its float value, the form inductor's ``qconv``/``qlinear`` take. Exact (the same
   dequantize, computed once).

4. An int8 linear with a float output (dynamic quantization) added to a graph input or a constant
   (or a view of one) is written as a subtraction of the negation::

       y = aten.add(aten.linear(dq(x), dq_w(W), b), r)      # r: placeholder / get_attr
   →   y = aten.sub(aten.linear(dq(x), dq_w(W), b), aten.neg(r))

   Inductor's ``qlinear`` binary fusion accumulates ("sum" post-op) *in place into* the add's other
   operand; when that is the caller's input it silently overwrites it, and when it is a frozen
   constant the results are wrong (measured: 0.4 dB SQNR). ``a - (-r)`` is bit-identical to
   ``a + r`` in IEEE arithmetic and does not match the fusion; the linear still runs in int8 and the
   subtraction is one fused elementwise kernel. Exact.

Preconditions: a graph after ``convert-to-qdq``/``fold-weight-quant`` (integer weights behind
``dequantize_per_channel``, literal per-tensor activation qparams). A graph with no quantize or
dequantize ops is left untouched.

``register_inductor_int8_patterns()`` makes inductor's freezing pass know the x86 int8 patterns at
all: in torch 2.14 they live in torchao and are registered only as a side effect of importing
torchao's ``X86InductorQuantizer``; without them every int8 conv runs as dequantize + float conv.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ...ir.graph import add_constant, get_attr_value, node_label
from ...ir.report import PassReport
from ..base import Pass, register_pass
from .config import op_kind
from .convert_to_qdq import qdq_ops
from .fold_weight_quant import DEQUANTIZE_OPS, QUANTIZE_OPS

__all__ = ["InductorInt8Layout", "register_inductor_int8_patterns"]

aten = torch.ops.aten
ADD_OPS = frozenset({aten.add.Tensor, aten.add_.Tensor})


def register_inductor_int8_patterns() -> str | None:
    """Register the x86 int8 freezing patterns with inductor (once); return why not, or None."""
    if not torch.backends.mkldnn.is_available():
        return "this build of torch has no oneDNN (mkldnn), which inductor's int8 kernels need"
    try:  # torch 2.14: the patterns live in torchao
        from torchao.quantization.pt2e.inductor_passes.x86 import _register_quantization_weight_pack_pass
    except ImportError as exc:
        try:  # older torch kept them in inductor
            from torch._inductor.fx_passes.quantization import (  # type: ignore[attr-defined,no-redef]
                _register_quantization_weight_pack_pass,
            )
        except ImportError:
            return f"torchao is not importable ({exc}); install torchao for inductor's x86 int8 patterns"
    _register_quantization_weight_pack_pass()
    return None


_VIEW_OPS = frozenset(
    {
        aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints, aten.permute.default,
        aten.transpose.int, aten.t.default, aten.expand.default, aten.slice.Tensor, aten.select.int, aten.squeeze.dim,
        aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default, aten.alias.default, aten.detach.default,
        aten.contiguous.default, aten.clone.default, aten._to_copy.default,
    }
)


def _view_root(node) -> fx.Node | None:
    """The tensor a value aliases after inductor drops views and no-op copies (None for a non-node)."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _VIEW_OPS:
        node = node.args[0]
    return node if isinstance(node, fx.Node) else None


def _is(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


@register_pass
class InductorInt8Layout(Pass):
    """Drop the Q/DQ between conv and a residual add, duplicate shared DQs, fold int32 biases,
    keep inductor's in-place qlinear sum away from inputs and constants."""

    name = "inductor-int8-layout"
    run_after = ("convert-to-qdq", "fold-weight-quant", "fold-qdq", "quantize-bias")

    def run(self, gm: fx.GraphModule, report: PassReport) -> None:
        if not any(_is(n, DEQUANTIZE_OPS) or _is(n, QUANTIZE_OPS) for n in gm.graph.nodes):
            report.note("no quantize/dequantize ops: nothing to lay out")
            return
        self._fold_int32_biases(gm, report)
        self._fuse_conv_add(gm, report)
        self._guard_inplace_sum(gm, report)
        self._duplicate_dequantize(gm, report)
        if report.changed:
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()

    # 1. conv → Q → DQ → add  ⇒  conv → add
    def _fuse_conv_add(self, gm: fx.GraphModule, report: PassReport) -> None:
        qd = qdq_ops()
        q_op, dq_op = qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default
        for add in list(gm.graph.nodes):
            if not _is(add, ADD_OPS):
                continue
            if len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
                report.skip(node_label(add), "add with alpha or a scalar operand")
                continue
            reasons = []
            for i in (0, 1):
                why = self._check_operand(add, i, q_op, dq_op)
                if why is None:
                    dq = add.args[i]
                    q = dq.args[0]
                    compute = q.args[0]
                    add.update_arg(i, compute)
                    gm.graph.erase_node(dq)
                    gm.graph.erase_node(q)
                    report.change(f"{node_label(compute)} → {node_label(add)}: output quantize/dequantize dropped", kind="conv+add fused")
                    break
                reasons.append(why)
            else:
                if any(r != "not a quantized operand" for r in reasons):
                    report.skip(node_label(add), "; ".join(dict.fromkeys(r for r in reasons if r != "not a quantized operand")))

    @staticmethod
    def _check_operand(add: fx.Node, i: int, q_op, dq_op) -> str | None:
        dq, other = add.args[i], add.args[1 - i]
        if not (_is(dq, {dq_op}) and _is(dq.args[0], {q_op})):
            return "not a quantized operand"
        q = dq.args[0]
        compute = q.args[0]
        kind = op_kind(compute) if isinstance(compute, fx.Node) and compute.op == "call_function" else None
        if kind not in ("conv", "linear"):
            return "not a quantized operand"
        if kind == "linear":
            return "linear + add: inductor's qlinear binary fusion does not take a dequantized extra input"
        if len(dq.users) != 1 or len(q.users) != 1 or len(compute.users) != 1:
            return "the conv's quantized output has other users"
        if not (_is(compute.args[0], DEQUANTIZE_OPS) and _is(compute.args[1], DEQUANTIZE_OPS)):
            return "the conv is not int8 (input or weight not dequantized)"
        if not _is(other, {dq_op}):
            return "the add's other input is not a per-tensor dequantize"
        a, b = compute.meta.get("val"), other.meta.get("val")
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape):
            return "the add broadcasts (operand shapes differ)"
        return None

    # 4. int8 linear (float out) + graph input / constant  ⇒  linear - (-r)
    def _guard_inplace_sum(self, gm: fx.GraphModule, report: PassReport) -> None:
        graph = gm.graph
        for add in list(graph.nodes):
            if not _is(add, ADD_OPS) or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
                continue
            for i in (0, 1):
                lin, other = add.args[i], add.args[1 - i]
                if not (_is(lin, {aten.linear.default}) and _is(lin.args[0], DEQUANTIZE_OPS) and _is(lin.args[1], DEQUANTIZE_OPS)):
                    continue
                root = _view_root(other)
                if root is None or root.op not in ("placeholder", "get_attr"):
                    continue
                with graph.inserting_before(add):
                    neg = graph.call_function(aten.neg.default, (other,))
                    sub = graph.call_function(aten.sub.Tensor, (lin, neg))
                neg.meta = {k: v for k, v in other.meta.items() if k == "val"}
                sub.meta = dict(add.meta)
                add.replace_all_uses_with(sub)
                graph.erase_node(add)
                what = "graph input" if root.op == "placeholder" else "constant"
                report.change(
                    f"{node_label(lin)} + {what} {root.name}: written as a subtraction so inductor does not accumulate into the {what}",
                    kind="residuals guarded",
                )
                break

    # 2. one dequantize per user
    def _duplicate_dequantize(self, gm: fx.GraphModule, report: PassReport) -> None:
        graph = gm.graph
        for dq in list(graph.nodes):
            if not _is(dq, DEQUANTIZE_OPS) or len(dq.users) < 2:
                continue
            for user in list(dq.users)[1:]:
                with graph.inserting_before(user):
                    copy = graph.call_function(dq.target, dq.args, dict(dq.kwargs))
                copy.meta = dict(dq.meta)
                user.replace_input_with(dq, copy)
                report.change(f"{node_label(dq)} duplicated for {node_label(user)}", kind="dequantize duplicated")

    # 3. int32 bias behind a dequantize → float constant
    def _fold_int32_biases(self, gm: fx.GraphModule, report: PassReport) -> None:
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or op_kind(node) not in ("conv", "linear") or len(node.args) < 3:
                continue
            dq = node.args[2]
            if not _is(dq, DEQUANTIZE_OPS) or not (isinstance(dq.args[0], fx.Node) and dq.args[0].op == "get_attr"):
                continue
            if any(isinstance(a, fx.Node) and a.op != "get_attr" for a in dq.args):
                continue
            args = fx.node.map_arg(dq.args, lambda n: get_attr_value(gm, n.target))
            with torch.no_grad():
                value = dq.target(*args, **dq.kwargs)
            const = add_constant(gm, f"{dq.args[0].target}_float", value, before=node)
            node.update_arg(2, const)
            report.change(f"{node_label(node)}: int32 bias folded to float", kind="float biases")
