"""What the per-call input check of a captured graph costs: torch.export's vs fxpress's vs none.

    ./run.sh python benchmarks/capture_overhead.py [--repeat 300] [--rounds 15] [--out benchmarks/results/capture_overhead.txt]

For each model (the digits CNN of ``fxpress.demo``, torchvision resnet18), at batch 1, one thread,
under ``torch.no_grad()``, the latency of:

  eager           the nn.Module itself
  torch-check     the graph as ``ExportedProgram.module()`` gives it (what ``fxpress.capture``
                  returned before): torch.export's ``_check_input_constraints_pre_hook`` and its
                  two no-op hooks for nn.Module inputs run on every call
  fxpress-check   ``fxpress.capture`` now: fxpress's ``InputCheck`` (fxpress/ir/input_check.py)
  no-check        the same graph with every hook removed (``remove_input_check``)

All four run the same ATen graph except eager. Latencies are medians over interleaved rounds (the
order rotates every round) so drift on a shared machine hits all alike; "overhead" is the
difference to no-check, and the IQR of the round medians says how much of it is noise. The check functions are also timed alone (called directly, 20000 times).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.export._unlift import _check_input_constraints_pre_hook

import fxpress
from fxpress.demo import DigitsCNN
from fxpress.ir.capture import _batch_dynamic_shapes, _export
from fxpress.ir.input_check import input_check_of, remove_input_check
from fxpress.ir.mode import enable_train_eval

sys.path.insert(0, str(Path(__file__).parent))
from _measure import median_ms  # noqa: E402


def torch_checked(model: torch.nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    """The graph as fxpress.capture returned it before its own check: ep.module() with torch's hooks."""
    args = (x,)
    ep = _export(model, args, {}, _batch_dynamic_shapes(model, args, {}), False)
    gm = ep.module(check_guards=False)
    enable_train_eval(gm)
    torch.nn.Module.train(gm, False)
    assert _check_input_constraints_pre_hook in gm._forward_pre_hooks.values()
    return gm


def interleaved_rounds(fns: dict, x, repeat: int, rounds: int) -> dict[str, list[float]]:
    """Each function's median latency (ms) per round; rounds interleaved, the order rotating each round
    (as _measure.interleaved, but keeping every round to show the spread)."""
    for fn in fns.values():
        fn(x)
    results: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            results[k].append(median_ms(fns[k], x, repeat))
    return results


def alone_us(fn, n: int = 20000) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def run_model(name: str, model: torch.nn.Module, x: torch.Tensor, repeat: int, rounds: int) -> list[str]:
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_gm = torch_checked(model, x)
        ours = fxpress.capture(model, (x,))
        bare = remove_input_check(fxpress.capture(model, (x,)))
    assert input_check_of(ours) is not None and not bare._forward_pre_hooks and not bare._forward_hooks
    fns = {"eager": model, "torch-check": torch_gm, "fxpress-check": ours, "no-check": bare}
    with torch.no_grad():
        for fn in fns.values():
            torch.testing.assert_close(fn(x), model(x), atol=1e-4, rtol=1e-4)
        per_round = interleaved_rounds(fns, x, repeat, rounds)
    ms = {k: statistics.median(v) for k, v in per_round.items()}
    iqr = {k: statistics.quantiles(v, n=4)[2] - statistics.quantiles(v, n=4)[0] for k, v in per_round.items()}
    check = input_check_of(ours)
    torch_alone = alone_us(lambda: _check_input_constraints_pre_hook(torch_gm, (x,), {}))
    ours_alone = alone_us(lambda: check(ours, (x,), {}))
    lines = [f"{name}: input {tuple(x.shape)}, {repeat} calls x {rounds} rounds"]
    lines.append(f"  {'variant':<15}{'median ms':>11}{'IQR ms':>9}{'overhead us':>14}{'vs eager':>10}")
    for key, value in ms.items():
        overhead = "" if key == "eager" else f"{(value - ms['no-check']) * 1000:+.1f}"
        lines.append(f"  {key:<15}{value:>11.4f}{iqr[key]:>9.4f}{overhead:>14}{value / ms['eager']:>9.2f}x")
    lines.append(f"  check alone (direct call, median of 20000): torch {torch_alone:.1f} us, fxpress {ours_alone:.2f} us")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=300, help="calls per round (resnet18 gets a tenth)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "capture_overhead.txt"))
    args = parser.parse_args()

    import torchvision

    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = [
        " ".join(["$ ./run.sh python benchmarks/capture_overhead.py", *sys.argv[1:]]),
        f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}",
        "1 thread, batch 1, torch.no_grad(); median of per-round medians, rounds interleaved",
        "IQR: spread of the round medians (differences below it are noise); overhead: difference to no-check",
        "",
    ]
    out += run_model("DigitsCNN", DigitsCNN(), torch.randn(1, 1, 8, 8), args.repeat, args.rounds)
    out.append("")
    resnet = torchvision.models.resnet18(weights=None)
    out += run_model("resnet18", resnet, torch.randn(1, 3, 224, 224), max(args.repeat // 10, 5), args.rounds)
    text = "\n".join(out) + "\n"
    print(text, end="")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
