"""Quantization parameters and the affine quantization math every quantization pass shares.

``q = clamp(round(x / scale) + zero_point, quant_min, quant_max)``,  ``x̂ = (q - zero_point) * scale``

Per-tensor parameters have a 0-d ``scale``/``zero_point``; per-channel ones a 1-d tensor along
``axis``; per-group (weight-only int4) ones are shaped ``[channels, groups]`` with ``group_size``.
Scales are float32 (what ONNX and the kernels use), zero points int64 (what the
``quantized_decomposed`` ops take).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["QParams", "dtype_range", "qparams_from_range"]

_RANGES = {
    torch.uint8: (0, 255),
    torch.int8: (-128, 127),
    torch.int16: (-32768, 32767),
    torch.int32: (-(2**31), 2**31 - 1),
}


def dtype_range(dtype: torch.dtype, bits: int | None = None) -> tuple[int, int]:
    """(quant_min, quant_max) of an integer dtype, or of a narrower bit width stored in it (int4 in int8)."""
    if bits is not None:
        signed = dtype != torch.uint8
        return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if dtype not in _RANGES:
        raise ValueError(f"no integer range for {dtype}; use uint8, int8, int16 or int32")
    return _RANGES[dtype]


@dataclass(frozen=True)
class QParams:
    scale: torch.Tensor
    zero_point: torch.Tensor
    quant_min: int
    quant_max: int
    dtype: torch.dtype
    axis: int | None = None
    group_size: int | None = None

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def _broadcast(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        if self.axis is None:
            return t
        shape = [1] * ndim
        shape[self.axis] = -1
        return t.reshape(shape)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.group_size is not None:
            return self._quantize_groups(x)
        scale = self._broadcast(self.scale, x.dim()).to(torch.float32)
        zp = self._broadcast(self.zero_point, x.dim())
        q = torch.round(x.to(torch.float32) / scale) + zp
        return q.clamp(self.quant_min, self.quant_max).to(self.dtype)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        if self.group_size is not None:
            return self._dequantize_groups(q)
        scale = self._broadcast(self.scale, q.dim()).to(torch.float32)
        zp = self._broadcast(self.zero_point, q.dim())
        return (q.to(torch.int32) - zp).to(torch.float32) * scale

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.quantize(x)).to(x.dtype)

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1, self.group_size)

    def _quantize_groups(self, x: torch.Tensor) -> torch.Tensor:
        g = self._grouped(x.to(torch.float32))
        q = torch.round(g / self.scale.unsqueeze(-1)) + self.zero_point.unsqueeze(-1)
        return q.clamp(self.quant_min, self.quant_max).to(self.dtype).reshape(x.shape)

    def _dequantize_groups(self, q: torch.Tensor) -> torch.Tensor:
        g = self._grouped(q.to(torch.int32))
        return ((g - self.zero_point.unsqueeze(-1)).to(torch.float32) * self.scale.unsqueeze(-1)).reshape(q.shape)


def qparams_from_range(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    dtype: torch.dtype,
    *,
    symmetric: bool,
    axis: int | None = None,
    quant_min: int | None = None,
    quant_max: int | None = None,
    eps: float = torch.finfo(torch.float32).eps,
) -> QParams:
    """Scale and zero point covering [min_val, max_val] (widened to include 0, as kernels need 0 exact).

    Symmetric: zero point at the middle of the range (0 for int8, 128 for uint8) and the scale set by
    max(|min|, |max|). Affine: the range maps onto [quant_min, quant_max].
    """
    qmin, qmax = dtype_range(dtype)
    qmin = qmin if quant_min is None else quant_min
    qmax = qmax if quant_max is None else quant_max
    min_val = torch.minimum(min_val.detach().to(torch.float32), torch.zeros_like(min_val, dtype=torch.float32))
    max_val = torch.maximum(max_val.detach().to(torch.float32), torch.zeros_like(max_val, dtype=torch.float32))
    if symmetric:
        bound = torch.maximum(-min_val, max_val)
        scale = (bound / ((qmax - qmin) / 2)).clamp(min=eps)
        zero_point = torch.full_like(scale, (qmin + qmax + 1) // 2, dtype=torch.int64)
    else:
        scale = ((max_val - min_val) / (qmax - qmin)).clamp(min=eps)
        zero_point = (qmin - torch.round(min_val / scale)).clamp(qmin, qmax).to(torch.int64)
    return QParams(scale.to(torch.float32), zero_point, qmin, qmax, dtype, axis)
