"""Measurement helpers shared by the benchmark scripts (run them as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import statistics
import time

import torch

from fxpress.passes.quant.debug import sqnr  # noqa: F401  (one SQNR definition for library and benchmarks)


def median_ms(fn, x, repeat: int) -> float:
    """Median wall time of ``fn(x)`` over ``repeat`` calls, in ms."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def interleaved(fns: dict, x, repeat: int, rounds: int, *, warmup: bool = False) -> dict:
    """Median over rounds of each function's median latency. Rounds are interleaved so drift hits all
    alike, and the order rotates each round so no function always runs first (or right after another)."""
    if warmup:
        for fn in fns.values():
            fn(x)
    results = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            results[k].append(median_ms(fns[k], x, repeat))
    return {k: statistics.median(v) for k, v in results.items()}


def outputs(fn, xs) -> torch.Tensor:
    """``fn`` applied to each input, concatenated, without autograd."""
    with torch.no_grad():
        return torch.cat([fn(x) for x in xs])
