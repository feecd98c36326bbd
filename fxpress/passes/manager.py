"""Run a pipeline of passes: order them, verify after each, time them, dump graphs, report.

Ordering: the given order, adjusted by each pass's ``run_after``/``run_before`` and by explicit
``constraints=[("a", "b"), ...]`` ("a before b"), solved as a networkx DAG (a cycle is an error
that names it). The given order is kept except where a constraint moves a pass: a pass's required
predecessors are pulled in just before it, so ``[fold-batch-norm, eliminate-dead-code,
fold-constants]`` runs as ``[fold-constants, fold-batch-norm, eliminate-dead-code]``.

Verification (on by default) after every pass: graph lint, ``meta["val"]`` present and consistent,
and for passes that claim exactness, outputs on the sample inputs within the pass's tolerance of the
outputs before it. A failing pass raises ``PassError`` naming itself and the passes that ran before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import networkx as nx
import torch
import torch.fx as fx

from ..ir.capture import normalize_inputs
from ..ir.mode import enable_train_eval
from ..ir.report import PassReport
from ..ir.verify import VerificationError, compare_outputs, verify_graph
from .base import Pass, get_pass

__all__ = ["PassManager", "PipelineReport", "PassError"]


class PassError(RuntimeError):
    """A pass failed or broke an invariant; the message names it and the passes before it."""


@dataclass
class PipelineReport:
    """The combined report of one pipeline run: one PassReport per pass run, in order."""

    passes: list[PassReport] = field(default_factory=list)
    iterations: int = 1

    def __getitem__(self, name: str) -> PassReport:
        for rep in reversed(self.passes):
            if rep.name == name:
                return rep
        raise KeyError(f"no pass named {name!r} ran; ran: {[r.name for r in self.passes]}")

    def __iter__(self):
        return iter(self.passes)

    @property
    def total_time_s(self) -> float:
        return sum(r.time_s for r in self.passes)

    def table(self) -> str:
        rows = [("pass", "result", "skipped", "time")]
        for r in self.passes:
            rows.append((r.name, r.summary() if r.changed else "no change", str(len(r.skipped)), f"{r.time_s * 1000:.1f} ms"))
        rows.append(("total", "", "", f"{self.total_time_s * 1000:.1f} ms"))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
        out = [line(rows[0]), "  ".join("-" * w for w in widths)]
        out += [line(r) for r in rows[1:]]
        return "\n".join(out)

    def details(self) -> str:
        blocks = []
        for r in self.passes:
            reasons = r.skip_reasons()
            if reasons or r.notes:
                lines = [f"{r.name}:"]
                lines += [f"  skipped {n}x: {why}" for why, n in reasons.most_common()]
                lines += [f"  note: {n}" for n in r.notes]
                blocks.append("\n".join(lines))
        return "\n".join(blocks)

    def __str__(self) -> str:
        details = self.details()
        return self.table() + (f"\n\n{details}" if details else "")


class PassManager:
    """An ordered, verified pipeline of passes.

    passes: names (``"fold-batch-norm"``), ``(name, {options})`` pairs, classes or instances.
    verify: check the IR invariants (and exactness claims, given sample inputs) after every pass.
    dump_dir: write the graph's code after each pass to ``dump_dir/NN-name.py``.
    constraints: extra ``(before, after)`` pairs of pass names.
    max_iterations: rerun the whole pipeline until no pass modifies the graph (at most this often).
    """

    def __init__(
        self,
        passes: Sequence[Any],
        *,
        verify: bool = True,
        dump_dir: str | Path | None = None,
        constraints: Sequence[tuple[str, str]] = (),
        max_iterations: int = 1,
    ):
        built = [get_pass(p[0], **p[1]) if isinstance(p, tuple) else get_pass(p) for p in passes]
        self.passes: list[Pass] = _order(built, constraints)
        self.verify = verify
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        if max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
        self.max_iterations = max_iterations

    def __repr__(self) -> str:
        return f"PassManager([{', '.join(p.name for p in self.passes)}])"

    def run(self, gm: fx.GraphModule, example_inputs: Any = None) -> tuple[fx.GraphModule, PipelineReport]:
        """Run the pipeline on ``gm`` (edited in place) and return it with the combined report.

        example_inputs: sample inputs used to check exactness claims (skipped without them).
        """
        if not isinstance(gm, fx.GraphModule):
            raise TypeError(
                f"PassManager.run takes a captured torch.fx.GraphModule, got {type(gm).__name__}; "
                "capture the model first: gm = fxpress.capture(model, example_inputs)"
            )
        inputs = normalize_inputs(example_inputs) if example_inputs is not None else None
        report = PipelineReport()
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            self._dump(gm, 0, "captured")
        reference = self._outputs(gm, inputs) if self.verify and inputs is not None else None
        step = 0
        for iteration in range(self.max_iterations):
            any_modified = False
            for p in self.passes:
                step += 1
                before = [r.name for r in report.passes]
                start = time.perf_counter()
                try:
                    result = p(gm)
                except Exception as exc:
                    raise PassError(f"pass {p.name!r} failed{_after(before)}: {type(exc).__name__}: {exc}") from exc
                elapsed = time.perf_counter() - start
                gm = result.gm
                result.report.time_s = elapsed
                report.passes.append(result.report)
                any_modified |= result.modified
                if self.dump_dir is not None:
                    self._dump(gm, step, p.name)
                if self.verify and result.modified:
                    self._check(p, gm, inputs, reference, before)
                    if reference is not None and not p.exact:
                        reference = self._outputs(gm, inputs)
            report.iterations = iteration + 1
            if not any_modified:
                break
        return enable_train_eval(gm), report

    @staticmethod
    def _outputs(gm: fx.GraphModule, inputs: tuple) -> Any:
        # A graph may update state when run (train-mode batch-norm statistics, counters): checking
        # a pass must not change the model, so buffers are restored after the sample run.
        # Observers may also replace a buffer by a new tensor (a histogram re-binned wider): the
        # original objects are put back, not just their values.
        saved = [(module, name, b, b.clone()) for module in gm.modules() for name, b in module._buffers.items() if b is not None]
        try:
            with torch.no_grad():
                return gm(*inputs)
        finally:
            with torch.no_grad():
                for module, name, b, copy in saved:
                    module._buffers[name] = b
                    b.copy_(copy)

    def _check(self, p: Pass, gm, inputs, reference, before) -> None:
        try:
            verify_graph(gm)
            if p.exact and reference is not None:
                atol, rtol = p.tolerance
                compare_outputs(reference, self._outputs(gm, inputs), atol=atol, rtol=rtol, what=f"exact pass {p.name!r}")
        except VerificationError as exc:
            raise PassError(f"pass {p.name!r} broke the graph{_after(before)}: {exc}") from exc

    def _dump(self, gm: fx.GraphModule, step: int, name: str) -> None:
        path = self.dump_dir / f"{step:02d}-{name}.py"
        path.write_text(f"# graph after {name}\n{gm.code}\n\n'''\n{_tabular(gm)}\n'''\n")


def _after(before: list[str]) -> str:
    return f" (after {', '.join(before)})" if before else " (first pass)"


def _tabular(gm: fx.GraphModule) -> str:
    rows = []
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        shape = tuple(val.shape) if isinstance(val, torch.Tensor) else ""
        rows.append(f"{n.op:14} {n.name:40} {str(n.target)[:50]:50} {shape}")
    return "\n".join(rows)


def _order(passes: list[Pass], constraints: Sequence[tuple[str, str]]) -> list[Pass]:
    names = [p.name for p in passes]
    dag = nx.DiGraph()
    dag.add_nodes_from(range(len(passes)))
    index: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        index.setdefault(name, []).append(i)
    edges = [(a, b) for p in passes for a, b in [(x, p.name) for x in p.run_after] + [(p.name, x) for x in p.run_before]]
    for a, b in list(constraints):
        for name in (a, b):
            if name not in index:
                raise ValueError(f"ordering constraint names {name!r}, which is not in the pipeline {names}")
        edges.append((a, b))
    for a, b in edges:
        for i in index.get(a, []):
            for j in index.get(b, []):
                if i != j:
                    dag.add_edge(i, j)
    if not nx.is_directed_acyclic_graph(dag):
        edges_in_cycle = nx.find_cycle(dag)
        cycle = " -> ".join([names[i] for i, _ in edges_in_cycle] + [names[edges_in_cycle[0][0]]])
        raise ValueError(f"pass ordering constraints form a cycle: {cycle}")
    # Stable order: walk the passes as given and pull each one's required predecessors in just
    # before it. (A plain lexicographic topological sort would let an unconstrained pass given
    # last, typically a clean-up like eliminate-dead-code, jump ahead of a constrained one.)
    order: list[int] = []
    placed: set[int] = set()

    def place(i: int) -> None:
        if i in placed:
            return
        placed.add(i)
        for j in sorted(dag.predecessors(i)):
            place(j)
        order.append(i)

    for i in range(len(passes)):
        place(i)
    return [passes[i] for i in order]
