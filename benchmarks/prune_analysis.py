"""Channel dependency analysis time, fxpress vs Torch-Pruning, side by side in one run (printed, not asserted).

    python benchmarks/prune_analysis.py [--models resnet50 vit_b_16] [--mlp-nodes 14000]
        [--sizes 2000 4000 8000 16000] [--rounds 3] [--width 64] [--hidden 128] [--no-tp] [--prune]

Measured per model in rounds (each round runs every contender once, in rotated order, after a
``gc.collect()``, so load drift and garbage hit all alike; the figure is the median over rounds):

- ``fx analysis``: ``analyze_channels`` + ``.groups`` on the captured ATen graph (what
  ``fxpress.channel_groups`` does after capture);
- ``fx capture+analysis``: ``fxpress.capture`` (torch.export) and then the same;
- ``TP``: Torch-Pruning's ``DependencyGraph().build_dependency(model, example_inputs)`` (its
  tracing, a forward pass with hooks plus a walk of the autograd graph, is part of it) +
  ``list(dg.get_all_groups())``.

The ratio TP / fxpress is given against both fxpress figures: analysis alone (both tools
holding a graph already is not quite the same thing, since TP has no separate capture step) and
capture + analysis (the like-for-like "model in, groups out" figure).

Models: torchvision resnet50 and vit_b_16 at 224x224 (random weights; sample batch 1 and 2:
a graph captured from a batch-1 sample may carry literal 1s where the dynamic batch flows, and when
a rule failed on a dynamic size there fxpress re-propagates the shapes with meta tensors and
analyses again -- vit_b_16 does, resnet50 does not), and the synthetic
residual MLP of Torch-Pruning's scaling measurement (shared/anchors/pruning.md: ``get_all_groups``
1.15 s at 3.6k nodes, 4.7 s at 7.2k and 21.6 s at 14.3k, i.e. super-linear):
``x = x + fc2(relu(fc1(x)))`` repeated, 8 ATen nodes per block, blocks added until the captured
graph has about ``--mlp-nodes`` nodes. The scaling series runs the same MLP at ``--sizes`` nodes
and prints each tool's time per node and its growth per doubling (``log2(t(2n) / t(n))``:
1.0 is linear, 2.0 quadratic). ``--prune`` also times ``fxpress.prune(ratio=0.5)`` on the
``--mlp-nodes`` graph.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import time
import warnings

import torch
import torch.nn as nn

from fxpress.ir.capture import capture
from fxpress.ir.channels import analyze_channels



class Block(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class ResidualMLP(nn.Module):
    def __init__(self, blocks: int, width: int, hidden: int):
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.blocks = nn.Sequential(*[Block(width, hidden) for _ in range(blocks)])
        self.out = nn.Linear(width, 10)

    def forward(self, x):
        return self.out(self.blocks(self.inp(x)))


def _fx_analysis(gm):
    an = analyze_channels(gm)
    return an, an.groups


def _rounds(fns: dict, rounds: int) -> dict:
    """Median seconds of each one-shot call over ``rounds`` rounds; every round calls every function
    once, in an order rotated each round, after a ``gc.collect()`` outside the timed region.

    Not ``_measure.interleaved``: these calls take seconds and allocate graphs of 10^4-10^5 Python
    objects; with the previous contender's garbage still on the heap, the collector's full passes
    land in whichever call comes next (seen here as 3-10x outliers for both tools), so the heap is
    cleaned before each call and the order rotated.
    """
    names = list(fns)
    times: dict = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            gc.collect()
            start = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _time_both(model: nn.Module, x: torch.Tensor, rounds: int, use_tp: bool) -> dict:
    """Median seconds over rounds for fxpress (analysis; capture + analysis) and TP."""
    start = time.perf_counter()
    gm = capture(model, (x,))
    first_capture = time.perf_counter() - start
    an, groups = _fx_analysis(gm)
    res = {"nodes": len(gm.graph.nodes), "fx_groups": len(groups), "fx_prunable": len(an.prunable),
           "first_capture_s": first_capture}
    del an, groups
    fns = {
        "fx": lambda: _fx_analysis(gm),
        "fx_cap": lambda: _fx_analysis(capture(model, (x,))),
    }
    if use_tp:
        import torch_pruning as tp

        holder = {}

        def tp_build():
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
            holder["groups"] = len(list(dg.get_all_groups()))
            holder["nodes"] = len(dg.module2node)

        try:
            tp_build()  # once outside the timing: fail early, and count its groups
            res["tp_groups"] = holder["groups"]
            res["tp_nodes"] = holder["nodes"]
            fns["tp"] = tp_build
        except Exception as exc:  # noqa: BLE001
            res["tp_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    res.update(_rounds(fns, rounds))
    return res


def _row(name: str, r: dict) -> str:
    tp_s = r.get("tp")
    tp_txt = f"{tp_s:>8.3f}" if tp_s is not None else f"{'error':>8}"
    ratio_an = f"{tp_s / r['fx']:>7.1f}x" if tp_s is not None else f"{'-':>8}"
    ratio_cap = f"{tp_s / r['fx_cap']:>7.1f}x" if tp_s is not None else f"{'-':>8}"
    groups = f"{r['fx_groups']}/{r['fx_prunable']}/{r.get('tp_groups', '-')}"
    return (f"{name:<18} {r['nodes']:>6} {r.get('tp_nodes', '-'):>6} {r['fx']:>8.3f} {r['fx_cap']:>8.3f} {tp_txt} "
            f"{ratio_an} {ratio_cap}  {groups}")


HEADER = (f"{'model':<18} {'nodes':>6} {'TPnode':>6} {'fx an s':>8} {'fx c+a s':>8} {'TP s':>8} "
          f"{'TP/fx an':>8} {'TP/fx c+a':>8}  groups fx/prunable/TP")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=["resnet50", "vit_b_16"], help="torchvision models at 224x224")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2],
                    help="sample batch sizes for the torchvision models (a batch-1 sample may cost fxpress a "
                         "shape re-propagation and a second analysis, see fxpress/ir/channels.py)")
    ap.add_argument("--mlp-nodes", type=int, default=14000, help="ATen nodes of the residual MLP headline case")
    ap.add_argument("--sizes", type=int, nargs="*", default=[2000, 4000, 8000, 16000], help="scaling series (ATen nodes)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (median taken)")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--no-tp", action="store_true", help="fxpress only")
    ap.add_argument("--prune", action="store_true", help="also time fxpress.prune(ratio=0.5) on the --mlp-nodes graph")
    args = ap.parse_args()
    use_tp = not args.no_tp
    warnings.filterwarnings("ignore", message="Unwrapped parameters detected")  # TP, once per build on vit_b_16
    if use_tp:
        try:
            from importlib.metadata import version

            import torch_pruning  # noqa: F401

            tp_version = version("torch-pruning")
        except ImportError:
            print("torch_pruning not installed (pip install fxpress[bench]): fxpress figures only")
            use_tp = False
    torch.manual_seed(0)
    print(f"load average at the start: {' '.join(f'{v:.2f}' for v in os.getloadavg())} ({os.cpu_count()} cores)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads"
          + (f", torch-pruning {tp_version}" if use_tp else "") + f"; median of {args.rounds} rounds (rotated order, gc.collect() before each call)")
    print("fx an = analyze_channels + groups on the captured graph; fx c+a = capture + the same; "
          "TP = DependencyGraph().build_dependency + get_all_groups")
    print(HEADER)

    import torchvision

    for name in args.models:
        model = getattr(torchvision.models, name)(weights=None).eval()
        for b in args.batches:
            x = torch.randn(b, 3, 224, 224)
            r = _time_both(model, x, args.rounds, use_tp)
            print(_row(f"{name} b{b}", r) + (f"   TP: {r['tp_error']}" if "tp_error" in r else ""), flush=True)

    x = torch.randn(4, args.width)
    headline = None
    if args.mlp_nodes:
        blocks = max(1, args.mlp_nodes // 8)
        model = ResidualMLP(blocks, args.width, args.hidden).eval()
        headline = (model, _time_both(model, x, args.rounds, use_tp))
        print(_row(f"residual MLP x{blocks}", headline[1]) + (f"   TP: {headline[1]['tp_error']}" if "tp_error" in headline[1] else ""), flush=True)

    if args.prune and headline is not None:
        import fxpress.prune_api as api

        gm = capture(headline[0], (x,))
        start = time.perf_counter()
        pruned = api.prune(gm, (x,), ratio=0.5, verify=False)
        t = time.perf_counter() - start
        rep = api.prune_report(pruned)
        print(f"prune(ratio=0.5) on {len(gm.graph.nodes)} nodes: {t:.2f} s; MACs x{rep.macs_ratio:.3f}, params x{rep.params_ratio:.3f}")
        del gm, pruned, rep
    headline = model = None  # the scaling series starts from a clean heap
    gc.collect()

    if args.sizes:
        print()
        print("scaling (residual MLP): seconds, us per ATen node, growth per doubling log2(t(2n)/t(n))")
        print(f"{'blocks':>6} {'nodes':>6} {'fx an s':>8} {'us/node':>7} {'growth':>6} {'fx c+a s':>8} {'growth':>6} "
              f"{'TP s':>8} {'us/node':>7} {'growth':>6} {'TP/fx an':>8} {'TP/fx c+a':>9}")
        prev = None
        for n in args.sizes:
            blocks = max(1, n // 8)
            model = ResidualMLP(blocks, args.width, args.hidden).eval()
            r = _time_both(model, x, args.rounds, use_tp)
            g = {}
            for k in ("fx", "fx_cap", "tp"):
                if prev is not None and r.get(k) and prev.get(k):
                    g[k] = math.log2(r[k] / prev[k]) / math.log2(r["nodes"] / prev["nodes"])
            gtxt = {k: f"{g[k]:>6.2f}" if k in g else f"{'-':>6}" for k in ("fx", "fx_cap", "tp")}
            tp_s = r.get("tp")
            tp_cols = (f"{tp_s:>8.3f} {tp_s / r['nodes'] * 1e6:>7.1f} {gtxt['tp']} {tp_s / r['fx']:>7.1f}x {tp_s / r['fx_cap']:>8.1f}x"
                       if tp_s is not None else f"{'-':>8} {'-':>7} {'-':>6} {'-':>8} {'-':>9}")
            print(f"{blocks:>6} {r['nodes']:>6} {r['fx']:>8.3f} {r['fx'] / r['nodes'] * 1e6:>7.1f} {gtxt['fx']} "
                  f"{r['fx_cap']:>8.3f} {gtxt['fx_cap']} {tp_cols}", flush=True)
            prev = r

    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())} ({os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
