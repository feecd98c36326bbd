"""fxpress: a model-compression compiler for PyTorch.

Capture a model as an ATen-level torch.fx graph, run composable rewrite passes over it, and lower
the result through ``torch.compile(backend="fxpress")`` or to ONNX for onnxruntime.
"""

from .ir import CaptureError, PassReport, VerificationError, capture
from .passes import Pass, PassError, PassManager, PassResult, PipelineReport, available_passes, register_pass

__version__ = "0.1.0"

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
    "register_pass",
]
