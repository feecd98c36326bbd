"""The ``fxpress`` command.

  fxpress demo [--out DIR] [--epochs N] [--compile]   train the embedded digits CNN, compress, export, report
  fxpress inspect MODEL [--input-shape 1,3,224,224]   op histogram, parameters and MACs of a model
  fxpress passes                                      the registered passes
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

__all__ = ["main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(args.out, epochs=args.epochs, with_compile=args.compile, progress=not args.quiet)
    print(result.table())
    print()
    print(result.pipeline_report)
    print()
    print(result.quant_report)
    print(f"\nwrote {result.onnx_path}, {result.onnx_path.with_name('model_int8.onnx')} and {args.out}/report.txt")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .ir import capture
    from .ir.cost import count_params, node_costs
    from .ir.graph import op_name
    from .zoo import load_model

    model, inputs = load_model(args.model, args.input_shape)
    gm = capture(model, inputs)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    histogram = Counter(op_name(n) for n in calls)
    costs = node_costs(gm)
    macs_by_op: Counter = Counter()
    for c in costs:
        macs_by_op[c.op] += c.macs
    shapes = ", ".join(str(tuple(x.shape)) for x in inputs if hasattr(x, "shape"))
    print(f"model      {args.model} ({type(model).__name__}), inputs {shapes}")
    print(f"graph      {len(gm.graph.nodes)} nodes, {len(calls)} calls, {len(histogram)} op kinds")
    print(f"params     {count_params(gm):,}")
    print(f"MACs       {sum(c.macs for c in costs):,}  (FLOPs {sum(c.flops for c in costs):,})")
    print()
    width = max((len(k) for k in histogram), default=2)
    print(f"{'op'.ljust(width)}  {'count':>5}  {'MACs':>15}")
    for op, count in histogram.most_common():
        print(f"{op.ljust(width)}  {count:>5}  {macs_by_op.get(op, 0):>15,}")
    return 0


def _cmd_passes(args: argparse.Namespace) -> int:
    from .passes import available_passes, get_pass

    for name in available_passes():
        cls = type(get_pass(name))
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:24} {'exact ' if cls.exact else '      '} {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxpress", description="Compress PyTorch models by rewriting their graphs.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train the embedded digits CNN, compress it, export ONNX and report")
    demo.add_argument("--out", default="fxpress-demo", help="directory for model.onnx and report.txt (default: %(default)s)")
    demo.add_argument("--epochs", type=int, default=8, help="training epochs (default: %(default)s)")
    demo.add_argument("--compile", action="store_true", help="also measure torch.compile(backend='fxpress') (slower: compiles)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)

    inspect = sub.add_parser("inspect", help="op histogram, parameters and MACs of a model")
    inspect.add_argument("model", help="torchvision name (resnet18), 'digits', or package.module:factory")
    inspect.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224")
    inspect.set_defaults(func=_cmd_inspect)

    passes = sub.add_parser("passes", help="list the registered passes")
    passes.set_defaults(func=_cmd_passes)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .ir import CaptureError
    from .zoo import ModelSpecError

    try:
        return args.func(args)
    except (ModelSpecError, CaptureError, NotADirectoryError) as exc:
        print(f"fxpress {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
