"""fxpress: a model-compression compiler for PyTorch.

Capture a model as an ATen-level torch.fx graph, run composable rewrite passes over it, and lower
the result through ``torch.compile(backend="fxpress")`` or to ONNX for onnxruntime.
"""

from .backends import export_onnx
from .ir import CaptureError, PassReport, VerificationError, capture
from .backends.compile_backend import compile_reports
from .backends.compile_backend import register as _register_backend
from .passes import Pass, PassError, PassManager, PassResult, PipelineReport, available_passes, register_pass

__version__ = "0.1.0"

_register_backend()

__all__ = [
    "CaptureError",
    "Pass",
    "PassError",
    "PassManager",
    "PassReport",
    "PassResult",
    "PipelineReport",
    "VerificationError",
    "available_passes",
    "capture",
    "export_onnx",
    "compile_reports",
    "register_pass",
]
