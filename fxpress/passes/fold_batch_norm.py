"""fold-batch-norm: fold an eval-mode batch norm into the convolution or linear layer feeding it.

Before::

    y = aten.conv2d(x, W, b, stride, padding, dilation, groups)
    z = aten.batch_norm(y, gamma, beta, mean, var, False, momentum, eps, cudnn)

After::

    z = aten.conv2d(x, W * s, (b - mean) * s + beta, stride, padding, dilation, groups)
    where s = gamma / sqrt(var + eps), broadcast over the output-channel axis of W

Also for ``aten.linear`` (2-D outputs, where batch norm's channel dim is the feature dim),
``aten.conv_transpose{1,2,3}d`` (W is [in, out/groups, k...]: s is applied per output channel of
each group), and the decomposed forms (``aten.convolution`` with its ``transposed`` flag, and
``_native_batch_norm_legit_no_training`` read through ``getitem(·, 0)``) that ``run_decompositions``
and aot_autograd give. Missing gamma/beta/bias count as
1/0/0.

Preconditions (each refusal is reported): the graph was captured in eval mode (batch norm's
``training`` flag is False) with running statistics; weights and statistics are constants; the
producer's output feeds only the batch norm.

Numerics: exact up to float rounding; the new weights are computed in float64 and cast back, so
outputs agree with the unfolded graph to within a few ulps of the activations (checked at 1e-4).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..ir.graph import add_constant, get_attr_value, set_attr_value
from ..ir.report import PassReport
from ..ir.rewrite import Const, Lit, Match, Op, RewriteRule, Var, apply_rules
from .base import Pass, register_pass

aten = torch.ops.aten

CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding}
CONV_TRANSPOSES = {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}
# the decomposed form (run_decompositions, aot_autograd): one op for both, with a `transposed` flag
CONVOLUTION = {aten.convolution.default}
LINEARS = {aten.linear.default}
PRODUCERS = CONVS | CONV_TRANSPOSES | CONVOLUTION | LINEARS
GROUPS_ARG = 6  # position of `groups` in aten.conv*d and aten.conv_transpose*d
CONVOLUTION_TRANSPOSED_ARG, CONVOLUTION_GROUPS_ARG = 6, 8  # in aten.convolution


def _producer() -> Op:
    return Op(PRODUCERS, Var("x"), Const("weight"), Const("bias", optional=True), name="producer")


class _FoldIntoProducer(RewriteRule):
    name = "folded"

    def check(self, gm: fx.GraphModule, m: Match) -> str | None:
        # Statistics first: a BatchNorm with track_running_stats=False is called with training=True
        # even in eval(), and "captured in train()" would send the user the wrong way.
        for stat in ("mean", "var"):
            node = m[stat]
            if node is None:
                return "batch norm has no running statistics (track_running_stats=False); it normalizes by batch statistics"
            if not (isinstance(node, fx.Node) and node.op == "get_attr"):
                return f"batch norm's running {stat} is not a constant tensor"
        if m.get("training", False) is not False:
            return "batch norm is in training mode (the model was captured in train()); capture model.eval() to fold"
        producer = m["producer"]
        if producer.target in LINEARS:
            val = producer.meta.get("val")
            if val is None or val.dim() != 2:
                return "batch norm after a linear with a >2-D output normalizes dim 1, not the feature dim"
        return None

    def rewrite(self, gm: fx.GraphModule, m: Match) -> fx.Node:
        producer: fx.Node = m["producer"]
        w_node: fx.Node = m["weight"]
        weight = get_attr_value(gm, w_node.target)
        out_channels = _out_channels(producer, weight)
        dtype = weight.dtype
        mean = get_attr_value(gm, m["mean"].target).double()
        var = get_attr_value(gm, m["var"].target).double()
        gamma = _value_or(gm, m.get("gamma"), torch.ones(out_channels, dtype=torch.float64))
        beta = _value_or(gm, m.get("beta"), torch.zeros(out_channels, dtype=torch.float64))
        bias = _value_or(gm, m.get("bias"), torch.zeros(out_channels, dtype=torch.float64))
        scale = gamma / torch.sqrt(var + float(m["eps"]))
        new_weight = _scale_weight(producer, weight.double(), scale).to(dtype)
        new_bias = ((bias - mean) * scale + beta).to(dtype)

        _store(gm, producer, w_node, new_weight, before=producer, arg_index=1)
        b_node = m.get("bias")
        if b_node is not None:
            _store(gm, producer, b_node, new_bias, before=producer, arg_index=2)
        else:
            stem = w_node.target.rsplit(".", 1)[0] if "." in w_node.target else w_node.target
            new = add_constant(gm, f"{stem}.bias", new_bias, before=producer)
            args = list(producer.args) + [None] * max(0, 3 - len(producer.args))
            args[2] = new
            producer.args = tuple(args)
        return producer


def _value_or(gm, node, default: torch.Tensor) -> torch.Tensor:
    return default if node is None else get_attr_value(gm, node.target).double()


def _out_channels(producer: fx.Node, weight: torch.Tensor) -> int:
    if _transposed(producer):
        return weight.shape[1] * _groups(producer)
    return weight.shape[0]


def _arg(producer: fx.Node, index: int, name: str, default):
    if len(producer.args) > index:
        return producer.args[index]
    return producer.kwargs.get(name, default)


def _transposed(producer: fx.Node) -> bool:
    if producer.target in CONVOLUTION:
        return bool(_arg(producer, CONVOLUTION_TRANSPOSED_ARG, "transposed", False))
    return producer.target in CONV_TRANSPOSES


def _groups(producer: fx.Node) -> int:
    index = CONVOLUTION_GROUPS_ARG if producer.target in CONVOLUTION else GROUPS_ARG
    return int(_arg(producer, index, "groups", 1))


def _scale_weight(producer: fx.Node, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if _transposed(producer):
        groups = _groups(producer)
        in_ch, out_per_group = weight.shape[:2]
        w = weight.reshape(groups, in_ch // groups, out_per_group, *weight.shape[2:])
        s = scale.reshape(groups, 1, out_per_group, *([1] * (weight.dim() - 2)))
        return (w * s).reshape(weight.shape)
    return weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))


def _store(gm, producer: fx.Node, node: fx.Node, value: torch.Tensor, *, before: fx.Node, arg_index: int) -> None:
    """Overwrite the attribute in place when only this producer reads it, else give it a copy."""
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == node.target]
    if len(readers) == 1 and len(node.users) == 1:
        set_attr_value(gm, node.target, value)
    else:
        producer.update_arg(arg_index, add_constant(gm, f"{node.target}_folded", value, before=before))


class FoldIntoProducer(_FoldIntoProducer):
    pattern = Op(
        {aten.batch_norm.default},
        _producer(),
        Const("gamma", optional=True),
        Const("beta", optional=True),
        Var("mean"),
        Var("var"),
        Var("training"),
        Var("momentum"),
        Var("eps"),
        name="bn",
    )


class FoldLegitNoTraining(_FoldIntoProducer):
    pattern = Op(
        {operator.getitem},
        Op(
            {aten._native_batch_norm_legit_no_training.default},
            _producer(),
            Const("gamma", optional=True),
            Const("beta", optional=True),
            Var("mean"),
            Var("var"),
            Var("momentum"),
            Var("eps"),
            name="bn",
        ),
        Lit(0, why="uses a statistics output of batch norm, not its result"),
    )

    def candidate(self, node: fx.Node) -> bool:
        src = node.args[0] if node.args else None
        return isinstance(src, fx.Node) and src.target == aten._native_batch_norm_legit_no_training.default


@register_pass
class FoldBatchNorm(Pass):
    """Fold eval-mode batch norms into the conv / conv_transpose / linear that feeds them."""

    name = "fold-batch-norm"
    exact = True
    run_after = ("fold-constants",)

    def run(self, gm: fx.GraphModule, report: PassReport) -> None:
        apply_rules(gm, [FoldIntoProducer(), FoldLegitNoTraining()], report)
