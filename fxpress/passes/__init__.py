"""Rewrite passes over the captured ATen graph, and the manager that runs them."""

from . import decompose, eliminate_dead_code, fold_batch_norm, fold_constants, matmul_to_linear, prune, quant  # noqa: F401  (register the passes)
from .base import Pass, PassResult, UnknownPassError, available_passes, get_pass, register_pass
from .manager import PassError, PassManager, PipelineReport

__all__ = [
    "Pass",
    "PassResult",
    "PassManager",
    "PassError",
    "PipelineReport",
    "UnknownPassError",
    "available_passes",
    "get_pass",
    "register_pass",
]
