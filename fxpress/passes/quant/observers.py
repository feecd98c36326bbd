"""Calibration observers: record statistics of a tensor and turn them into ``QParams``.

An observer is an ``nn.Module`` that returns its input unchanged (``y = obs(x)`` is ``x`` itself)
and, on real data, updates statistics kept in buffers (so they survive ``state_dict`` and
``deepcopy``). FakeTensors, meta tensors, tensors seen while a tracing mode (FakeTensorMode,
functionalization, make_fx's proxy mode) is active, strict ``torch.export``, and calls while
``obs.enabled`` is False are passed through without being recorded, so a prepared graph can be
re-traced or shape-propagated. Under ``torch.compile`` the recording runs outside the compiled graph
(a graph break) on the real tensors, so calibrating a compiled prepared model works. Statistics are
normal tensors even when calibrating under ``torch.inference_mode``. NaN and ±inf values are
ignored (they would make every range infinite); inputs are observed in float32. After calibration
``obs.qparams()`` gives the scale and zero point through ``fxpress.ir.qparams.qparams_from_range``,
which always widens the chosen range ``[lo, hi]`` to contain 0 (so 0 is exactly representable):

    affine:     scale = (hi - lo) / (qmax - qmin),  zero_point = qmin - round(lo / scale)
    symmetric:  scale = max(-lo, hi) / ((qmax - qmin) / 2),  zero_point = (qmin + qmax + 1) // 2

Kinds (``make_observer(kind, dtype=torch.uint8, symmetric=False, axis=None, **options)``):

==================  ===========  =============================================================
kind                per-channel  range [lo, hi]
==================  ===========  =============================================================
``minmax``          yes          running min and max
``moving_average``  yes          exponential moving average of per-batch min/max
                                 (``averaging_constant=0.01``)
``histogram_mse``   yes          per tensor: the sub-range of a 2048-bin histogram minimizing the
                                 expected squared quantization error; per channel (weights): a
                                 grid search of the clipping ratio per channel on the observed data
``entropy``         no           TensorRT's KL-divergence threshold on the |x| histogram
``percentile``      no           the ``percentile`` (99.99) of |x| (symmetric) or the low/high
                                 percentiles (affine), read off the histogram
==================  ===========  =============================================================

Common options: ``dtype`` (uint8, int8 or int16; a name such as ``"int8"`` works too), ``symmetric``,
``axis`` (per-channel along that dim; min/max are taken over every other dim), and the integer
range as either ``bits`` (a narrower width stored in ``dtype``: ``bits=4`` with int8 is [-8, 7],
with uint8 [0, 15]) or ``quant_min``/``quant_max``.

Distributed calibration: ``obs.all_reduce_(group)`` combines the statistics of every rank in place
(min by MIN, max by MAX, histograms by SUM after re-binning onto the common range, moving averages
by their mean over the ranks that saw data, stored per-channel samples by concatenation in rank
order with duplicates, e.g. identical weights, kept once), so every rank then computes identical
qparams. Without an initialized ``torch.distributed`` it does nothing.
"""

from __future__ import annotations

import difflib
import inspect
import math
import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from ...ir.qparams import QParams, dtype_range, qparams_from_range

__all__ = [
    "CalibrationError",
    "Observer",
    "MinMaxObserver",
    "MovingAverageObserver",
    "HistogramMSEObserver",
    "EntropyObserver",
    "PercentileObserver",
    "OBSERVERS",
    "make_observer",
]

_DTYPES = (torch.uint8, torch.int8, torch.int16)


class CalibrationError(RuntimeError):
    """Qparams were asked of an observer that never saw a real batch."""


# --------------------------------------------------------------------------------------------
# what counts as real data


def _tracing_modes() -> tuple[type, ...]:
    modes: list[type] = []
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        modes.append(FakeTensorMode)
    except ImportError:  # pragma: no cover
        pass
    try:
        from torch._subclasses.functional_tensor import FunctionalTensorMode

        modes.append(FunctionalTensorMode)
    except ImportError:  # pragma: no cover
        pass
    try:
        from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode

        modes.append(ProxyTorchDispatchMode)
    except ImportError:  # pragma: no cover
        pass
    return tuple(modes)


_TRACING_MODES: tuple[type, ...] | None = None


def _is_real(x: Any) -> bool:
    """True for a tensor holding actual values that is not being traced."""
    global _TRACING_MODES
    if not isinstance(x, torch.Tensor) or x.is_meta:
        return False
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(x):
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    stack = _get_current_dispatch_mode_stack()
    if stack:
        if _TRACING_MODES is None:
            _TRACING_MODES = _tracing_modes()
        if any(isinstance(m, _TRACING_MODES) for m in stack):
            return False
    return True


@torch.compiler.disable
def _record_eagerly(obs: Observer, x: torch.Tensor) -> None:
    obs._record(x)


# --------------------------------------------------------------------------------------------
# option checking


def _resolve_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; observers quantize to uint8, int8 or int16")
        dtype = resolved
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (uint8, int8 or int16), got {type(dtype).__name__}")
    if dtype not in _DTYPES:
        raise ValueError(f"observers quantize to torch.uint8, torch.int8 or torch.int16, not {dtype}")
    return dtype


def _check_int(name: str, value: Any, low: int | None = None, high: int | None = None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {span}, got {value}")


def _check_float(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not (low < value if low_open else low <= value) or not value <= high:
        raise ValueError(f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {value}")
    return value


# --------------------------------------------------------------------------------------------
# histogram helpers (all float64; a histogram is `counts` over `bins` equal bins on [lo, hi])


def _bin_counts(x: torch.Tensor, lo: float, hi: float, bins: int) -> torch.Tensor:
    """Counts of the flat float tensor ``x`` in ``bins`` equal bins on [lo, hi]; values outside land in the end bins."""
    idx = (x - lo).mul_(bins / (hi - lo)).clamp_(0, bins - 1).to(torch.int32)
    return torch.bincount(idx, minlength=bins)


def _cdf(counts: torch.Tensor, lo: float, hi: float, t: torch.Tensor) -> torch.Tensor:
    """Count below ``t``, taking each bin's count as spread uniformly over the bin."""
    bins = counts.numel()
    width = (hi - lo) / bins
    pos = (t.to(torch.float64) - lo) / width
    idx = pos.floor().clamp(0, bins - 1)
    frac = (pos - idx).clamp(0, 1)
    idx = idx.long()
    cum = torch.cumsum(counts, 0) - counts
    return cum[idx] + frac * counts[idx]


def _rebin(counts: torch.Tensor, lo: float, hi: float, new_lo: float, new_hi: float, bins: int) -> torch.Tensor:
    """The histogram on [new_lo, new_hi] with ``bins`` bins (piecewise-uniform density; mass outside is dropped)."""
    edges = torch.linspace(new_lo, new_hi, bins + 1, dtype=torch.float64, device=counts.device)
    return _cdf(counts, lo, hi, edges).diff().clamp_(min=0)


def _abs_histogram(counts: torch.Tensor, lo: float, hi: float, top: float, bins: int) -> torch.Tensor:
    """Histogram of |x| on [0, top], folded from the signed one on [lo, hi]."""
    edges = torch.linspace(0.0, top, bins + 1, dtype=torch.float64, device=counts.device)
    inside = _cdf(counts, lo, hi, edges) - _cdf(counts, lo, hi, -edges)  # mass in [-t, t]
    return inside.diff().clamp_(min=0)


def _quantile(counts: torch.Tensor, lo: float, hi: float, q: float) -> float:
    """The value below which a fraction ``q`` of the histogram's mass lies (linear within the bin)."""
    bins = counts.numel()
    cum = torch.cumsum(counts, 0)
    target = q * float(cum[-1])
    idx = int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype, device=cum.device)).clamp(max=bins - 1))
    inside = float(counts[idx])
    before = float(cum[idx]) - inside
    frac = min(max((target - before) / inside, 0.0), 1.0) if inside > 0 else 1.0
    return lo + (idx + frac) * (hi - lo) / bins


def _sawtooth_sq_integral(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """An antiderivative of (x - s*round(x/s))²: s³ (k/12 + ((f - 1/2)³ + 1/8) / 3), g = x/s + 1/2, k = ⌊g⌋, f = g - k."""
    g = x / s + 0.5
    k = g.floor()
    f = g - k
    return s**3 * (k / 12 + ((f - 0.5) ** 3 + 0.125) / 3)


def _sq_error_integral(u: torch.Tensor, v: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """∫_u^v (x - fake_quant(x))² dx for scale ``s`` and zero point ``z`` (all broadcast together).

    Inside the representable range [s(qmin - z), s(qmax - z)] the error is the rounding sawtooth;
    outside it is the distance to the nearest end (clipping).
    """
    lo_q = s * (qmin - z)
    hi_q = s * (qmax - z)
    a, b = torch.minimum(u, lo_q), torch.minimum(v, lo_q)
    below = ((b - lo_q) ** 3 - (a - lo_q) ** 3) / 3
    a, b = torch.maximum(u, hi_q), torch.maximum(v, hi_q)
    above = ((b - hi_q) ** 3 - (a - hi_q) ** 3) / 3
    a = torch.minimum(torch.maximum(u, lo_q), hi_q)
    b = torch.minimum(torch.maximum(v, lo_q), hi_q)
    inside = _sawtooth_sq_integral(b, s) - _sawtooth_sq_integral(a, s)
    return below + above + inside


def _grid_error_table(counts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What ``_grid_sq_errors`` needs of a histogram, computed once per search (float64).

    In bin units y (bin b is [b, b+1], counts spread uniformly), C(t) = ∫_{y<t} (t - y) dP(y), the
    integral of the cumulative count, is piecewise quadratic: for t = i + f in bin i,
    C(t) = C_i + P_i f + c_i f²/2 with P_i the count left of edge i and C_i = Σ_{b<i} (P_b + c_b/2)
    (sums of non-negative terms, so C is accurate to float64 rounding). Returns
    (c/2, P, C_edge, total, mean bin centre, Σ c (centre - mean)²).
    """
    c = counts.to(torch.float64)
    bins = c.numel()
    p = torch.cumsum(c, 0) - c
    step = p + 0.5 * c
    cum = torch.cumsum(step, 0)
    c_edge = cum - step
    total = cum.new_tensor(float(p[-1] + c[-1]))
    centres = torch.arange(bins, dtype=torch.float64, device=c.device) + 0.5
    mean = (c * centres).sum() / total.clamp(min=1e-300)
    var = (c * (centres - mean) ** 2).sum()
    return 0.5 * c, p, c_edge, total, mean, var


def _grid_sq_errors(
    table: tuple[torch.Tensor, ...], h_lo: float, width: float, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Σ_b (count_b / w) ∫_bin (x - fq(x))² dx for each candidate (``s``, ``z``: [K] float64), as [K].

    The same expected error as integrating ``_sq_error_integral`` over every bin, but in O(levels)
    per candidate instead of O(bins): in bin units, with grid points γ_n = γ_0 + nδ (δ = s/w,
    n = 0..L-1 for the L = qmax - qmin + 1 levels) and rounding thresholds t_j = γ_j + δ/2, the
    error of a value y is (y - γ_{L-1})² - 2δ Σ_j [y < t_j] (t_j - y) (clipping below the grid
    is rounding to γ_0, clipping above is rounding to γ_{L-1}), so

        E = w² ( Σ_b c_b ((b + 1/2 - γ_{L-1})² + 1/12) - 2δ Σ_j C(t_j) )

    with C from ``_grid_error_table`` (linear beyond the top edge: C(B) + total·(t - B)).
    Float64 cancellation costs about 12 L² ε relative (~1e-10 for 8 bits, ~2e-8 for 12 bits);
    for int16's 65536 levels ``_sq_error_integral`` over the bins is both cheaper and exact.
    Chunked so that no op exceeds torch's intra-op grain (32768 elements): multi-threading such
    small ops costs far more than it saves on a busy machine.
    """
    half, p, c_edge, total, mean, var = table
    bins = half.numel()
    levels = qmax - qmin + 1
    delta = s / width  # [K]
    first = (s * (qmin - z) - h_lo) / width  # γ_0, [K]
    last = first + delta * (levels - 1)  # γ_{L-1}
    out = var + total * ((mean - last) ** 2 + 1.0 / 12)
    j = torch.arange(levels - 1, dtype=torch.float64, device=half.device) + 0.5
    chunk = max(1, (1 << 15) // max(1, levels - 1))
    sums = []
    for k in range(0, s.numel(), chunk):
        t = torch.addcmul(first[k : k + chunk, None], delta[k : k + chunk, None], j[None])  # thresholds, [k, L-1]
        beyond = (t - bins).clamp_(min=0).sum(1)
        t.clamp_(0, bins)
        i = t.long().clamp_(max=bins - 1)  # floor (t >= 0); not t.floor(), which goes multi-threaded early
        f = t.sub_(i)
        i = i.view(-1)  # index_select on flat indices: several times faster than p[i]
        # C(t) = C_i + f (P_i + f c_i / 2)
        v = torch.addcmul(p.index_select(0, i).view_as(f), half.index_select(0, i).view_as(f), f)
        v = v.mul_(f).add_(c_edge.index_select(0, i).view_as(f))
        sums.append(v.sum(1) + total * beyond)
    out = out - 2 * delta * torch.cat(sums)
    return out.clamp_(min=0) * (width * width)


# --------------------------------------------------------------------------------------------
# distributed helpers


def _dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _collective_device(group) -> torch.device:
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# the base class


class Observer(nn.Module):
    """Base class: configuration, the identity forward, running min/max, qparams, all-reduce.

    Buffers: ``num_batches`` (real batches seen), ``input_ndim`` (to resolve a negative ``axis``),
    ``min_val``/``max_val`` (0-d per tensor; one value per channel with ``axis``). Subclasses set
    ``kind`` and implement ``_observe(x)`` (x: float32, finite check left to helpers) and
    ``_range()``.
    """

    kind: ClassVar[str] = ""
    per_channel_ok: ClassVar[bool] = True
    _resizable: ClassVar[tuple[str, ...]] = ("min_val", "max_val")

    def __init__(
        self,
        dtype: torch.dtype | str = torch.uint8,
        symmetric: bool = False,
        axis: int | None = None,
        *,
        bits: int | None = None,
        quant_min: int | None = None,
        quant_max: int | None = None,
    ):
        super().__init__()
        dtype = _resolve_dtype(dtype)
        if not isinstance(symmetric, bool):
            raise TypeError(f"symmetric must be True or False, got {symmetric!r}")
        _check_int("axis", axis, allow_none=True)
        if axis is not None and not self.per_channel_ok:
            raise ValueError(
                f"the {self.kind!r} observer is per-tensor only (axis=None); "
                "use 'histogram_mse', 'minmax' or 'moving_average' for per-channel ranges"
            )
        full_min, full_max = dtype_range(dtype)
        if bits is not None:
            if quant_min is not None or quant_max is not None:
                raise ValueError("give either bits or quant_min/quant_max, not both")
            _check_int("bits", bits, 2, dtype.itemsize * 8)
            qmin, qmax = dtype_range(dtype, bits)
        else:
            _check_int("quant_min", quant_min, full_min, full_max, allow_none=True)
            _check_int("quant_max", quant_max, full_min, full_max, allow_none=True)
            qmin = full_min if quant_min is None else quant_min
            qmax = full_max if quant_max is None else quant_max
            if qmin >= qmax:
                raise ValueError(f"quant_min ({qmin}) must be below quant_max ({qmax})")
        self.dtype = dtype
        self.symmetric = symmetric
        self.axis = axis
        self.bits = bits
        self.quant_min = qmin
        self.quant_max = qmax
        self.enabled = True
        self._warned_nonfinite = False
        shape = () if axis is None else (0,)
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.int64))
        self.register_buffer("input_ndim", torch.zeros((), dtype=torch.int64))
        self.register_buffer("min_val", torch.full(shape, math.inf))
        self.register_buffer("max_val", torch.full(shape, -math.inf))

    # ---- public API ------------------------------------------------------------------------

    @property
    def calibrated(self) -> bool:
        """True once at least one real batch was recorded."""
        return int(self.num_batches) > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # torch.compile: record outside the graph (a graph break), on the real tensors;
            # strict export: the observer is the identity
            if not torch.compiler.is_exporting():
                _record_eagerly(self, x)
            return x
        self._record(x)
        return x

    def _record(self, x: torch.Tensor) -> None:
        if not self.enabled or not _is_real(x):
            return
        if not x.is_floating_point():
            raise TypeError(f"{self._label()} observes floating-point tensors, got {x.dtype}")
        if x.numel() == 0:
            return
        # statistics are normal tensors even when calibrating under inference_mode (an inference
        # tensor could not be updated in place later, e.g. by all_reduce_ or a second calibration run)
        with torch.inference_mode(False), torch.no_grad():
            if self.num_batches.device != x.device:
                self.to(x.device)
            v = x.detach()
            if v.dtype != torch.float32:
                v = v.to(torch.float32)
            if self._observe(v):
                self.num_batches += 1
                self.input_ndim.fill_(v.dim())

    def qparams(self) -> QParams:
        """Scale and zero point for the observed data (``CalibrationError`` if none was seen)."""
        if not self.calibrated:
            raise CalibrationError(
                f"{self._label()} has not seen any data, so it has no qparams: run calibration batches through "
                "the prepared model first (e.g. `for x in loader: prepared(x)`, or fxpress.calibrate(prepared, loader))"
            )
        with torch.no_grad():
            lo, hi = self._range()
            return qparams_from_range(
                lo,
                hi,
                self.dtype,
                symmetric=self.symmetric,
                axis=self._resolved_axis(),
                quant_min=self.quant_min,
                quant_max=self.quant_max,
            )

    def all_reduce_(self, group=None) -> Observer:
        """Combine the statistics of all ranks in ``group`` in place; a no-op without torch.distributed."""
        if not _dist_ready():
            return self
        import torch.distributed as dist

        with torch.no_grad():
            device = _collective_device(group)
            channels = -1 if self.axis is None else int(self.min_val.numel())
            meta = torch.tensor([int(self.calibrated), channels, int(self.num_batches), int(self.input_ndim)], dtype=torch.int64, device=device)
            gathered = [torch.empty_like(meta) for _ in range(dist.get_world_size(group))]
            dist.all_gather(gathered, meta, group=group)
            metas = torch.stack(gathered).cpu()
            seen = metas[:, 0] > 0
            if not bool(seen.any()):
                return self
            if self.axis is not None:
                sizes = set(metas[seen, 1].tolist())
                if len(sizes) != 1:
                    raise ValueError(f"{self._label()}: ranks observed different channel counts {sorted(sizes)}")
                channels = sizes.pop()
            self._all_reduce(group, device, metas, channels)
            self.num_batches.fill_(int(metas[:, 2].sum()))
            self.input_ndim.fill_(int(metas[:, 3].max()))
            self._invalidate()
        return self

    def extra_repr(self) -> str:
        parts = [f"kind={self.kind}", f"dtype={self.dtype}", f"symmetric={self.symmetric}"]
        if self.axis is not None:
            parts.append(f"axis={self.axis}")
        if self.bits is not None:
            parts.append(f"bits={self.bits}")
        elif (self.quant_min, self.quant_max) != dtype_range(self.dtype):
            parts.append(f"quant_range=[{self.quant_min}, {self.quant_max}]")
        if self.calibrated and self.min_val.numel():
            lo, hi = float(self.min_val.min()), float(self.max_val.max())
            if self.axis is not None:
                parts.append(f"channels={self.min_val.numel()}")
            parts.append(f"range=[{lo:.6g}, {hi:.6g}]")
        else:
            parts.append("range=None")
        parts.append(f"batches={int(self.num_batches)}")
        return ", ".join(parts)

    @classmethod
    def option_names(cls) -> list[str]:
        """The keyword options ``make_observer`` accepts for this kind."""
        names: list[str] = []
        for klass in reversed(cls.__mro__):
            init = klass.__dict__.get("__init__")
            if init is None or klass is nn.Module or klass is object:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in names:
                    names.append(p.name)
        return names

    # ---- for subclasses ----------------------------------------------------------------------

    def _observe(self, x: torch.Tensor) -> bool:
        raise NotImplementedError

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val

    def _all_reduce(self, group, device: torch.device, metas: torch.Tensor, channels: int) -> None:
        self._reduce_minmax(group, device, channels)

    def _invalidate(self) -> None:
        """Drop anything computed from the buffers (they just changed)."""

    # ---- helpers -----------------------------------------------------------------------------

    def _label(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, dtype={self.dtype}, axis={self.axis})"

    def _channel_axis(self, x: torch.Tensor) -> int:
        axis = self.axis if self.axis >= 0 else self.axis + x.dim()
        if not 0 <= axis < x.dim():
            raise ValueError(f"{self._label()}: axis {self.axis} is out of range for a {x.dim()}-d input of shape {tuple(x.shape)}")
        return axis

    def _resolved_axis(self) -> int | None:
        if self.axis is None or self.axis >= 0:
            return self.axis
        ndim = int(self.input_ndim)
        return self.axis + ndim if ndim else self.axis

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as [channels, -1] (a view when the channel axis is the leading, contiguous one)."""
        axis = self._channel_axis(x)
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)

    def _warn_nonfinite(self) -> None:
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(f"{self._label()} saw NaN or inf values; they are ignored", RuntimeWarning, stacklevel=4)

    def _batch_minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(batch min, batch max, finite data) per tensor or per channel; None if nothing finite is left.

        Per tensor the data comes back flat; per channel in its own shape, with non-finite values
        replaced by 0, which every range contains anyway.
        """
        if self.axis is None:
            lo, hi = torch.aminmax(x)
            if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
                self._warn_nonfinite()
                x = x[torch.isfinite(x)]
                if x.numel() == 0:
                    return None
                lo, hi = torch.aminmax(x)
            return lo, hi, x
        axis = self._channel_axis(x)
        dims = tuple(d for d in range(x.dim()) if d != axis)

        def reduce(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if not dims:  # 1-d: every element is its own channel
                return t.clone(), t.clone()
            return t.amin(dim=dims), t.amax(dim=dims)  # no copy of t, unlike moving the axis first

        lo, hi = reduce(x)
        if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
            self._warn_nonfinite()
            x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
            lo, hi = reduce(x)
        if self.calibrated and lo.numel() != self.min_val.numel():
            raise ValueError(
                f"{self._label()}: input has {lo.numel()} channels along axis {self.axis}, earlier batches had {self.min_val.numel()}"
            )
        return lo, hi, x

    def _update_minmax(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if not self.calibrated:
            self.min_val = lo.clone()
            self.max_val = hi.clone()
        else:
            torch.minimum(self.min_val, lo, out=self.min_val)
            torch.maximum(self.max_val, hi, out=self.max_val)

    def _local_minmax(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.calibrated:
            return self.min_val, self.max_val
        shape = () if self.axis is None else (channels,)
        return torch.full(shape, math.inf, device=self.min_val.device), torch.full(shape, -math.inf, device=self.max_val.device)

    def _reduce_minmax(self, group, device: torch.device, channels: int) -> None:
        import torch.distributed as dist

        lo, hi = self._local_minmax(channels)
        n = lo.numel()
        t = torch.cat([-lo.reshape(-1), hi.reshape(-1)]).to(device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        t = t.to(self.min_val.device)
        self.min_val = (-t[:n]).reshape(lo.shape).clone()
        self.max_val = t[n:].reshape(hi.shape).clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # per-channel buffers get their size from the first batch; take the stored one
        if self.axis is not None:
            for name in self._resizable:
                key = prefix + name
                buf = self._buffers.get(name)
                if buf is not None and key in state_dict and state_dict[key].shape != buf.shape:
                    self._buffers[name] = torch.empty(state_dict[key].shape, dtype=buf.dtype, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._invalidate()


# --------------------------------------------------------------------------------------------
# min/max kinds


class MinMaxObserver(Observer):
    """Running minimum and maximum: ``lo = min over batches of min(x)``, ``hi = max of max(x)``.

    Per channel (``axis``): min/max over every dim but ``axis``. The range covers every observed
    value, so fake quantization never clips: the error is at most scale/2.
    """

    kind = "minmax"

    def _observe(self, x: torch.Tensor) -> bool:
        got = self._batch_minmax(x)
        if got is None:
            return False
        self._update_minmax(got[0], got[1])
        return True


class MovingAverageObserver(Observer):
    """Exponential moving average of per-batch min/max (per tensor or per channel).

    The first batch sets ``lo = min(x_1)``, ``hi = max(x_1)``; then every batch t does
    ``lo += c * (min(x_t) - lo)`` and ``hi += c * (max(x_t) - hi)`` with
    ``c = averaging_constant`` (default 0.01, as torch.ao). ``all_reduce_`` averages ``lo``/``hi``
    over the ranks that saw data.
    """

    kind = "moving_average"

    def __init__(self, dtype=torch.uint8, symmetric=False, axis=None, *, averaging_constant: float = 0.01, **common):
        super().__init__(dtype, symmetric, axis, **common)
        self.averaging_constant = _check_float("averaging_constant", averaging_constant, 0.0, 1.0, low_open=True)

    def _observe(self, x: torch.Tensor) -> bool:
        got = self._batch_minmax(x)
        if got is None:
            return False
        lo, hi, _ = got
        if not self.calibrated:
            self.min_val = lo.clone()
            self.max_val = hi.clone()
        else:
            c = self.averaging_constant
            self.min_val.add_(lo - self.min_val, alpha=c)
            self.max_val.add_(hi - self.max_val, alpha=c)
        return True

    def _all_reduce(self, group, device, metas, channels) -> None:
        import torch.distributed as dist

        if self.calibrated:
            lo, hi, w = self.min_val, self.max_val, 1.0
        else:
            shape = () if self.axis is None else (channels,)
            lo = hi = torch.zeros(shape, device=self.min_val.device)
            w = 0.0
        n = lo.numel()
        t = torch.cat([lo.reshape(-1) * w, hi.reshape(-1) * w]).to(device=device, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        t = (t / int((metas[:, 0] > 0).sum())).to(device=self.min_val.device, dtype=torch.float32)
        self.min_val = t[:n].reshape(lo.shape).clone()
        self.max_val = t[n:].reshape(hi.shape).clone()


# --------------------------------------------------------------------------------------------
# histogram kinds


class _HistogramObserver(Observer):
    """A per-tensor histogram with ``bins`` equal bins (default 2048) on [hist_min, hist_max].

    The first batch sets the range to its [min, max]. When a later batch falls outside, the range
    grows to ``[hist_min - j*w, hist_min - j*w + m*bins*w]`` (w the old bin width, j and m the
    smallest integers that cover the batch), so every old bin lies inside exactly one new bin of
    width m*w and re-binning is exact (old bins i → new bin ⌊(i + j)/m⌋). The new range is at most
    twice as wide as needed, so the data always spans at least half of the bins. The exact
    running min/max are kept as well (``min_val``/``max_val``). Counts are float64.
    """

    per_channel_ok = False

    def __init__(self, dtype=torch.uint8, symmetric=False, axis=None, *, bins: int = 2048, **common):
        super().__init__(dtype, symmetric, axis, **common)
        _check_int("bins", bins, 16, 1 << 20)
        self.bins = bins
        if self.axis is None:
            self.register_buffer("histogram", torch.zeros(bins, dtype=torch.float64))
            self.register_buffer("hist_min", torch.zeros((), dtype=torch.float64))
            self.register_buffer("hist_max", torch.zeros((), dtype=torch.float64))
            self.register_buffer("zeros", torch.zeros((), dtype=torch.float64))

    def _observe(self, x: torch.Tensor) -> bool:
        got = self._batch_minmax(x)
        if got is None:
            return False
        lo_t, hi_t, x = got
        x = x.reshape(-1)
        lo, hi = float(lo_t), float(hi_t)
        if not self.calibrated:
            if hi - lo <= 1e-12 * max(abs(lo), abs(hi), 1.0):  # a constant batch: give the range some width
                hi = lo + max(abs(lo), 1e-6) * 1e-6
            self.hist_min.fill_(lo)
            self.hist_max.fill_(hi)
            self.histogram.zero_()
            self.zeros.zero_()
        elif lo < float(self.hist_min) or hi > float(self.hist_max):
            self._grow(lo, hi)
        self._update_minmax(lo_t, hi_t)
        self.histogram += _bin_counts(x, float(self.hist_min), float(self.hist_max), self.bins)
        self.zeros += torch.count_nonzero(x == 0)
        self._invalidate()
        return True

    def _grow(self, lo: float, hi: float) -> None:
        hmin, hmax, bins = float(self.hist_min), float(self.hist_max), self.bins
        width = (hmax - hmin) / bins
        j = max(0, math.ceil((hmin - lo) / width))
        new_min = hmin - j * width
        m = max(1, math.ceil((max(hi, hmax) - new_min) / (bins * width)))
        while new_min + m * bins * width < hi:  # float safety
            m += 1
        new_max = new_min + m * bins * width
        dev = self.histogram.device
        idx = ((torch.arange(bins, dtype=torch.float64, device=dev) + float(j)) / float(m)).floor().clamp(0, bins - 1).long()
        self.histogram = torch.zeros_like(self.histogram).index_add_(0, idx, self.histogram)
        self.hist_min.fill_(new_min)
        self.hist_max.fill_(new_max)

    def _hist(self) -> tuple[torch.Tensor, float, float]:
        return self.histogram, float(self.hist_min), float(self.hist_max)

    def _hist_without_zeros(self) -> tuple[torch.Tensor, float, float]:
        """The histogram less the values that are exactly 0 (every candidate range represents them exactly)."""
        counts, lo, hi = self._hist()
        zeros = float(self.zeros)
        if zeros > 0 and lo <= 0.0 <= hi:
            counts = counts.clone()
            b = self._zero_bin(lo, hi)
            counts[b] = (counts[b] - zeros).clamp_(min=0)
        return counts, lo, hi

    def _zero_bin(self, lo: float, hi: float) -> int:
        """The bin 0.0 falls in, computed exactly as ``_bin_counts`` does."""
        return int(_bin_counts(torch.zeros(1, device=self.histogram.device), lo, hi, self.bins).argmax())

    def _all_reduce(self, group, device, metas, channels) -> None:
        import torch.distributed as dist

        self._reduce_minmax(group, device, channels)  # exact data min/max
        if self.calibrated:
            span = torch.tensor([-float(self.hist_min), float(self.hist_max)], dtype=torch.float64, device=device)
        else:
            span = torch.tensor([-math.inf, -math.inf], dtype=torch.float64, device=device)
        dist.all_reduce(span, op=dist.ReduceOp.MAX, group=group)
        new_min, new_max = -float(span[0]), float(span[1])
        if self.calibrated:
            counts, lo, hi = self._hist_without_zeros()
            if (lo, hi) == (new_min, new_max):
                mine = counts.clone()
            else:  # proportional: the old range lies inside the new one, so no mass is lost
                mine = _rebin(counts, lo, hi, new_min, new_max, self.bins)
            if lo <= 0.0 <= hi:  # the exact zeros go back whole into the new bin of 0
                mine[self._zero_bin(new_min, new_max)] += float(self.zeros)
        else:
            mine = torch.zeros(self.bins, dtype=torch.float64, device=self.histogram.device)
        zeros = self.zeros.reshape(1) if self.calibrated else torch.zeros(1, dtype=torch.float64)
        mine = torch.cat([mine.to(device), zeros.to(device)])
        dist.all_reduce(mine, op=dist.ReduceOp.SUM, group=group)
        mine = mine.to(self.histogram.device)
        self.histogram = mine[:-1].clone()
        self.zeros.fill_(float(mine[-1]))
        self.hist_min.fill_(new_min)
        self.hist_max.fill_(new_max)


class HistogramMSEObserver(_HistogramObserver):
    """The range that minimizes the expected squared quantization error.

    Per tensor (default): a ``bins``-bin histogram (default 2048, see ``_HistogramObserver``) is taken
    as a piecewise-uniform density p(x). For a candidate range the qparams are those
    ``qparams_from_range`` gives, and the expected error is computed exactly under p:

        E = Σ_bins (count_b / w) ∫_bin (x - fq(x))² dx

    where fq rounds to the grid inside [s(qmin - z), s(qmax - z)] (the sawtooth integrates in closed
    form) and clips outside (error (x - end)²). So both rounding and clipping error count. The
    candidates shrink the range [min(lo, 0), max(hi, 0)] toward 0 by ratios r ∈ (0, 1] (100 linear
    steps of 0.01 plus 16 log-spaced ratios down to 1e-4, for long tails): symmetric uses (-rA, rA)
    with A = max|x|; affine tries both ends shrunk by the same ratio, each end alone, then refines
    around the best pair on a 21×21 local grid (about 800 candidates, evaluated as tensors). Each
    candidate's E is computed exactly, from the histogram's integrated cumulative count at the
    candidate's qmax - qmin rounding thresholds (``_grid_sq_errors``: O(levels), not O(bins), per
    candidate, so 8 bits cost 255 and 4 bits 15 evaluations; beyond 12 bits it integrates over the
    bins). Values that are exactly 0 (ReLU outputs) are counted apart and cost nothing: every range
    represents 0.

    Per channel (``axis`` given, meant for weights, which are constant): the observed tensor is kept
    (as [channels, n] in the ``data`` buffer; an identical tensor observed again, as weights are on
    every calibration batch, is not stored twice; beyond ``max_samples`` elements an evenly strided
    subset of columns is kept) and for each channel the clipping ratio r from ``ratios`` (100) evenly
    spaced values in [``min_ratio`` (0.3), 1] is chosen that minimizes the actual MSE of the
    fake-quantized values with the range (r·min(lo_c, 0), r·max(hi_c, 0)); all channels at once.
    """

    kind = "histogram_mse"
    per_channel_ok = True
    _resizable = ("min_val", "max_val", "data")

    def __init__(
        self,
        dtype=torch.uint8,
        symmetric=False,
        axis=None,
        *,
        bins: int = 2048,
        ratios: int = 100,
        min_ratio: float = 0.3,
        max_samples: int = 1 << 24,
        **common,
    ):
        super().__init__(dtype, symmetric, axis, bins=bins, **common)
        _check_int("ratios", ratios, 1, 10_000)
        self.ratios = ratios
        self.min_ratio = _check_float("min_ratio", min_ratio, 0.0, 1.0, low_open=True)
        _check_int("max_samples", max_samples, 1)
        self.max_samples = max_samples
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.axis is not None:
            self.register_buffer("data", torch.zeros(0, 0))

    # -- observation

    def _observe(self, x: torch.Tensor) -> bool:
        if self.axis is None:
            return super()._observe(x)
        got = self._batch_minmax(x)
        if got is None:
            return False
        lo, hi, x = got
        c = self._channels(x)
        first = not self.calibrated
        self._update_minmax(lo, hi)
        if first or self.data.numel() == 0:
            self.data = c.contiguous().clone()
        elif not (self.data.shape == c.shape and torch.equal(self.data, c)):
            self.data = self._capped(torch.cat([self.data, c], dim=1))
        else:
            return True  # the same constant again: nothing new
        self._invalidate()
        return True

    def _capped(self, data: torch.Tensor) -> torch.Tensor:
        cols = max(1, self.max_samples // max(1, data.shape[0]))
        if data.shape[1] <= cols:
            return data
        keep = torch.linspace(0, data.shape[1] - 1, cols, device=data.device).round().long()
        return data[:, keep].contiguous()

    def _invalidate(self) -> None:
        self._cache = None

    # -- ranges

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None:
            self._cache = self._search_per_channel() if self.axis is not None else self._search_histogram()
        return self._cache

    def _candidate_qparams(self, lo: torch.Tensor, hi: torch.Tensor) -> QParams:
        return qparams_from_range(lo, hi, self.dtype, symmetric=self.symmetric, quant_min=self.quant_min, quant_max=self.quant_max)

    def _search_per_channel(self) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.data.to(torch.float32)
        lo0 = self.min_val.clamp(max=0)
        hi0 = self.max_val.clamp(min=0)
        ratios = torch.linspace(self.min_ratio, 1.0, self.ratios, device=data.device) if self.ratios > 1 else torch.ones(1, device=data.device)
        best_err = torch.full_like(lo0, math.inf)
        best_r = torch.ones_like(lo0)
        chunk = max(1, (1 << 22) // max(1, data.numel()))
        qmin, qmax = self.quant_min, self.quant_max
        for start in range(0, ratios.numel(), chunk):
            r = ratios[start : start + chunk, None]  # [R, 1]
            qp = self._candidate_qparams(r * lo0, r * hi0)  # [R, C]
            s = qp.scale.unsqueeze(-1)
            z = qp.zero_point.to(torch.float32).unsqueeze(-1)
            # round(x/s) + z clamped to [qmin, qmax], minus z again (z is an integer)
            diff = torch.round(data / s).clamp_(qmin - z, qmax - z).mul_(s).sub_(data)
            err = torch.linalg.vector_norm(diff, dim=-1).square_()  # [R, C]; faster than square().sum()
            e, i = err.min(0)
            better = e < best_err  # strict: ties keep the wider range
            best_err = torch.where(better, e, best_err)
            best_r = torch.where(better, r[i, 0], best_r)
        return best_r * lo0, best_r * hi0

    _BASE_RATIOS: ClassVar[torch.Tensor] = torch.cat(
        [torch.logspace(-4, -2, 17, dtype=torch.float64)[:-1], torch.linspace(0.01, 1.0, 100, dtype=torch.float64)]
    )

    def _search_histogram(self) -> tuple[torch.Tensor, torch.Tensor]:
        counts, h_lo, h_hi = self._hist_without_zeros()
        dev = counts.device
        width = (h_hi - h_lo) / self.bins
        lo0 = min(float(self.min_val), 0.0)
        hi0 = max(float(self.max_val), 0.0)
        if self.symmetric:  # candidates (-rA, rA)
            lo0, hi0 = -max(-lo0, hi0), max(-lo0, hi0)
        base = self._BASE_RATIOS.to(dev)
        qmin, qmax = self.quant_min, self.quant_max

        def candidates(r_lo: torch.Tensor, r_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            qp = self._candidate_qparams((r_lo * lo0).to(torch.float32), (r_hi * hi0).to(torch.float32))
            return qp.scale.to(torch.float64), qp.zero_point.to(torch.float64)

        if qmax - qmin < 4096:  # O(levels) per candidate (8 bits: 255 thresholds, not 2048 bins)
            table = _grid_error_table(counts)

            def evaluate(r_lo: torch.Tensor, r_hi: torch.Tensor) -> torch.Tensor:
                s, z = candidates(r_lo, r_hi)
                return _grid_sq_errors(table, h_lo, width, s, z, qmin, qmax)

        else:  # wider integer ranges (int16): integrate over the bins
            nz = counts > 0
            u = (h_lo + width * torch.arange(self.bins, dtype=torch.float64, device=dev))[nz]
            density = counts[nz] / width

            def evaluate(r_lo: torch.Tensor, r_hi: torch.Tensor) -> torch.Tensor:
                s, z = candidates(r_lo, r_hi)
                out = []
                for k in range(0, s.numel(), 128):
                    err = _sq_error_integral(u[None], (u + width)[None], s[k : k + 128, None], z[k : k + 128, None], qmin, qmax)
                    out.append((err * density[None]).sum(1))
                return torch.cat(out)

        def around(r: float) -> tuple[float, float]:
            i = int(torch.searchsorted(base, torch.tensor(r, dtype=torch.float64, device=dev)).clamp(max=base.numel() - 1))
            return float(base[max(i - 1, 0)]), float(base[min(i + 1, base.numel() - 1)])

        ones = torch.ones_like(base)
        if self.symmetric:
            err = evaluate(base, base)
            a, b = around(float(base[int(err.argmin())]))
            fine = torch.linspace(a, b, 41, dtype=torch.float64, device=dev)
            fine_err = evaluate(fine, fine)
            r = float(fine[int(fine_err.argmin())])
            r_lo = r_hi = r
        else:
            r_lo_c = torch.cat([base, ones, base])
            r_hi_c = torch.cat([base, base, ones])
            err = evaluate(r_lo_c, r_hi_c)
            k = int(err.argmin())
            (a0, a1), (b0, b1) = around(float(r_lo_c[k])), around(float(r_hi_c[k]))
            ga = torch.linspace(a0, a1, 21, dtype=torch.float64, device=dev)
            gb = torch.linspace(b0, b1, 21, dtype=torch.float64, device=dev)
            ga, gb = torch.meshgrid(ga, gb, indexing="ij")
            ga, gb = ga.reshape(-1), gb.reshape(-1)
            fine_err = evaluate(ga, gb)
            k2 = int(fine_err.argmin())
            if float(fine_err[k2]) <= float(err[k]):
                r_lo, r_hi = float(ga[k2]), float(gb[k2])
            else:
                r_lo, r_hi = float(r_lo_c[k]), float(r_hi_c[k])
        f32 = dict(dtype=torch.float32, device=self.min_val.device)
        return torch.tensor(r_lo * lo0, **f32), torch.tensor(r_hi * hi0, **f32)

    # -- distributed

    def _all_reduce(self, group, device, metas, channels) -> None:
        if self.axis is None:
            return super()._all_reduce(group, device, metas, channels)
        import torch.distributed as dist

        self._reduce_minmax(group, device, channels)
        local_cols = int(self.data.shape[1]) if self.calibrated and self.data.numel() else 0
        sizes_t = torch.tensor([local_cols], dtype=torch.int64, device=device)
        sizes = [torch.empty_like(sizes_t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(sizes, sizes_t, group=group)
        sizes = [int(t) for t in sizes]
        width = max(sizes)
        pad = torch.zeros(channels, width, device=device)
        if local_cols:
            pad[:, :local_cols] = self.data.to(device)
        pieces = [torch.empty_like(pad) for _ in sizes]
        dist.all_gather(pieces, pad, group=group)
        kept: list[torch.Tensor] = []
        for n, piece in zip(sizes, pieces):
            piece = piece[:, :n]
            if n and not any(k.shape == piece.shape and torch.equal(k, piece) for k in kept):
                kept.append(piece)
        self.data = self._capped(torch.cat(kept, dim=1)).to(self.min_val.device).contiguous()


class EntropyObserver(_HistogramObserver):
    """TensorRT-style entropy calibration: the threshold minimizing KL(P‖Q).

    The histogram (see ``_HistogramObserver``) is re-binned to ``bins`` (2048) bins of |x| on
    [0, max|x|] (signed data; the positive and negative halves folded together) or of x on
    [0, max x] (non-negative, ReLU-like data; mirrored for non-positive data). With
    n = 2^(bits-1) quantization levels for symmetric or signed data (128 for 8 bits) or 2^bits for
    one-sided affine data (256 for uint8; precisely (qmax-qmin+1) or half of it), every threshold
    of i bins, i = n..bins, is scored:

    * P: the first i bins, with the mass of all bins beyond added to bin i-1 (clipped values land on
      the threshold);
    * Q: the first i bins merged into n groups (bin k → group ⌊k·n/i⌋), each group's count spread
      evenly over the group's bins where P is non-zero (zero where P is zero);
    * KL(P‖Q) = Σ P log(P/Q) over P > 0 (both normalized; where P > 0 but Q's group is empty, Q gets
      a count of 1e-4 as in MXNet's/onnxruntime's smoothing, so far outliers can still be clipped).

    Values that are exactly 0 (ReLU outputs) are left out of the histogram first: every threshold
    represents them exactly, and as a spike in bin 0 they would push the threshold down.

    The threshold t = i*·max/bins of the best i gives the range: (-t, t) symmetric,
    (max(min, -t), min(max, t)) affine signed, (0, t) one-sided. All thresholds are scored at once
    from prefix sums (see ``_kl_scores``: O(bins · n), about 10 ms for 2048 bins). Per-tensor only.
    """

    kind = "entropy"

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        counts, h_lo, h_hi = self._hist_without_zeros()
        mn, mx = float(self.min_val), float(self.max_val)
        one_sided = mn >= 0 or mx <= 0
        levels = self.quant_max - self.quant_min + 1
        n = levels // 2 if (self.symmetric or not one_sided) else levels
        if mn >= 0:
            top = mx
            h = _rebin(counts, h_lo, h_hi, 0.0, mx, self.bins) if mx > 0 else None
        elif mx <= 0:
            top = -mn
            h = _rebin(counts, h_lo, h_hi, mn, 0.0, self.bins).flip(0)
        else:
            top = max(-mn, mx)
            h = _abs_histogram(counts, h_lo, h_hi, top, self.bins)
        t = top * _kl_best_bins(h, n) / self.bins if top > 0 else 0.0
        if self.symmetric:
            lo, hi = -t, t
        else:
            lo, hi = max(mn, -t), min(mx, t)
        f32 = dict(dtype=torch.float32, device=self.min_val.device)
        return torch.tensor(lo, **f32), torch.tensor(hi, **f32)


_KL_EPS = 1e-4  # the count MXNet's and onnxruntime's smooth_distribution give an empty bin


def _kl_scores(h: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(P‖Q) for every threshold of i = n..len(h) bins (see ``EntropyObserver``), as (i, kl).

    Computed per merged group rather than per bin: with T the total, o_i the mass beyond bin i-1,
    S_c the count and Z_c the non-zero bins of P in group c, PG_c = (S_c + [c last] o_i) / T,

        KL_i = Σ_k (P_k/T) log(P_k/T) - Σ_c PG_c log(S_c / (Z_c Σ_{k<i} h_k))

    where the first sum comes from prefix sums of h log h, so all thresholds cost O(bins · n). A
    group where P has mass but Q has none (the clipped values piled onto an empty last bin) gets the
    count 1e-4, as the smoothing in MXNet's and onnxruntime's implementations does; without it,
    far outliers would make every clipping threshold score ∞.
    """
    h = h.to(torch.float64)
    bins = h.numel()
    dev = h.device
    total = float(h.sum())
    i = torch.arange(n, bins + 1, device=dev)  # kept bins
    zero = torch.zeros(1, dtype=torch.float64, device=dev)
    cum = torch.cat([zero, torch.cumsum(h, 0)])  # cum[j] = Σ_{k<j} h_k
    nz = torch.cat([zero, torch.cumsum((h > 0).to(torch.float64), 0)])
    hlogh = torch.cat([zero, torch.cumsum(torch.where(h > 0, h * torch.log(h.clamp_min(1e-300)), 0.0), 0)])
    outside = total - cum[i]
    last = h[i - 1]
    p_last = last + outside
    # Σ P log P, with P_{i-1} = h_{i-1} + o_i
    plogp = hlogh[i - 1] + torch.where(p_last > 0, p_last * torch.log(p_last.clamp_min(1e-300)), 0.0)
    ent = plogp / total - math.log(total)
    c = torch.arange(n + 1, device=dev)
    starts = (c[None] * i[:, None] + n - 1) // n  # [I, n+1]; starts[:, n] == i
    s_c = cum[starts[:, 1:]] - cum[starts[:, :-1]]
    z_c = nz[starts[:, 1:]] - nz[starts[:, :-1]]
    z_c[:, -1] += ((last == 0) & (outside > 0)).to(torch.float64)
    pg = s_c.clone()
    pg[:, -1] += outside
    pg = pg / total
    s_c = torch.where((pg > 0) & (s_c <= 0), _KL_EPS, s_c)  # clipped mass beyond the data: smoothed, not log 0
    q = s_c / (z_c.clamp_min(1) * cum[i][:, None])
    cross = torch.where(pg > 0, pg * torch.log(q), 0.0)
    return i, ent - cross.sum(1)


def _kl_best_bins(h: torch.Tensor, n: int) -> int:
    """The number of leading bins i (n ≤ i ≤ len(h)) whose clipped distribution has the least KL(P‖Q)."""
    bins = h.numel()
    if n >= bins or float(h.sum()) <= 0:
        return bins
    i, kl = _kl_scores(h, n)
    return int(i[int(kl.argmin())])


class PercentileObserver(_HistogramObserver):
    """Clip at a percentile, read off the histogram (not by storing the data).

    Symmetric: t = the ``percentile`` (default 99.99) of |x| (histogram folded at 0), range (-t, t).
    Affine: lo = the (100 - percentile) and hi = the ``percentile`` percentile of x, kept inside the
    observed [min, max]. Within a bin values are taken as uniformly spread. Per-tensor only.
    """

    kind = "percentile"

    def __init__(self, dtype=torch.uint8, symmetric=False, axis=None, *, percentile: float = 99.99, bins: int = 2048, **common):
        super().__init__(dtype, symmetric, axis, bins=bins, **common)
        self.percentile = _check_float("percentile", percentile, 50.0, 100.0, low_open=True)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        counts, h_lo, h_hi = self._hist()
        mn, mx = float(self.min_val), float(self.max_val)
        q = self.percentile / 100
        if self.symmetric:
            top = max(-mn, mx)
            t = _quantile(_abs_histogram(counts, h_lo, h_hi, top, self.bins), 0.0, top, q) if top > 0 else 0.0
            lo, hi = -t, t
        else:
            lo = max(_quantile(counts, h_lo, h_hi, 1 - q), mn)
            hi = min(_quantile(counts, h_lo, h_hi, q), mx)
            hi = max(hi, lo)
        f32 = dict(dtype=torch.float32, device=self.min_val.device)
        return torch.tensor(lo, **f32), torch.tensor(hi, **f32)


# --------------------------------------------------------------------------------------------
# registry and factory

OBSERVERS: dict[str, type[Observer]] = {
    cls.kind: cls for cls in (MinMaxObserver, MovingAverageObserver, HistogramMSEObserver, EntropyObserver, PercentileObserver)
}


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def make_observer(kind: str, dtype: torch.dtype | str = torch.uint8, symmetric: bool = False, axis: int | None = None, **options) -> Observer:
    """An observer of ``kind`` (a key of ``OBSERVERS``; ``-`` and ``_`` are interchangeable).

    Raises ValueError for an unknown kind or an out-of-range value, TypeError for an option the
    kind does not take or a value of the wrong type.
    """
    if not isinstance(kind, str):
        raise TypeError(f"observer kind must be a string, one of {sorted(OBSERVERS)}; got {kind!r}")
    key = kind.strip().lower().replace("-", "_")
    cls = OBSERVERS.get(key)
    if cls is None:
        raise ValueError(f"unknown observer kind {kind!r}{_did_you_mean(key, OBSERVERS)}; known kinds: {', '.join(OBSERVERS)}")
    accepted = [n for n in cls.option_names() if n not in ("dtype", "symmetric", "axis", "common")]
    unknown = [name for name in options if name not in accepted]
    if unknown:
        hints = "".join(_did_you_mean(name, accepted) for name in unknown)
        raise TypeError(f"the {key!r} observer takes no option {', '.join(map(repr, unknown))}{hints}; its options: {', '.join(accepted)}")
    return cls(dtype=dtype, symmetric=symmetric, axis=axis, **options)
