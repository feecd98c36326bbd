"""What weight sparsity buys on CPU, measured (printed, not asserted): an MLP dense vs 50 % unstructured
vs 2:4, exported to ONNX and run in onnxruntime, plus the .onnx size raw and gzipped, and fxpress's
global magnitude mask against the peer ``torch.nn.utils.prune.global_unstructured``.

    python benchmarks/sparsity.py [--width 1024] [--layers 4] [--batch 16] [--threads 2] [--rounds 7] [--repeat 20]

Random weights (seed 0). Every model is exported with ``fxpress.export_onnx`` (which checks parity
with torch) and run in a plain ``onnxruntime.InferenceSession`` (CPU, all graph optimizations,
``intra_op_num_threads=--threads``). Latency: ``_measure.interleaved`` (rounds interleave the models,
median over rounds of per-round medians). The expected result, which this script exists to show
rather than assume: latency ratios near 1.0 (onnxruntime's CPU kernels do not skip zeros), the same
raw file size, a smaller gzipped file. A second dense session ("dense (control)") shows how far two
identical models differ on this machine: read the sparse rows against it, not against 1.0.
"""

from __future__ import annotations

import argparse
import gzip
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import fxpress
from _measure import interleaved


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})


def _mlp(width: int, layers: int) -> nn.Module:
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*mods, nn.Linear(width, 10)).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = _mlp(args.width, args.layers)
    x = torch.randn(args.batch, args.width)
    print(f"load average before: {os.getloadavg()}")

    # peer check: one global magnitude threshold, fxpress vs torch.nn.utils.prune
    import copy

    import torch.nn.utils.prune as tprune

    peer = copy.deepcopy(model)
    linears = [m for m in peer.modules() if isinstance(m, nn.Linear)]
    start = time.perf_counter()
    tprune.global_unstructured([(m, "weight") for m in linears], pruning_method=tprune.L1Unstructured, amount=0.5)
    peer_s = time.perf_counter() - start
    start = time.perf_counter()
    glob = fxpress.sparsify(model, (x,), 0.5, scope="global")
    ours_s = time.perf_counter() - start
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    same = sum(int(((glob.get_submodule(n).weight == 0) == (peer.get_submodule(n).weight == 0)).sum()) for n in names)
    total = sum(model.get_submodule(n).weight.numel() for n in names)
    print(f"global 50% mask agreement with torch.nn.utils.prune: {same / total:.6f} of {total:,} weights "
          f"(fxpress {ours_s:.2f} s incl. capture, torch.nn.utils.prune {peer_s:.2f} s)")

    forms = {
        "dense": fxpress.capture(model, (x,)),
        "50% unstructured": fxpress.sparsify(model, (x,), 0.5),
        "2:4": fxpress.sparsify(model, (x,), pattern="2:4"),
        "dense (control)": fxpress.capture(model, (x,)),  # a second dense session: the noise floor
    }
    runs, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name, gm in forms.items():
            path = Path(tmp) / f"{name.replace(' ', '_').replace('%', '').replace(':', '_')}.onnx"
            fxpress.export_onnx(gm, (x,), path)
            raw = path.stat().st_size
            zipped = len(gzip.compress(path.read_bytes(), compresslevel=6))
            sp = fxpress.sparsity_report(gm).weight_sparsity
            runs[name] = _session(path, args.threads)
            rows.append((name, sp, raw, zipped))
        xn = x.numpy()
        lat = interleaved(runs, xn, args.repeat, args.rounds, warmup=True)
    base = lat["dense"]
    print(f"\nMLP {args.layers}x{args.width}, batch {args.batch}, onnxruntime CPU, {args.threads} threads")
    print(f"{'form':18} {'weights zero':>12} {'onnx KB':>9} {'gzip KB':>9} {'latency ms':>11} {'vs dense':>9}")
    for name, sp, raw, zipped in rows:
        print(f"{name:18} {sp:12.1%} {raw / 1024:9.0f} {zipped / 1024:9.0f} {lat[name]:11.3f} {lat[name] / base:9.2f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
