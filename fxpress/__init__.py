"""fxpress: a model-compression compiler for PyTorch.

Capture a model as an ATen-level torch.fx graph, run composable rewrite passes over it, and lower
the result through ``torch.compile(backend="fxpress")`` or to ONNX for onnxruntime.
"""

from .api import QuantReport, calibrate, convert, prepare, quant_report, quantize
from .backends import export_onnx
from .backends.compile_backend import compile_reports
from .backends.compile_backend import register as _register_backend
from .ir import CaptureError, PassReport, VerificationError, capture
from .passes import Pass, PassError, PassManager, PassResult, PipelineReport, available_passes, register_pass
from .passes.prune import ChannelPrune, PruneReport, SparsityReport
from .passes.quant import OpQuant, QuantConfig, TensorSpec
from .prune_api import channel_groups, prune, prune_report
from .sparsity_api import sparsify, sparsity_report

__version__ = "0.1.0"

_register_backend()

__all__ = [
    "CaptureError",
    "OpQuant",
    "Pass",
    "PassError",
    "PassManager",
    "PassReport",
    "PassResult",
    "PipelineReport",
    "QuantConfig",
    "QuantReport",
    "TensorSpec",
    "VerificationError",
    "available_passes",
    "calibrate",
    "channel_groups",
    "ChannelPrune",
    "capture",
    "compile_reports",
    "convert",
    "export_onnx",
    "prepare",
    "prune",
    "prune_report",
    "PruneReport",
    "quant_report",
    "quantize",
    "register_pass",
    "sparsify",
    "sparsity_report",
    "SparsityReport",
]
