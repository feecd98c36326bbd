"""The pass interface and the registry that maps kebab-case names to pass classes.

A pass is a class with a ``name``, options as constructor arguments, and
``__call__(gm) -> PassResult(gm, modified, report)``. It keeps no state between calls.
``exact = True`` claims the pass preserves the graph's outputs within ``tolerance`` (atol, rtol);
the pass manager checks that claim on the sample inputs when verification is on.
``run_after`` / ``run_before`` name passes this one must follow or precede when both are scheduled.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from ..ir.report import PassReport

__all__ = ["Pass", "PassResult", "register_pass", "get_pass", "available_passes", "UnknownPassError"]


@dataclass
class PassResult:
    gm: fx.GraphModule
    modified: bool
    report: PassReport


class Pass:
    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    tolerance: ClassVar[tuple[float, float]] = (1e-4, 1e-4)
    run_after: ClassVar[tuple[str, ...]] = ()
    run_before: ClassVar[tuple[str, ...]] = ()

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        report = PassReport(self.name)
        self.run(gm, report)
        return PassResult(gm, report.modified, report)

    def run(self, gm: fx.GraphModule, report: PassReport) -> None:
        """Rewrite ``gm`` in place, recording every change and skip in ``report``."""
        raise NotImplementedError(f"pass {self.name!r} implements neither run() nor __call__()")

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


class UnknownPassError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return self.args[0]


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its ``name``."""
    if not cls.name or cls.name != cls.name.lower() or " " in cls.name:
        raise ValueError(f"pass {cls.__name__} needs a kebab-case name, got {cls.name!r}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two passes are named {cls.name!r}: {_REGISTRY[cls.name].__name__} and {cls.__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def available_passes() -> list[str]:
    return sorted(_REGISTRY)


def get_pass(spec: "str | Pass | type[Pass]", **options) -> Pass:
    """A pass instance from a name (with options), a class, or an instance (returned as is)."""
    if isinstance(spec, Pass):
        if options:
            raise TypeError(f"options {sorted(options)} given for an already built pass {spec.name!r}")
        return spec
    if isinstance(spec, type) and issubclass(spec, Pass):
        cls = spec
    elif isinstance(spec, str):
        cls = _REGISTRY.get(spec)
        if cls is None:
            close = difflib.get_close_matches(spec, _REGISTRY, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownPassError(f"unknown pass {spec!r}.{hint} Known passes: {', '.join(available_passes())}.")
    else:
        raise TypeError(f"a pass is given by name, class or instance, not {type(spec).__name__}")
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as exc:
        raise TypeError(f"bad options for pass {cls.name!r}: {exc}") from None
    return cls(**options)
