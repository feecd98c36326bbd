"""Low-rank decomposition passes: svd-linear, spatial-svd-conv, tucker-conv, cp-conv, tt-linear.

Shared machinery: layers.py (which nodes, their geometry), ops.py (the factor chain a layer becomes),
ranks.py (rank rules, EVBMF), activations.py (calibration inputs), common.py (the per-layer loop),
budget.py (model-wide rank selection), latency.py (measured latency of candidates, and the
``objective`` that weighs it against error), data_aware.py (convolution decompositions fitted to
calibration outputs), report.py (what ``fxpress.decompose_report`` shows).
"""

from . import cp_conv, spatial_svd_conv, svd_linear, tt_linear, tucker_conv  # noqa: F401  (register the passes)
from .budget import BudgetError, Option, layer_options, solve_budget, solve_ratio, solve_uniform
from .common import DecomposePass, LayerRecord
from .cp_conv import CpConv
from .latency import LatencyModel
from .layers import Layer, find_layers
from .report import DecomposeReport
from .spatial_svd_conv import SpatialSvdConv
from .svd_linear import SvdLinear
from .tt_linear import TtLinear
from .tucker_conv import TuckerConv

METHODS: dict[str, type[DecomposePass]] = {
    "svd": SvdLinear,
    "spatial-svd": SpatialSvdConv,
    "tucker": TuckerConv,
    "cp": CpConv,
    "tt": TtLinear,
}

__all__ = [
    "METHODS",
    "BudgetError",
    "CpConv",
    "DecomposePass",
    "DecomposeReport",
    "LatencyModel",
    "Layer",
    "LayerRecord",
    "Option",
    "SpatialSvdConv",
    "SvdLinear",
    "TtLinear",
    "TuckerConv",
    "find_layers",
    "layer_options",
    "solve_budget",
    "solve_ratio",
    "solve_uniform",
]
