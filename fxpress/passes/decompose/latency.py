"""Cost on the target: measured latency of decomposition candidates, and the rule that weighs it.

Equal parameters do not mean equal speed. On CPU a depthwise convolution whose channel count is not
a multiple of the SIMD width (16 floats with AVX-512) runs about 2x slower than one that is (eager
PyTorch, 64->64 at 56x56: 0.30 ms at 65-72 channels, 0.14 ms at 64 and 0.16 ms at 80); a CP layer
with 3 input channels spends its time expanding them, and can be slower than the convolution it
replaces. A choice by error per parameter alone ignores all of that.

``LatencyModel`` times a candidate as the chain of ops it would emit (``pass.template``: random
factors of the right shapes; the time does not depend on the values), at the layer's input shape
(the captured sample's, batch included), in eager PyTorch with the thread count the caller runs
with, without autograd. The layer itself is timed alongside as the reference. The candidates of
one layer are timed together, in interleaved rounds whose order rotates, and each gets the
**minimum** over its calls: other processes on a shared machine only ever add time, so the minimum
is the stable estimate of what the chain costs (``timeit``'s advice; medians under a load average
of 4 on 2 cores put a chain at 4x its time now and then). Results are cached process-wide by the
chain's signature (op kinds, shapes, strides, padding, dilation, groups, input shape, threads), so
a rank search, the pass after it and later calls do not time a chain twice. Any callable
``latency(layer, {key: ops}) -> {key: ms}`` can stand in for it (another runtime, a cost model).

Where the cores are shared with other processes, multi-threaded timings measure waiting for
preempted threads more than the chain: on this project's 2-core machine at load 1.5, a 3-op Tucker
chain timed 4.2 ms with 2 threads and 0.13 ms with 1 (the plain conv 0.20 ms either way). There,
``latency=LatencyModel(threads=1)`` ranks candidates far more reliably than the caller's count.

``choose(options, objective, ...)``, per layer, among the options that fit (the parameter ratio,
or the cost the budget's plan gave the layer), scores each by its loss ``-log(1 - e^2)`` (what the
budget solver adds up; ``e^2`` while errors are small, unbounded as ``e -> 1``: no speed-up buys
the last of a layer's signal) times its measured latency to a power ``beta``, and takes the lowest:

- ``"error"`` (beta 0): the lowest predicted error (ties: fewer parameters). Nothing is timed.
- ``"balanced"`` (beta 0.14, the default of ``fxpress.decompose``): an exchange rate of "2x faster
  is worth 5% more error" where errors are small (loss ratio 1.05**2 = 2**0.14); a 1.2x faster
  option may have 1.3% more error. Mostly it picks a SIMD-friendly rank next to an odd one of
  nearly the same error, and keeps layers off structures that are slow on the machine (resnet18's
  3-channel 7x7 stem: CP 3.62 ms vs Tucker-2 0.94 ms at the same parameters, for 4.6% less error).
- ``"latency"`` (beta 1): 2x faster is worth 41% more error (loss ratio 2).
- a number: beta itself.

The rule looks at a shortlist: per method, the lowest-error options, the lowest-error ones whose
ranks are multiples of 8 and of 16, and the Pareto-best (error, MACs) options, all with a loss
within ``4**beta`` of the lowest (an option worse than that would have to be over 4x faster). Errors
are the rank search's predicted ones (weight, or whitened-output, truncation errors; for CP the
error of the trial decomposition). Exact options (error 0) tie at score 0 and the fastest wins.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .layers import Layer
from .ops import FactorOp

__all__ = ["LatencyModel", "Option", "choose", "OBJECTIVES", "shortlist", "aligned", "objective_beta", "latency_note", "loss"]

OBJECTIVES: dict[str, float] = {"error": 0.0, "balanced": math.log2(1.05**2), "latency": 1.0}
MAX_SPEEDUP = 4.0  # the shortlist keeps options with a loss within MAX_SPEEDUP**beta of the lowest


def loss(error: float | None) -> float:
    """``-log(1 - e^2)``: what a layer's relative error costs (see budget.py's ``_loss``)."""
    e2 = min(float(error or 0.0) ** 2, 1.0 - 1e-12)
    return -math.log1p(-e2)


_CACHE: dict[tuple, float] = {}


@dataclass(frozen=True)
class Option:
    """One way to decompose a layer: method, rank, its analytic cost and its predicted error."""

    method: str
    rank: Any
    params: int
    macs: int
    error: float | None


def objective_beta(objective: Any) -> float:
    """The latency exponent of an objective name (or a number >= 0 given directly)."""
    if isinstance(objective, str):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(repr(k) for k in OBJECTIVES)} (or a latency exponent >= 0), got {objective!r}")
        return OBJECTIVES[objective]
    if isinstance(objective, bool) or not isinstance(objective, (int, float)) or objective < 0 or not math.isfinite(objective):
        raise ValueError(f"objective must be one of {', '.join(repr(k) for k in OBJECTIVES)} (or a latency exponent >= 0), got {objective!r}")
    return float(objective)


def _op_signature(op: FactorOp) -> tuple:
    out: list[Any] = [type(op).__name__]
    for k, v in vars(op).items():
        if k == "bias_node":
            continue
        if isinstance(v, torch.Tensor):
            out.append((k, tuple(v.shape), str(v.dtype)))
        elif isinstance(v, (list, tuple)):
            out.append((k, tuple(v)))
        else:
            out.append((k, v))
    return tuple(out)


def _layer_ops(layer: Layer) -> list[FactorOp]:
    from .ops import Conv, Linear

    if layer.kind == "linear":
        return [Linear(layer.weight.detach(), layer.bias.detach() if layer.bias is not None else None)]
    return [Conv(layer.weight.detach(), layer.bias.detach() if layer.bias is not None else None, layer.stride,
                 layer.padding if isinstance(layer.padding, str) else list(layer.padding), layer.dilation, layer.groups)]


class LatencyModel:
    """Measured eager latency (ms) of op chains at a layer's input shape; see the module docstring.

    rounds / repeat: interleaved rounds, and calls per round; a chain slower than ``long_ms`` gets
    2 calls per round (each candidate at least ``2 * rounds + 2`` calls; the minimum is kept).
    threads: intra-op threads while timing (default: the caller's count when the model is made).
    """

    def __init__(self, rounds: int = 5, repeat: int = 3, long_ms: float = 30.0, threads: int | None = None):
        self.rounds, self.repeat, self.long_ms = rounds, repeat, long_ms
        self.threads = threads or torch.get_num_threads()
        self.timed = 0  # chains timed (not served from the cache)

    def signature(self, layer: Layer, ops: list[FactorOp]) -> tuple:
        return (tuple(layer.in_shape), str(layer.weight.dtype), self.threads, tuple(_op_signature(op) for op in ops))

    def __call__(self, layer: Layer, chains: dict[Any, list[FactorOp] | None], *, again: bool = False) -> dict[Any, float]:
        """{key: ms} for each chain (``None``: the layer itself). ``again``: time them anew (the
        cache keeps the lower of the two, both being minimums)."""
        chains = {k: (ops if ops is not None else _layer_ops(layer)) for k, ops in chains.items()}
        sigs = {k: self.signature(layer, ops) for k, ops in chains.items()}
        todo: dict[tuple, list[FactorOp]] = {}
        for k, ops in chains.items():
            if again or sigs[k] not in _CACHE:
                todo.setdefault(sigs[k], ops)
        if todo:
            for sig, ms in self._measure(layer, todo).items():
                _CACHE[sig] = min(ms, _CACHE.get(sig, math.inf))
            self.timed += len(todo)
        return {k: _CACHE[sigs[k]] for k in chains}

    def _measure(self, layer: Layer, todo: dict[tuple, list[FactorOp]]) -> dict[tuple, float]:
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            x = torch.randn(layer.in_shape, dtype=layer.weight.dtype)
            fns = {sig: _runner([op.to(dtype=layer.weight.dtype) for op in ops]) for sig, ops in todo.items()}
            with torch.no_grad():
                first = {}
                for sig, fn in fns.items():  # warm-up (allocator, oneDNN primitive caches), and a first time
                    fn(x)
                    t = time.perf_counter()
                    fn(x)
                    first[sig] = (time.perf_counter() - t) * 1000
                times: dict[tuple, list[float]] = {sig: [first[sig]] for sig in fns}
                names = list(fns)
                for r in range(self.rounds):
                    for sig in names[r % len(names):] + names[: r % len(names)]:
                        n = min(2, self.repeat) if first[sig] > self.long_ms else self.repeat
                        for _ in range(n):
                            t = time.perf_counter()
                            fns[sig](x)
                            times[sig].append((time.perf_counter() - t) * 1000)
            return {sig: min(v) for sig, v in times.items()}
        finally:
            torch.set_num_threads(before)


def _runner(ops: list[FactorOp]) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        for op in ops:
            x = op.apply(x)
        return x

    return run


def aligned(rank: Any, multiple: int) -> bool:
    """Every rank a multiple of ``multiple`` (TT's boundary 1s aside)."""
    ranks = rank if isinstance(rank, (tuple, list)) else (rank,)
    inner = [r for r in ranks if r != 1] if len(ranks) > 2 else list(ranks)
    return bool(inner) and all(int(r) % multiple == 0 for r in inner)


def shortlist(options: list, beta: float, per_class: int = 3) -> list:
    """The options ``choose`` times (see the module docstring); ``options`` have .method, .rank,
    .error, .macs, .params."""
    known = [o for o in options if o.error is not None]
    if not known:
        return list(options)
    best = min(loss(o.error) for o in known)
    limit = best * MAX_SPEEDUP**beta + 1e-12
    near = [o for o in known if loss(o.error) <= limit]
    picked: dict[int, Any] = {}
    by_method: dict[str, list] = {}
    for o in near:
        by_method.setdefault(o.method, []).append(o)
    for opts in by_method.values():
        opts = sorted(opts, key=lambda o: (o.error, o.macs))
        classes = [opts, [o for o in opts if aligned(o.rank, 8)], [o for o in opts if aligned(o.rank, 16)]]
        for cls in classes:
            for o in cls[:per_class]:
                picked[id(o)] = o
        front, lowest = [], math.inf  # Pareto-best in (error, MACs): each cheaper than every better one
        for o in opts:
            if o.macs < lowest:
                front.append(o)
                lowest = o.macs
        step = max(1, len(front) // per_class)
        for o in front[::step]:
            picked[id(o)] = o
    return list(picked.values())


def choose(layer: Layer, options: list, objective: str, latency: Callable | None,
           template: Callable[[Any], list[FactorOp] | None]) -> tuple[Any, dict[str, Any]]:
    """(the chosen option, what was measured) for one layer; see the module docstring.
    ``template(option)`` gives the op chain to time (None: cannot be timed)."""
    if not options:
        raise ValueError("no option to choose from")
    by_error = min(options, key=lambda o: (o.error if o.error is not None else math.inf, -o.params))
    beta = objective_beta(objective)
    known = [o for o in options if o.error is not None]
    if beta <= 0 or latency is None or not known:
        return by_error, {}
    cands = shortlist(known, beta)
    if by_error not in cands:
        cands.append(by_error)
    chains = {}
    for i, o in enumerate(cands):
        ops = template(o)
        if ops is not None:
            chains[i] = ops
    if not chains:
        return by_error, {}
    chains["layer"] = None
    ms = latency(layer, chains)

    def score(i: int) -> tuple[float, float]:
        return (loss(cands[i].error) * ms[i] ** beta, ms[i])

    best_i = min((i for i in chains if i != "layer"), key=score)
    low_i = cands.index(by_error) if by_error in cands and cands.index(by_error) in chains else None
    if low_i is not None and best_i != low_i and isinstance(latency, LatencyModel):
        # a choice that gives up error is confirmed by timing the two again, head to head
        ms.update(latency(layer, {best_i: chains[best_i], low_i: chains[low_i]}, again=True))
        best_i = min((i for i in chains if i != "layer"), key=score)
    best = cands[best_i]
    info = {"ms": ms[best_i], "layer_ms": ms["layer"], "timed": len(chains) - 1,
            "by_error": by_error, "by_error_ms": ms.get(cands.index(by_error)) if by_error in cands else None}
    return best, info



def _ranks_text(rank: Any) -> str:
    return "(" + ", ".join(str(r) for r in rank) + ")" if isinstance(rank, (tuple, list)) else str(rank)


def latency_note(objective: Any, best: Any, info: dict[str, Any]) -> str:
    """The report's line on a latency-aware choice."""
    text = (f"objective {objective}: {best.method} {_ranks_text(best.rank)} measured {info['ms']:.3g} ms "
            f"(the layer: {info['layer_ms']:.3g} ms; {info['timed']} candidates timed)")
    low = info.get("by_error")
    if low is not None and low != best:
        ms = info.get("by_error_ms")
        text += (f"; the lowest-error option, {low.method} {_ranks_text(low.rank)} (predicted error {low.error:.3g} vs "
                 f"{best.error:.3g}), measured {ms:.3g} ms" if ms is not None else "")
    return text
