"""The report of one compression run: per stage params, MACs, size, latency and accuracy (or SQNR),
per-layer sensitivity, channels kept and ranks chosen; rendered as a terminal table, Markdown, or a
self-contained HTML page with plots.

    result = recipe.apply(model, (x,), calibration=loader)
    print(result.report)                      # terminal table + per-layer summaries
    result.report.to_markdown("report.md")
    result.report.to_html("report.html")      # one file: tables and matplotlib plots as embedded PNGs
    result.report.save("report.json"); CompressionReport.load("report.json")

What the columns mean (each measured on the stage's output graph, see ``Meter``):

- params: distinct parameter elements the graph computes with (``fxpress.ir.cost.count_params``:
  integer weights count, batch-norm statistics do not);
- MACs: multiply-accumulates of one forward pass at the example inputs' batch size
  (``fxpress.ir.cost``);
- size: bytes of every tensor the graph holds (parameters, integer weights, qparams, buffers):
  what a saved model stores apart from its graph (the saved files' real sizes are under "outputs");
- latency: median wall time of one forward pass in PyTorch on the example inputs (a few runs after
  warm-up; quantized graphs emulate int8 in float here, so see the onnxruntime column, measured
  where an ONNX file was exported, for deployment speed);
- accuracy (%) when the run had an ``evaluate`` function, otherwise SQNR (dB) of the outputs
  against the uncompressed model on the evaluation batches (higher is closer; 40 dB is ~1% error).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx

__all__ = ["CompressionReport", "StageRecord", "Meter", "layer_tables"]


@dataclass
class StageRecord:
    """One row of the report: the model after a stage (the first row is the original model)."""

    name: str
    kind: str
    params: int | None = None
    macs: int | None = None  # per sample (ir.cost.macs_per_sample)
    size_bytes: int | None = None
    latency_ms: float | None = None
    ort_latency_ms: float | None = None
    metric: float | None = None
    time_s: float = 0.0
    options: dict = field(default_factory=dict)
    summary: str = ""
    details: str = ""


@dataclass
class CompressionReport:
    """One report per pipeline run (see the module docstring for what is measured)."""

    title: str = "fxpress compression report"
    model: str = ""
    metric_name: str = "SQNR dB"
    stages: list[StageRecord] = field(default_factory=list)
    sensitivity: list[tuple[str, float]] = field(default_factory=list)  # (layer, SQNR dB of that layer alone)
    channels: list[tuple[str, int, int]] = field(default_factory=list)  # (layer, output channels before, after)
    ranks: list[dict] = field(default_factory=list)  # {layer, method, ranks, params_before, params_after, error}
    recipe: dict | None = None
    environment: dict = field(default_factory=dict)
    outputs: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    notes: list[str] = field(default_factory=list)
    created: str = ""

    # ---- data

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CompressionReport":
        data = dict(data)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        for key in unknown:
            data.pop(key)
        stage_fields = {f.name for f in dataclasses.fields(StageRecord)}
        data["stages"] = [StageRecord(**{k: v for k, v in s.items() if k in stage_fields}) for s in data.get("stages", [])]
        data["sensitivity"] = [tuple(x) for x in data.get("sensitivity", [])]
        data["channels"] = [tuple(x) for x in data.get("channels", [])]
        return cls(**data)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, default=_json_default))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CompressionReport":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @property
    def original(self) -> StageRecord | None:
        return self.stages[0] if self.stages else None

    @property
    def final(self) -> StageRecord | None:
        return self.stages[-1] if self.stages else None

    # ---- renderers

    def _rows(self) -> tuple[list[str], list[list[str]]]:
        head = ["stage", "params", "MACs", "size", "latency ms", *(["onnxruntime ms"] if self._has_ort() else []), self.metric_name, "time s"]
        base = self.original
        rows = []
        for s in self.stages:
            row = [
                s.name,
                _with_ratio(s.params, base.params if base else None, _count),
                _with_ratio(s.macs, base.macs if base else None, _count),
                _with_ratio(s.size_bytes, base.size_bytes if base else None, _bytes),
                _num(s.latency_ms, 3),
            ]
            if self._has_ort():
                row.append(_num(s.ort_latency_ms, 3))
            row += [_num(s.metric, 2), f"{s.time_s:.1f}" if s is not base else "-"]
            rows.append(row)
        return head, rows

    def _has_ort(self) -> bool:
        return any(s.ort_latency_ms is not None for s in self.stages)

    def table(self) -> str:
        """The per-stage table, aligned for a terminal."""
        head, rows = self._rows()
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

        def line(row):
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

        return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, rows)])

    def __str__(self) -> str:
        lines = [self.title + (f": {self.model}" if self.model else ""), "", self.table()]
        for s in self.stages[1:]:
            if s.summary:
                lines.append(f"  {s.name}: {s.summary}")
        if self.sensitivity:
            worst = ", ".join(f"{n} {_num(v, 1)} dB" for n, v in self.sensitivity[:5])
            lines += ["", f"most sensitive layers (quantized alone, SQNR): {worst}"]
        if self.channels:
            kept = sum(a for _, _, a in self.channels) / max(sum(b for _, b, _ in self.channels), 1)
            lines += ["", f"channels kept: {kept:.0%} over {len(self.channels)} layers"
                      + "".join(f"\n  {n}: {b} -> {a}" for n, b, a in self.channels[:12])
                      + (f"\n  ... {len(self.channels) - 12} more" if len(self.channels) > 12 else "")]
        if self.ranks:
            lines += ["", f"ranks chosen ({len(self.ranks)} layers decomposed):"]
            lines += [f"  {r['layer']}: {r['method']} rank {r['ranks']}, params {r['params_before']:,} -> {r['params_after']:,}" for r in self.ranks[:12]]
            if len(self.ranks) > 12:
                lines.append(f"  ... {len(self.ranks) - 12} more")
        if self.outputs:
            lines += ["", "outputs: " + ", ".join(f"{k} ({_bytes(v)})" for k, v in self.outputs.items())]
        if self.notes:
            lines += ["", *[f"note: {n}" for n in self.notes]]
        return "\n".join(lines)

    def details(self) -> str:
        """Every stage's own report (what each pass changed, skipped and why)."""
        return "\n\n".join(f"== {s.name} ==\n{s.details}" for s in self.stages[1:] if s.details)

    def to_markdown(self, path: str | os.PathLike | None = None) -> str:
        head, rows = self._rows()
        md = [f"# {self.title}" + (f": `{self.model}`" if self.model else ""), ""]
        md += _md_table(head, rows)
        if any(s.summary for s in self.stages[1:]):
            md += ["", *[f"- **{s.name}**: {s.summary}" for s in self.stages[1:] if s.summary]]
        if self.sensitivity:
            md += ["", "## Per-layer sensitivity", "", "SQNR (dB) of the model output with only this layer quantized (lowest = most sensitive).", ""]
            md += _md_table(["layer", "SQNR dB"], [[n, _num(v, 2)] for n, v in self.sensitivity])
        if self.channels:
            md += ["", "## Channels kept per layer", ""]
            md += _md_table(["layer", "before", "after", "kept"], [[n, str(b), str(a), f"{a / b:.0%}" if b else "-"] for n, b, a in self.channels])
        if self.ranks:
            md += ["", "## Ranks chosen", ""]
            md += _md_table(
                ["layer", "method", "ranks", "params before", "params after", "error"],
                [[r["layer"], r["method"], str(r["ranks"]), f"{r['params_before']:,}", f"{r['params_after']:,}", _num(r.get("error"), 4)] for r in self.ranks],
            )
        md += ["", "## Stage details", ""]
        for s in self.stages[1:]:
            md += [f"### {s.name}", "", "```", s.details or s.summary or "(no report)", "```", ""]
        md += _md_context(self)
        text = "\n".join(md).rstrip() + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    def plots(self) -> dict[str, bytes]:
        """The report's figures as PNG bytes, by title (needs matplotlib)."""
        return _plots(self)

    def to_html(self, path: str | os.PathLike | None = None) -> str:
        """A self-contained HTML page (inline CSS, plots as base64 PNG); written to ``path`` when given."""
        page = _html(self)
        if path is not None:
            Path(path).write_text(page, encoding="utf-8")
        return page


# ---------------------------------------------------------------------------------------------
# formatting helpers


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    return repr(obj)


def _count(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _num(v: float | None, digits: int) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{digits}f}"


def _with_ratio(v: int | None, base: int | None, fmt: Callable[[int], str]) -> str:
    if v is None:
        return "-"
    if base and v != base:
        return f"{fmt(v)} ({v / base:.2f}x)"
    return fmt(v)


def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(map(esc, head)) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return out


def _md_context(rep: CompressionReport) -> list[str]:
    md = []
    if rep.outputs:
        md += ["## Outputs", "", *[f"- `{k}`: {_bytes(v)}" for k, v in rep.outputs.items()], ""]
    if rep.notes:
        md += ["## Notes", "", *[f"- {n}" for n in rep.notes], ""]
    if rep.environment:
        md += ["## Reproduce", "", *[f"- {k}: `{v}`" for k, v in rep.environment.items()], ""]
    if rep.recipe:
        from .recipe import dict_to_toml

        md += ["## Recipe", "", "```toml", dict_to_toml(rep.recipe).rstrip(), "```", ""]
    return md


# ---------------------------------------------------------------------------------------------
# plots


def _plots(rep: CompressionReport) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figs: dict[str, Any] = {}
    names = [s.name for s in rep.stages]
    base = rep.original
    colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]

    if rep.stages and base is not None:
        fig, ax = plt.subplots(figsize=(7.5, 3.4))
        series = [("params", "params"), ("MACs", "macs"), ("size", "size_bytes")]
        width = 0.8 / len(series)
        for i, (label, attr) in enumerate(series):
            b = getattr(base, attr) or 0
            vals = [100.0 * (getattr(s, attr) or 0) / b if b else 0.0 for s in rep.stages]
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
            bars = ax.bar(xs, vals, width, label=label, color=colors[i])
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
        ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
        ax.set_ylabel("% of original")
        ax.set_title("Size and cost after each stage")
        ax.legend(fontsize=8, loc="upper right")
        ax.set_ylim(0, max(115, ax.get_ylim()[1]))
        figs["Size and cost per stage"] = fig

        fig, ax = plt.subplots(figsize=(7.5, 3.0))
        lat = [s.latency_ms or 0.0 for s in rep.stages]
        bars = ax.bar([j - 0.2 if rep._has_ort() else j for j in range(len(names))], lat, 0.4 if rep._has_ort() else 0.6,
                      label="PyTorch", color=colors[0])
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
        if rep._has_ort():
            ort = [s.ort_latency_ms or 0.0 for s in rep.stages]
            bars = ax.bar([j + 0.2 for j in range(len(names))], ort, 0.4, label="onnxruntime", color=colors[1])
            ax.bar_label(bars, labels=[f"{v:.3f}" if v else "" for v in ort], fontsize=7, padding=1)
            ax.legend(fontsize=8)
        shown = [v for v in lat + [s.ort_latency_ms or 0.0 for s in rep.stages] if v > 0]
        if shown and max(shown) / min(shown) > 30:
            ax.set_yscale("log")
        ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
        ax.set_ylabel("ms per call (median)")
        ax.set_title("Latency")
        figs["Latency per stage"] = fig

        metrics = [(n, s.metric) for n, s in zip(names, rep.stages) if s.metric is not None and math.isfinite(s.metric)]
        if metrics:
            fig, ax = plt.subplots(figsize=(7.5, 3.0))
            ax.plot([n for n, _ in metrics], [v for _, v in metrics], marker="o", color=colors[2], linewidth=2)
            for n, v in metrics:
                ax.annotate(f"{v:.2f}", (n, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
            ax.set_ylabel(rep.metric_name)
            ax.set_title(("Accuracy" if "accuracy" in rep.metric_name.lower() else "Output SQNR against the original") + " after each stage")
            ax.tick_params(axis="x", labelsize=8, rotation=15)
            ax.grid(alpha=0.3)
            figs[f"{rep.metric_name} per stage"] = fig

    if rep.sensitivity:
        rows = [(n, v) for n, v in rep.sensitivity if math.isfinite(v)][:30]
        if rows:
            fig, ax = plt.subplots(figsize=(7.5, max(2.0, 0.8 + 0.25 * len(rows))))
            ax.barh([n for n, _ in rows][::-1], [v for _, v in rows][::-1], color=colors[3])
            ax.set_xlabel("output SQNR with only this layer quantized (dB; lower = more sensitive)")
            ax.set_title("Per-layer quantization sensitivity")
            ax.tick_params(axis="y", labelsize=7)
            figs["Per-layer sensitivity"] = fig

    if rep.channels:
        rows = rep.channels[:40]
        fig, ax = plt.subplots(figsize=(7.5, max(2.0, 0.8 + 0.25 * len(rows))))
        labels = [n for n, _, _ in rows][::-1]
        ax.barh(labels, [b for _, b, _ in rows][::-1], color="#cfd8e3", label="before")
        ax.barh(labels, [a for _, _, a in rows][::-1], color=colors[0], label="kept")
        ax.set_xlabel("output channels")
        ax.set_title("Channels kept per layer")
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(fontsize=8, loc="lower right")
        figs["Channels kept per layer"] = fig

    if rep.ranks:
        rows = rep.ranks[:40]
        fig, ax = plt.subplots(figsize=(7.5, max(2.0, 0.8 + 0.25 * len(rows))))
        labels = [r["layer"] for r in rows][::-1]
        ax.barh(labels, [r["params_before"] for r in rows][::-1], color="#e3d8cf", label="params before")
        bars = ax.barh(labels, [r["params_after"] for r in rows][::-1], color=colors[1], label="params after")
        ax.bar_label(bars, labels=[f"{r['method']} {r['ranks']}" for r in rows][::-1], fontsize=6, padding=2)
        ax.set_xlabel("parameters")
        ax.set_title("Ranks chosen per layer")
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(fontsize=8, loc="best")
        figs["Ranks chosen per layer"] = fig

    out = {}
    for title, fig in figs.items():
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        out[title] = buf.getvalue()
    return out


# ---------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;color:#222;background:#fafafa}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.15em;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin-top:0}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:16px 0}
.card{background:#fff;border:1px solid #e2e2e2;border-radius:8px;padding:10px 16px;min-width:140px}
.card .v{font-size:1.4em;font-weight:600}.card .k{color:#666;font-size:.85em}
table{border-collapse:collapse;background:#fff;font-size:.9em;margin:8px 0}
th,td{border:1px solid #e2e2e2;padding:4px 10px;text-align:right}th{background:#f0f3f7}
td:first-child,th:first-child{text-align:left}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:14px}
figure{margin:0;background:#fff;border:1px solid #e2e2e2;border-radius:8px;padding:8px}
figure img{width:100%;height:auto}figcaption{color:#555;font-size:.85em;text-align:center}
pre{background:#fff;border:1px solid #e2e2e2;padding:10px;overflow-x:auto;font-size:.8em}
details{margin:6px 0}summary{cursor:pointer;font-weight:600}
"""


def _html_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    e = html.escape
    out = ["<table><thead><tr>", *[f"<th>{e(str(h))}</th>" for h in head], "</tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _cards(rep: CompressionReport) -> str:
    base, last = rep.original, rep.final
    if base is None or last is None or base is last:
        return ""
    cards = []
    for label, attr in (("params", "params"), ("MACs", "macs"), ("size", "size_bytes")):
        b, a = getattr(base, attr), getattr(last, attr)
        if b and a is not None:
            cards.append((f"{b / a:.2f}x smaller" if a < b else f"{a / b:.2f}x", label))
    if base.ort_latency_ms and last.ort_latency_ms:
        cards.append((f"{last.ort_latency_ms:.3f} ms", f"onnxruntime latency (was {base.ort_latency_ms:.3f})"))
    elif base.latency_ms and last.latency_ms:
        cards.append((f"{last.latency_ms:.2f} ms", f"PyTorch latency (was {base.latency_ms:.2f})"))
    if last.metric is not None:
        was = f" (was {_num(base.metric, 2)})" if base.metric is not None and math.isfinite(base.metric) else ""
        cards.append((_num(last.metric, 2), rep.metric_name + was))
    e = html.escape
    return '<div class="cards">' + "".join(f'<div class="card"><div class="v">{e(v)}</div><div class="k">{e(k)}</div></div>' for v, k in cards) + "</div>"


def _html(rep: CompressionReport) -> str:
    e = html.escape
    head, rows = rep._rows()
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{e(rep.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(rep.title)}</h1>",
        f"<p class='sub'>{e(rep.model)}{' · ' + e(rep.created) if rep.created else ''}</p>",
        _cards(rep),
        "<h2>Stages</h2>",
        _html_table(head, rows),
    ]
    summaries = [(s.name, s.summary) for s in rep.stages[1:] if s.summary]
    if summaries:
        parts.append("<ul>" + "".join(f"<li><b>{e(n)}</b>: {e(t)}</li>" for n, t in summaries) + "</ul>")
    try:
        plots = rep.plots()
    except ImportError as exc:  # matplotlib is a dependency, but a broken install must not lose the report
        plots = {}
        parts.append(f"<p><i>No plots: {e(str(exc))}</i></p>")
    if plots:
        parts.append("<h2>Plots</h2><div class='plots'>")
        for title, png in plots.items():
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<figure><img alt='{e(title)}' src='data:image/png;base64,{data}'></figure>")
        parts.append("</div>")
    if rep.sensitivity:
        parts += ["<h2>Per-layer sensitivity</h2>",
                  "<p>Output SQNR with only this layer quantized (its own error, measured against the float graph); lowest first.</p>",
                  _html_table(["layer", "SQNR dB"], [[n, _num(v, 2)] for n, v in rep.sensitivity])]
    if rep.channels:
        parts += ["<h2>Channels kept per layer</h2>",
                  _html_table(["layer", "before", "after", "kept"], [[n, b, a, f"{a / b:.0%}" if b else "-"] for n, b, a in rep.channels])]
    if rep.ranks:
        parts += ["<h2>Ranks chosen</h2>", _html_table(
            ["layer", "method", "ranks", "params before", "params after", "error"],
            [[r["layer"], r["method"], r["ranks"], f"{r['params_before']:,}", f"{r['params_after']:,}", _num(r.get("error"), 4)] for r in rep.ranks])]
    details = [s for s in rep.stages[1:] if s.details]
    if details:
        parts.append("<h2>Stage details</h2>")
        parts += [f"<details><summary>{e(s.name)}</summary><pre>{e(s.details)}</pre></details>" for s in details]
    if rep.outputs:
        parts += ["<h2>Outputs</h2>", _html_table(["file", "size"], [[k, _bytes(v)] for k, v in rep.outputs.items()])]
    if rep.notes:
        parts += ["<h2>Notes</h2><ul>", *[f"<li>{e(n)}</li>" for n in rep.notes], "</ul>"]
    if rep.environment:
        parts += ["<h2>Reproduce</h2>", _html_table(["", ""], [[k, v] for k, v in rep.environment.items()])]
    if rep.recipe:
        from .recipe import dict_to_toml

        parts += ["<h2>Recipe</h2>", f"<pre>{e(dict_to_toml(rep.recipe))}</pre>"]
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# measuring


def _is_graph(model: Any) -> bool:
    return isinstance(model, fx.GraphModule) and any("val" in n.meta for n in model.graph.nodes)


def _call(model: Callable, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


class Meter:
    """Measures a model for one report row: params, MACs, size, latency, accuracy or SQNR.

    example_inputs: the inputs latency is measured on (and MACs counted at).
    evaluate: ``f(model) -> float`` (e.g. accuracy in %); without it the metric is the SQNR of the
    outputs on ``eval_batches`` against the first model measured (the original).
    latency_runs / latency_budget_s: at most this many timed calls, or this much time.
    """

    def __init__(
        self,
        example_inputs: tuple,
        *,
        evaluate: Callable[[Any], float] | None = None,
        metric_name: str | None = None,
        eval_batches: Sequence[Any] | None = None,
        latency: bool = True,
        latency_runs: int = 30,
        latency_budget_s: float = 1.0,
    ):
        self.example_inputs = tuple(example_inputs)
        self.evaluate = evaluate
        self.metric_name = metric_name or ("accuracy %" if evaluate is not None else "SQNR dB")
        self.eval_batches = list(eval_batches) if eval_batches is not None else [self.example_inputs]
        self.latency = latency
        self.latency_runs = latency_runs
        self.latency_budget_s = latency_budget_s
        self._reference: list[Any] | None = None
        self.notes: list[str] = []

    def _outputs(self, model: Any) -> list[Any]:
        with torch.no_grad():
            return [_call(model, b) for b in self.eval_batches]

    def latency_ms(self, fn: Callable) -> float:
        with torch.no_grad():
            for _ in range(2):
                fn(*self.example_inputs)
            times: list[float] = []
            start = time.perf_counter()
            while len(times) < self.latency_runs and (len(times) < 3 or time.perf_counter() - start < self.latency_budget_s):
                t = time.perf_counter()
                fn(*self.example_inputs)
                times.append(time.perf_counter() - t)
        return statistics.median(times) * 1000

    def measure(self, model: Any, record: StageRecord) -> StageRecord:
        from .ir.cost import count_params, macs_per_sample, param_bytes
        from .passes.quant.debug import sqnr

        record.params = count_params(model)
        record.size_bytes = param_bytes(model, buffers=True)
        record.macs = macs_per_sample(model) if _is_graph(model) else None  # per sample, as `fxpress inspect`
        if self.latency:
            record.latency_ms = self.latency_ms(model)
        if self.evaluate is not None:
            was_training = getattr(model, "training", False)
            model.eval()
            record.metric = float(self.evaluate(model))
            if was_training:
                model.train()
        else:
            if self._reference is None:
                try:
                    outs = self._outputs(model)
                except Exception as exc:  # noqa: BLE001 - e.g. a graph that accepts smaller batches only
                    if self.eval_batches == [self.example_inputs]:
                        raise
                    self.notes.append(f"SQNR measured on the example inputs: the evaluation batches do not run on this model "
                                      f"({str(exc).splitlines()[0][:160]})")
                    self.eval_batches = [self.example_inputs]
                    outs = self._outputs(model)
                self._reference = outs
                record.metric = float("inf")
            else:
                record.metric = sqnr(self._reference, self._outputs(model))
        return record


# ---------------------------------------------------------------------------------------------
# per-layer tables from a stage's result


def layer_tables(gm: Any, kind: str, before: Any = None, eval_batch: Any = None) -> dict[str, Any]:
    """Per-layer information for the report from the graph a stage returned:
    ``channels`` (prune), ``ranks`` (decompose), ``sensitivity`` (quantize, needs ``before``: the
    float graph the stage started from, and ``eval_batch``)."""
    meta = getattr(gm, "meta", {}).get("fxpress", {}) if isinstance(gm, fx.GraphModule) else {}
    out: dict[str, Any] = {}
    if kind == "prune" and "prune_report" in meta:
        rep = meta["prune_report"]
        rows = []
        for c in rep.layers:
            if c.target.endswith("weight") and c.before and c.before[0] != c.after[0] and len(c.before) > 1:
                rows.append((c.target.rpartition(".")[0] or c.target, int(c.before[0]), int(c.after[0])))
        out["channels"] = rows
    if kind == "decompose" and "decompose_report" in meta:
        rep = meta["decompose_report"]
        out["ranks"] = [
            {"layer": r.module or r.node, "method": r.method, "ranks": _rank_text(r.ranks), "params_before": int(r.params_before),
             "params_after": int(r.params_after), "error": r.output_error if r.output_error is not None else r.weight_error}
            for r in rep.decomposed
        ]
    if kind == "quantize" and before is not None and eval_batch is not None:
        out["sensitivity"] = _sensitivity(before, gm, eval_batch)
    return out


def _rank_text(ranks: Any) -> str:
    if isinstance(ranks, (list, tuple)):
        return "x".join(str(r) for r in ranks)
    return str(ranks)


def _sensitivity(before: Any, qgm: fx.GraphModule, batch: Any) -> list[tuple[str, float]]:
    """Each quantized layer's own error: its output SQNR when it alone sees float inputs ("local"
    mode of ``compare_nodes``), named by module path where known; lowest first."""
    from .passes.quant.config import op_kind
    from .passes.quant.debug import compare_nodes

    try:
        rows = compare_nodes(before, qgm, batch, mode="local")
    except Exception as exc:  # noqa: BLE001 - the report must not fail the run; say why it is missing
        return [(f"(not measured: {str(exc).splitlines()[0][:120]})", float("nan"))]
    nodes = {n.name: n for n in qgm.graph.nodes}
    out = []
    for name, db in rows:
        node = nodes.get(name)
        if node is None or op_kind(node) not in ("conv", "conv_transpose", "linear", "matmul"):
            continue
        out.append((_layer_name(node), float(db)))
    return sorted(out, key=lambda r: r[1])


def _layer_name(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            return f"{path} ({node.name})"
    return node.name


def evaluate_batches(data: Iterable, n: int, arity: int) -> list[tuple]:
    """The inputs of the first ``n`` batches (labels after the inputs dropped)."""
    out = []
    for batch in data:
        if len(out) >= n:
            break
        if isinstance(batch, torch.Tensor):
            out.append((batch,))
        elif isinstance(batch, (tuple, list)):
            out.append(tuple(batch[:arity]))
        elif isinstance(batch, dict):
            out.append(batch)
    return out
