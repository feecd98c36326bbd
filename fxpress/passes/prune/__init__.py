"""Structured pruning passes: channel-prune (physically shrinks channel groups; see channel_prune.py)."""

from . import channel_prune  # noqa: F401  (registers the pass)
from .channel_prune import ChannelPrune, LayerChange, PruneReport, apply_plan
from .importance import IMPORTANCES, compute_gradients, group_scores, select_channels
from .sparsity import LayerSparsity, Sparsify, SparsityReport

__all__ = [
    "ChannelPrune",
    "IMPORTANCES",
    "LayerChange",
    "LayerSparsity",
    "PruneReport",
    "apply_plan",
    "compute_gradients",
    "group_scores",
    "select_channels",
    "Sparsify",
    "SparsityReport",
]
