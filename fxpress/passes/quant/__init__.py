"""Quantization passes: observers, calibration, Q/DQ conversion and folding.

Importing this package registers insert-observers, convert-to-qdq, fold-weight-quant and fold-qdq.
The observers module is imported lazily by the passes that need it.
"""

from . import convert_to_qdq, fold_qdq, fold_weight_quant, insert_observers, quantize_bias  # noqa: F401  (register)
from .config import PRESETS, OpQuant, QuantConfig, TensorSpec

__all__ = ["PRESETS", "OpQuant", "QuantConfig", "TensorSpec"]
