"""ONNX lowering of dynamic and weight-only quantized linears: the integer kernels onnxruntime runs fast.

Static int8 graphs export as Q/DQ and onnxruntime fuses them (QLinearConv, QGemm). Dynamic and
weight-only graphs do not: ``choose_qparams`` has no ONNX translation, per-group dequantize has none
either, and a DequantizeLinear in front of a float MatMul is not an integer kernel. This module
rewrites those linears, on the copy of the graph ``export_onnx`` exports, into three small torch
custom ops (namespace ``fxpress_onnx``) and gives ``torch.onnx.export`` a translation for each
(``custom_translation_table``). The FX graph, where the pattern is explicit (which linear, which
weight, which axis), is where the match is made; the ONNX side is a fixed node template.

Dynamic int8 (``int8_dynamic``: uint8 activations quantized per batch, int8 weights per output
channel), before::

    s, z = choose_qparams.tensor(x, 0, 255, eps, uint8)
    x_d = dequantize_per_tensor.tensor(quantize_per_tensor.tensor(x, s, z, ...), s, z, ...)
    W_d = dequantize_per_channel(W_q, W_s, W_z, 0, -128, 127, int8)            # W_q: int8 [out, in]
    y = aten.linear(x_d, W_d, b)

after (one ``dynamic_quantize`` per distinct input, shared by the linears reading it: q/k/v)::

    x_q, x_s, x_z = fxpress_onnx.dynamic_quantize(x, eps)
    y = fxpress_onnx.dynamic_quant_linear(x_q, x_s, x_z, W_t, W_s, None, b)     # W_t = W_q.T: [in, out]

and in ONNX, the form ``onnxruntime.quantization.quantize_dynamic`` writes::

    x_q, x_s, x_z = DynamicQuantizeLinear(x)
    y = Add(Mul(Cast<float>(MatMulInteger(x_q, W_t, x_z[, W_z])), Mul(x_s, W_s)), b)

which onnxruntime fuses into ``MatMulIntegerToFloat`` (and, for a single consumer,
``DynamicQuantizeMatMul``). The per-output-channel weight scales sit on the last axis of
``MatMulInteger``'s output ``[..., out]`` (columns of ``W_t``), so they broadcast as ``W_s[out]``.

Weight-only int4 (``int4_weight_only``: groups of ``g`` along in_features, ``g`` a power of two
>= 16)::

    y = aten.linear(x, dequantize_per_channel_group(W_q, S, Z, -8, 7, int8, g, float32), b)
  → y = fxpress_onnx.matmul_nbits(x, B, S, None, b, K, N, 4, g, 0)
  → y = com.microsoft.MatMulNBits(x, B, S, bias=b, K=K, N=N, bits=4, block_size=g)

``B`` is uint8 ``[N, K/g, g/2]``: each 4-bit code ``W_q + 8`` packed two per byte, low nibble first
(MatMulNBits' default zero point is 8 = 2^(bits-1), so symmetric weights need no zero-point input;
asymmetric ones get packed ``Z + 8``). Group sizes that are not a power of two but have a power-of-two
divisor >= 16 use that divisor as block size with each group's scale repeated (exact). Other widths
up to 8 bits use ``bits=8`` (codes ``W_q + 128``).

Weight-only int8 (per output channel): by default left to the exporter, ``DequantizeLinear(W_q) →
MatMul/Gemm``. What onnxruntime 1.32 makes of it (measured): for 3-d activations (MatMul) it fuses the
pair into ``MatMulNBits`` at its session default ``session.qdq_matmulnbits_accuracy_level`` (4: int8
compute, so not the graph's float numerics); for 2-d ones (Gemm) it keeps the DequantizeLinear, run on
every call, in front of a float GEMM. With ``OnnxQuantOptions(weight_only_int8="matmul_nbits")`` the
export says what runs: ``MatMulNBits`` with ``bits=8``, the channel's scale repeated over every block
(exact), at ``accuracy_level``.

``accuracy_level`` (MatMulNBits attribute): 0 (default) computes in float, the fxpress graph's
numerics; 4 lets onnxruntime quantize the activations to int8 per block inside the kernel (much
faster on CPUs with VNNI, but no longer weight-only numerics).

Anything else stays as it was and is reported: a dynamic input that is not uint8 over 0..255 (e.g.
int8 activations) or a weight quantized along in_features keeps the reference Q/DQ, exported through
the fallback translations below (``choose_qparams`` as ReduceMin/ReduceMax arithmetic; per-group
dequantize as Reshape/Sub/Mul), which are correct but run in float (and onnxscript's optimizer
constant-folds the per-group dequantize of small weights, under a few thousand elements, into float
initializers).

Numerics. The lowered torch graph computes exactly what the fxpress graph computes (the custom ops'
eager code calls the same ``quantized_decomposed`` ops on the same integers and scales). onnxruntime
then differs from it by float rounding (integer accumulation is exact; the scale product is rounded
once), plus, for dynamic quantization, the rare element where ``x / s`` lands within an ulp of a
rounding boundary and onnxruntime's ``DynamicQuantizeLinear`` rounds it to the neighbouring code:
one step ``s`` on that input element, i.e. at most ``s * max|W[:, k]|`` on each output. For one
linear layer the two agree to float rounding (measured: 130 dB SQNR, max diff 1e-7). Through a deep
network the difference grows: per-batch quantization makes the output a discontinuous function of
its input, so float-rounding differences in the float ops between quantized linears (LayerNorm,
softmax, GELU: onnxruntime and torch differ there by ~1e-7 relative) flip codes in the next
quantizer, and the flips cascade. Measured on a BERT encoder (hidden 512, random weights): SQNR of
onnxruntime against the fxpress graph 77 dB after 1 layer, 54 dB after 2, 43 dB after 6 (where the
quantization itself is at 39 dB against fp32); the fxpress graph compared with itself under a 1e-7
relative perturbation of the embeddings reaches 45 dB at 6 layers, so this is the model's
sensitivity, not a lowering error. Tests use atol 1e-3 + rtol 1e-2 on small models; deep models
need rtol ~5e-2 in ``export_onnx``'s check. The graph's dynamic qparams are per batch: compare on the same batch.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from ..ir.graph import add_constant, get_attr_value, global_pool_keepdim, node_label
from ..ir.report import PassReport
from ..ir.verify import refresh_meta
from ..passes.base import Pass
from ..passes.quant.convert_to_qdq import qdq_ops
from ..passes.quant.fold_weight_quant import DEQUANTIZE_OPS

__all__ = [
    "OnnxQuantOptions",
    "LowerQuantizedLinears",
    "LowerQuantizedPooling",
    "translation_table",
    "needs_translations",
    "pack_nbits",
    "unpack_nbits",
]

aten = torch.ops.aten
NAMESPACE = "fxpress_onnx"
_FLOAT = 1  # onnx TensorProto.FLOAT


@dataclass(frozen=True)
class OnnxQuantOptions:
    """How ``export_onnx`` lowers dynamic / weight-only quantized linears.

    weight_only_int8: "dq" (DequantizeLinear → MatMul, float GEMM; default) or "matmul_nbits"
        (com.microsoft MatMulNBits with bits=8).
    accuracy_level: MatMulNBits' compute type: 0 float (matches the fxpress graph), 4 int8 (the
        kernel quantizes activations per block: faster, different numerics). 1..3 as onnxruntime defines.
    nbits_block_size: block size for int8 weight-only MatMulNBits (power of two >= 16; the per-channel
        scale is repeated over blocks, so any size is exact).
    """

    weight_only_int8: str = "dq"
    accuracy_level: int = 0
    nbits_block_size: int = 128

    def __post_init__(self):
        if self.weight_only_int8 not in ("dq", "matmul_nbits"):
            raise ValueError(f"weight_only_int8 must be 'dq' or 'matmul_nbits', got {self.weight_only_int8!r}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0..4, got {self.accuracy_level!r}")
        if not _is_block_size(self.nbits_block_size):
            raise ValueError(f"nbits_block_size must be a power of two >= 16, got {self.nbits_block_size!r}")

    @classmethod
    def coerce(cls, value: "OnnxQuantOptions | dict | None") -> "OnnxQuantOptions":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**value)
        raise TypeError(f"quant_options must be an OnnxQuantOptions, a dict or None, not {type(value).__name__}")


def _is_block_size(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 16 and n & (n - 1) == 0


# ---------------------------------------------------------------------------------------------
# packing for MatMulNBits


def pack_nbits(codes: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """Pack unsigned codes ``[N, K]`` (values < 2**bits) into MatMulNBits' uint8 ``[N, ceil(K/bs), bs*bits/8]``.

    Codes go low bits first along K; K is padded to whole blocks with zeros.
    """
    n, k = codes.shape
    blocks = -(-k // block_size)
    padded = torch.zeros(n, blocks * block_size, dtype=torch.int32)
    padded[:, :k] = codes.to(torch.int32)
    per_byte = 8 // bits
    grouped = padded.reshape(n, blocks, block_size // per_byte, per_byte)
    packed = torch.zeros(n, blocks, block_size // per_byte, dtype=torch.int32)
    for j in range(per_byte):
        packed |= grouped[..., j] << (bits * j)
    return packed.to(torch.uint8)


def unpack_nbits(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of ``pack_nbits``: int32 codes ``[N, K]`` from uint8 ``[N, blocks, blob]``."""
    n = packed.shape[0]
    per_byte = 8 // bits
    p = packed.to(torch.int32)
    codes = torch.stack([(p >> (bits * j)) & ((1 << bits) - 1) for j in range(per_byte)], dim=-1)
    return codes.reshape(n, -1)[:, :k]


def _pack_zero_points(zp_codes: torch.Tensor, bits: int) -> torch.Tensor:
    """MatMulNBits' uint8 zero points: per row, ``blocks`` codes packed like the weights, ``[N * ceil(blocks*bits/8)]``."""
    n, blocks = zp_codes.shape
    per_byte = 8 // bits
    return pack_nbits(zp_codes, bits, per_byte * -(-blocks // per_byte)).reshape(n, -1).reshape(-1)


def _unpack_zero_points(packed: torch.Tensor, bits: int, n: int, blocks: int) -> torch.Tensor:
    return unpack_nbits(packed.reshape(n, 1, -1), bits, blocks)


# ---------------------------------------------------------------------------------------------
# custom ops: eager code = the fxpress graph's math, fake code = shapes


def _define_ops() -> dict[str, Any]:
    qd = qdq_ops()
    lib_ops: dict[str, Any] = {}

    @torch.library.custom_op(f"{NAMESPACE}::dynamic_quantize", mutates_args=())
    def dynamic_quantize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 per-tensor quantization of ``x`` with qparams from its own min/max (0 included)."""
        scale, zero_point = qd.choose_qparams.tensor(x, 0, 255, eps, torch.uint8)
        q = qd.quantize_per_tensor.tensor(x, scale, zero_point, 0, 255, torch.uint8)
        return q, scale.to(torch.float32).reshape(()), zero_point.to(torch.uint8).reshape(())

    @dynamic_quantize.register_fake
    def _(x, eps):
        return torch.empty_like(x, dtype=torch.uint8), x.new_empty((), dtype=torch.float32), x.new_empty((), dtype=torch.uint8)

    @torch.library.custom_op(f"{NAMESPACE}::dynamic_quant_linear", mutates_args=())
    def dynamic_quant_linear(
        x_q: torch.Tensor,
        x_scale: torch.Tensor,
        x_zero_point: torch.Tensor,
        w_t: torch.Tensor,
        w_scale: torch.Tensor,
        w_zero_point: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """``linear(dequantize(x_q), dequantize(w_t.T), bias)``; w_t is the integer weight ``[in, out]``."""
        x = qd.dequantize_per_tensor.tensor(x_q, x_scale, x_zero_point, 0, 255, torch.uint8)
        w = _dequantize_weight(w_t.t().contiguous(), w_scale, w_zero_point)  # contiguous: the same GEMM as the graph's
        return torch.nn.functional.linear(x, w, bias)

    @dynamic_quant_linear.register_fake
    def _(x_q, x_scale, x_zero_point, w_t, w_scale, w_zero_point, bias):
        return x_q.new_empty((*x_q.shape[:-1], w_t.shape[1]), dtype=torch.float32)

    @torch.library.custom_op(f"{NAMESPACE}::matmul_nbits", mutates_args=())
    def matmul_nbits(
        x: torch.Tensor,
        b_packed: torch.Tensor,
        scales: torch.Tensor,
        zero_points: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        K: int,
        N: int,
        bits: int,
        block_size: int,
        accuracy_level: int,
    ) -> torch.Tensor:
        """``linear(x, W, bias)`` with ``W[n, k] = (code - zp) * scale[n, k // block_size]`` (float compute)."""
        blocks = -(-K // block_size)
        codes = unpack_nbits(b_packed, bits, K)
        if zero_points is None:
            zp = torch.full((N, blocks), 1 << (bits - 1), dtype=torch.int32)
        else:
            zp = _unpack_zero_points(zero_points, bits, N, blocks)
        w = _dequantize_blocks(codes, scales.reshape(N, blocks), zp, block_size, K)
        return torch.nn.functional.linear(x, w, bias)

    @matmul_nbits.register_fake
    def _(x, b_packed, scales, zero_points, bias, K, N, bits, block_size, accuracy_level):
        return x.new_empty((*x.shape[:-1], N))

    @torch.library.custom_op(f"{NAMESPACE}::global_avg_pool", mutates_args=())
    def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
        """Mean over the spatial dims (all after the channel dim), kept as size 1: ONNX GlobalAveragePool."""
        return x.mean(tuple(range(2, x.dim())), keepdim=True)

    @global_avg_pool.register_fake
    def _(x):
        return x.new_empty((*x.shape[:2], *[1] * (x.dim() - 2)))

    lib_ops.update(
        dynamic_quantize=dynamic_quantize, dynamic_quant_linear=dynamic_quant_linear, matmul_nbits=matmul_nbits,
        global_avg_pool=global_avg_pool,
    )
    return lib_ops


def _dequantize_weight(w: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-output-channel (scale ``[out]``) or per-tensor (0-d scale) dequantize of ``w [out, in]``."""
    qd = qdq_ops()
    qmin, qmax = (-128, 127) if w.dtype == torch.int8 else (0, 255)
    zp = zero_point.to(torch.int64) if zero_point is not None else None
    if scale.dim() == 0:
        return qd.dequantize_per_tensor.default(w, float(scale), int(zp) if zp is not None else 0, qmin, qmax, w.dtype)
    return qd.dequantize_per_channel.default(w, scale, zp, 0, qmin, qmax, w.dtype)


def _dequantize_blocks(codes: torch.Tensor, scales: torch.Tensor, zp: torch.Tensor, block_size: int, k: int) -> torch.Tensor:
    n, blocks = scales.shape
    padded = torch.zeros(n, blocks * block_size, dtype=torch.int32)
    padded[:, :k] = codes
    grouped = padded.reshape(n, blocks, block_size)
    w = grouped.sub(zp.to(torch.int32).unsqueeze(-1)).mul(scales.unsqueeze(-1)).to(torch.float32)
    return w.reshape(n, -1)[:, :k]


_OPS: dict[str, Any] | None = None


def _ops() -> dict[str, Any]:
    global _OPS
    if _OPS is None:
        _OPS = _define_ops()
    return _OPS


def _op(name: str):
    _ops()
    return getattr(getattr(torch.ops, NAMESPACE), name).default


# ---------------------------------------------------------------------------------------------
# ONNX translations (onnxscript, traced when torch.onnx.export meets the op)


def _translations() -> dict[Any, Callable]:
    from onnxscript import opset18 as op
    from onnxscript.values import Op, Opset

    matmul_nbits_op = Op(Opset("com.microsoft", 1), "MatMulNBits", _matmul_nbits_schema())
    qd = qdq_ops()

    def dynamic_quantize(x, eps: float):
        return op.DynamicQuantizeLinear(x)

    def dynamic_quant_linear(x_q, x_scale, x_zero_point, w_t, w_scale, w_zero_point=None, bias=None):
        if w_zero_point is None:
            acc = op.MatMulInteger(x_q, w_t, x_zero_point)
        else:
            acc = op.MatMulInteger(x_q, w_t, x_zero_point, w_zero_point)
        y = op.Mul(op.Cast(acc, to=_FLOAT), op.Mul(x_scale, w_scale))
        return y if bias is None else op.Add(y, bias)

    def matmul_nbits(x, b_packed, scales, zero_points=None, bias=None, K: int = 0, N: int = 0, bits: int = 4, block_size: int = 32, accuracy_level: int = 0):
        return matmul_nbits_op(
            x, b_packed, scales, zero_points, None, bias, K=K, N=N, bits=bits, block_size=block_size, accuracy_level=accuracy_level
        )

    # fallbacks for dynamic Q/DQ the linear lowering leaves (e.g. int8 activations): float arithmetic
    def choose_qparams(input, quant_min: int, quant_max: int, eps: float, dtype: int):
        zero = op.Constant(value_float=0.0)
        lo = op.Min(op.ReduceMin(input, keepdims=0), zero)
        hi = op.Max(op.ReduceMax(input, keepdims=0), zero)
        scale = op.Max(op.Div(op.Sub(hi, lo), op.Constant(value_float=float(quant_max - quant_min))), op.Constant(value_float=float(eps)))
        zp = op.Sub(op.Constant(value_float=float(quant_min)), op.Round(op.Div(lo, scale)))
        zp = op.Clip(zp, op.Constant(value_float=float(quant_min)), op.Constant(value_float=float(quant_max)))
        one = op.Constant(value_ints=[1])
        return op.Reshape(op.Cast(scale, to=11), one), op.Reshape(op.Cast(zp, to=7), one)  # double, int64 as torch

    def quantize_per_tensor(input, scale, zero_point, quant_min: int, quant_max: int, dtype: int):
        q = op.QuantizeLinear(input, _scalar(op, op.Cast(scale, to=_FLOAT)), _scalar(op, op.Cast(zero_point, to=dtype)))
        return op.Clip(q, op.Cast(op.Constant(value_int=quant_min), to=dtype), op.Cast(op.Constant(value_int=quant_max), to=dtype))

    def dequantize_per_tensor(input, scale, zero_point, quant_min: int, quant_max: int, dtype: int, out_dtype: int = -1):
        y = op.DequantizeLinear(input, _scalar(op, op.Cast(scale, to=_FLOAT)), _scalar(op, op.Cast(zero_point, to=dtype)))
        return y if out_dtype in (-1, None, _FLOAT) else op.Cast(y, to=out_dtype)

    def dequantize_per_channel_group(input, scales, zero_points, quant_min: int, quant_max: int, dtype: int, group_size: int, output_dtype: int = _FLOAT):
        grouped = op.Cast(op.Reshape(input, op.Constant(value_ints=[-1, group_size])), to=_FLOAT)
        col = op.Constant(value_ints=[-1, 1])
        if zero_points is not None:
            grouped = op.Sub(grouped, op.Cast(op.Reshape(zero_points, col), to=_FLOAT))
        w = op.Mul(grouped, op.Cast(op.Reshape(scales, col), to=_FLOAT))
        return op.Reshape(w, op.Shape(input))

    def global_avg_pool(x):
        return op.GlobalAveragePool(x)

    return {
        _op("global_avg_pool"): global_avg_pool,
        _op("dynamic_quantize"): dynamic_quantize,
        _op("dynamic_quant_linear"): dynamic_quant_linear,
        _op("matmul_nbits"): matmul_nbits,
        qd.choose_qparams.tensor: choose_qparams,
        qd.quantize_per_tensor.tensor: quantize_per_tensor,
        qd.dequantize_per_tensor.tensor: dequantize_per_tensor,
        qd.dequantize_per_channel_group.default: dequantize_per_channel_group,
    }


def _matmul_nbits_schema():
    """com.microsoft::MatMulNBits as an ``onnx.defs.OpSchema`` for onnxscript's tracer (not registered
    with onnx: onnx itself has no contrib schemas). Inputs/attributes as in onnxruntime's ContribOperators.md."""
    from onnx.defs import OpSchema

    single, optional = OpSchema.FormalParameterOption.Single, OpSchema.FormalParameterOption.Optional
    inputs = [
        OpSchema.FormalParameter("A", "T1", param_option=single),
        OpSchema.FormalParameter("B", "T2", param_option=single),
        OpSchema.FormalParameter("scales", "T1", param_option=single),
        OpSchema.FormalParameter("zero_points", "T3", param_option=optional),
        OpSchema.FormalParameter("g_idx", "T4", param_option=optional),
        OpSchema.FormalParameter("bias", "T1", param_option=optional),
    ]
    ints = OpSchema.AttrType.INT
    attributes = [
        OpSchema.Attribute("K", ints, required=True),
        OpSchema.Attribute("N", ints, required=True),
        OpSchema.Attribute("bits", ints, required=False),
        OpSchema.Attribute("block_size", ints, required=True),
        OpSchema.Attribute("accuracy_level", ints, required=False),
    ]
    constraints = [
        ("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
        ("T2", ["tensor(uint8)", "tensor(int32)"], ""),
        ("T3", ["tensor(uint8)", "tensor(int32)", "tensor(float16)", "tensor(float)", "tensor(bfloat16)"], ""),
        ("T4", ["tensor(int32)"], ""),
    ]
    return OpSchema(
        "MatMulNBits", "com.microsoft", 1, inputs=inputs, outputs=[OpSchema.FormalParameter("Y", "T1", param_option=single)],
        type_constraints=constraints, attributes=attributes,
    )


def _scalar(op, value):
    return op.Reshape(value, op.Constant(value_ints=[]))


def translation_table() -> dict[Any, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export``: fxpress_onnx ops and the dynamic/grouped Q/DQ fallbacks."""
    return _translations()


def needs_translations(gm: fx.GraphModule) -> bool:
    """Whether the graph holds an op only ``translation_table()`` can export."""
    qd = qdq_ops()
    special = {qd.choose_qparams.tensor, qd.quantize_per_tensor.tensor, qd.dequantize_per_tensor.tensor, qd.dequantize_per_channel_group.default}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in special or getattr(node.target, "namespace", None) == NAMESPACE:
            return True
    return False


# ---------------------------------------------------------------------------------------------
# the FX rewrite


class LowerQuantizedLinears(Pass):
    """Rewrite dynamic / weight-only quantized linears into fxpress_onnx ops (ONNX export lowering).

    Not registered as a user pass: it inserts backend ops that only ``export_onnx`` consumes.
    """

    name = "lower-quantized-linears"

    def __init__(self, options: OnnxQuantOptions | dict | None = None):
        self.options = OnnxQuantOptions.coerce(options)

    def run(self, gm: fx.GraphModule, report: PassReport) -> None:
        _ops()
        quantized_inputs: dict[tuple, fx.Node] = {}  # one dynamic_quantize per (input, eps)
        left_to_exporter = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target != aten.linear.default:
                continue
            x, w = node.args[0], node.args[1]
            if _dynamic_act(x) is not None:
                self._dynamic(gm, node, report, quantized_inputs)
            elif _is_call(x, *DEQUANTIZE_OPS):
                continue  # static int8: exported as Q/DQ, fused by onnxruntime (QGemm, QLinearMatMul)
            elif _is_call(w, qdq_ops().dequantize_per_channel_group.default):
                self._grouped(gm, node, report)
            elif _is_call(w, qdq_ops().dequantize_per_channel.default):
                if self.options.weight_only_int8 == "matmul_nbits":
                    self._per_channel_nbits(gm, node, report)
                else:
                    left_to_exporter += 1
        if left_to_exporter:
            report.note(f"{left_to_exporter} int8 weight-only linear(s) left as DequantizeLinear → MatMul/Gemm (weight_only_int8='dq')")
        if report.changed:
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
            refresh_meta(gm)

    # -- dynamic int8 -------------------------------------------------------------------------

    def _dynamic(self, gm: fx.GraphModule, node: fx.Node, report: PassReport, quantized_inputs: dict) -> None:
        x_dq, w_dq = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        src, qmin, qmax, eps, dtype = _dynamic_act(x_dq)
        if (qmin, qmax, dtype) != (0, 255, torch.uint8):
            report.skip(node_label(node), f"dynamic {str(dtype).removeprefix('torch.')} [{qmin}, {qmax}] input: DynamicQuantizeLinear is uint8 over 0..255 only (kept as float Q/DQ)")
            return
        weight, why = _integer_weight(gm, w_dq)
        if weight is None:
            report.skip(node_label(node), f"{why} (kept as float Q/DQ)")
            return
        w_q, w_scale, w_zp = weight
        key = (src, eps)
        if key not in quantized_inputs:
            with gm.graph.inserting_after(src):
                dq_node = gm.graph.call_function(_op("dynamic_quantize"), (src, eps))
            with gm.graph.inserting_after(dq_node):
                parts = tuple(gm.graph.call_function(operator.getitem, (dq_node, i)) for i in range(3))
            quantized_inputs[key] = parts
        x_q, x_s, x_z = quantized_inputs[key]
        stem = _stem(w_dq)
        w_t_node = add_constant(gm, f"{stem}_t", w_q.t().contiguous(), before=node)
        s_node = add_constant(gm, f"{stem}_scale_f32", w_scale, before=node)
        z_node = add_constant(gm, f"{stem}_zero_point_t", w_zp, before=node) if w_zp is not None else None
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(_op("dynamic_quant_linear"), (x_q, x_s, x_z, w_t_node, s_node, z_node, bias))
        new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        how = "per output channel" if w_scale.dim() else "per tensor"
        report.change(f"{node_label(new)}: DynamicQuantizeLinear → MatMulInteger (int8 weight {how})", kind="dynamic int8 linears")

    # -- weight-only ----------------------------------------------------------------------------

    def _grouped(self, gm: fx.GraphModule, node: fx.Node, report: PassReport) -> None:
        w_dq = node.args[1]
        w, scales, zps, qmin, qmax, dtype, group_size = w_dq.args[:7]
        if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in (w, scales)) or not (zps is None or (isinstance(zps, fx.Node) and zps.op == "get_attr")):
            report.skip(node_label(node), "per-group weight or qparams are not constants")
            return
        bits, offset = _nbits(qmin, qmax)
        block = _largest_block(group_size)
        if bits is None or block is None:
            why = f"range [{qmin}, {qmax}] is wider than 8 bits" if bits is None else f"group size {group_size} has no power-of-two divisor >= 16"
            report.skip(node_label(node), f"MatMulNBits needs blocks of a power of two >= 16 and <= 8 bits: {why} (exported as float dequantize)")
            return
        q = get_attr_value(gm, w.target)
        n, k = q.shape
        s = get_attr_value(gm, scales.target).to(torch.float32).reshape(n, -1)
        z = get_attr_value(gm, zps.target).reshape(n, -1) if zps is not None else torch.zeros_like(s, dtype=torch.int64)
        repeat = group_size // block
        s, z = s.repeat_interleave(repeat, dim=1), z.repeat_interleave(repeat, dim=1)
        self._emit_nbits(gm, node, q, s, z, bits, offset, block, report, what=f"{bits}-bit groups of {group_size}")

    def _per_channel_nbits(self, gm: fx.GraphModule, node: fx.Node, report: PassReport) -> None:
        w_dq = node.args[1]
        weight, why = _integer_weight(gm, w_dq)
        if weight is None:
            report.skip(node_label(node), f"{why} (kept as DequantizeLinear → MatMul)")
            return
        q, scale, zp = weight
        n, k = q.shape
        block = min(self.options.nbits_block_size, max(16, 1 << (k - 1).bit_length()))
        blocks = -(-k // block)
        s = (scale if scale.dim() else scale.expand(n)).reshape(n, 1).expand(n, blocks).contiguous()
        z = (zp.to(torch.int64) if zp is not None else torch.zeros(n, dtype=torch.int64))
        z = (z if z.dim() else z.expand(n)).reshape(n, 1).expand(n, blocks).contiguous()
        offset = 128 if q.dtype == torch.int8 else 0
        self._emit_nbits(gm, node, q, s, z, 8, offset, block, report, what=f"{str(q.dtype).removeprefix('torch.')} per channel")

    def _emit_nbits(self, gm, node, q, s, z, bits, offset, block, report, *, what: str) -> None:
        """MatMulNBits from integers ``q [N, K]`` with block scales/zero points ``[N, K/block]``; codes are ``q + offset``."""
        n, k = q.shape
        codes = q.to(torch.int32) + offset
        packed = pack_nbits(codes, bits, block)
        zp_codes = z.to(torch.int32) + offset
        default_zp = 1 << (bits - 1)  # what MatMulNBits assumes without a zero-point input
        zero_points = None if bool((zp_codes == default_zp).all()) else _pack_zero_points(zp_codes, bits)
        stem = _stem(node.args[1])
        b_node = add_constant(gm, f"{stem}_nbits", packed, before=node)
        s_node = add_constant(gm, f"{stem}_block_scales", s.contiguous(), before=node)
        z_node = add_constant(gm, f"{stem}_block_zero_points", zero_points, before=node) if zero_points is not None else None
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        args = (node.args[0], b_node, s_node, z_node, bias, k, n, bits, block, self.options.accuracy_level)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(_op("matmul_nbits"), args)
        new.meta.update({key: v for key, v in node.meta.items() if key != "val"})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        report.change(f"{node_label(new)}: MatMulNBits ({what}, block {block})", kind="MatMulNBits linears")


class LowerQuantizedPooling(Pass):
    """Global average pooling between a static DQ and Q as ONNX GlobalAveragePool.

    torch.onnx exports ``adaptive_avg_pool2d(x, 1)`` and ``x.mean((2, 3))`` as ReduceMean, which
    onnxruntime runs in float between a DequantizeLinear and a QuantizeLinear; DQ →
    GlobalAveragePool → Q it fuses into QLinearGlobalAveragePool. Before / after::

        y = aten.mean.dim(dequantize(q), [2, 3], keepdim=False); y_q = quantize(y, s, z)
      → y_q = squeeze(quantize(fxpress_onnx.global_avg_pool(dequantize(q)), s, z), [-1, -2])

    Exact: the pooled values are the same, and squeezing size-1 dims commutes with quantization.
    Not registered as a user pass: it inserts a backend op only ``export_onnx`` consumes.
    """

    name = "lower-quantized-pooling"

    def run(self, gm: fx.GraphModule, report: PassReport) -> None:
        _ops()
        qd = qdq_ops()
        for node in list(gm.graph.nodes):
            keepdim = global_pool_keepdim(node)
            if keepdim is None:
                continue
            x, users = node.args[0], list(node.users)
            if not _is_call(x, qd.dequantize_per_tensor.default):
                continue
            if len(users) != 1 or not _is_call(users[0], qd.quantize_per_tensor.default):
                report.skip(node_label(node), "its output is not quantized alone (onnxruntime keeps ReduceMean in float)")
                continue
            q = users[0]
            with gm.graph.inserting_before(node):
                pooled = gm.graph.call_function(_op("global_avg_pool"), (x,))
            q.replace_input_with(node, pooled)
            gm.graph.erase_node(node)
            if not keepdim:
                rank = len(x.meta["val"].shape)
                with gm.graph.inserting_after(q):
                    squeezed = gm.graph.call_function(aten.squeeze.dims, (q, list(range(2, rank))))
                q.replace_all_uses_with(squeezed, delete_user_cb=lambda user: user is not squeezed)
            report.change(f"{node_label(pooled)}: GlobalAveragePool", kind="quantized global average pools")
        if report.changed:
            gm.graph.lint()
            gm.recompile()
            refresh_meta(gm)


def _is_call(node: Any, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _dynamic_act(x: Any) -> tuple | None:
    """(source, qmin, qmax, eps, dtype) when ``x`` is choose_qparams → quantize → dequantize of one tensor."""
    qd = qdq_ops()
    if not _is_call(x, qd.dequantize_per_tensor.tensor):
        return None
    q = x.args[0]
    if not _is_call(q, qd.quantize_per_tensor.tensor) or tuple(q.args[1:6]) != tuple(x.args[1:6]):
        return None
    scale, zp = x.args[1], x.args[2]
    if not (_is_call(scale, operator.getitem) and _is_call(zp, operator.getitem)):
        return None
    cp = scale.args[0]
    if cp is not zp.args[0] or (scale.args[1], zp.args[1]) != (0, 1) or not _is_call(cp, qd.choose_qparams.tensor):
        return None
    src, qmin, qmax, eps, dtype = cp.args[:5]
    if src is not q.args[0]:
        return None
    return src, qmin, qmax, eps, dtype


def _integer_weight(gm: fx.GraphModule, w_dq: Any) -> tuple[tuple | None, str]:
    """((W_q [out, in], scale float32 [out] or 0-d, zero point in W_q's dtype or None), '') or (None, why)."""
    qd = qdq_ops()
    if _is_call(w_dq, qd.dequantize_per_channel.default):
        w, scale, zp, axis = w_dq.args[:4]
        if axis != 0:
            return None, f"weight quantized along axis {axis}, not per output channel (axis 0)"
        if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in (w, scale)) or not (zp is None or (isinstance(zp, fx.Node) and zp.op == "get_attr")):
            return None, "weight or its qparams are not constants"
        s = get_attr_value(gm, scale.target).to(torch.float32)
        z = get_attr_value(gm, zp.target) if zp is not None else None
    elif _is_call(w_dq, qd.dequantize_per_tensor.default):
        w = w_dq.args[0]
        if not (isinstance(w, fx.Node) and w.op == "get_attr") or isinstance(w_dq.args[1], fx.Node):
            return None, "weight or its qparams are not constants"
        s = torch.tensor(float(w_dq.args[1]), dtype=torch.float32)
        z = torch.tensor(int(w_dq.args[2]))
    else:
        return None, "weight is not an integer constant behind a dequantize"
    q = get_attr_value(gm, w.target)
    if q.dtype not in (torch.int8, torch.uint8) or q.dim() != 2:
        return None, f"weight is {str(q.dtype).removeprefix('torch.')} {tuple(q.shape)}, not a 2-d int8/uint8 matrix"
    if z is not None:
        z = None if bool((z == 0).all()) else z.to(q.dtype)
    return (q, s, z), ""


def _nbits(qmin: int, qmax: int) -> tuple[int | None, int]:
    """(MatMulNBits bit width, offset from stored integer to unsigned code) for a quantized range."""
    for bits in (4, 8):
        if qmin >= 0 and qmax < (1 << bits):
            return bits, 0
        if -(1 << (bits - 1)) <= qmin and qmax < (1 << (bits - 1)):
            return bits, 1 << (bits - 1)
    return None, 0


def _largest_block(group_size: int) -> int | None:
    block = group_size & -group_size  # largest power of two dividing it
    return min(block, 256) if block >= 16 else None


def _stem(w_dq: fx.Node) -> str:
    w = w_dq.args[0]
    return w.target if isinstance(w, fx.Node) and w.op == "get_attr" else w_dq.name
