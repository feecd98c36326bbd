"""record-input-means and bias-correction: remove the mean output shift weight quantization causes.

Quantizing a weight W to Ŵ changes a layer's output by (Ŵ - W)·x. Its expectation,
E[(Ŵ - W)·x] = (Ŵ - W)·E[x], is a per-output-channel constant that does not average out: with
coarse weights (4-bit, or depthwise convs whose few taps per channel round badly) it biases every
output. Empirical bias correction (Nagel et al. 2019, Banner et al. 2019) measures E[x] on the
calibration data and subtracts the shift from the bias, so the quantized layer's mean output
matches the float layer's.

Two passes:

``record-input-means`` (at prepare time, after insert-observers). Before::

    y = aten.conv2d(x_o, W_o, b)

After::

    x_m = input_means.conv2d(x_o)            # ChannelStats: identity, records E[x] on real data
    y = aten.conv2d(x_m, W_o, b)

``bias-correction`` (at convert time, after convert-to-qdq, before fold-weight-quant, while the
float weight is still a constant). Before::

    W_d = dequantize_per_channel(quantize_per_channel(W, s, z, ...), s, z, ...)
    y = aten.conv2d(input_means.conv2d(x_d), W_d, b)

After::

    y = aten.conv2d(x_d, W_d, b - δ)

with δ the expected output shift, per output channel o:

* linear:  δ_o = Σ_i (Ŵ - W)[o, i] · E[x_i]              (E over every position but the feature dim)
* conv:    δ_o = mean over output positions p of conv(E[x], Ŵ - W)[o, p]
  where E[x] is the per-position mean image over the batch, so zero padding at the borders is
  accounted for exactly (a 3x3 tap that reads padding contributes nothing there). When inputs of
  different spatial sizes were seen, the per-channel mean is used instead:
  δ_o = Σ_i (Σ_k (Ŵ - W)[o, i, k]) · E[x_i], grouped convs by group.

A layer without a bias gets one. Layers that are not quantized, whose weight is not quantized
from a float constant, or whose recorder saw no data are skipped with the reason; the recorders
are removed either way.

Numerics: not exact by design: the mean output error E[ŷ - y] of each corrected layer becomes
(up to the difference between E[x̂] and E[x] of its quantized input) zero; the variance of the
error is unchanged. With 8-bit per-channel weights the shift is small; with 4-bit weights or
depthwise convs it is a measurable part of the error (see tests/passes/quant/test_advanced_ptq.py).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ...ir.graph import add_constant, get_attr_value, node_label, set_attr_value
from ...ir.report import PassReport
from ..base import Pass, register_pass
from .config import op_kind

__all__ = ["ChannelStats", "RecordInputMeans", "BiasCorrection", "RECORDER_ROOT", "evaluate_constant"]

RECORDER_ROOT = "input_means"
_QUANTIZED = ("static", "dynamic", "weight_only")


class ChannelStats(torch.nn.Module):
    """Identity that records, on real data, per-channel mean and max|x| (and the mean per position).

    channel_dim: the channel axis (1 for conv inputs, -1 for linear inputs). positions: the shape of
    one sample (without the batch dim) to also keep the per-position mean of, or None. State lives
    in buffers allocated up front and updated in place (so it survives state_dict/deepcopy, and a
    run whose buffers are restored afterwards, such as the pass manager's check, leaves no trace).
    FakeTensors, tracing and torch.compile pass through unrecorded.
    """

    def __init__(self, channels: int, channel_dim: int = 1, positions: tuple[int, ...] | None = None):
        super().__init__()
        self.channel_dim = channel_dim
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("sum", torch.zeros(channels, dtype=torch.float64))
        self.register_buffer("absmax", torch.zeros(channels, dtype=torch.float32))
        self.register_buffer("samples", torch.zeros((), dtype=torch.float64))
        self.register_buffer("position_sum", torch.zeros(positions if positions is not None else (0,), dtype=torch.float64))
        self.register_buffer("positions_ok", torch.tensor(positions is not None))

    @property
    def calibrated(self) -> bool:
        return float(self.count) > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return x
        from .observers import _is_real

        if not _is_real(x) or not x.is_floating_point() or x.numel() == 0:
            return x
        with torch.inference_mode(False), torch.no_grad():
            if self.sum.device != x.device:
                self.to(x.device)
            v = x.detach()
            dim = self.channel_dim % v.dim()
            moved = v.movedim(dim, -1).reshape(-1, v.shape[dim])
            self.sum += moved.sum(0, dtype=torch.float64)
            self.absmax.copy_(torch.maximum(self.absmax, moved.abs().amax(0).to(torch.float32)))
            self.count += moved.shape[0]
            if bool(self.positions_ok):
                if tuple(v.shape[1:]) == tuple(self.position_sum.shape):
                    self.position_sum += v.sum(0, dtype=torch.float64)
                    self.samples += v.shape[0]
                else:  # inputs of another size: only the per-channel mean is meaningful
                    self.positions_ok.fill_(False)
        return x

    def mean(self) -> torch.Tensor:
        return self.sum / self.count.clamp(min=1)

    def position_mean(self) -> torch.Tensor | None:
        if not bool(self.positions_ok) or float(self.samples) == 0:
            return None
        return self.position_sum / self.samples

    def extra_repr(self) -> str:
        return f"channels={self.sum.numel()}, channel_dim={self.channel_dim}, seen={int(self.count)}"


def _static_shape(val) -> tuple[int, ...] | None:
    try:
        return tuple(int(s) for s in val.shape[1:]) if all(isinstance(s, int) for s in val.shape[1:]) else None
    except (TypeError, AttributeError):
        return None


def _add_module(gm: fx.GraphModule, root: str, name: str, mod: torch.nn.Module) -> str:
    if not hasattr(gm, root):
        gm.add_module(root, torch.nn.Module())
    getattr(gm, root).add_module(name, mod)
    return f"{root}.{name}"


def insert_stats(gm: fx.GraphModule, tensor: fx.Node, consumers: list[fx.Node], name: str, root: str, *, channel_dim: int, positions: bool) -> fx.Node:
    """Put a ``ChannelStats`` on ``tensor`` read by ``consumers`` only; return its node."""
    val = tensor.meta["val"]
    shape = _static_shape(val) if positions else None
    target = _add_module(gm, root, name, ChannelStats(int(val.shape[channel_dim]), channel_dim, shape))
    with gm.graph.inserting_after(tensor):
        node = gm.graph.call_module(target, (tensor,))
    node.meta["val"] = val
    for c in consumers:
        c.replace_input_with(tensor, node)
    return node


@register_pass
class RecordInputMeans(Pass):
    """Put an input-mean recorder in front of every quantized conv/linear (for bias-correction)."""

    name = "record-input-means"
    exact = True
    run_after = ("insert-observers",)

    def run(self, gm: fx.GraphModule, report: PassReport) -> None:
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or op_kind(node) not in ("conv", "linear"):
                continue
            mode = node.meta.get("fxpress_quant")
            if mode not in _QUANTIZED:
                report.skip(node_label(node), f"not quantized ({mode or 'no quantization planned'}); no bias to correct")
                continue
            x = node.args[0]
            if not isinstance(x, fx.Node) or not isinstance(x.meta.get("val"), torch.Tensor):
                report.skip(node_label(node), "input is not a tensor node")
                continue
            is_conv = op_kind(node) == "conv"
            insert_stats(gm, x, [node], node.name, RECORDER_ROOT, channel_dim=1 if is_conv else -1, positions=is_conv)
            report.change(f"{node_label(node)}: input mean recorder", kind="recorders")
        if report.changed:
            gm.graph.lint()
            gm.recompile()


def evaluate_constant(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The value of ``node`` if it is computed from constants only (get_attr and pure calls), else None."""
    if not isinstance(node, fx.Node):
        return node
    if node.op == "get_attr":
        return get_attr_value(gm, node.target)
    if node.op != "call_function":
        return None
    missing = []

    def value(a):
        if isinstance(a, fx.Node):
            v = evaluate_constant(gm, a)
            if v is None:
                missing.append(a)
            return v
        return a

    args = fx.node.map_aggregate(node.args, value)
    kwargs = fx.node.map_aggregate(node.kwargs, value)
    if missing:
        return None
    with torch.no_grad():
        return node.target(*args, **kwargs)


def _float_weight(gm: fx.GraphModule, w: fx.Node) -> torch.Tensor | None:
    """The float constant at the root of a weight's quantize → dequantize chain."""
    cur = w
    while isinstance(cur, fx.Node) and cur.op == "call_function":
        cur = cur.args[0]
    if isinstance(cur, fx.Node) and cur.op == "get_attr":
        value = get_attr_value(gm, cur.target)
        return value if value.is_floating_point() else None
    return None


@register_pass
class BiasCorrection(Pass):
    """Subtract (Ŵ - W)·E[x] from the bias of every quantized conv/linear with recorded input means."""

    name = "bias-correction"
    run_after = ("convert-to-qdq",)
    run_before = ("fold-weight-quant", "fold-qdq")

    def run(self, gm: fx.GraphModule, report: PassReport) -> None:
        recorders = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(RECORDER_ROOT + ".")]
        for rec in recorders:
            stats = gm.get_submodule(rec.target)
            for layer in [u for u in rec.users if u.op == "call_function" and op_kind(u) in ("conv", "linear")]:
                reason = self._correct(gm, layer, stats, report)
                if reason:
                    report.skip(node_label(layer), reason)
            rec.replace_all_uses_with(rec.args[0])
            gm.graph.erase_node(rec)
        if hasattr(gm, RECORDER_ROOT):
            delattr(gm, RECORDER_ROOT)
        if recorders:
            report.counts["recorders removed"] = len(recorders)
            gm.graph.lint()
            gm.recompile()

    def _correct(self, gm: fx.GraphModule, layer: fx.Node, stats: ChannelStats, report: PassReport) -> str | None:
        if not stats.calibrated:
            return "its input recorder saw no calibration data"
        w_node = layer.args[1]
        if not (isinstance(w_node, fx.Node) and w_node.op == "call_function"):
            return "weight is not quantized"
        w_hat = evaluate_constant(gm, w_node)
        w = _float_weight(gm, w_node)
        if w_hat is None or w is None:
            return "weight is not quantized from a float constant (run bias-correction before fold-weight-quant)"
        delta = w_hat.detach().double() - w.detach().double()
        shift = _expected_shift(layer, delta, stats)
        bias = layer.args[2] if len(layer.args) > 2 else None
        if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
            return "bias is not a constant"
        if bias is None:
            b = torch.zeros(delta.shape[0], dtype=torch.float64)
            new = add_constant(gm, f"{w_node.name}_bias_corrected", (b - shift).to(w.dtype), before=layer)
            args = list(layer.args) + [None] * max(0, 3 - len(layer.args))
            args[2] = new
            layer.args = tuple(args)
        else:
            old = get_attr_value(gm, bias.target)
            readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == bias.target]
            value = (old.detach().double() - shift).to(old.dtype)
            if len(readers) == 1 and len(bias.users) == 1:
                set_attr_value(gm, bias.target, value)
            else:
                layer.update_arg(2, add_constant(gm, f"{bias.target}_corrected", value, before=layer))
        report.change(
            f"{node_label(layer)}: bias shifted by up to {float(shift.abs().max()):.3g} (mean |shift| {float(shift.abs().mean()):.3g})",
            kind="corrected biases",
        )
        return None


def _expected_shift(layer: fx.Node, delta: torch.Tensor, stats: ChannelStats) -> torch.Tensor:
    """E[(Ŵ - W)·x] per output channel (see the module docstring)."""
    if op_kind(layer) == "linear":
        return delta @ stats.mean().to(delta.device)
    pos = stats.position_mean()
    if pos is not None:
        rest = [a for a in layer.args[3:]]
        with torch.no_grad():
            out = layer.target(pos.unsqueeze(0).to(delta), delta, None, *rest, **layer.kwargs)
        return out.reshape(out.shape[1], -1).mean(1)
    groups = int(layer.args[6]) if len(layer.args) > 6 else int(layer.kwargs.get("groups", 1))
    mean = stats.mean().to(delta)
    out_ch, cpg = delta.shape[0], delta.shape[1]
    summed = delta.reshape(out_ch, cpg, -1).sum(-1).reshape(groups, out_ch // groups, cpg)
    return torch.einsum("goc,gc->go", summed, mean.reshape(groups, cpg)).reshape(out_ch)
