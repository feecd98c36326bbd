"""The embedded default: a small CNN trained in seconds on scikit-learn's bundled digits data.

``fxpress demo`` trains it, folds batch norms, quantizes it to int8 (static, calibrated on 16
training batches), exports fp32 and int8 ONNX, checks the accuracy of every form on the held-out
digits, and prints a table of accuracy, size and latency.
Nothing is downloaded: ``sklearn.datasets.load_digits`` ships its 1,797 8x8 images inside the
package.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

__all__ = ["DigitsCNN", "load_digits_tensors", "train_digits_cnn", "fit", "accuracy", "latency_ms", "run_demo", "DemoRow"]


class DigitsCNN(nn.Module):
    """conv-BN-ReLU ×3 with a residual, global pooling and a linear head; ~25k parameters."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
        )
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        x = self.down(x)
        return self.head(x.mean((2, 3)))


def load_digits_tensors(seed: int = 0, test_fraction: float = 0.2):
    """(x_train, y_train, x_test, y_test): 1x8x8 float images scaled to [0, 1], int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the digits demo needs scikit-learn: pip install 'fxpress[demo]'") from exc
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def train_digits_cnn(epochs: int = 8, seed: int = 0, progress: bool = True) -> tuple[DigitsCNN, tuple]:
    """Train DigitsCNN; return (model in eval mode, (x_train, y_train, x_test, y_test))."""
    torch.manual_seed(seed)
    data = load_digits_tensors(seed)
    model = DigitsCNN()
    return fit(model, data[0], data[1], epochs=epochs, lr=3e-3, progress=progress, desc="training DigitsCNN"), data


def fit(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float = 1e-3, batch_size: int = 64,
    progress: bool = True, desc: str = "fine-tuning",
) -> nn.Module:
    """Train ``model`` (an eager module or a captured/compressed fxpress graph) with Adam and cross
    entropy in train mode, the learning rate decaying to zero on a cosine; return it in eval mode."""
    from tqdm.auto import tqdm

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    steps = epochs * -(-len(x) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        model.train()
        order = torch.randperm(len(x))
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def accuracy(fn: Callable, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (fn(x).argmax(1) == y).float().mean().item() * 100


def latency_ms(fn: Callable, x: torch.Tensor, repeat: int = 200) -> float:
    """Median wall time of one call, after warm-up."""
    with torch.no_grad():
        for _ in range(10):
            fn(x)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1000


@dataclass
class DemoRow:
    form: str
    accuracy: float
    size_kb: float
    latency_ms: float
    notes: str = ""


@dataclass
class DemoResult:
    rows: list[DemoRow] = field(default_factory=list)
    pipeline_report: object = None
    quant_report: object = None
    onnx_path: Path | None = None

    def table(self) -> str:
        head = ("form", "accuracy %", "size KB", "latency ms (batch 1)", "notes")
        body = [(r.form, f"{r.accuracy:.2f}", f"{r.size_kb:.1f}", f"{r.latency_ms:.3f}", r.notes) for r in self.rows]
        widths = [max(len(str(row[i])) for row in [head, *body]) for i in range(len(head))]
        fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
        return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, body)])


def _param_kb(module: nn.Module) -> float:
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 1024


def run_demo(out_dir: str | Path = "fxpress-demo", epochs: int = 8, with_compile: bool = False, progress: bool = True) -> DemoResult:
    """Train, compress, export and measure; write ``model.onnx`` and ``report.txt`` to ``out_dir``."""
    from . import PassManager, capture, export_onnx, quant_report, quantize
    from .backends import optimized_op_counts
    from .backends.compile_backend import DEFAULT_PASSES

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a directory for the demo's outputs")
    out.mkdir(parents=True, exist_ok=True)
    model, (x_train, _, x_test, y_test) = train_digits_cnn(epochs=epochs, progress=progress)
    sample = x_test[:1]
    result = DemoResult()
    result.rows.append(DemoRow("eager fp32", accuracy(model, x_test, y_test), _param_kb(model), latency_ms(model, sample)))

    gm = capture(model, (sample,))
    gm, report = PassManager(list(DEFAULT_PASSES), verify=True).run(gm, (sample,))
    result.pipeline_report = report
    result.rows.append(
        DemoRow("fxpress graph", accuracy(gm, x_test, y_test), _param_kb(gm), latency_ms(gm, sample), report["fold-batch-norm"].summary())
    )

    exported = export_onnx(gm, (sample,), out / "model.onnx")
    session = exported.session(intra_op_threads=2)
    result.onnx_path = exported.path
    result.rows.append(
        DemoRow(
            "onnxruntime fp32",
            accuracy(session, x_test, y_test),
            exported.path.stat().st_size / 1024,
            latency_ms(session, sample),
            f"opset {exported.opset}, max |diff| {max(exported.max_abs_diff):.1e}",
        )
    )

    calibration = [x_train[i : i + 32] for i in range(0, 32 * 16, 32)]
    qm = quantize(model, (sample,), calibration=calibration, config="int8_static", progress=progress)
    result.quant_report = quant_report(qm)
    int_kb, float_kb = (b / 1024 for b in result.quant_report.weight_bytes)
    result.rows.append(DemoRow("fxpress int8 graph", accuracy(qm, x_test, y_test), int_kb + float_kb, latency_ms(qm, sample), "Q/DQ emulated in float"))
    exported_q = export_onnx(qm, (sample,), out / "model_int8.onnx", rtol=0.05)
    session_q = exported_q.session(intra_op_threads=2)
    fused = optimized_op_counts(exported_q.path)
    kernels = ", ".join(f"{v} {k}" for k, v in sorted(fused.items()) if k.startswith(("QLinear", "QGemm")))
    result.rows.append(
        DemoRow(
            "onnxruntime int8",
            accuracy(session_q, x_test, y_test),
            exported_q.path.stat().st_size / 1024,
            latency_ms(session_q, sample),
            kernels,
        )
    )
    if with_compile:
        size_kb = {r.form: r.size_kb for r in result.rows}  # the graphs the backend compiles hold these weights
        for form, module, graph_form in (("torch.compile fxpress fp32", model, "fxpress graph"), ("torch.compile fxpress int8", qm, "fxpress int8 graph")):
            compiled = torch.compile(module, backend="fxpress")
            result.rows.append(DemoRow(form, accuracy(compiled, x_test, y_test), size_kb[graph_form], latency_ms(compiled, sample), "inductor"))

    text = f"{result.table()}\n\n{report}\n\n{result.quant_report}\n"
    (out / "report.txt").write_text(text)
    return result
