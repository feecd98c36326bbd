"""The compression report: terminal table, Markdown, self-contained HTML with plots, JSON round
trip, and the HTML rendered in a real headless browser (Chromium) with a screenshot check."""

import base64
import re
import shutil
import subprocess

import pytest

from fxpress.report import CompressionReport, StageRecord


def _report() -> CompressionReport:
    rep = CompressionReport(model="DigitsCNN", metric_name="accuracy %", created="2025-01-01 00:00:00")
    rep.stages = [
        StageRecord("original", "original", params=38122, macs=1493632, size_bytes=153800, latency_ms=0.35, ort_latency_ms=0.045, metric=99.4),
        StageRecord("prune 0.5", "prune", params=9850, macs=378180, size_bytes=40000, latency_ms=0.22, metric=10.9, time_s=1.2,
                    summary="params 0.26x, MACs 0.25x", details="channel pruning: ratio 0.5 ..."),
        StageRecord("finetune 3 ep", "finetune", params=9850, macs=378180, size_bytes=40000, latency_ms=0.21, metric=97.1, time_s=4.0,
                    summary="3 epochs, final loss 0.12"),
        StageRecord("quantize int8_static", "quantize", params=9860, macs=378180, size_bytes=11100, latency_ms=0.5,
                    ort_latency_ms=0.028, metric=96.9, time_s=3.1, summary="quantized: conv 4/4, linear 1/1, add 1/1",
                    details="conv 4 of 4 quantized | with a pipe <and markup>"),
    ]
    rep.sensitivity = [("block.3 (conv2d_2)", 40.4), ("down.0 (conv2d_3)", 42.0), ("head (linear)", 49.0)]
    rep.channels = [("stem.0", 32, 16), ("block.0", 32, 16), ("down.0", 64, 32)]
    rep.ranks = [{"layer": "down.0", "method": "tucker", "ranks": "16x24", "params_before": 18432, "params_after": 7000, "error": 0.05}]
    rep.recipe = {"recipe": {"name": "cnn-prune-int8", "description": "", "seed": 0},
                  "stage": [{"kind": "prune", "ratio": 0.5}, {"kind": "finetune", "epochs": 3}, {"kind": "quantize", "config": "int8_static"}]}
    rep.environment = {"seed": 0, "fxpress": "0.1.0", "torch": "2.x"}
    rep.outputs = {"model.pt2": 130000, "model.onnx": 53000}
    rep.notes = ["a note"]
    return rep


def test_terminal_table_and_summary():
    text = str(_report())
    lines = text.splitlines()
    head = next(line for line in lines if line.startswith("stage"))
    assert re.split(r"\s{2,}", head) == ["stage", "params", "MACs", "size", "latency ms", "onnxruntime ms", "accuracy %", "time s"]
    row = next(line for line in lines if line.startswith("quantize int8_static"))
    assert "9.86k (0.26x)" in row and "10.8 KiB (0.07x)" in row and "96.90" in row and "0.028" in row
    assert "most sensitive layers" in text and "block.3 (conv2d_2) 40.4 dB" in text
    assert "channels kept: 50% over 3 layers" in text
    assert "down.0: tucker rank 16x24" in text
    assert "model.pt2 (127.0 KiB)" in text


def test_markdown_has_every_section(tmp_path):
    md = _report().to_markdown(tmp_path / "r.md")
    assert (tmp_path / "r.md").read_text() == md
    for heading in ("# fxpress compression report", "## Per-layer sensitivity", "## Channels kept per layer", "## Ranks chosen",
                    "## Stage details", "## Reproduce", "## Recipe"):
        assert heading in md
    assert "| quantize int8_static | 9.86k (0.26x) |" in md
    assert "quantized | with a pipe <and markup>" in md  # stage details sit verbatim in code fences
    assert 'kind = "prune"' in md  # the recipe as TOML


def test_html_is_self_contained_with_embedded_plots(tmp_path):
    page = _report().to_html(tmp_path / "r.html")
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page)  # nothing fetched
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 6  # size/cost, latency, accuracy, sensitivity, channels, ranks
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "&lt;and markup&gt;" in page  # stage text is escaped


def test_json_round_trip(tmp_path):
    rep = _report()
    loaded = CompressionReport.load(rep.save(tmp_path / "r.json"))
    assert loaded == rep


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="no headless browser installed (.ci/run installs Debian's chromium where apt works)")
def test_html_renders_in_a_headless_browser(tmp_path):
    from PIL import Image

    html = tmp_path / "report.html"
    _report().to_html(html)
    shot = tmp_path / "shot.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600",
           html.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-2000:]
    assert shot.stat().st_size > 30_000  # a page of tables and plots, not an empty canvas
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 1600)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200  # anti-aliased text and coloured plots
    # the plots area (below the header, cards and stage table) is not uniform
    plots = image.crop((40, 500, 1160, 1100))
    assert len(plots.getcolors(maxcolors=1 << 20)) > 100
    extrema = plots.getextrema()
    assert all(hi - lo > 100 for lo, hi in extrema)
