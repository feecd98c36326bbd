"""Measured latency of channel pruning, not just MACs: resnet50 original vs pruned at ratio 0.5 by
fxpress and by Torch-Pruning, all three exported to ONNX and run in onnxruntime (printed, not asserted).

    python benchmarks/prune_latency.py [--model resnet50] [--size 224] [--threads 2] [--rounds 9] [--repeat 10]

Random weights (seed 0), batch 1. fxpress: ``fxpress.prune(model, ratio=0.5, importance="l2",
ignore=["fc"])``. Torch-Pruning: ``MagnitudePruner(MagnitudeImportance(p=2), pruning_ratio=0.5,
ignored_layers=[model.fc])`` on a copy of the same model. All three are exported the same way
(``fxpress.export_onnx``, which checks onnxruntime parity against the torch model) and run in
plain ``onnxruntime.InferenceSession``s with the same options (``intra_op_num_threads=--threads``,
one inter-op thread, all graph optimizations, CPU). Latency: ``_measure.interleaved`` (each round
times every model, so load drift hits all alike; median over rounds of per-round medians).
The load average (``os.getloadavg``) is printed before and after, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

import fxpress
from _measure import interleaved


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})


def _tp_prune(model: torch.nn.Module, x: torch.Tensor, ignored: list) -> tuple[torch.nn.Module, float, float]:
    import torch_pruning as tp

    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(True)
    macs0, params0 = tp.utils.count_ops_and_params(model, x)
    pruner = tp.pruner.MagnitudePruner(model, example_inputs=x, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.5, ignored_layers=[model.get_submodule(n) for n in ignored])
    pruner.step()
    macs1, params1 = tp.utils.count_ops_and_params(model, x)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), macs1 / macs0, params1 / params0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet50", help="torchvision model name")
    ap.add_argument("--ignore", nargs="*", default=["fc"], help="the classifier (kept by both tools)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--round-to", type=int, default=1, help="fxpress round_to (channels kept per group a multiple of it)")
    ap.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    args = ap.parse_args()

    import onnxruntime as ort
    import torchvision

    load_before = os.getloadavg()
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).eval()
    x = torch.randn(1, 3, args.size, args.size)
    xs = (x,)

    pruned = fxpress.prune(model, xs, ratio=0.5, importance="l2", ignore=args.ignore, round_to=args.round_to)
    rep = fxpress.prune_report(pruned)
    models = {"original": (model, 1.0, 1.0), "fxpress 0.5": (pruned, rep.macs_ratio, rep.params_ratio)}
    if not args.no_tp:
        try:
            tp_model, tp_macs, tp_params = _tp_prune(model, x, args.ignore)
            models["Torch-Pruning 0.5"] = (tp_model, tp_macs, tp_params)
        except Exception as exc:  # noqa: BLE001
            print(f"Torch-Pruning failed: {type(exc).__name__}: {exc}")

    fns, diffs = {}, {}
    with tempfile.TemporaryDirectory(prefix="prune-latency-") as d:
        for name, (m, _, _) in models.items():
            path = Path(d) / (name.split()[0] + ".onnx")
            res = fxpress.export_onnx(m, xs, path, atol=1e-3, rtol=1e-3)
            d_ = res.max_abs_diff
            diffs[name] = max(d_) if isinstance(d_, (list, tuple)) else d_
            fns[name] = _session(path, args.threads)
        xn = x.numpy()
        ref = {k: np.asarray(fn(xn)[0]) for k, fn in fns.items()}
        ms = interleaved(fns, xn, args.repeat, args.rounds, warmup=True)
    load_after = os.getloadavg()

    print(f"{args.model}, batch 1, {args.size}x{args.size}, onnxruntime {ort.__version__} CPU, "
          f"{args.threads} intra-op threads, torch {torch.__version__}; median of {args.rounds} interleaved rounds x {args.repeat}")
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f} ({os.cpu_count()} cores)")
    print(f"{'model':<20} {'MACs':>7} {'params':>7} {'latency ms':>10} {'speedup':>8}  ORT parity max|diff|")
    base = ms["original"]
    for name, (_, macs, params) in models.items():
        print(f"{name:<20} {macs:>6.3f}x {params:>6.3f}x {ms[name]:>10.2f} {base / ms[name]:>7.2f}x  "
              f"{diffs[name]:.2e}  out {tuple(ref[name].shape)}")
    if "Torch-Pruning 0.5" in ms:
        print(f"fxpress / Torch-Pruning latency ratio: {ms['fxpress 0.5'] / ms['Torch-Pruning 0.5']:.3f}")


if __name__ == "__main__":
    main()
