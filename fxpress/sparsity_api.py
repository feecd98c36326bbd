"""User functions for weight sparsity: ``sparsify`` zeroes weights, ``sparsity_report`` measures them.

    sparse = fxpress.sparsify(model, (x,), sparsity=0.5)                   # unstructured, per layer
    sparse = fxpress.sparsify(model, (x,), 0.7, scope="global")             # one threshold over all layers
    sparse = fxpress.sparsify(model, (x,), pattern="2:4", ignore=["fc"])    # keep 2 of every 4 weights
    sparse = fxpress.sparsify(model, (x,), 0.5, calibration=batches)        # Wanda: |W| * ||X_j||
    print(fxpress.sparsity_report(sparse))                                  # counted from the tensors
    fxpress.export_onnx(sparse, (x,), "sparse.onnx")                        # same graph, zeros in the weights

``sparsify`` captures the model (a GraphModule from ``fxpress.capture`` is copied, never edited), runs
the ``sparsify`` pass (fxpress/passes/prune/sparsity.py) through the PassManager, and returns the
GraphModule: same ops and shapes, any batch size, exports to ONNX like the original.

Where it is faster -- honestly: not on CPU. The weights are dense tensors holding zeros, which is
what ONNX / onnxruntime and inductor run; neither onnxruntime's CPU kernels nor inductor's CPU code
skip zeros, for unstructured or for 2:4 sparsity, so CPU latency does not change and the .onnx
file keeps its size (it compresses well with zip/gzip, though). 2:4 runs faster only on NVIDIA
Ampere or newer GPUs (compute capability 8.0+) through ``torch.sparse.to_sparse_semi_structured``
(cuSPARSELt / CUTLASS), which covers linear layers in float16 / bfloat16 (int8, and float32 with
CUTLASS) with size limits; ``semi_structured=True`` performs that conversion and fails with a clear
error on other hardware. A semi-structured graph runs in PyTorch eager mode on the GPU; it does not
export to ONNX.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx

from .ir.capture import normalize_inputs
from .ir.channels import resolve_ignore
from .ir.graph import get_attr_value
from .passes.manager import PassManager
from .passes.prune.sparsity import (
    LayerSparsity,
    Sparsify,
    SparsityReport,
    find_weight_layers,
    input_channel_norms,
    _dense,
    measure_sparsity,
    nm_conforms,
    parse_pattern,
    validate_sparsity_options,
)
from .prune_api import _graph, _ignore_names

__all__ = ["sparsify", "sparsity_report"]

_GPU_NEEDED = (
    "semi_structured=True converts 2:4 weights with torch.sparse.to_sparse_semi_structured, whose kernels "
    "(cuSPARSELt / CUTLASS) need an NVIDIA GPU of compute capability 8.0 or newer (Ampere such as A100 / RTX 30xx, "
    "Ada, Hopper) and a CUDA build of PyTorch"
)


def sparsify(
    model: torch.nn.Module,
    example_inputs: Any,
    sparsity: float | None = None,
    pattern: str = "unstructured",
    *,
    scope: str = "layer",
    ignore: Sequence[Any] = (),
    min_params: int = 0,
    importance: str | None = None,
    calibration: Iterable | None = None,
    max_batches: int = 32,
    semi_structured: bool = False,
    verify: bool = True,
) -> fx.GraphModule:
    """Zero weights of every conv / linear / matmul layer; return the sparse GraphModule.

    sparsity: fraction of weights set to zero, in [0, 1). Unset: 0.5 for unstructured; an N:M
        pattern fixes it at 1 - N/M (giving another value is a ValueError).
    pattern: "unstructured" (the least important weights anywhere in the layer) or "N:M" such as
        "2:4" (in every run of M consecutive weights along the input-channel dim keep the N most
        important; layers whose input-channel dim is not a multiple of M are skipped, with the
        reason in the report).
    scope: "layer" (each layer reaches ``sparsity``), "global" (one threshold over all chosen
        layers: the model reaches ``sparsity``, layers differ) or "output" (every output channel /
        neuron reaches it); N:M patterns are per group, so they take "layer" only.
    ignore: layers left dense: module paths ("fc", "layer4.1"), submodules, or graph node names;
        a name that matches nothing is a ValueError.
    min_params: leave layers with fewer weights dense.
    importance: "magnitude" (|W|) or "wanda" (|W| scaled by the L2 norm of its input channel over
        ``calibration``, Sun et al. 2023). Unset: "wanda" when ``calibration`` is given, else "magnitude".
    calibration: batches (tensors, tuples with the inputs first, or dicts by input name) for
        "wanda"; at most ``max_batches`` are used.
    semi_structured: with pattern "2:4", convert the sparsified linear weights to
        ``torch.sparse.to_sparse_semi_structured`` tensors so that they run on the sparse tensor
        cores. Needs the model on an NVIDIA GPU with compute capability 8.0+ (float16 / bfloat16
        weights); anywhere else it raises RuntimeError. The result runs in eager PyTorch only (no ONNX).
    verify: run the pass manager's graph checks.

    Runtime: the zeros stay in dense tensors. On CPU (onnxruntime, inductor, eager) this is no
    faster and no smaller than the dense model; see the module docstring. Measure the result with
    ``sparsity_report(sparse)``.
    """
    if importance is None:
        importance = "wanda" if calibration is not None else "magnitude"
    target, nm = validate_sparsity_options(sparsity, pattern, scope, importance, min_params)
    if importance == "wanda" and calibration is None:
        raise ValueError(
            "importance='wanda' scales |W| by the L2 norm of each input channel and needs calibration data: "
            "sparsify(model, x, importance='wanda', calibration=[batch, ...])"
        )
    if importance == "magnitude" and calibration is not None:
        raise ValueError("calibration data is only used by importance='wanda'; drop calibration= or set importance='wanda'")
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise ValueError(f"max_batches must be an integer >= 1, got {max_batches!r}")
    if semi_structured:
        if nm != (2, 4):
            raise ValueError(f"semi_structured=True needs pattern='2:4' (the only pattern the sparse tensor cores run), got {pattern!r}")
        _check_semi_structured_hardware()
    inputs = normalize_inputs(example_inputs)
    names = _ignore_names(model, ignore)
    gm = _graph(model, inputs)
    resolve_ignore(gm, names)  # a bad ignore fails before any work
    norms = None
    if importance == "wanda":
        from .api import _batch_args, _by_name

        def batches():
            for batch in itertools.islice(calibration, max_batches):
                args, kwargs = _batch_args(batch, len(inputs))
                yield _by_name(gm, kwargs) if kwargs else args

        norms = input_channel_norms(gm, batches())
    p = Sparsify(sparsity=target, pattern=pattern, scope=scope, ignore=names, min_params=min_params,
                 importance=importance, activation_norms=norms)
    gm, _ = PassManager([p], verify=verify).run(gm, inputs)
    if semi_structured:
        _to_semi_structured(gm)
    return gm


def _check_semi_structured_hardware() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{_GPU_NEEDED}; this machine has no CUDA device. Leave semi_structured=False: the 2:4 zeros are then "
            "kept in dense weights (correct everywhere, but no faster on CPU)."
        )
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 0):
        raise RuntimeError(f"{_GPU_NEEDED}; this GPU ({torch.cuda.get_device_name()}) is sm{major}{minor}.")


def _to_semi_structured(gm: fx.GraphModule) -> None:
    """Replace each 2:4 linear weight by a SparseSemiStructuredTensor parameter; record skips."""
    from torch.sparse import to_sparse_semi_structured

    rep: SparsityReport = gm.meta["fxpress"]["sparsity_report"]
    layers = {layer.target: layer for layer in find_weight_layers(gm)[0]}
    converted = 0
    for entry in rep.sparsified:
        layer = layers[entry.target]
        value = get_attr_value(gm, entry.target)
        if any(u.node.target != torch.ops.aten.linear.default for u in layer.uses):
            why = "to_sparse_semi_structured covers linear layers only; this weight keeps its 2:4 zeros densely"
        elif not value.is_cuda:
            why = f"weight is on {value.device}: move the model to the GPU (model.cuda().half()) before sparsify"
        else:
            try:
                sparse = to_sparse_semi_structured(value.detach().contiguous())
            except (RuntimeError, ValueError, NotImplementedError) as exc:
                why = f"to_sparse_semi_structured refused it: {str(exc).splitlines()[0]}" + (
                    " (cuSPARSELt takes float16 / bfloat16: model.half())" if value.dtype == torch.float32 else "")
            else:
                *path, leaf = entry.target.split(".")
                owner = gm.get_submodule(".".join(path)) if path else gm
                owner._parameters.pop(leaf, None)
                owner._buffers.pop(leaf, None)
                owner.register_parameter(leaf, torch.nn.Parameter(sparse, requires_grad=False))
                entry.semi_structured = True
                converted += 1
                continue
        rep.skipped.append((f"{entry.layer} [{entry.target}] (semi-structured)", why))
    rep.notes.append(f"semi_structured: {converted} of {len(rep.sparsified)} sparsified layers run on the 2:4 sparse tensor cores"
                     " (eager PyTorch on the GPU; a graph holding them does not export to ONNX)")


def sparsity_report(model: torch.nn.Module, *, pattern: str | None = None) -> SparsityReport:
    """The sparsity of ``model``'s weights, counted from the tensors (so it checks, not restates).

    model: a GraphModule from ``sparsify`` (its record adds the pattern, the target and the skipped
    layers with reasons, and the report notes any layer whose zeros changed since, e.g. after
    fine-tuning), any captured GraphModule, or an eager module (its Linear / Conv / ConvTranspose
    weights). pattern: an N:M pattern ("2:4") to check every layer against (default: the pattern
    sparsify applied, checked on the layers it sparsified).
    """
    nm = parse_pattern(pattern) if pattern is not None else None
    if isinstance(model, fx.GraphModule) and any("val" in n.meta for n in model.graph.nodes):
        recorded: SparsityReport | None = model.meta.get("fxpress", {}).get("sparsity_report")
        layers, computed = find_weight_layers(model)
        check = nm if pattern is not None else (parse_pattern(recorded.pattern) if recorded is not None else None)
        rep = measure_sparsity(model, layers, check)
        if recorded is None:
            rep.skipped = list(computed)
            rep.notes.append("no sparsify record on this graph: the figures are measured only")
            return rep
        rep.pattern, rep.target, rep.scope, rep.importance = recorded.pattern, recorded.target, recorded.scope, recorded.importance
        rep.skipped = list(recorded.skipped)
        before = {x.target: x for x in recorded.layers}
        for x in rep.layers:
            old = before.get(x.target)
            if old is not None and old.pattern is not None:
                x.pattern = old.pattern
                if old.zeros != x.zeros:
                    rep.notes.append(f"{x.target}: {x.zeros:,} zeros now, {old.zeros:,} when sparsified (the weights changed since)")
            elif pattern is None:
                x.conforms = None
        rep.notes += recorded.notes
        return rep
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"sparsity_report takes a GraphModule or a torch.nn.Module, got {type(model).__name__}")
    return _eager_report(model, nm)


def _eager_report(model: torch.nn.Module, nm: tuple[int, int] | None) -> SparsityReport:
    rep = SparsityReport(None, None)
    kinds = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)
    for name, mod in model.named_modules():
        if not isinstance(mod, kinds) or not isinstance(getattr(mod, "weight", None), torch.Tensor):
            continue
        w = _dense(mod.weight)
        red = 0 if isinstance(mod, torch.nn.modules.conv._ConvTransposeNd) else 1
        rep.layers.append(LayerSparsity(
            name, f"{name}.weight", type(mod).__name__, tuple(w.shape), w.numel(), int((w == 0).sum()),
            conforms=nm_conforms(w, red, *nm) if nm is not None else None,
        ))
    for p in model.parameters():
        if p.is_floating_point():
            rep.params_total += p.numel()
            rep.params_zero += int((_dense(p) == 0).sum())
    rep.notes.append("an eager module: Linear / Conv / ConvTranspose weights measured (no sparsify record)")
    return rep
