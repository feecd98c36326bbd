"""Export a model or a captured (and possibly rewritten) fxpress graph to ONNX, and check the result.

``export_onnx(model_or_gm, args, path)`` works on fxpress's IR, so the ONNX file is the graph the
passes produced, not a fresh trace of the eager model:

1. An ``nn.Module`` is captured first with ``fxpress.capture`` (dynamic batch by default); a
   GraphModule whose placeholders carry ``meta["val"]`` (what ``capture`` returns) is used as is.
2. The graph is exported with ``torch.export`` through the same helper ``capture`` uses (so a
   sample batch of 1 is not specialized: size-oblivious reasoning), then handed as an
   ``ExportedProgram`` to ``torch.onnx.export(dynamo=True)``. Doing the ``torch.export`` step
   ourselves keeps one tracing strategy with fxpress's error handling instead of the ONNX
   exporter's fallbacks. Dynamic dims: an explicit ``dynamic_shapes`` wins; else, with
   ``dynamic_batch``, the dims that are symbolic in the captured graph stay dynamic
   (``dynamic_shapes_of``); ``dynamic_batch=False`` exports static shapes. A graph that turns out to
   specialize its dynamic dims is exported static with one warning.
3. Graphs that still run batch norm on batch statistics or active dropout (captured in ``train()``)
   are refused with a ValueError: ONNX export is for inference, torch.onnx turns training-mode batch
   norm into a wrong inference node, and the parity check would run the graph's buffer updates.
4. Opset: 18 by default (the lowest the exporter implements; asking for 17 silently yields an
   opset-18 file, so it is refused), 21 when the graph holds int4/uint4 tensors.
5. Check (``check=True``): ``onnx.checker`` (path-based for models saved with external data, i.e.
   over 1.5 GiB of weights; a rejection raises ``OnnxExportError``), then onnxruntime is run on the sample inputs and compared with the torch
   graph run on the same inputs.

Numerics / tolerance contract: for every output ``i``, with ``t`` the torch graph's output and ``o``
onnxruntime's, ``max|o - t| <= atol + rtol * max|t|`` (defaults 1e-4 / 1e-4, in float64; NaN must
match NaN). Output count and shapes must match exactly. A violation raises ``OnnxParityError``
naming the output, the worst difference, the allowed bound and the file. For float32 CNNs and MLPs
the observed differences are float rounding (1e-7..1e-5), from different summation orders.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..ir.capture import _export, _first_line, _is_dynamic_failure, capture, dynamic_shapes_of, normalize_inputs
from .onnxruntime_session import OnnxRuntimeModule

__all__ = ["export_onnx", "OnnxExportResult", "OnnxParityError", "OnnxExportError", "DEFAULT_OPSET", "INT4_OPSET"]

DEFAULT_OPSET = 18  # torch.onnx's exporter implements ops from opset 18 on
INT4_OPSET = 21  # INT4/UINT4 tensor types (and blocked QDQ) need opset 21
MIN_OPSET = 18
_LARGE_MODEL_BYTES = 1536 * 1024 * 1024  # as torch.onnx: above this, weights go to external data (2 GB protobuf limit)
_INT4_DTYPES = frozenset(d for d in (getattr(torch, "int4", None), getattr(torch, "uint4", None)) if d is not None)


class OnnxParityError(AssertionError):
    """onnxruntime's outputs differ from the torch graph's beyond the tolerance, or in count/shape."""


class OnnxExportError(RuntimeError):
    """torch.export, torch.onnx.export, onnx.checker or onnxruntime's loading failed; the message says which."""


@dataclass
class OnnxExportResult:
    """What ``export_onnx`` produced.

    path: the .onnx file (None when exported to memory only).
    model: the ONNX graph (for a model saved with external data, without the weights loaded).
    opset: the default-domain opset of the file.
    max_abs_diff: per output, max |onnxruntime - torch| on the sample inputs (None if check=False).
    input_names / output_names: the ONNX graph's inputs and outputs, in order.
    dynamic_shapes: the dynamic_shapes the graph was exported with (None: static).
    """

    path: Path | None
    model: onnx.ModelProto = field(repr=False)
    opset: int
    max_abs_diff: list[float] | None
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: Any = None
    _tmpdir: Any = field(default=None, repr=False)  # keeps a temporary external-data copy alive

    def session(self, **options: Any) -> OnnxRuntimeModule:
        """An onnxruntime session for the exported model; options go to ``OnnxRuntimeModule``."""
        return OnnxRuntimeModule(_session_source(self.path, self.model, self._tmpdir), **options)


def _session_source(path: Path | None, model: onnx.ModelProto, tmpdir: Any) -> Any:
    if path is not None:
        return path
    if tmpdir is not None:
        return Path(tmpdir.name) / "model.onnx"
    return model


def export_onnx(
    model: torch.nn.Module,
    args: Any,
    path: str | os.PathLike | None = "m.onnx",
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    dynamic_shapes: Any = None,
    check: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    optimize: bool = True,
    quant_options: Any = None,
) -> OnnxExportResult:
    """Export ``model`` (an nn.Module, or a GraphModule from ``fxpress.capture``) to ONNX at ``path``.

    args: the sample inputs (a tensor or a tuple), also used for the parity check.
    path: the .onnx file to write (parent folders are created); None keeps the model in memory.
    opset: ONNX opset (default 18, or 21 when the graph has int4 tensors; at least 18).
    dynamic_batch: keep the graph's dynamic dims (dim 0 by default) dynamic in ONNX.
    dynamic_shapes: explicit ``torch.export`` dynamic shapes; overrides ``dynamic_batch``.
    check: run onnx.checker and compare onnxruntime with torch on ``args`` (see the module docstring).
    atol, rtol: the parity tolerance: ``max|ort - torch| <= atol + rtol * max|torch|`` per output.
    optimize: let the exporter run onnxscript's graph optimizer (constant folding, dead code, ...).
    quant_options: how dynamic / weight-only quantized linears are lowered
        (``fxpress.backends.onnx_quant.OnnxQuantOptions`` or a dict of its fields; defaults when None).
    """
    args = normalize_inputs(args)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"export_onnx takes a torch.nn.Module or a captured GraphModule, got {type(model).__name__}")
    if atol < 0 or rtol < 0:
        raise ValueError(f"atol and rtol must be >= 0, got atol={atol}, rtol={rtol}")
    out_path = _prepare_path(path)

    gm = model if _is_captured(model) else capture(model, args, dynamic_batch=dynamic_batch, dynamic_shapes=dynamic_shapes)
    if dynamic_shapes is not None:  # explicit wins (the captured module keeps forward()'s parameter names)
        shapes, auto = dynamic_shapes, False
    else:
        shapes, auto = (_captured_dynamic_shapes(gm, args) if dynamic_batch else None), True

    training = _training_mode_nodes(gm)
    if training:
        raise ValueError(
            f"export_onnx exports inference graphs, but this graph runs {', '.join(training[:5])}"
            f"{' ...' if len(training) > 5 else ''} in training mode (batch statistics / random dropout), which "
            "ONNX inference cannot reproduce. Call model.eval() first (captured and compressed fxpress graphs support .train()/.eval() too)."
        )
    gm, translations = _lower_quantized(gm, quant_options)
    opset = _choose_opset(gm, opset)
    program, shapes = _to_onnx_program(gm, args, shapes, auto, opset, optimize, translations)

    large = _initializer_bytes(program) > _LARGE_MODEL_BYTES
    tmpdir = None
    if out_path is not None:
        program.save(out_path, external_data=large)
    elif large:  # onnx.checker and onnxruntime need the weights next to a file; keep one while the result lives
        tmpdir = tempfile.TemporaryDirectory(prefix="fxpress-onnx-")
        program.save(Path(tmpdir.name) / "model.onnx", external_data=True)
    saved = out_path if out_path is not None else (Path(tmpdir.name) / "model.onnx" if tmpdir else None)
    proto = onnx.load(str(saved), load_external_data=False) if large else program.model_proto

    actual_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    if actual_opset != opset:
        warnings.warn(
            f"export_onnx: asked for opset {opset}, but the exporter produced opset {actual_opset} "
            "(its version conversion failed); the file says what it is",
            stacklevel=2,
        )
    result = OnnxExportResult(
        path=out_path,
        model=proto,
        opset=actual_opset,
        max_abs_diff=None,
        input_names=[i.name for i in proto.graph.input],
        output_names=[o.name for o in proto.graph.output],
        dynamic_shapes=shapes,
        _tmpdir=tmpdir,
    )
    if check:
        where = str(out_path) if out_path is not None else "<in-memory model>"
        try:
            if large:
                onnx.checker.check_model(str(saved))
            else:
                onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as exc:
            raise OnnxExportError(f"onnx.checker rejected the exported model ({where}): {_first_line(exc)}") from exc
        try:
            session = OnnxRuntimeModule(_session_source(out_path, proto, tmpdir))
        except Exception as exc:  # noqa: BLE001
            raise OnnxExportError(f"onnxruntime could not load the exported model ({where}): {_first_line(exc, 1200)}") from exc
        result.max_abs_diff = _check_parity(gm, session, args, atol=atol, rtol=rtol, where=where)
    return result


def _lower_quantized(gm: fx.GraphModule, quant_options: Any = None) -> tuple[fx.GraphModule, dict | None]:
    """For graphs with Q/DQ: a copy in the layout onnxruntime runs as integer kernels, and the
    ``custom_translation_table`` its export needs (None when the default exporter suffices).

    Static int8: int32 biases (quantize-bias), so DQ→Conv/Gemm→Q groups fuse into QLinearConv/QGemm.
    Dynamic int8 and weight-only linears: ``onnx_quant.LowerQuantizedLinears`` (DynamicQuantizeLinear
    → MatMulInteger, MatMulNBits); quantized global average pools: ``LowerQuantizedPooling``. The user's graph is not changed (inductor's int8 lowering wants
    the float bias and reference Q/DQ it has).
    """
    from ..passes import PassManager
    from ..passes.quant.fold_weight_quant import DEQUANTIZE_OPS
    from . import onnx_quant

    options = onnx_quant.OnnxQuantOptions.coerce(quant_options)
    if not any(n.op == "call_function" and n.target in DEQUANTIZE_OPS for n in gm.graph.nodes):
        return gm, None
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    graph._codegen = gm.graph._codegen  # same pytree signature as the user's graph
    lowered = fx.GraphModule(gm, graph)
    torch.nn.Module.train(lowered, gm.training)
    lowered.meta.update(gm.meta)
    passes = ["quantize-bias", onnx_quant.LowerQuantizedLinears(options), onnx_quant.LowerQuantizedPooling()]
    lowered, _ = PassManager(passes, verify=False).run(lowered)
    translations = onnx_quant.translation_table() if onnx_quant.needs_translations(lowered) else None
    return lowered, translations


def _is_captured(model: torch.nn.Module) -> bool:
    """A GraphModule in fxpress's IR: every placeholder carries a sample value (meta["val"])."""
    if not isinstance(model, fx.GraphModule):
        return False
    placeholders = model.graph.find_nodes(op="placeholder")
    return all("val" in p.meta for p in placeholders)


def _captured_dynamic_shapes(gm: fx.GraphModule, args: tuple) -> Any:
    """The graph's symbolic dims as ``dynamic_shapes`` structured like ``args`` (placeholders are its leaves)."""
    flat = dynamic_shapes_of(gm)
    if flat is None:
        return None
    leaves, spec = pytree.tree_flatten(args)
    if len(leaves) == len(flat):
        return pytree.tree_unflatten(list(flat), spec)
    return flat


_aten = torch.ops.aten
# op -> (position of its `training`/`train` flag, position of its dropout probability or None)
_TRAINING_FLAGS = {
    _aten.batch_norm.default: (5, None),
    _aten.native_batch_norm.default: (5, None),
    _aten.dropout.default: (2, 1),
    _aten.feature_dropout.default: (2, 1),
    _aten.alpha_dropout.default: (2, 1),
    _aten.feature_alpha_dropout.default: (2, 1),
    _aten.native_dropout.default: (2, 1),
}
# these batch-norm forms always use batch statistics
_ALWAYS_TRAINING = {_aten._native_batch_norm_legit.default, _aten._native_batch_norm_legit_functional.default}


def _training_mode_nodes(gm: fx.GraphModule) -> list[str]:
    """Nodes that behave differently in training: batch norm on batch statistics, active dropout."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _ALWAYS_TRAINING:
            found.append(node.name)
        elif node.target in _TRAINING_FLAGS:
            flag_at, p_at = _TRAINING_FLAGS[node.target]
            flag = node.args[flag_at] if len(node.args) > flag_at else node.kwargs.get("training", node.kwargs.get("train"))
            p = node.args[p_at] if p_at is not None and len(node.args) > p_at else node.kwargs.get("p", 1.0)
            if flag is True and p != 0:
                found.append(node.name)
    return found


def _choose_opset(gm: fx.GraphModule, opset: int | None) -> int:
    needs_int4 = _has_int4(gm)
    if opset is None:
        return INT4_OPSET if needs_int4 else DEFAULT_OPSET
    if not isinstance(opset, int) or isinstance(opset, bool):
        raise TypeError(f"opset must be an int, got {type(opset).__name__}")
    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET or opset > newest:
        raise ValueError(
            f"opset {opset} is not supported: use {MIN_OPSET}..{newest} (QDQ needs >= 13, int4 >= 21, "
            f"and torch.onnx's exporter implements opset >= {MIN_OPSET}; lower requests silently give opset 18)"
        )
    if needs_int4 and opset < INT4_OPSET:
        raise ValueError(f"the graph has int4/uint4 tensors, which ONNX supports from opset {INT4_OPSET}; got opset={opset}")
    return opset


def _has_int4(gm: fx.GraphModule) -> bool:
    if not _INT4_DTYPES:
        return False
    for node in gm.graph.nodes:
        for leaf in pytree.tree_leaves(node.meta.get("val")):
            if isinstance(leaf, torch.Tensor) and leaf.dtype in _INT4_DTYPES:
                return True
        for a in pytree.tree_leaves((node.args, node.kwargs)):
            if isinstance(a, torch.dtype) and a in _INT4_DTYPES:
                return True
    return any(t.dtype in _INT4_DTYPES for t in list(gm.parameters()) + list(gm.buffers()))


def _prepare_path(path: str | os.PathLike | None) -> Path | None:
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str, os.PathLike or None, got {type(path).__name__}")
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"path {str(out)!r} is a directory; give a file name such as {str(out / 'model.onnx')!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _to_onnx_program(gm, args, shapes, auto, opset, optimize, translations=None):
    try:
        ep = _export(gm, args, {}, shapes, False)
    except Exception as exc:  # noqa: BLE001 - retried static below, or reported
        if not (auto and shapes is not None and _is_dynamic_failure(exc)):
            raise OnnxExportError(f"torch.export of the graph failed before ONNX export: {_first_line(exc)}") from exc
        warnings.warn(
            "export_onnx: the graph specializes its dynamic dims; exporting static shapes, so the ONNX "
            f"model only runs on inputs shaped like the sample ({_first_line(exc, 200)})",
            stacklevel=3,
        )
        shapes = None
        try:
            ep = _export(gm, args, {}, None, False)
        except Exception as exc2:  # noqa: BLE001
            raise OnnxExportError(f"torch.export of the graph failed before ONNX export: {_first_line(exc2)}") from exc2
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*training mode.*")
            program = torch.onnx.export(
                ep, args, dynamo=True, opset_version=opset, optimize=optimize, verbose=False, custom_translation_table=translations
            )
    except Exception as exc:  # noqa: BLE001
        raise OnnxExportError(f"torch.onnx.export failed (opset {opset}): {_first_line(exc, 1200)}") from exc
    return program, shapes


def _initializer_bytes(program: Any) -> int:
    total = 0
    for value in program.model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


def _check_parity(gm: fx.GraphModule, session: OnnxRuntimeModule, args: tuple, *, atol: float, rtol: float, where: str) -> list[float]:
    with torch.no_grad():
        reference = gm(*args)
    feeds = [a for a in pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]
    outs = session(*feeds)
    outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
    ref = [r for r in pytree.tree_leaves(reference) if isinstance(r, torch.Tensor)]
    return compare_parity(ref, outs, session.output_names, atol=atol, rtol=rtol, where=where)


def compare_parity(
    reference: list[torch.Tensor], actual: list[torch.Tensor], names: list[str], *, atol: float, rtol: float, where: str
) -> list[float]:
    """Per output, max |actual - reference|; raise OnnxParityError on count, shape or tolerance mismatch."""
    if len(reference) != len(actual):
        raise OnnxParityError(
            f"the ONNX model ({where}) has {len(actual)} output(s) {list(names)}, the torch graph {len(reference)}"
        )
    diffs, failures = [], []
    for i, (t, o) in enumerate(zip(reference, actual)):
        label = f"output {i} ({names[i]!r})" if i < len(names) else f"output {i}"
        if tuple(t.shape) != tuple(o.shape):
            raise OnnxParityError(
                f"{label} of the ONNX model ({where}) has shape {tuple(o.shape)}, the torch graph's {tuple(t.shape)}"
            )
        if t.numel() == 0:
            diffs.append(0.0)
            continue
        t64, o64 = t.detach().cpu().double(), o.detach().cpu().double()
        both_nan = t64.isnan() & o64.isnan()
        err = (o64 - t64).abs().masked_fill(both_nan, 0.0).nan_to_num(nan=float("inf"))
        diff = err.max().item()
        scale = t64.abs().masked_fill(t64.isnan(), 0.0).max().item()
        bound = atol + rtol * scale
        diffs.append(diff)
        if not diff <= bound:
            failures.append((diff - bound, label, diff, bound, scale))
    if failures:
        _, label, diff, bound, scale = max(failures)
        others = f" ({len(failures) - 1} more output(s) also out of tolerance)" if len(failures) > 1 else ""
        raise OnnxParityError(
            f"onnxruntime and torch disagree on {label}: max |ort - torch| = {diff:.3g} > allowed {bound:.3g} "
            f"(atol {atol:g} + rtol {rtol:g} * max|torch| {scale:.3g}) for {where}{others}"
        )
    return diffs
