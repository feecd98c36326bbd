"""Fake quantization for quantization-aware training (QAT): a module, and the two passes around it.

``FakeQuantize`` wraps one calibration observer (the very observer ``insert-observers`` placed for
post-training quantization) and, in the forward pass, rounds its input onto the integer grid and
back, with the straight-through estimator (STE) as gradient::

    y = (clamp(round(x / s) + z, qmin, qmax) - z) * s         dy/dx = 1 inside the range, 0 where clipped

Passes:

* ``observers-to-fake-quant`` (prepare_qat): every ``Observer`` under ``gm.observers`` becomes a
  ``FakeQuantize`` around it; ``SharedObserver``s (shape-only ops) stay as they are::

      x_o = observers.act_0(x)  # identity, records x        ->  x_o = observers.act_0(x)  # records x, returns fq(x)

* ``fake-quant-to-observers`` (first step of ``fxpress.convert`` on a QAT graph): switch the graph
  to inference, fold its batch norms into the convolutions (with the ``fold-batch-norm`` pass, so the
  folding is PTQ's), and hand ``convert-to-qdq`` ordinary observers again: activation fake-quants
  become ``FixedQParams`` holding the qparams they trained with; weight fake-quants become a fresh
  observer of the configured kind, which ``convert-to-qdq`` runs on the final (folded) weight exactly
  as in post-training quantization, or ``FixedQParams`` with the learned scales (LSQ). The rest of
  ``convert`` is PTQ's, so a QAT model converts to the same Q/DQ graph and lowers the same way.

How qparams evolve during training:

* weights: recomputed from the current weight at every training step (they follow the optimizer),
  with the configured weight observer (per-channel min/max by default);
* activations: the observer keeps recording training batches until ``observe_steps`` training
  steps have passed (None: forever), and the qparams are re-read from it every ``refresh_every``
  steps (1 for min/max observers; 16 for histogram ones, whose range search costs a few ms);
  with ``torch.distributed`` initialized the statistics are first reduced across ranks (on a copy,
  so repeated reductions never double count), so every rank fake-quantizes identically;
* ``learnable=True`` (LSQ, Esser et al. 2020): the scale (and, for affine tensors, the zero point)
  start from the observer and are then trained by gradient descent with LSQ's gradient scaling
  ``1/sqrt(numel * qmax)`` (PyTorch's ``_fake_quantize_learnable_*`` kernels); the observer stops.

Batch norms kept in training mode during QAT (``prepare_qat(bn="train")``): a batch norm after a
convolution is folded only at convert time, so the weight fake-quant sees the unfolded weight. With
per-output-channel symmetric weights that is exact: folding scales channel c by k_c =
gamma_c / sqrt(var_c + eps), and fq(k_c w_c) = k_c fq(w_c) because the per-channel scale scales with
|k_c| (round is odd-symmetric). Learned weight scales are multiplied by |k_c| when folding.

Numerics: fake quantization is not exact by design; ``convert`` reproduces the eval-mode QAT graph
up to float rounding (a value within float eps of a rounding boundary may land one step apart).
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
from torch import nn

from ...ir.graph import get_attr_value, node_label
from ...ir.mode import set_training
from ...ir.qparams import QParams
from ...ir.report import PassReport
from ..base import Pass, register_pass
from .insert_observers import OBSERVER_ROOT, SharedObserver

if TYPE_CHECKING:
    from .observers import Observer


def _is_real(x) -> bool:
    from .observers import _is_real as is_real  # imported lazily, as the quantization passes do (it pulls in dynamo)

    return is_real(x)


__all__ = [
    "FakeQuantize", "FixedQParams", "QATBatchNorm", "ObserversToFakeQuant", "BatchNormsToQAT", "FakeQuantToObservers",
    "fake_quant_modules", "qat_batch_norms",
]

aten = torch.ops.aten

_CHEAP_KINDS = ("minmax", "moving_average")


def _dist_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class FixedQParams(nn.Module):
    """An observer that already knows its qparams (what ``convert-to-qdq`` reads from a trained fake-quant)."""

    calibrated = True

    def __init__(self, qp: QParams):
        super().__init__()
        self.register_buffer("scale", qp.scale.detach().clone().to(torch.float32))
        self.register_buffer("zero_point", qp.zero_point.detach().clone().to(torch.int64))
        self.quant_min, self.quant_max, self.dtype, self.axis = qp.quant_min, qp.quant_max, qp.dtype, qp.axis

    def forward(self, x):
        return x

    def qparams(self) -> QParams:
        return QParams(self.scale, self.zero_point, self.quant_min, self.quant_max, self.dtype, self.axis)

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, axis={self.axis}, range=[{self.quant_min}, {self.quant_max}]"


class FakeQuantize(nn.Module):
    """Fake-quantize a tensor with qparams from a wrapped observer, or learned (LSQ).

    role: "activation" or "weight" (weights: qparams recomputed from the current weight every
    training step). learnable: LSQ scale (and zero point when affine). observe_steps: training
    steps after which the observer stops recording (None: never; activations only).
    refresh_every: training steps between re-reading the observer's qparams (None: 1 for min/max
    kinds, 16 for histogram kinds). Flags: ``observer_enabled``, ``fake_quant_enabled``.

    State that must survive checkpoints is in buffers/parameters: ``scale``, ``zero_point``,
    ``initialized``, ``steps`` (training forwards seen).
    """

    def __init__(
        self,
        observer: Observer,
        role: str = "activation",
        *,
        learnable: bool = False,
        observe_steps: int | None = None,
        refresh_every: int | None = None,
    ):
        super().__init__()
        if role not in ("activation", "weight"):
            raise ValueError(f"role must be 'activation' or 'weight', got {role!r}")
        if observe_steps is not None and (isinstance(observe_steps, bool) or not isinstance(observe_steps, int) or observe_steps < 0):
            raise ValueError(f"observe_steps must be None or an integer >= 0, got {observe_steps!r}")
        self.observer = observer
        self.role = role
        self.group_size: int | None = None  # per-group weights (weight-only int4): set by observers-to-fake-quant
        self.learnable = bool(learnable)
        self.observe_steps = observe_steps
        if refresh_every is None:
            refresh_every = 1 if observer.kind in _CHEAP_KINDS else 16
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"refresh_every must be an integer >= 1, got {refresh_every!r}")
        self.refresh_every = refresh_every
        self.observer_enabled = True
        self.fake_quant_enabled = True
        self.quant_min, self.quant_max, self.dtype = observer.quant_min, observer.quant_max, observer.dtype
        self.symmetric = observer.symmetric
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        shape = () if observer.axis is None else (0,)
        self._seen_weight: tuple[int, int] | None = None  # (data_ptr, _version) the weight qparams were computed from
        if self.learnable:
            shape = (1,) if observer.axis is None else shape  # the LSQ kernels take a 1-element scale
            self.scale = nn.Parameter(torch.ones(shape))
            self.zero_point = nn.Parameter(torch.zeros(shape), requires_grad=not self.symmetric)
        else:
            self.register_buffer("scale", torch.ones(shape))
            self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int64))

    # -- what convert reads ------------------------------------------------------------------

    @property
    def axis(self) -> int | None:
        return self.observer._resolved_axis()

    @property
    def calibrated(self) -> bool:
        return bool(self.initialized)

    def qparams(self) -> QParams:
        """The qparams this module fake-quantizes with now (learned ones rounded as the kernels round them)."""
        from .observers import CalibrationError

        if not self.calibrated:
            raise CalibrationError(
                f"{self._label()} has no qparams yet: run training or calibration batches through the QAT model first"
            )
        with torch.no_grad():
            scale = self.scale.detach().to(torch.float32).abs().clamp_min(torch.finfo(torch.float32).eps).clone()
            zp = self.zero_point.detach()
            zp = zp.round().clamp(self.quant_min, self.quant_max).to(torch.int64) if zp.is_floating_point() else zp.clone()
        if self.axis is None:
            scale, zp = scale.reshape(()), zp.reshape(())
        return QParams(scale, zp, self.quant_min, self.quant_max, self.dtype, self.axis)

    # -- forward ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or not _is_real(x) or not x.is_floating_point():
            return x
        if self.training or not self.calibrated or self._weight_changed(x):
            self._update(x)
        if not self.fake_quant_enabled or not self.calibrated:
            return x
        return self._fake_quant(x)

    def _weight_changed(self, w: torch.Tensor) -> bool:
        """A weight fake-quant in inference: has the optimizer changed the weight since the last qparams?"""
        return self.role == "weight" and not self.learnable and self._seen_weight != (w.data_ptr(), w._version)

    def _observing(self, step: int) -> bool:
        if not self.calibrated:
            return True  # no qparams yet: the first batch gives them, frozen or not
        if not self.observer_enabled:
            return False
        if self.role == "weight":
            return not (self.learnable and self.calibrated)
        if self.learnable and self.calibrated:
            return False  # LSQ: the observer only gives the starting point
        return self.observe_steps is None or step < self.observe_steps

    def _update(self, x: torch.Tensor) -> None:
        step = int(self.steps)
        if self.training:
            self.steps += 1
        if not self._observing(step):
            return
        due = not self.calibrated or step % self.refresh_every == 0
        if self.role == "weight":
            if due or self._weight_changed(x):
                if self.group_size is not None:  # what convert-to-qdq computes for grouped weights
                    from .convert_to_qdq import group_qparams

                    o = self.observer
                    self._set_qparams(group_qparams(x.detach(), o.dtype, o.bits, o.symmetric, self.group_size))
                else:
                    obs = copy.deepcopy(self.observer)  # a fresh statistic of the current weight
                    obs(x)
                    self._set_qparams(obs.qparams())
                self._seen_weight = (x.data_ptr(), x._version)
            return
        self.observer(x)
        if due:
            self.start_from_observer()  # reduced across ranks: every rank must fake-quantize alike

    def start_from_observer(self) -> None:
        """Take the qparams the (calibrated) observer gives now, reduced across ranks when distributed."""
        obs = self.observer
        if _dist_world() > 1:  # a collective: every rank calls this at the same step
            obs = copy.deepcopy(obs).all_reduce_()
        if obs.calibrated:
            self._set_qparams(obs.qparams())

    def _set_qparams(self, qp: QParams) -> None:
        with torch.no_grad():
            scale = qp.scale.to(self.scale.device, torch.float32)
            zp = qp.zero_point.to(self.zero_point.device)
            if self.learnable:
                shape = (1,) if self.axis is None else scale.shape
                self.scale.data = scale.reshape(shape).clone()
                self.zero_point.data = zp.to(torch.float32).reshape(shape).clone()
            else:
                self.scale = scale.clone()
                self.zero_point = zp.to(torch.int64).clone()
            self.initialized.fill_(True)

    def _fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax, axis = self.quant_min, self.quant_max, self.axis
        if self.group_size is not None:
            return self._fake_quant_groups(x)
        if self.learnable:
            n = x.numel() if axis is None else max(1, x.numel() // max(1, x.shape[axis]))
            grad_factor = 1.0 / math.sqrt(n * max(qmax, 1))
            scale = self.scale.abs().clamp_min(torch.finfo(torch.float32).eps)  # a step may push it through 0
            if axis is None:
                return torch._fake_quantize_learnable_per_tensor_affine(x, scale, self.zero_point, qmin, qmax, grad_factor)
            return torch._fake_quantize_learnable_per_channel_affine(x, scale, self.zero_point, axis, qmin, qmax, grad_factor)
        zp = self.zero_point.to(torch.int32)
        if axis is None:
            return torch.fake_quantize_per_tensor_affine(x, self.scale, zp, qmin, qmax)
        return torch.fake_quantize_per_channel_affine(x, self.scale, zp, axis, qmin, qmax)

    def _fake_quant_groups(self, x: torch.Tensor) -> torch.Tensor:
        g = x.reshape(x.shape[0], -1, self.group_size)
        scale = self.scale.detach().unsqueeze(-1)
        zp = self.zero_point.detach().unsqueeze(-1).to(x.dtype)
        q = g.mul(1.0 / scale).add(zp).round().clamp(self.quant_min, self.quant_max)  # as quantize_per_channel_group
        fq = ((q - zp) * scale).reshape(x.shape)
        return x + (fq - x).detach()  # straight-through

    def _label(self) -> str:
        return f"FakeQuantize({self.role}, {self.observer.kind}, dtype={self.dtype})"

    def extra_repr(self) -> str:
        parts = [self.role, f"learnable={self.learnable}", f"steps={int(self.steps)}"]
        if self.observe_steps is not None:
            parts.append(f"observe_steps={self.observe_steps}")
        if self.calibrated and self.axis is None:
            qp = self.qparams()
            parts.append(f"scale={float(qp.scale):.4g}, zero_point={int(qp.zero_point)}")
        return ", ".join(parts)


class QATBatchNorm(nn.Module):
    """A graph's batch norm during QAT: batch statistics while training, running ones once frozen.

    ``y = aten.batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps)``
    with ``training = self.training and not self.frozen``; the tensors stay the graph's own
    attributes (they arrive as arguments), so state dicts keep their names. ``freeze_after``: the
    number of training forwards after which it freezes itself (None: only ``freeze()``). Frozen
    (torch.ao's ``freeze_bn_stats``): normalizes with the running statistics, stops updating them,
    gamma and beta still train. ``gm.train()``/``gm.eval()`` reach it as a submodule.
    """

    def __init__(self, momentum: float, eps: float, freeze_after: int | None = None):
        super().__init__()
        self.momentum = float(momentum) if momentum is not None else 0.1
        self.eps = float(eps)
        self.freeze_after = freeze_after
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def freeze(self, frozen: bool = True) -> "QATBatchNorm":
        self.frozen.fill_(bool(frozen))
        return self

    def forward(self, x, weight, bias, running_mean, running_var):
        real = _is_real(x)
        if self.training and real:
            self.steps += 1
            if self.freeze_after is not None and int(self.steps) > self.freeze_after:
                self.frozen.fill_(True)
        # traced (fake tensors): the mode does not change shapes, and the flag is not readable
        training = self.training and not (real and bool(self.frozen))
        return aten.batch_norm.default(x, weight, bias, running_mean, running_var, training, self.momentum, self.eps, False)

    def extra_repr(self) -> str:
        return f"frozen={bool(self.frozen)}, steps={int(self.steps)}, freeze_after={self.freeze_after}"


QAT_BN_ROOT = "qat_batch_norms"


@register_pass
class BatchNormsToQAT(Pass):
    """Route every ``aten.batch_norm`` through a ``QATBatchNorm`` module (freezable statistics)."""

    name = "batch-norms-to-qat"

    def __init__(self, freeze_after: int | None = None):
        self.freeze_after = freeze_after

    def run(self, gm: fx.GraphModule, report: PassReport) -> None:
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not aten.batch_norm.default:
                continue
            x, w, b, mean, var, _training, momentum, eps = node.args[:8]
            if not all(isinstance(t, fx.Node) for t in (mean, var)):
                report.skip(node_label(node), "no running statistics (track_running_stats=False): left as is")
                continue
            if not hasattr(gm, QAT_BN_ROOT):
                gm.add_module(QAT_BN_ROOT, nn.Module())
            leaf = f"bn_{len(getattr(gm, QAT_BN_ROOT)._modules)}"
            getattr(gm, QAT_BN_ROOT).add_module(leaf, QATBatchNorm(momentum, eps, self.freeze_after).train(gm.training))
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(f"{QAT_BN_ROOT}.{leaf}", (x, w, b, mean, var))
            new.meta = dict(node.meta)
            new.meta["fxpress_batch_norm"] = node.name
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            report.change(f"{node_label(new)}: freezable batch norm", kind="batch norms")
        if report.changed:
            gm.recompile()


def _batch_norms_back(gm: fx.GraphModule) -> int:
    """Turn ``QATBatchNorm`` call_module nodes back into inference ``aten.batch_norm`` ops."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith(QAT_BN_ROOT + "."):
            mod = gm.get_submodule(node.target)
            x, w, b, mean, var = node.args
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(aten.batch_norm.default, (x, w, b, mean, var, False, mod.momentum, mod.eps, False))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            n += 1
    if hasattr(gm, QAT_BN_ROOT):
        delattr(gm, QAT_BN_ROOT)
    return n


def qat_batch_norms(gm: nn.Module) -> dict[str, QATBatchNorm]:
    root = getattr(gm, QAT_BN_ROOT, None)
    return {} if root is None else {name: m for name, m in root.named_children() if isinstance(m, QATBatchNorm)}


def fake_quant_modules(gm: nn.Module) -> dict[str, FakeQuantize]:
    """The graph's fake-quant modules by name (empty for a graph that is not prepared for QAT)."""
    root = getattr(gm, OBSERVER_ROOT, None)
    if root is None:
        return {}
    return {name: m for name, m in root.named_children() if isinstance(m, FakeQuantize)}


def _observer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(OBSERVER_ROOT + ".")]


@register_pass
class ObserversToFakeQuant(Pass):
    """Wrap every calibration observer of a prepared graph in a ``FakeQuantize``."""

    name = "observers-to-fake-quant"
    run_after = ("insert-observers",)

    def __init__(self, learnable: bool = False, observe_steps: int | None = None, refresh_every: int | None = None, config=None):
        from .config import QuantConfig

        self.options = dict(learnable=learnable, observe_steps=observe_steps, refresh_every=refresh_every)
        self.config = QuantConfig.coerce(config) if config is not None else None

    def run(self, gm: fx.GraphModule, report: PassReport) -> None:
        root = getattr(gm, OBSERVER_ROOT, None)
        if root is None:
            report.note("no observers: nothing to fake-quantize (the config quantizes nothing in this graph)")
            return
        for node in _observer_nodes(gm):
            leaf = str(node.target).split(".", 1)[1]
            mod = getattr(root, leaf)
            if isinstance(mod, SharedObserver) or isinstance(mod, FakeQuantize):
                continue
            x = node.args[0]
            role = "weight" if x.op == "get_attr" else "activation"
            opts = dict(self.options)
            group_size = None
            if role == "weight":
                opts["observe_steps"] = None
                opts["refresh_every"] = 1
                mod = _fresh_observer(mod)  # calibration ran the weight through it: start clean (qparams follow the weight)
                group_size = self._group_size(node)
                if group_size is not None and opts["learnable"]:
                    opts["learnable"] = False
                    report.note(f"{node_label(x)}: per-group weights keep min/max scales (LSQ is per tensor or per channel)")
            fq = FakeQuantize(mod, role, **opts).train(gm.training)
            fq.group_size = group_size
            if role == "activation" and mod.calibrated:  # calibrated first: start from PTQ's qparams
                fq.start_from_observer()
            root.add_module(leaf, fq)
            report.change(f"{node_label(x)}: {role} ({mod.kind}{', learnable scale' if fq.learnable else ''})", kind=f"fake-quantized {role}s")
        if report.changed:
            gm.recompile()

    def _group_size(self, node: fx.Node) -> int | None:
        consumer = next(iter(node.users), None)
        if self.config is None or consumer is None:
            return None
        spec, _ = self.config.resolve(consumer)
        return spec.weight.group_size if spec is not None and spec.weight is not None else None


@register_pass
class FakeQuantToObservers(Pass):
    """Inference mode, batch norms folded, and fake-quants turned back into observers for ``convert-to-qdq``."""

    name = "fake-quant-to-observers"
    run_before = ("convert-to-qdq",)

    def run(self, gm: fx.GraphModule, report: PassReport) -> None:
        from ..fold_batch_norm import FoldBatchNorm

        switched = set_training(gm, False)
        if switched:
            report.note(f"switched {switched} batch-norm/dropout ops to inference")
        restored = _batch_norms_back(gm)
        if restored:
            report.note(f"{restored} QAT batch norms back to inference batch_norm ops (running statistics)")
        root = getattr(gm, OBSERVER_ROOT, None)
        fqs = fake_quant_modules(gm)
        nodes = {str(n.target).split(".", 1)[1]: n for n in _observer_nodes(gm)}
        # 1. the observers convert-to-qdq reads, built while the batch norms are still there
        hooked: list[tuple[str, fx.Node]] = []  # weight observers of a conv/linear a batch norm follows
        for leaf, fq in fqs.items():
            node = nodes.get(leaf)
            user = next(iter(node.users)) if node is not None and len(node.users) == 1 else None
            k = _bn_factor(gm, user) if fq.role == "weight" and user is not None else None
            if k is not None:
                hooked.append((leaf, user))
            if fq.role == "weight" and not fq.learnable:
                root.add_module(leaf, _fresh_observer(fq.observer))
                report.change(f"{leaf}: weight observer ({fq.observer.kind}), read from the final weight", kind="weight observers")
                continue
            if not fq.calibrated:
                continue  # convert-to-qdq names it among the observers that never saw data
            qp = fq.qparams()
            if k is not None and qp.axis is not None:  # the folded weight's channels are scaled by |k|
                qp = QParams(qp.scale * k.abs().to(qp.scale), qp.zero_point, qp.quant_min, qp.quant_max, qp.dtype, qp.axis)
            root.add_module(leaf, FixedQParams(qp))
            report.change(f"{leaf}: {fq.role} qparams as trained{' (learned)' if fq.learnable else ''}", kind=f"trained {fq.role} qparams")
        # 2. fold those batch norms with PTQ's pass: unhook the weight observers, fold, re-hook
        if hooked:
            parked = {}
            for leaf, user in hooked:
                obs_node = user.args[1]
                user.update_arg(1, obs_node.args[0])
                gm.graph.erase_node(obs_node)
                parked[leaf] = getattr(root, leaf)
                delattr(root, leaf)  # out of the graph's reach while folding cleans up unused tensors
            folded = FoldBatchNorm()(gm)
            report.note(f"fold-batch-norm: {folded.report.summary()}")
            for leaf, user in hooked:
                root.add_module(leaf, parked[leaf])
                weight = user.args[1]
                with gm.graph.inserting_after(weight):
                    obs_node = gm.graph.call_module(f"{OBSERVER_ROOT}.{leaf}", (weight,))
                obs_node.meta["val"] = weight.meta.get("val")
                user.update_arg(1, obs_node)
        gm.graph.lint()
        gm.recompile()
        if switched and not report.changed:
            report.change("graph switched to inference mode", kind="mode switches")


def _fresh_observer(obs: Observer) -> Observer:
    """An observer configured like ``obs`` with no statistics."""
    from .observers import make_observer

    opts = {}
    for name in type(obs).option_names():
        if name in ("dtype", "symmetric", "axis", "common", "bits", "quant_min", "quant_max"):
            continue
        if hasattr(obs, name):
            opts[name] = getattr(obs, name)
    if obs.bits is not None:
        opts["bits"] = obs.bits
    else:
        opts["quant_min"], opts["quant_max"] = obs.quant_min, obs.quant_max
    return make_observer(obs.kind, dtype=obs.dtype, symmetric=obs.symmetric, axis=obs.axis, **opts)


_BN = (aten.batch_norm.default,)


def _bn_factor(gm: fx.GraphModule, producer: fx.Node) -> torch.Tensor | None:
    """gamma / sqrt(var + eps) of the inference batch norm that alone reads ``producer``, if any."""
    users = list(producer.users)
    if len(users) != 1:
        return None
    bn = users[0]
    if bn.op != "call_function":
        return None
    if bn.target is aten._native_batch_norm_legit_no_training.default:
        _, gamma, _, _, var, _, eps = bn.args
    elif bn.target in _BN and bn.args[5] is False:
        _, gamma, _, _, var, _, _, eps = bn.args[:8]
    else:
        return None
    if not (isinstance(var, fx.Node) and var.op == "get_attr"):
        return None
    v = get_attr_value(gm, var.target).detach().double()
    g = get_attr_value(gm, gamma.target).detach().double() if isinstance(gamma, fx.Node) else torch.ones_like(v)
    return (g / torch.sqrt(v + float(eps))).to(torch.float32)

