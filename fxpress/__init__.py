"""fxpress: a model-compression compiler for PyTorch.

Capture a model as an ATen-level torch.fx graph, run composable rewrite passes over it, and lower
the result through ``torch.compile(backend="fxpress")`` or to ONNX for onnxruntime.
"""

from .api import QuantReport, calibrate, convert, prepare, quant_report, quantize
from .backends import export_onnx
from .backends.compile_backend import compile_reports
from .backends.compile_backend import register as _register_backend
from .ir import CaptureError, InputMismatchError, PassReport, VerificationError, capture
from .passes import Pass, PassError, PassManager, PassResult, PipelineReport, available_passes, register_pass
from .passes.prune import ChannelPrune, PruneReport, SparsityReport
from .passes.quant import OpQuant, QuantConfig, TensorSpec
from .passes.quant.debug import FallbackReport, auto_fallback, compare_nodes, sensitivity
from .prune_api import channel_groups, prune, prune_report
from .train import DistillReport, ReconstructReport, distill, distill_report, freeze_bn, freeze_observers, prepare_qat, quantize_qat, reconstruct
from .decompose_api import decompose, decompose_report
from .passes.decompose import DecomposeReport
from .sparsity_api import sparsify, sparsity_report
from .recipe import QAT, Decompose, Distill, FineTune, Prune, Quantize, Recipe, RecipeError, RecipeResult, Sparsify
from .report import CompressionReport
from .serialize import FormatVersionError, UnsafeFileError, load, load_weights, read_metadata, save, save_weights

__version__ = "0.1.0"

_register_backend()

__all__ = [
    "CaptureError",
    "InputMismatchError",
    "FallbackReport",
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
    "auto_fallback",
    "available_passes",
    "calibrate",
    "channel_groups",
    "ChannelPrune",
    "capture",
    "compare_nodes",
    "compile_reports",
    "convert",
    "distill",
    "distill_report",
    "reconstruct",
    "quantize_qat",
    "ReconstructReport",
    "DistillReport",
    "freeze_bn",
    "freeze_observers",
    "decompose",
    "decompose_report",
    "DecomposeReport",
    "export_onnx",
    "prepare",
    "prepare_qat",
    "prune",
    "prune_report",
    "PruneReport",
    "quant_report",
    "quantize",
    "register_pass",
    "sensitivity",
    "sparsify",
    "sparsity_report",
    "SparsityReport",
    "CompressionReport",
    "Decompose",
    "Distill",
    "FineTune",
    "FormatVersionError",
    "Prune",
    "QAT",
    "Quantize",
    "Recipe",
    "RecipeError",
    "RecipeResult",
    "Sparsify",
    "UnsafeFileError",
    "load",
    "load_weights",
    "read_metadata",
    "save",
    "save_weights",
]
