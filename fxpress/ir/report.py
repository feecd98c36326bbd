"""What a pass did: the record every pass returns and the pass manager combines into a table."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["PassReport", "SizeRatios"]


@dataclass
class PassReport:
    """Per pass: what changed, what was skipped and why, counters, wall time.

    ``changed`` and ``skipped`` are meant for people: each entry names a node (and its module path)
    so a user can find it. ``counts`` are for programs and tests.
    """

    name: str
    changed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    time_s: float = 0.0

    def change(self, what: str, kind: str = "changed") -> None:
        self.changed.append(what)
        self.counts[kind] += 1

    def skip(self, where: str, why: str) -> None:
        self.skipped.append((where, why))
        self.counts["skipped"] += 1

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def modified(self) -> bool:
        return bool(self.changed)

    def summary(self) -> str:
        parts = [f"{v} {k}" for k, v in self.counts.items() if k != "skipped"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped")
        return ", ".join(parts) if parts else "no change"

    def skip_reasons(self) -> Counter:
        return Counter(why for _, why in self.skipped)

    def __str__(self) -> str:
        lines = [f"{self.name}: {self.summary()} ({self.time_s * 1000:.1f} ms)"]
        lines += [f"  + {c}" for c in self.changed[:50]]
        if len(self.changed) > 50:
            lines.append(f"  + ... {len(self.changed) - 50} more")
        lines += [f"  - skipped {where}: {why}" for where, why in self.skipped[:50]]
        if len(self.skipped) > 50:
            lines.append(f"  - ... {len(self.skipped) - 50} more skipped")
        lines += [f"  * {n}" for n in self.notes]
        return "\n".join(lines)


class SizeRatios:
    """``params_ratio`` and ``macs_ratio`` (after / before) for a report with ``params_before``,
    ``params_after``, ``macs_before`` and ``macs_after``."""

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0
