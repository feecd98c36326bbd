"""Quantization-aware training: ``prepare_qat`` gives a trainable graph with fake quantization in it.

    qat = fxpress.prepare_qat(model, (x,), config="int8_static", calibration=loader)
    fxpress.distill(qat, teacher=model, data=loader, epochs=2)      # or any training loop: qat.train(); ...
    qm = fxpress.convert(qat)                                         # the int8 Q/DQ graph PTQ gives
    fxpress.export_onnx(qm, (x,), "m.onnx", rtol=0.05)

``prepare_qat`` is PTQ's ``prepare`` (same config vocabulary, same observer placement), then every
observer becomes a ``FakeQuantize`` (``fxpress.passes.quant.fake_quant``): the forward pass rounds
weights and activations onto the integer grid, the backward pass is straight-through. ``convert``
first runs ``fake-quant-to-observers`` (inference mode, batch norms folded, the trained qparams handed
over as observers) and then exactly PTQ's conversion, so the result lowers to onnxruntime's
QLinearConv/QGemm and inductor's int8 kernels as a PTQ model does.

Batch norms (``bn``):

* ``"fold"`` (default): folded into the convolutions before training, as PTQ does. The graph QAT
  trains is the graph that gets deployed; the statistics stay the float model's (frozen). Stable for
  short recovery training, which is what QAT after a trained model is.
* ``"train"``: batch norms stay and normalize with batch statistics while training
  (``QATBatchNorm``); ``freeze_bn_after=N`` switches them to their running statistics after N
  training steps (``freeze_bn(qat)`` does it now). They are folded at convert. Needs per-channel
  symmetric weights (the default), for which folding commutes with fake quantization. Under DDP,
  ``fxpress.distill`` synchronizes them (``sync_bn=True``): batch statistics of the global batch,
  as ``nn.SyncBatchNorm`` computes them; in a loop of your own, run the forward under
  ``fxpress.train.distributed.SyncBatchNorms()``.

Modes: static (weights and activations fake-quantized), weight-only (weights, per channel or per
group as configured); dynamic (weights; the per-batch activation quantization the converted graph
does is not simulated).

Observers: with ``calibration`` the observers first see those batches exactly as in PTQ, so training
starts from PTQ's qparams; ``observe_steps`` (default: 0 after calibration, else unlimited) is how many
training steps the activation observers keep recording. ``learnable_scales=True`` trains the scales
(and affine zero points) with LSQ, starting from the observers. Weights' qparams always follow the
current weights.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx

from ..ir.capture import capture, normalize_inputs
from ..passes import PassManager
from ..passes.quant.config import QuantConfig
from ..passes.quant.fake_quant import fake_quant_modules, qat_batch_norms

__all__ = ["prepare_qat", "quantize_qat", "freeze_bn", "freeze_observers", "is_qat"]

_BN_MODES = ("fold", "train")


def _float_graph(model: Any, inputs: tuple) -> fx.GraphModule:
    from ..api import _as_graph

    if isinstance(model, fx.GraphModule) and any("val" in n.meta for n in model.graph.nodes):
        # a copy (refusing prepared/quantized graphs); the earlier passes' reports stay behind: they are
        # records of the float graph, and some hold tensors that cannot be deep-copied
        saved = model.meta.get("fxpress")
        model.meta["fxpress"] = {}
        try:
            gm = _as_graph(model, inputs)
        finally:
            model.meta["fxpress"] = saved
        gm.eval()
        return gm
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"prepare_qat takes a torch.nn.Module or a captured GraphModule, got {type(model).__name__}")
    was_training = model.training
    model.eval()  # captured in inference mode: batch norms with their running statistics
    try:
        return capture(model, inputs, share_weights=False)
    finally:
        model.train(was_training)


def _check_weights_fold_safely(cfg: QuantConfig) -> None:
    specs = [cfg.default, *cfg.op_types.values(), *cfg.nodes.values()]
    for spec in specs:
        w = spec.weight if spec is not None else None
        if w is not None and not (w.axis == 0 and w.symmetric and w.group_size is None):
            raise ValueError(
                "prepare_qat(bn='train') needs per-output-channel symmetric weights (axis=0, symmetric=True), for which "
                "folding the batch norms at convert commutes with the fake quantization; this config has "
                f"{w}. Use bn='fold' (batch norms folded before training), or per-channel symmetric weights."
            )


def prepare_qat(
    model: torch.nn.Module,
    example_inputs: Any,
    config: QuantConfig | str | dict | None = "int8_static",
    *,
    bn: str = "fold",
    freeze_bn_after: int | None = None,
    calibration: Iterable | None = None,
    max_batches: int | None = None,
    learnable_scales: bool = False,
    observe_steps: int | None = None,
    refresh_every: int | None = None,
    progress: bool = True,
    verify: bool = True,
) -> fx.GraphModule:
    """A copy of ``model`` as a graph with fake quantization, ready to train (see the module docstring).

    config: as for ``fxpress.prepare`` (a preset name, a ``QuantConfig`` or a dict).
    bn: "fold" or "train"; freeze_bn_after: training steps before batch norms freeze (bn="train").
    calibration / max_batches: batches the observers see before training (PTQ's calibration).
    learnable_scales: LSQ. observe_steps: training steps the activation observers keep recording.
    refresh_every: training steps between qparams refreshes (default 1 for min/max observers, 16 for
    histogram ones). The model itself is not changed.
    """
    from ..api import calibrate, prepare

    check_bn_options(bn, freeze_bn_after)
    cfg = QuantConfig.coerce(config)
    inputs = normalize_inputs(example_inputs)
    gm = _float_graph(model, inputs)
    if bn == "fold":
        gm = prepare(gm, inputs, cfg, verify=verify)
    else:
        _check_weights_fold_safely(cfg)
        cfg.check_names(gm)  # as prepare does: a nodes / ignore name that matches nothing is an error
        passes = ["fold-constants", "eliminate-dead-code", ("insert-observers", {"config": cfg, "through_batch_norm": True})]
        gm, report = PassManager(passes, verify=verify).run(gm, inputs)
        gm.meta.setdefault("fxpress", {}).update(quant_config=cfg, prepare_report=report, example_inputs=inputs, bias_correction=False)
    if calibration is not None:
        calibrate(gm, calibration, max_batches=max_batches, progress=progress)
        if observe_steps is None:
            observe_steps = 0
    qat_passes: list[Any] = [
        ("observers-to-fake-quant", {"learnable": learnable_scales, "observe_steps": observe_steps, "refresh_every": refresh_every, "config": cfg})
    ]
    if bn == "train":
        qat_passes.append(("batch-norms-to-qat", {"freeze_after": freeze_bn_after}))
    # no sample run here: the observers are calibrated now, and a verification run would feed them the sample
    gm, more = PassManager(qat_passes, verify=verify).run(gm)
    _trainable_like(gm, model)
    meta = gm.meta["fxpress"]
    meta["prepare_report"].passes += more.passes
    meta["pre_convert"] = ["fake-quant-to-observers"]
    meta["qat"] = dict(bn=bn, learnable_scales=learnable_scales, observe_steps=observe_steps, calibrated=calibration is not None)
    if not fake_quant_modules(gm):
        import warnings

        warnings.warn("prepare_qat: the config quantizes nothing in this model (no fake-quant was inserted)", stacklevel=2)
    return gm.train()


def check_bn_options(bn: str, freeze_bn_after: int | None) -> None:
    """prepare_qat's batch-norm options (also checked by the ``qat`` recipe stage before anything runs)."""
    if bn not in _BN_MODES:
        raise ValueError(f"bn must be one of {_BN_MODES} (fold batch norms before training, or train them), got {bn!r}")
    if freeze_bn_after is not None:
        if bn != "train":
            raise ValueError("freeze_bn_after applies to bn='train' (with bn='fold' the statistics are folded, frozen from the start)")
        if isinstance(freeze_bn_after, bool) or not isinstance(freeze_bn_after, int) or freeze_bn_after < 0:
            raise ValueError(f"freeze_bn_after must be an integer >= 0, got {freeze_bn_after!r}")


def quantize_qat(
    model: torch.nn.Module,
    example_inputs: Any,
    teacher: torch.nn.Module,
    data: Iterable,
    config: QuantConfig | str | dict | None = "int8_static",
    *,
    epochs: int = 2,
    lr: float = 1e-4,
    temperature: float = 4.0,
    alpha: float = 0.7,
    bn: str = "fold",
    freeze_bn_after: int | None = None,
    learnable_scales: bool = False,
    calibration: Iterable | None = None,
    max_batches: int | None = None,
    max_steps: int | None = None,
    progress: bool = True,
) -> fx.GraphModule:
    """QAT in one call: ``prepare_qat``, ``distill`` against ``teacher`` on ``data`` for ``epochs``, ``convert``.

    Returns the converted integer graph (what ``fxpress.quantize`` returns for PTQ); the distillation
    report stays attached (``fxpress.distill_report``). ``calibration`` defaults to ``data``'s inputs
    (up to ``max_batches``, default 16), so training starts from PTQ's ranges. This is the recipe
    stage ``kind = "qat"``.
    """
    from ..api import convert
    from .distill import _length, distill, distill_report

    if calibration is None:  # calibration reads the inputs of each batch and ignores the labels
        calibration = data
        max_batches = 16 if max_batches is None else max_batches
    if _length(data) == 0:
        raise ValueError("the training data is empty: quantize_qat needs labelled (or unlabelled) batches to train on")
    qat = prepare_qat(model, example_inputs, config, bn=bn, freeze_bn_after=freeze_bn_after, calibration=calibration,
                      max_batches=max_batches, learnable_scales=learnable_scales, progress=progress)
    distill(qat, teacher, data, epochs=epochs, lr=lr, temperature=temperature, alpha=alpha, max_steps=max_steps, progress=progress)
    report = distill_report(qat)
    qm = convert(qat)
    qm.meta.setdefault("fxpress", {})["distill_report"] = report
    return qm


def _trainable_like(gm: fx.GraphModule, model: Any) -> None:
    """Parameters the passes rebuilt (folded weights and biases) are created frozen: make the graph's
    weights trainable again, except those the user's model had frozen (matched by name)."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad} if isinstance(model, torch.nn.Module) else set()
    for name, p in gm.named_parameters():
        if name.startswith("observers."):
            continue  # fake-quant scales/zero points: as FakeQuantize set them
        stem = name.rsplit(".", 1)[0]
        p.requires_grad_(name not in frozen and f"{stem}.weight" not in frozen)


def is_qat(gm: Any) -> bool:
    """True for a graph from ``prepare_qat`` that was not converted yet."""
    return isinstance(gm, fx.GraphModule) and "qat" in gm.meta.get("fxpress", {}) and bool(fake_quant_modules(gm))


def freeze_bn(qat: fx.GraphModule, frozen: bool = True) -> int:
    """Make the batch norms of a ``prepare_qat(bn="train")`` graph use (and keep) their running
    statistics from now on; return how many. gamma and beta keep training."""
    bns = qat_batch_norms(qat)
    for m in bns.values():
        m.freeze(frozen)
    return len(bns)


def freeze_observers(qat: fx.GraphModule, frozen: bool = True) -> int:
    """Stop (or restart) the activation observers: the qparams stay as they are now; return how many."""
    n = 0
    for fq in fake_quant_modules(qat).values():
        if fq.role == "activation":
            fq.observer_enabled = not frozen
            n += 1
    return n

