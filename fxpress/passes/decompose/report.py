"""The report ``fxpress.decompose`` attaches to its result: per layer, what was done or why not."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...ir.report import SizeRatios
from .common import LayerRecord, format_ranks

__all__ = ["DecomposeReport"]


def _count(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


@dataclass
class DecomposeReport(SizeRatios):
    method: str
    rule: str  # "budget params<=0.5", "rank 0.5", "energy 0.95", ...
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    layers: list[LayerRecord] = field(default_factory=list)
    budget: dict[str, float] | None = None
    budget_met: bool | None = None
    output_error: float | None = None  # end to end, relative, on the calibration (or sample) batches
    error_data: str = ""
    notes: list[str] = field(default_factory=list)
    pipeline: Any = field(default=None, repr=False)
    rounds: int = 1

    @property
    def decomposed(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.status == "decomposed"]

    @property
    def skipped(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.status != "decomposed"]

    def table(self) -> str:
        head = ("layer", "shape", "method", "ranks", "params", "MACs", "weight err", "output err")
        rows = []
        for r in self.decomposed:
            rows.append((
                r.name, r.layer, r.method, format_ranks(r.ranks),
                f"{_count(r.params_before)} -> {_count(r.params_after)}", f"{_count(r.macs_before)} -> {_count(r.macs_after)}",
                f"{r.weight_error:.3f}" if r.weight_error is not None else "-",
                f"{r.output_error:.3f}" if r.output_error is not None else "-",
            ))
        if not rows:
            return "  (no layer decomposed)"
        widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
        fmt = lambda row: "  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
        return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)])

    def __str__(self) -> str:
        lines = [
            f"decomposition: method {self.method}, {self.rule}",
            f"  params {self.params_before:,} -> {self.params_after:,} ({self.params_ratio:.3f}x)",
            f"  MACs   {self.macs_before:,} -> {self.macs_after:,} ({self.macs_ratio:.3f}x)",
        ]
        if self.budget:
            what, value = next(iter(self.budget.items()))
            state = "met" if self.budget_met else "NOT met"
            lines.append(f"  budget {what} <= {value:g}: {state}" + (f" (after {self.rounds} planning rounds)" if self.rounds > 1 else ""))
        n_conv = sum(1 for r in self.layers if r.layer.startswith("conv"))
        lines.append(f"  {len(self.decomposed)} of {len(self.layers)} layers decomposed ({n_conv} convolutions, "
                     f"{len(self.layers) - n_conv} linears considered)")
        if self.output_error is not None:
            lines.append(f"  model output relative error {self.output_error:.4f} ({self.error_data})")
        lines.append(self.table())
        if self.skipped:
            lines.append("  left alone:")
            for r in self.skipped[:80]:
                lines.append(f"    {r.name} [{r.layer}]: {r.reason}")
            if len(self.skipped) > 80:
                lines.append(f"    ... {len(self.skipped) - 80} more")
        notes = [f"{r.name}: {n}" for r in self.decomposed for n in r.notes if "activation-aware" not in n]
        lines += [f"  note: {n}" for n in self.notes + notes[:40]]
        return "\n".join(lines)
