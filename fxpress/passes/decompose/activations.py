"""The inputs the decomposed layers see on calibration (or sample) data.

``collect_inputs(gm, batches, names)`` runs the graph on each batch (no grad) and keeps, per layer:

- a subsample of its inputs (whole images for convolutions, rows for linears) of at most
  ``max_elements`` numbers: what the per-layer output errors are measured on;
- for linears named in ``gram``: ``sum(x^T x)`` over **all** rows of all batches, in float64
  (the statistics of activation-aware SVD; ``rows`` counts them); for those named in ``diag``, only
  its diagonal ``sum(x^2)`` per feature (wide layers, where the full matrix would not fit);
- for convolutions named in ``gram``: the per-pixel input-channel second moment ``sum(x x^T)`` over
  all positions of all batches (``gram``, ``rows`` = positions), what data-aware Tucker-2 and
  spatial SVD whiten with (their output statistics are measured on ``samples``).

Batches are tensors, tuples/lists (inputs first; extra items such as labels are ignored) or dicts
keyed by the graph's input names.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx

__all__ = ["LayerInputs", "collect_inputs", "batch_args"]


@dataclass
class LayerInputs:
    samples: list[torch.Tensor] = field(default_factory=list)
    kept: int = 0  # numbers kept in samples
    gram: torch.Tensor | None = None
    rows: int = 0
    sq: torch.Tensor | None = None  # diag only: per-feature sum of squares

    def sample(self) -> torch.Tensor | None:
        return torch.cat(self.samples) if self.samples else None


def batch_args(gm: fx.GraphModule, batch: Any) -> tuple:
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, dict):
        missing = [k for k in names if k not in batch]
        if missing:
            raise ValueError(f"a dict calibration batch must hold the model inputs {names} by name; missing {missing}")
        return tuple(batch[k] for k in names)
    if isinstance(batch, (list, tuple)):
        return tuple(batch[: len(names)])
    raise TypeError(
        f"a calibration batch must be a tensor, a tuple/list (inputs first; extra items such as labels are "
        f"ignored) or a dict of keyword inputs, got {type(batch).__name__}"
    )


class _Recorder(fx.Interpreter):
    def __init__(self, gm, wanted: dict[str, str], out: dict[str, LayerInputs], max_elements: int, gram: set[str],
                 diag: set[str] = frozenset()):
        super().__init__(gm, garbage_collect_values=True)
        self.wanted, self.out, self.max_elements, self.gram, self.diag = wanted, out, max_elements, gram, diag

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.wanted:
            x = self.env[n.args[0]] if isinstance(n.args[0], fx.Node) else None
            if isinstance(x, torch.Tensor):
                self._record(n.name, self.wanted[n.name], x.detach())
        return super().run_node(n)

    def _record(self, name: str, kind: str, x: torch.Tensor) -> None:
        rec = self.out[name]
        if kind == "linear":
            flat = x.reshape(-1, x.shape[-1])
            if name in self.gram:
                f64 = flat.double()
                g = f64.T @ f64
                rec.gram = g if rec.gram is None else rec.gram + g
                rec.rows += flat.shape[0]
            elif name in self.diag:
                sq = flat.double().pow(2).sum(0)
                rec.sq = sq if rec.sq is None else rec.sq + sq
                rec.rows += flat.shape[0]
            room = (self.max_elements - rec.kept) // max(flat.shape[1], 1)
            if room > 0:
                part = flat[:room].clone()
                rec.samples.append(part)
                rec.kept += part.numel()
        else:
            if name in self.gram:  # per-pixel channel second moment
                pix = x.double().transpose(0, 1).reshape(x.shape[1], -1)
                g = pix @ pix.T
                rec.gram = g if rec.gram is None else rec.gram + g
                rec.rows += pix.shape[1]
            per = x[0].numel() if x.shape[0] else 1
            room = (self.max_elements - rec.kept) // max(per, 1)
            if room <= 0 and rec.kept == 0:
                room = 1  # always keep one sample, however large
            if room > 0:
                part = x[:room].clone()
                rec.samples.append(part)
                rec.kept += part.numel()


def collect_inputs(
    gm: fx.GraphModule,
    batches: Iterable[Any],
    layers: dict[str, str],
    *,
    gram: Iterable[str] = (),
    diag: Iterable[str] = (),
    max_batches: int | None = 8,
    max_elements: int = 1 << 21,
) -> dict[str, LayerInputs]:
    """{node name: LayerInputs} for ``layers`` ({node name: "conv2d" | "linear"}) over ``batches``."""
    out = {name: LayerInputs() for name in layers}
    rec = _Recorder(gm, dict(layers), out, max_elements, set(gram), set(diag))
    seen = 0
    with torch.no_grad():
        for batch in itertools.islice(batches, max_batches):
            rec.run(*batch_args(gm, batch))
            seen += 1
    if seen == 0:
        raise ValueError("the calibration data yielded no batches; give a non-empty DataLoader or list of batches")
    return out
