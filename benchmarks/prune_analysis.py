"""How long the channel dependency analysis takes on a large graph (printed, not asserted).

    python benchmarks/prune_analysis.py [--nodes 14000] [--width 64] [--hidden 128] [--prune]

The model is the synthetic residual MLP of Torch-Pruning's scaling measurement (see
shared/anchors/pruning.md: their ``get_all_groups`` takes 1.15 s at 3.6k nodes, 4.7 s at 7.2k and
21.6 s at 14.3k, i.e. super-linear): ``x = x + fc2(relu(fc1(x)))`` repeated. Blocks are added until
the captured ATen graph has about ``--nodes`` nodes (8 per block). Capture (torch.export) is timed
separately from the analysis; the analysis is run at several sizes to show its scaling. With
``--prune`` the whole ``fxpress.prune`` at ratio 0.5 is timed too. If ``torch_pruning`` is installed
(the optional ``bench`` extra), its ``DependencyGraph`` build on the same eager model is timed alongside.
"""

from __future__ import annotations

import argparse
import time

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


def _time_analysis(gm, repeat: int = 3) -> tuple[float, object]:
    best, an = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        an = analyze_channels(gm)
        _ = an.groups
        best = min(best, time.perf_counter() - start)
    return best, an


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=14000)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0],
                    help="graph sizes to measure, as fractions of --nodes")
    ap.add_argument("--prune", action="store_true", help="also time fxpress.prune(ratio=0.5) on the largest graph")
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(4, args.width)
    print(f"{'nodes':>7} {'blocks':>6} {'capture s':>9} {'analysis s':>10} {'groups':>6} {'prunable':>8}  per node")
    sizes = sorted({max(1, int(args.nodes * f) // 8) for f in args.fractions})
    last = None
    for blocks in sizes:
        model = ResidualMLP(blocks, args.width, args.hidden).eval()
        start = time.perf_counter()
        gm = capture(model, (x,))
        t_capture = time.perf_counter() - start
        t_an, an = _time_analysis(gm)
        n = len(gm.graph.nodes)
        print(f"{n:>7} {blocks:>6} {t_capture:>9.2f} {t_an:>10.3f} {len(an.groups):>6} {len(an.prunable):>8}  {t_an / n * 1e6:.1f} us")
        last = (model, gm)
    model, gm = last
    if args.prune:
        import fxpress.prune_api as api

        start = time.perf_counter()
        pruned = api.prune(gm, (x,), ratio=0.5, verify=False)
        t = time.perf_counter() - start
        rep = api.prune_report(pruned)
        print(f"prune(ratio=0.5) on {len(gm.graph.nodes)} nodes: {t:.2f} s; MACs x{rep.macs_ratio:.3f}, params x{rep.params_ratio:.3f}")
    try:
        import torch_pruning as tp
    except ImportError:
        print("torch_pruning not installed (pip install fxpress[bench]); its measured figure: 21.6 s at 14.3k nodes")
        return
    start = time.perf_counter()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    groups = list(dg.get_all_groups())
    print(f"torch_pruning {tp.__version__}: build + get_all_groups {time.perf_counter() - start:.2f} s, {len(groups)} groups")


if __name__ == "__main__":
    main()
