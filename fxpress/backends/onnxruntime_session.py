"""Run an ONNX model in onnxruntime as if it were a torch module, and count what onnxruntime runs.

``OnnxRuntimeModule(model)`` wraps an ``onnxruntime.InferenceSession`` on the CPU execution
provider: call it with torch tensors (positionally, in the ONNX graph's input order, or by input
name) and get torch tensors back, one tensor for a single-output model, else a tuple. Tensors cross
the boundary without copies where possible: a contiguous CPU tensor is handed to onnxruntime as a
numpy view and each output array is wrapped with ``torch.from_numpy``.

``count_ops(model)`` counts the node types of an ONNX graph (subgraphs of If/Loop/Scan included);
``optimized_op_counts(model)`` counts them in the graph onnxruntime actually runs after its graph
optimizations (saved through ``SessionOptions.optimized_model_filepath``), which is how tests see
whether Q/DQ groups were fused into QLinearConv/QGemm/MatMulInteger.

Numerics: none of its own. Dtypes are kept as given (no casts), so a float64 tensor fed to a float32
input is an error, not a silent conversion; results are onnxruntime's, bit for bit.
"""

from __future__ import annotations

import collections
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
import torch

__all__ = ["OnnxRuntimeModule", "count_ops", "optimized_op_counts", "OPTIMIZATION_LEVELS"]

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


def _ort():
    import onnxruntime  # imported on first use: `import fxpress` should not pay for it

    return onnxruntime


def _graph_optimization_level(level: str):
    ort = _ort()
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if level not in levels:
        raise ValueError(f"optimization_level must be one of {OPTIMIZATION_LEVELS}, got {level!r}")
    return levels[level]


def _model_source(model: Any) -> str | bytes:
    """What InferenceSession takes: a file path (external data resolves next to it) or serialized bytes."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX file at {path}")
        return str(path)
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    raise TypeError(
        f"expected an ONNX model as a path, bytes or onnx.ModelProto, got {type(model).__name__}"
    )


class OnnxRuntimeModule(torch.nn.Module):
    """An onnxruntime CPU session called like a torch module: torch tensors in, torch tensors out.

    model: a path to an .onnx file, its serialized bytes, or an ``onnx.ModelProto`` (models with
        external data must be given as a path).
    intra_op_threads: ``SessionOptions.intra_op_num_threads`` (onnxruntime's default when None).
    optimization_level: "disable", "basic", "extended" or "all" (onnxruntime's graph optimizations).
    optimized_model_path: where onnxruntime writes the graph it will run, after its optimizations.
    log_severity_level: onnxruntime's session log level (0 verbose .. 4 fatal; its default 2 when None).
    """

    def __init__(
        self,
        model: Any,
        *,
        intra_op_threads: int | None = None,
        optimization_level: str = "all",
        optimized_model_path: str | os.PathLike | None = None,
        log_severity_level: int | None = None,
    ):
        super().__init__()
        ort = _ort()
        options = ort.SessionOptions()
        options.graph_optimization_level = _graph_optimization_level(optimization_level)
        if intra_op_threads is not None:
            if not isinstance(intra_op_threads, int) or isinstance(intra_op_threads, bool) or intra_op_threads < 0:
                raise ValueError(f"intra_op_threads must be a non-negative int, got {intra_op_threads!r}")
            options.intra_op_num_threads = intra_op_threads
        if optimized_model_path is not None:
            Path(optimized_model_path).parent.mkdir(parents=True, exist_ok=True)
            options.optimized_model_filepath = str(optimized_model_path)
        if log_severity_level is not None:
            options.log_severity_level = log_severity_level
        self.session = ort.InferenceSession(_model_source(model), options, providers=["CPUExecutionProvider"])
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.input_names: list[str] = [i.name for i in inputs]
        self.output_names: list[str] = [o.name for o in outputs]
        self._input_meta = [(i.name, i.type, list(i.shape)) for i in inputs]
        self._n_inputs = len(self.input_names)
        self._single = len(self.output_names) == 1

    def extra_repr(self) -> str:
        return f"inputs={self.input_names}, outputs={self.output_names}"

    # nn.Module.__call__ would add hook dispatch to every call; a session has no hooks to run.
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            args = self._merge_keywords(args, kwargs)
        if len(args) != self._n_inputs:
            raise TypeError(
                f"this ONNX model takes {self._n_inputs} input(s) {self.input_names}, got {len(args)}"
            )
        try:
            feeds = {name: _to_numpy(a) for name, a in zip(self.input_names, args)}
            outs = self.session.run(None, feeds)
        except Exception as exc:  # noqa: BLE001 - re-raised, with the mismatch spelled out when there is one
            problem = self._describe_mismatch(args)
            if problem is None:
                raise
            raise ValueError(problem) from exc
        if self._single:
            return torch.from_numpy(outs[0])
        return tuple(torch.from_numpy(o) for o in outs)

    def _merge_keywords(self, args: tuple, kwargs: dict) -> tuple:
        unknown = [k for k in kwargs if k not in self.input_names]
        if unknown:
            raise TypeError(f"unknown input name(s) {unknown}; this ONNX model's inputs are {self.input_names}")
        merged = list(args)
        for name in self.input_names[len(args):]:
            if name not in kwargs:
                raise TypeError(f"missing input {name!r}; this ONNX model's inputs are {self.input_names}")
            merged.append(kwargs.pop(name))
        if kwargs:
            raise TypeError(f"input(s) {list(kwargs)} given both by position and by name")
        return tuple(merged)

    def _describe_mismatch(self, args: tuple) -> str | None:
        """A readable reason why onnxruntime refused the inputs, or None if they look right."""
        for (name, type_str, shape), a in zip(self._input_meta, args):
            if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16:
                return f"input {name!r} is bfloat16, which numpy (and so this wrapper) cannot hand to onnxruntime"
            if not isinstance(a, (torch.Tensor, np.ndarray, np.generic, int, float, bool)):
                return f"input {name!r} must be a tensor, got {type(a).__name__}"
            got = np.asarray(a.detach().cpu()) if isinstance(a, torch.Tensor) else np.asarray(a)
            want = _ORT_TYPES.get(type_str)
            if want is not None and got.dtype != want:
                return f"input {name!r} has dtype {got.dtype}, the ONNX model expects {type_str} (dtypes are not cast)"
            if len(shape) != got.ndim:
                return f"input {name!r} has shape {tuple(got.shape)}, the ONNX model expects rank {len(shape)} {shape}"
            for i, (want_dim, got_dim) in enumerate(zip(shape, got.shape)):
                if isinstance(want_dim, int) and want_dim != got_dim:
                    return (
                        f"input {name!r} has shape {tuple(got.shape)}, but the ONNX model fixes dim {i} to "
                        f"{want_dim} (expected {shape}; export with dynamic dims to vary it)"
                    )
        return None


def _to_numpy(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        a = a.detach()
        if a.device.type != "cpu":
            a = a.cpu()
        if not a.is_contiguous():
            a = a.contiguous()
        return a.numpy()
    return a  # numpy arrays (and onnxruntime's own values) pass through


def _iter_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _iter_nodes(g)


def count_ops(model: Any) -> collections.Counter:
    """Count the op_type of every node of an ONNX model (a path or ModelProto), subgraphs included.

    External weights are not loaded: only the graph is read.
    """
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(str(model), load_external_data=False)
    elif isinstance(model, (bytes, bytearray)):
        model = onnx.load_from_string(bytes(model))
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"count_ops takes a path, bytes or onnx.ModelProto, got {type(model).__name__}")
    return collections.Counter(node.op_type for node in _iter_nodes(model.graph))


def optimized_op_counts(model: Any, *, optimization_level: str = "extended") -> collections.Counter:
    """Count the node types of the graph onnxruntime runs after optimizing ``model``.

    The default level, "extended", includes onnxruntime's QDQ fusions (QLinearConv, QGemm, ...) and
    its float fusions while leaving out the hardware-specific NCHWc layout rewrites of "all".
    """
    with tempfile.TemporaryDirectory(prefix="fxpress-ort-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        OnnxRuntimeModule(model, optimization_level=optimization_level, optimized_model_path=out, log_severity_level=3)
        return count_ops(out)
