"""What to quantize and how: tensor specs, per-op settings, presets, overrides and an ignore list.

A ``QuantConfig`` has a global ``OpQuant`` (activation and weight ``TensorSpec``s and a mode),
optional overrides per op kind (``"conv"``, ``"linear"``, ``"matmul"``, ``"add"``, ...) and per node
(by graph node name or module path, e.g. ``"layer1.0.conv1"``; a module path covers everything
inside the module, the most specific key wins), and an ignore list (node names, module paths or op
kinds) kept in float. ``resolve(node)`` answers, for one node, the ``OpQuant`` to apply or the
reason it stays float; the quantization report quotes those reasons. ``fxpress.prepare`` and
``quantize`` raise ``ValueError`` for a ``nodes`` or ``ignore`` name that matches no node of the
model (``check_names``), suggesting close matches.

Presets (``QuantConfig.preset(name)``, or pass the name wherever a config is taken):

=================  ================================  =====================================  ===========
preset             activations                       weights                                mode
=================  ================================  =====================================  ===========
int8_static        uint8 affine, per tensor (MSE)    int8 symmetric, per output channel     static
int8_dynamic       uint8 affine, per batch at run    int8 symmetric, per output channel     dynamic
int8_weight_only   float                             int8 symmetric, per output channel     weight_only
int4_weight_only   float                             4-bit symmetric, groups of 32          weight_only
=================  ================================  =====================================  ===========

uint8 activations with int8 weights (U8S8) is the combination x86 int8 kernels (onnxruntime's
QLinearConv/QGemm, oneDNN through inductor) run fastest.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx

from ...ir.graph import global_pool_keepdim


__all__ = ["TensorSpec", "OpQuant", "QuantConfig", "OP_KINDS", "op_kind", "PRESETS", "MODES"]

aten = torch.ops.aten

MODES = ("static", "dynamic", "weight_only")

# op kinds a user names in overrides / ignore lists → the ATen overloads they cover
OP_KINDS: dict[str, frozenset] = {
    "conv": frozenset({aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding}),
    "conv_transpose": frozenset({aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}),
    "linear": frozenset({aten.linear.default}),
    "matmul": frozenset({aten.matmul.default, aten.bmm.default, aten.mm.default}),
    "add": frozenset({aten.add.Tensor, aten.add_.Tensor}),
    "mul": frozenset({aten.mul.Tensor, aten.mul_.Tensor}),
    "cat": frozenset({aten.cat.default}),
    "avg_pool": frozenset({aten.adaptive_avg_pool2d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool1d.default}),
}
WEIGHTED_KINDS = ("conv", "conv_transpose", "linear")


def op_kind(node: fx.Node) -> str | None:
    for kind, targets in OP_KINDS.items():
        if node.target in targets:
            return kind
    if node.target is aten.mean.dim and global_pool_keepdim(node) is not None:
        return "avg_pool"  # x.mean((2, 3)): global average pooling written as a mean
    return None


@dataclass(frozen=True)
class TensorSpec:
    """How one tensor is quantized.

    dtype: storage dtype (uint8/int8); bits: a narrower width stored in it (4 → int4 values in int8).
    symmetric: zero point in the middle of the range. axis: per-channel along this dim (None: per
    tensor). group_size: per-group along the last dim (weight-only int4). observer: the calibration
    observer kind (see ``fxpress.passes.quant.observers``) and its options.
    """

    dtype: torch.dtype = torch.uint8
    symmetric: bool = False
    axis: int | None = None
    group_size: int | None = None
    bits: int | None = None
    observer: str = "histogram_mse"
    observer_options: dict = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self):
        if self.dtype not in (torch.uint8, torch.int8):
            raise ValueError(f"quantized tensors are stored as torch.uint8 or torch.int8, not {self.dtype}")
        if self.bits is not None and not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {self.bits}")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size must be positive, got {self.group_size}")


@dataclass(frozen=True)
class OpQuant:
    """Settings for one quantizable op: its activation and weight specs and the mode."""

    mode: str = "static"
    activation: TensorSpec | None = TensorSpec()
    weight: TensorSpec | None = TensorSpec(dtype=torch.int8, symmetric=True, axis=0, observer="minmax")

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")


_W8 = TensorSpec(dtype=torch.int8, symmetric=True, axis=0, observer="minmax")
PRESETS: dict[str, OpQuant] = {
    "int8_static": OpQuant("static", TensorSpec(), _W8),
    "int8_dynamic": OpQuant("dynamic", TensorSpec(observer="minmax"), _W8),
    "int8_weight_only": OpQuant("weight_only", None, _W8),
    "int4_weight_only": OpQuant("weight_only", None, TensorSpec(dtype=torch.int8, symmetric=True, axis=0, group_size=32, bits=4, observer="minmax")),
}
# which op kinds each mode quantizes by default
_DEFAULT_KINDS = {
    "static": ("conv", "conv_transpose", "linear", "matmul", "add", "cat", "avg_pool"),
    "dynamic": ("linear", "matmul"),
    "weight_only": ("linear", "conv"),
}


@dataclass
class QuantConfig:
    """A global ``OpQuant``, per-op-kind and per-node overrides, an ignore list.

    quantize_outputs: also quantize tensors the model returns (off: outputs stay float, which keeps
    their precision and costs nothing in onnxruntime or inductor).
    op_kinds: which op kinds to quantize (default: per the mode, see ``_DEFAULT_KINDS``).
    """

    default: OpQuant = field(default_factory=lambda: PRESETS["int8_static"])
    op_types: dict[str, OpQuant | str | None] = field(default_factory=dict)
    nodes: dict[str, OpQuant | str | None] = field(default_factory=dict)
    ignore: list[str] = field(default_factory=list)
    op_kinds: tuple[str, ...] | None = None
    quantize_outputs: bool = False

    def __post_init__(self):
        self.default = _as_op_quant(self.default, "default")
        _check_kinds(self.op_types, "op_types")
        self.op_types = {k: _as_op_quant(v, f"op_types[{k!r}]") for k, v in self.op_types.items()}
        self.nodes = {k: _as_op_quant(v, f"nodes[{k!r}]") for k, v in self.nodes.items()}
        if self.op_kinds is None:
            self.op_kinds = _DEFAULT_KINDS[self.default.mode]
        _check_kinds(self.op_kinds, "op_kinds")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "QuantConfig":
        return cls(default=_as_op_quant(name, None), **overrides)

    @classmethod
    def coerce(cls, config: "QuantConfig | str | dict | None") -> "QuantConfig":
        if config is None:
            return cls()
        if isinstance(config, QuantConfig):
            return config
        if isinstance(config, str):
            return cls.preset(config)
        if isinstance(config, dict):
            return cls(**config)
        raise TypeError(f"config must be a preset name ({', '.join(PRESETS)}), a QuantConfig or a dict, not {type(config).__name__}")

    def resolve(self, node: fx.Node) -> tuple[OpQuant | None, str]:
        """The settings for ``node``, or None and the reason it stays float."""
        kind = op_kind(node)
        if kind is None:
            return None, "not a quantizable op"
        path = _module_path(node)
        for key in self.ignore:
            if key in (node.name, kind) or (path is not None and (path == key or path.startswith(key + "."))):
                return None, f"ignored by config ({key!r})"
        for key in (node.name, *_enclosing(path)):
            if key in self.nodes:
                spec = self.nodes[key]
                return (spec, "") if spec is not None else (None, f"kept float by config (nodes[{key!r}])")
        if kind in self.op_types:
            spec = self.op_types[kind]
            return (spec, "") if spec is not None else (None, f"kept float by config (op_types[{kind!r}])")
        if kind not in self.op_kinds:
            if kind in _DEFAULT_KINDS[self.default.mode]:
                return None, f"{kind} is left out of config.op_kinds"
            return None, f"{kind} is not quantized in {self.default.mode} mode"
        return self.default, ""

    def check_names(self, gm: fx.GraphModule) -> None:
        """Raise ValueError naming the ``ignore`` entries and ``nodes`` keys that match no node of
        ``gm`` (with close matches), as ``fxpress.prune``'s ``ignore`` does."""
        from ...ir.channels import resolve_ignore

        how = "Name a module path (e.g. 'layer4.1.conv2' or 'fc', covering the layers inside it) or a graph node name"
        kinds = [k for k in self.nodes if k in OP_KINDS]
        checks = [
            ([k for k in self.ignore if k not in OP_KINDS], "QuantConfig.ignore entries", f"{how}, or an op kind ({', '.join(OP_KINDS)})."),
            (list(self.nodes), "QuantConfig.nodes keys", how + (f" (op kinds such as {kinds[0]!r} go in op_types)." if kinds else ".")),
        ]
        errors = []
        for names, what, hint in checks:
            try:
                resolve_ignore(gm, names, what=what, how=hint)
            except ValueError as exc:
                errors.append(str(exc))
        if errors:
            raise ValueError("\n".join(errors))

    def with_default(self, **changes: Any) -> "QuantConfig":
        return replace(self, default=replace(self.default, **changes))


def _as_op_quant(value: Any, where: str | None) -> OpQuant | None:
    """``value`` as an ``OpQuant``; where: the config field it was given for (None: the preset itself)."""
    if value is None or isinstance(value, OpQuant):
        return value
    if isinstance(value, str):
        if value not in PRESETS:
            close = difflib.get_close_matches(value, PRESETS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            field_ = f" in QuantConfig.{where}" if where else ""
            raise ValueError(f"unknown quantization preset {value!r}{field_}{hint} Presets: {', '.join(PRESETS)}.")
        return PRESETS[value]
    raise TypeError(f"{where or 'preset'} must be an OpQuant, a preset name or None, not {type(value).__name__}")


def _check_kinds(keys: Any, where: str) -> None:
    for key in keys:
        if key not in OP_KINDS:
            close = difflib.get_close_matches(str(key), OP_KINDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise ValueError(f"unknown op kind {key!r} in QuantConfig.{where}{hint} Known kinds: {', '.join(OP_KINDS)}.")


def _enclosing(path: str | None) -> list[str]:
    """A module path and the paths of the modules around it, innermost first: a.b.c, a.b, a."""
    out = []
    while path:
        out.append(path)
        path = path.rpartition(".")[0]
    return out


def _module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").replace("L['self']", "") or None
