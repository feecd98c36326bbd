"""Backends: ONNX export checked against onnxruntime, and onnxruntime sessions called like torch modules."""

from .onnx_export import OnnxExportError, OnnxExportResult, OnnxParityError, export_onnx
from .onnxruntime_session import OnnxRuntimeModule, count_ops, optimized_op_counts
