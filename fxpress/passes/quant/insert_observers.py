"""insert-observers: put calibration observers on the tensors quantization will need.

Before::

    y = aten.conv2d(x, W, b); r = aten.relu_(y); p = aten.max_pool2d(r); z = aten.linear(flatten(p), W2, b2)

After (static mode)::

    x_o = observers.act_0(x)                     # input of a quantized op
    W_o = observers.weight_1(W)                  # per-channel weight observer
    y = aten.conv2d(x_o, W_o, b); r = aten.relu_(y)
    r_o = observers.act_2(r)                     # conv's output, after the relu it fuses with
    p = aten.max_pool2d(r_o); p_o = observers.shared_3(p)     # shape-only op: shares act_2's qparams
    f = aten.flatten(p_o); f_o = observers.shared_4(f)
    z = aten.linear(f_o, observers.weight_5(W2), b2)          # model output: stays float

Which tensors get observers:

* the activation inputs of every op the config quantizes (conv, linear, matmul, add, cat, avg pool
  in static mode), walking up through shape-only ops (view/reshape/flatten/permute/transpose/
  squeeze/max_pool/dropout/...) to the real producer, whose observer the shape-only ops then share
  (one set of qparams, no requantization: onnxruntime drops the Q/DQ around them and inductor
  matches them as shared);
* the output of every quantized op (after a relu that directly follows, which int8 kernels fuse),
  unless it is only a model output and ``quantize_outputs`` is off;
* the weights of conv/linear (observed from the constant at convert time, no calibration needed).

An observer on a quantized op's output replaces every use of it (the tensor is born int8); one on
any other tensor feeds only the quantized consumers, so float consumers keep the exact value.
Ops the config does not quantize, or cannot (non-float, non-constant weight, scalar operand), are
reported with the reason and stamped ``meta["fxpress_quant"] = reason`` for the quantization
report. Numerics: exact (observers return their input).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ...ir.graph import node_label, op_name
from ...ir.report import PassReport
from ..base import Pass, register_pass
from .config import OpQuant, QuantConfig, TensorSpec, op_kind

__all__ = ["InsertObservers", "SharedObserver", "SHARE_OPS", "ACTIVATIONS", "OBSERVER_ROOT"]

aten = torch.ops.aten
OBSERVER_ROOT = "observers"

# ops whose output is a rearrangement or subset of their input's values: they share its qparams
SHARE_OPS = frozenset(
    {
        aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints,
        aten.permute.default, aten.transpose.int, aten.t.default, aten.squeeze.dim, aten.squeeze.dims,
        aten.squeeze.default, aten.unsqueeze.default, aten.max_pool2d.default, aten.max_pool1d.default,
        aten.adaptive_max_pool2d.default, aten.dropout.default, aten.clone.default, aten.contiguous.default,
        aten.expand.default, aten.slice.Tensor, aten.pixel_shuffle.default, aten.channel_shuffle.default,
    }
)
# elementwise activations int8 kernels fuse into the op before them (the Q after them clips to ≥ 0)
# activations int8 kernels fuse into the op before them (observed after the activation): onnxruntime
# drops a Relu/Clip whose following QuantizeLinear already clips to its range, oneDNN fuses them
ACTIVATIONS = frozenset({aten.relu.default, aten.relu_.default, aten.relu6.default, aten.hardtanh.default, aten.hardtanh_.default})


class SharedObserver(torch.nn.Module):
    """Marks a tensor that reuses another observer's qparams (``source`` names it)."""

    def __init__(self, source: str):
        super().__init__()
        self.source = source

    def forward(self, x):
        return x

    def extra_repr(self) -> str:
        return f"source={self.source}"


def _is_float(node) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.is_floating_point()


class _Plan:
    """Which tensors to observe, with what, and which consumers read the observed version."""

    def __init__(self):
        self.observer: dict[fx.Node, tuple[str, torch.nn.Module]] = {}
        self.born: set[fx.Node] = set()  # outputs of quantized ops: every use reads the observed tensor
        self.readers: dict[fx.Node, set[fx.Node]] = {}  # other observed tensors: only these uses
        self.counter = 0

    def name(self, kind: str) -> str:
        self.counter += 1
        return f"{kind}_{self.counter - 1}"


@register_pass
class InsertObservers(Pass):
    """Insert calibration observers for the ops a ``QuantConfig`` quantizes."""

    name = "insert-observers"
    run_after = ("fold-batch-norm", "fold-constants")

    def __init__(self, config: QuantConfig | str | dict | None = None, through_batch_norm: bool = False):
        self.config = QuantConfig.coerce(config)
        # QAT with batch norms still in training (prepare_qat(bn="train")): a conv's output is the
        # batch norm's (folded into the conv at convert), so its observer goes after the batch norm
        self.through_batch_norm = through_batch_norm

    def run(self, gm: fx.GraphModule, report: PassReport) -> None:
        from .observers import make_observer

        plan = _Plan()
        outputs = set(gm.graph.output_node().all_input_nodes)
        quantized: list[tuple[fx.Node, OpQuant]] = []
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or op_kind(node) is None:
                continue
            spec, reason = self.config.resolve(node)
            reason = reason or _cannot_quantize(node, spec)
            if spec is None or reason:
                node.meta["fxpress_quant"] = reason
                report.skip(node_label(node), reason)
                continue
            quantized.append((node, spec))
            node.meta["fxpress_quant"] = spec.mode

        def observer_for(spec: TensorSpec, kind: str) -> tuple[str, torch.nn.Module]:
            opts = dict(spec.observer_options)
            if spec.bits is not None:
                opts["bits"] = spec.bits
            return plan.name(kind), make_observer(spec.observer, dtype=spec.dtype, symmetric=spec.symmetric, axis=spec.axis, **opts)

        # outputs of quantized ops that are observed for every reader ("born" int8)
        fused_output = lambda node: _fused_output(node, self.through_batch_norm)  # noqa: E731
        born = {out for node, spec in quantized if spec.mode == "static" for out in [fused_output(node)]
                if any(u.op != "output" for u in out.users) or (self.config.quantize_outputs and out in outputs)}

        def observe_input(tensor: fx.Node, consumer: fx.Node, spec: TensorSpec) -> None:
            chain, root = [], tensor
            while root.op == "call_function" and root.target in SHARE_OPS and isinstance(root.args[0], fx.Node) and _is_float(root.args[0]):
                chain.append(root)
                root = root.args[0]
            # Sharing reads the observed root through the shape ops, so every other reader of a link
            # would see fake-quantized values. Unless the root is int8 for everyone anyway, stop at the
            # first link read by anything else and observe it there: float consumers keep exact values.
            if root not in born:
                cut = next((i for i, link in enumerate(chain) if len(link.users) > 1), None)
                if cut is not None:
                    chain, root = chain[:cut], chain[cut]
            if root not in plan.observer:
                plan.observer[root] = observer_for(spec, "act")
            source = plan.observer[root][0]
            # each op on the chain reads the observed version of its input and shares the root's qparams
            reader = consumer
            for link in [*chain, None]:
                current = link if link is not None else root
                plan.readers.setdefault(current, set()).add(reader)
                if link is not None and link not in plan.observer:
                    plan.observer[link] = (plan.name("shared"), SharedObserver(source))
                reader = link

        for node, spec in quantized:
            kind = op_kind(node)
            if spec.weight is not None and kind in ("conv", "conv_transpose", "linear"):
                weight = node.args[1]
                name, obs = observer_for(spec.weight, "weight")
                _add_observer(gm, name, obs)
                with gm.graph.inserting_after(weight):
                    wnode = gm.graph.call_module(f"{OBSERVER_ROOT}.{name}", (weight,))
                wnode.meta["val"] = weight.meta.get("val")
                node.update_arg(1, wnode)
            if spec.mode != "static":
                report.change(f"{node_label(node)}: {spec.mode} ({op_name(node)})", kind=f"{spec.mode} ops")
                continue
            for tensor in _activation_inputs(node):
                observe_input(tensor, node, spec.activation)
            out = fused_output(node)
            if out in born:
                if out not in plan.observer:
                    plan.observer[out] = observer_for(spec.activation, "act")
                plan.born.add(out)
            report.change(f"{node_label(node)}: static ({op_name(node)})", kind="static ops")

        self._materialize(gm, plan)
        report.counts["observers"] = len(plan.observer)
        if quantized:
            gm.recompile()

    def _materialize(self, gm: fx.GraphModule, plan: _Plan) -> None:
        for tensor, (name, obs) in plan.observer.items():
            _add_observer(gm, name, obs)
            with gm.graph.inserting_after(tensor):
                onode = gm.graph.call_module(f"{OBSERVER_ROOT}.{name}", (tensor,))
            onode.meta["val"] = tensor.meta.get("val")
            if tensor in plan.born:
                keep_float = {u for u in tensor.users if u.op == "output" and not self.config.quantize_outputs}
                tensor.replace_all_uses_with(onode, delete_user_cb=lambda u: u is not onode and u not in keep_float)
            else:
                readers = plan.readers.get(tensor, set())
                tensor.replace_all_uses_with(onode, delete_user_cb=lambda u: u in readers)


def _add_observer(gm: fx.GraphModule, name: str, obs: torch.nn.Module) -> None:
    if not hasattr(gm, OBSERVER_ROOT):
        gm.add_module(OBSERVER_ROOT, torch.nn.Module())
    getattr(gm, OBSERVER_ROOT).add_module(name, obs)


def _activation_inputs(node: fx.Node) -> list[fx.Node]:
    kind = op_kind(node)
    if kind in ("conv", "conv_transpose", "linear", "avg_pool"):
        return [node.args[0]]
    if kind == "cat":
        return [t for t in node.args[0] if isinstance(t, fx.Node)]
    return [a for a in node.args[:2] if isinstance(a, fx.Node)]


def _fused_output(node: fx.Node, through_batch_norm: bool = False) -> fx.Node:
    users = list(node.users)
    if through_batch_norm and len(users) == 1 and users[0].op == "call_function" and users[0].target == aten.batch_norm.default:
        node, users = users[0], list(users[0].users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in ACTIVATIONS:
        return users[0]
    return node


def _cannot_quantize(node: fx.Node, spec: OpQuant | None) -> str:
    """Why this op cannot be quantized as configured ('' when it can)."""
    if spec is None:
        return ""
    if not _is_float(node):
        return "output is not a float tensor"
    kind = op_kind(node)
    if kind in ("conv", "conv_transpose", "linear"):
        weight = node.args[1]
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            return "weight is not a constant (computed in the graph)"
        if spec.weight is not None and spec.weight.group_size is not None:
            in_features = weight.meta["val"].shape[1]
            if kind != "linear":
                return "per-group weights are for linear layers"
            if in_features % spec.weight.group_size:
                return f"in_features {in_features} is not a multiple of group_size {spec.weight.group_size}"
    if spec.mode == "static":
        inputs = _activation_inputs(node)
        if kind in ("add", "mul", "matmul") and (len(inputs) < 2 or not all(_is_float(t) for t in inputs)):
            return "an operand is a scalar or not a float tensor"
        if not all(_is_float(t) for t in inputs):
            return "an input is not a float tensor"
    elif kind not in ("conv", "conv_transpose", "linear", "matmul"):
        return f"{kind} has no weights to quantize in {spec.mode} mode"
    elif kind == "matmul":
        return f"matmul has no constant weight to quantize in {spec.mode} mode"
    return ""
