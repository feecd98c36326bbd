"""vgg11 decomposed to at most half its MACs, timed in onnxruntime against the original, in one run.

    python benchmarks/decompose_vgg11.py [--size 224] [--budget 0.5] [--threads 2] [--method auto]

torchvision's vgg11 with random weights (nothing can be downloaded here), batch 1. fxpress.decompose
with ``budget={"macs": f}`` (rank search over Tucker-2 / spatial SVD / SVD, ranks rounded to 8), then
(``--fc-rank``) a second call that SVDs the classifier's linears, which a MAC budget leaves alone
but which dominate batch-1 memory traffic (411 MB of weights); all graphs exported with fxpress.export_onnx (parity checked) and run in onnxruntime with
``intra_op_num_threads`` as given; latency is the median over interleaved rounds (benchmarks/_measure.py).
Target (issue 5): <= 0.5 of the MACs runs >= 1.5x faster. ``--objective`` is fxpress's (default
"balanced": among the ranks the MAC plan allows per layer, candidates are timed in eager PyTorch
and traded against error; "error": the plan's lowest-error ranks).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import fxpress
from _measure import interleaved
from fxpress.ir.cost import count_params, total_macs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--method", default="auto")
    ap.add_argument("--objective", default="balanced")
    ap.add_argument("--fc-rank", type=float, default=0.25,
                    help="then also SVD the classifier's linears to this fraction of their params (0: skip)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    import torchvision

    torch.manual_seed(0)
    load_before = open("/proc/loadavg").read().split()[:3]
    model = torchvision.models.vgg11().eval()
    x = torch.randn(1, 3, args.size, args.size)
    t = time.perf_counter()
    gm = fxpress.capture(model, (x,))
    t_capture = time.perf_counter() - t
    t = time.perf_counter()
    small = fxpress.decompose(gm, (x,), args.method, budget={"macs": args.budget}, progress=False, objective=args.objective)
    t_decompose = time.perf_counter() - t
    rep = fxpress.decompose_report(small)
    print(rep)
    print(f"\ncapture {t_capture:.1f} s, decompose {t_decompose:.1f} s (rank search + decompositions)")
    models = {"original": gm, "decomposed": small}
    if args.fc_rank > 0:
        # the MAC budget leaves the classifier alone (1.6% of the MACs), but batch 1 reads its 411 MB of
        # weights on every call: a second, ordinary decompose call on the linears
        t = time.perf_counter()
        fc = fxpress.decompose(small, (x,), "svd", rank=args.fc_rank, progress=False, objective=args.objective)
        print(f"\n+ classifier SVD at rank ratio {args.fc_rank} ({time.perf_counter() - t:.1f} s):")
        print(fxpress.decompose_report(fc).table())
        models["decomposed+fc"] = fc

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        sessions, diffs = {}, []
        for name, m in models.items():
            e = fxpress.export_onnx(m, (x,), Path(tmp) / f"{name}.onnx")
            sessions[name] = e.session(intra_op_threads=args.threads)
            diffs.append(f"{name} {max(e.max_abs_diff):.1e}")
        print(f"\nexport + parity check {time.perf_counter() - t:.1f} s; max |ort - torch|: " + ", ".join(diffs))
        lat = interleaved(sessions, x, args.repeat, args.rounds, warmup=True)

    load_after = open("/proc/loadavg").read().split()[:3]
    print(f"\nvgg11 {args.size}x{args.size}, batch 1, onnxruntime {args.threads} threads, median of {args.rounds} "
          f"interleaved rounds x {args.repeat} (random weights; shared machine, load average {' '.join(load_before)} "
          f"at the start, {' '.join(load_after)} after timing)")
    base_macs, base_ms = total_macs(gm), lat["original"]
    print(f"{'model':14} {'params':>14} {'MACs':>16} {'MACs ratio':>10} {'latency ms':>11} {'speedup':>8}")
    for name, m in models.items():
        macs = total_macs(m)
        print(f"{name:14} {count_params(m):>14,} {macs:>16,} {macs / base_macs:>10.3f} {lat[name]:>11.2f} {base_ms / lat[name]:>7.2f}x")
    for name in [n for n in models if n != "original"]:
        macs_ratio, speedup = total_macs(models[name]) / base_macs, base_ms / lat[name]
        ok = macs_ratio <= args.budget and speedup >= 1.5
        print(f"{name}: MACs ratio {macs_ratio:.3f} (target <= {args.budget}), speedup {speedup:.2f}x (target >= 1.5x): {'MET' if ok else 'NOT MET'}")
    print(f"model output relative error (random weights, example input): decomposed {rep.output_error:.3f}"
          + (f", +fc {fxpress.decompose_report(models['decomposed+fc']).output_error:.3f} (vs decomposed)" if "decomposed+fc" in models else ""))


if __name__ == "__main__":
    main()
