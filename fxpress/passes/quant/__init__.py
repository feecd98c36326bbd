"""Quantization passes: observers, calibration, Q/DQ conversion and folding.

Importing this package registers insert-observers, convert-to-qdq, fold-weight-quant and fold-qdq,
and cross-layer-equalization, record-input-means, bias-correction and smooth-quant.
The observers module is imported lazily by the passes that need it.
"""

from . import convert_to_qdq, fold_qdq, fold_weight_quant, inductor_layout, insert_observers, quantize_bias  # noqa: F401  (register)
from . import bias_correction, equalize, smooth_quant  # noqa: F401  (register the advanced PTQ passes)
from .config import PRESETS, OpQuant, QuantConfig, TensorSpec

__all__ = ["PRESETS", "OpQuant", "QuantConfig", "TensorSpec"]
