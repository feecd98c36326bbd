"""fxpress's IR: the ATen-level torch.fx GraphModule torch.export gives, and the tools to edit it."""

from .capture import CaptureError, InputMismatchError, capture, dynamic_shapes_of, normalize_inputs
from .mode import enable_train_eval, set_training
from .report import PassReport
from .rewrite import Const, Lit, Match, Op, RewriteRule, Var, apply_rules
from .verify import VerificationError, compare_outputs, refresh_meta, verify_graph

__all__ = [
    "CaptureError",
    "InputMismatchError",
    "capture",
    "dynamic_shapes_of",
    "normalize_inputs",
    "PassReport",
    "enable_train_eval",
    "set_training",
    "Const",
    "Lit",
    "Match",
    "Op",
    "RewriteRule",
    "Var",
    "apply_rules",
    "VerificationError",
    "compare_outputs",
    "refresh_meta",
    "verify_graph",
]
