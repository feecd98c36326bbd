"""What fxpress's plumbing costs, side by side with the plain tools, in one run.

    ./run.sh python benchmarks/backend_overhead.py [--model resnet18] [--repeat 200] [--rounds 5]

1. capture, and capture + default passes (fold-constants, fold-batch-norm, eliminate-dead-code;
   verify off), vs a bare ``torch.export.export`` with the same dynamic batch (and a static one);
2. latency of ``torch.compile(model, backend="fxpress")`` vs ``torch.compile(model)`` (inductor);
3. latency of ``backend="fxpress"`` with ``target="onnxruntime"`` vs a plain onnxruntime
   ``InferenceSession`` on the same ONNX file the fxpress target runs.

Latencies are medians over interleaved rounds (A, B, A, B, ...) so drift on a shared machine hits
both sides alike; the figure that matters is the ratio (target ≤ 1.05: never noticeably slower).
Batch 1, two threads for torch and onnxruntime.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import fxpress
from fxpress.backends import OnnxRuntimeModule, export_onnx
from fxpress.backends.compile_backend import DEFAULT_PASSES
from _measure import interleaved


def _timed(fn, n: int = 3) -> float:
    best = float("inf")
    for _ in range(n):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--repeat", type=int, default=100, help="calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import torchvision

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)

    import torch.fx.experimental._config as fx_config

    def bare_export():  # the same dynamic batch dimension fxpress.capture gives
        with fx_config.patch(backed_size_oblivious=True):
            torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))

    static_s = _timed(lambda: torch.export.export(model, (x,)))
    export_s = _timed(bare_export)
    pipeline = fxpress.PassManager(list(DEFAULT_PASSES), verify=False)
    capture_s = _timed(lambda: fxpress.capture(model, (x,)))
    fx_s = _timed(lambda: pipeline.run(fxpress.capture(model, (x,)), (x,)))

    rows = [
        ("capture vs torch.export, dynamic batch (s)", capture_s, export_s),
        ("capture + passes vs torch.export, dynamic (s)", fx_s, export_s),
        ("capture + passes vs torch.export, static (s)", fx_s, static_s),
    ]
    with torch.no_grad():
        torch._dynamo.reset()
        ours = torch.compile(model, backend="fxpress")
        plain = torch.compile(model)
        ours(x), plain(x)  # compile
        for _ in range(20):
            ours(x), plain(x)
        lat = interleaved({"ours": ours, "plain": plain}, x, args.repeat, args.rounds)
        a, b = lat["ours"], lat["plain"]
        rows.append(("backend=fxpress vs inductor (ms)", a, b))

        ort_compiled = torch.compile(model, backend="fxpress", options={"target": "onnxruntime", "ort_threads": 2})
        ort_compiled(x)
        with tempfile.TemporaryDirectory() as tmp:
            gm, _ = fxpress.PassManager(list(DEFAULT_PASSES)).run(fxpress.capture(model, (x,), dynamic_batch=False), (x,))
            path = export_onnx(gm, (x,), Path(tmp) / "m.onnx", dynamic_batch=False).path
            session = OnnxRuntimeModule(path, intra_op_threads=2)
            for _ in range(20):
                ort_compiled(x), session(x)
            lat = interleaved({"ours": ort_compiled, "plain": session}, x, args.repeat, args.rounds)
            a, b = lat["ours"], lat["plain"]
        rows.append(("target=onnxruntime vs plain ORT session (ms)", a, b))

    print(f"{args.model}, batch 1, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'measure':46} {'fxpress':>10} {'baseline':>10} {'ratio':>7}")
    for name, ours_v, base_v in rows:
        print(f"{name:46} {ours_v:10.3f} {base_v:10.3f} {ours_v / base_v:7.3f}")


if __name__ == "__main__":
    main()
