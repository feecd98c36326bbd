"""The ``fxpress`` command.

  fxpress compress MODEL --recipe R [--calib DATA] [--train DATA] [--out DIR] [--dry-run]
                                                      run a recipe: model.pt2, model.onnx, report.{html,md,json}
  fxpress report OUT_DIR|model.pt2|report.json [--format text|markdown|html] [--open]
                                                      show the report of a compress run
  fxpress inspect MODEL|model.pt2 [--input-shape 1,3,224,224]
                                                      op histogram, parameters and MACs per sample (batch 1);
                                                      for a saved model also what is quantized / pruned /
                                                      decomposed / sparse
  fxpress recipes                                     the shipped recipes
  fxpress demo [--out DIR] [--epochs N] [--compile]   train the embedded digits CNN, compress, export, report
  fxpress passes                                      the registered passes

MODEL: a torchvision name (resnet18), transformers:TYPE (transformers:bert), 'digits', or
package.module:factory; DATA: 'digits', 'random', or package.module:callable (see fxpress.zoo).
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
    from .ir.cost import count_params, graph_batch, node_costs, per_sample
    from .ir.graph import op_name
    from .zoo import load_model

    saved = args.model.endswith(".pt2")
    if saved:
        from .serialize import load

        gm = load(args.model)
        inputs = gm.meta["fxpress"].get("example_inputs", ())
        source = gm.meta["fxpress"].get("source", "graph")
        with_ = gm.meta["fxpress"].get("saved_with", {})
        label = f"{args.model} ({source}; saved by fxpress {with_.get('fxpress_version')}, torch {with_.get('torch_version')})"
    else:
        model, inputs = load_model(args.model, args.input_shape)
        gm = capture(model, inputs)
        label = f"{args.model} ({type(model).__name__})"
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    histogram = Counter(op_name(n) for n in calls)
    costs = node_costs(gm)
    batch, dynamic = graph_batch(gm)
    macs_by_op: Counter = Counter()
    for c in costs:
        macs_by_op[c.op] += c.macs
    macs, flops = sum(c.macs for c in costs), sum(c.flops for c in costs)
    shapes = ", ".join(str(tuple(x.shape)) for x in inputs if hasattr(x, "shape"))
    print(f"model      {label}, inputs {shapes}")
    print(f"graph      {len(gm.graph.nodes)} nodes, {len(calls)} calls, {len(histogram)} op kinds")
    print(f"params     {count_params(gm):,}")
    # per sample, as `fxpress compress`'s report counts them: a saved model's example input has batch 2
    # (torch.export specializes a dynamic dim sampled at 1)
    at = f"batch {batch}{' (dynamic)' if dynamic else ''}"
    scaled = f"; at {at}: {macs:,} MACs" if batch != 1 else f"; at {at}"
    print(f"MACs       {per_sample(macs, batch):,} per sample  (FLOPs {per_sample(flops, batch):,}{scaled})")
    print()
    width = max((len(k) for k in histogram), default=2)
    print(f"{'op'.ljust(width)}  {'count':>5}  {'MACs/sample':>15}")
    for op, count in histogram.most_common():
        print(f"{op.ljust(width)}  {count:>5}  {per_sample(macs_by_op.get(op, 0), batch):>15,}")
    if saved:
        print()
        print(_compression_summary(gm))
    return 0


def _compression_summary(gm) -> str:
    """What a saved graph's compression did: quantized, pruned, decomposed and sparse layers."""
    from .api import quant_report
    from .passes.quant.fold_weight_quant import DEQUANTIZE_OPS, QUANTIZE_OPS

    meta = gm.meta.get("fxpress", {})
    lines = ["compression:"]
    qdq = sum(1 for n in gm.graph.nodes if n.op == "call_function" and (n.target in DEQUANTIZE_OPS or n.target in QUANTIZE_OPS))
    if qdq:
        rep = quant_report(gm)
        kinds = ", ".join(f"{k} {rep.quantized(k)} of {rep.total(k)}" for k in rep.per_kind)
        modes = Counter()
        for counts in rep.per_kind.values():
            modes.update({k: v for k, v in counts.items() if k != "float"})
        lines.append(f"  quantized   {kinds} ({', '.join(f'{v} {k}' for k, v in modes.items())}); {qdq} Q/DQ ops")
        kept = [(node, kind, why) for node, kind, why in rep.float_ops if not why.endswith(" mode")]  # not mode exclusions
        for node, kind, why in kept[:10]:
            lines.append(f"    float: {node} [{kind}]: {why}")
        if len(kept) > 10:
            lines.append(f"    ... {len(kept) - 10} more kept in float")
    pr = meta.get("prune_report")
    if pr is not None and hasattr(pr, "layer_table"):
        table = pr.layer_table()
        lines.append(f"  pruned      {len(table)} layers, params {pr.params_before:,} -> {pr.params_after:,} ({pr.params_ratio:.2f}x)")
        lines += [f"    {name}: {what}" for name, what in table[:15]]
        if len(table) > 15:
            lines.append(f"    ... {len(table) - 15} more")
    dr = meta.get("decompose_report")
    if dr is not None and hasattr(dr, "decomposed"):
        lines.append(f"  decomposed  {len(dr.decomposed)} layers, params {dr.params_before:,} -> {dr.params_after:,} ({dr.params_ratio:.2f}x)")
        lines += [f"    {r.module or r.node}: {r.method} rank {r.ranks}" for r in dr.decomposed[:15]]
    sr = meta.get("sparsity_report")
    if sr is not None:
        from .sparsity_api import sparsity_report

        measured = sparsity_report(gm)
        lines.append(f"  sparse      {measured.sparsity:.0%} of the weights of {len(measured.sparsified)} layers are zero")
    recipe = meta.get("recipe")
    if isinstance(recipe, dict):
        stages = ", ".join(st.get("kind", "?") for st in recipe.get("stage", []))
        lines.append(f"  recipe      {recipe.get('recipe', {}).get('name', '?')}: {stages}")
    if len(lines) == 1:
        lines.append("  none recorded (a plain captured graph)")
    return "\n".join(lines)


def _cmd_compress(args: argparse.Namespace) -> int:
    import torch

    from .recipe import Recipe
    from .zoo import ModelSpecError, digits_accuracy, load_data, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = Recipe.load(args.recipe)
    for spec in (args.calib, args.train, args.eval):  # fail before the model is built (the digits model trains first)
        if spec is not None and spec not in ("digits", "random") and ":" not in spec:
            raise ModelSpecError(f"unknown data {spec!r}: give 'digits', 'random', or package.module:callable returning batches")
    if args.seed is not None:
        recipe.seed = args.seed
    progress = not args.quiet and sys.stderr.isatty()
    if progress:
        print(f"fxpress: loading {args.model}", file=sys.stderr, flush=True)
    torch.manual_seed(recipe.seed)
    model, inputs = load_model(args.model, args.input_shape)
    is_digits = args.model == "digits"
    calib_spec = args.calib or ("digits" if is_digits else None)
    train_spec = args.train or ("digits" if is_digits else None)
    if train_spec is None and calib_spec is not None and any(st.needs_train_data() for st in recipe.stages):
        train_spec = calib_spec  # labelled calibration data (digits) trains too; say so in the run record
    calibration = load_data(calib_spec, inputs, batch_size=args.batch_size, batches=args.calib_batches, seed=recipe.seed) if calib_spec else None
    train_data = load_data(train_spec, inputs, batch_size=args.batch_size, seed=recipe.seed) if train_spec else None
    if args.dry_run:
        print(recipe.plan(model, inputs, calibration=calibration, train_data=train_data))
        return 0
    evaluate = digits_accuracy if is_digits else None
    eval_data = load_data(args.eval, inputs, split="test", batch_size=args.batch_size, batches=4, seed=recipe.seed) if args.eval else None
    result = recipe.apply(
        model, inputs, calibration=calibration, train_data=train_data, evaluate=evaluate, eval_data=eval_data,
        progress=progress, model_name=args.model,
    )
    if not is_digits:
        result.report.notes.append(
            f"{args.model} has random weights (nothing is downloaded): the metric is the output SQNR against the uncompressed "
            "model, not task accuracy" + (f"; calibration data: {calib_spec}" if calib_spec else "")
        )
    extra = {"command": "fxpress " + " ".join(args.argv), "model": args.model, "calibration": calib_spec, "train_data": train_spec}
    paths = result.write(args.out, onnx=not args.no_onnx, html=not args.no_html, extra=extra)
    print(result.report)
    print()
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    print(f"see the report: fxpress report {args.out}   (HTML: {paths.get('report_html', 'disabled')})")
    return 0


def _report_from(path_text: str):
    from pathlib import Path

    from .report import CompressionReport

    path = Path(path_text)
    if path.is_dir():
        path = path / "report.json"
    if path.suffix == ".pt2":
        from .serialize import read_metadata

        doc = read_metadata(path)
        if "report" not in doc:
            raise FileNotFoundError(f"{path} holds no report (it was saved without one)")
        return CompressionReport.from_dict(doc["report"]), path
    if not path.is_file():
        raise FileNotFoundError(f"no report at {path}: give the output folder of fxpress compress, its report.json, or a model.pt2")
    return CompressionReport.load(path), path


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    report, path = _report_from(args.path)
    if args.format == "markdown":
        print(report.to_markdown(), end="")
    elif args.format == "html":
        target = Path(args.output) if args.output else path.with_name("report.html")
        report.to_html(target)
        print(f"wrote {target}")
    else:
        print(report)
        if args.details:
            print()
            print(report.details())
    if args.open:
        import webbrowser

        html_path = path.with_name("report.html")
        if not html_path.exists():
            report.to_html(html_path)
        opened = webbrowser.open(html_path.resolve().as_uri())
        print(f"{'opened' if opened else 'open this in a browser:'} {html_path}")
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from .recipe import Recipe, shipped_recipes

    for name, path in shipped_recipes().items():
        recipe = Recipe.from_file(path)
        stages = " -> ".join(s.label() for s in recipe.stages)
        print(f"{name:24} {stages}")
        if recipe.description:
            print(f"{'':24} {recipe.description}")
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

    compress = sub.add_parser("compress", help="run a recipe on a model: compressed model (.pt2), ONNX and a report")
    compress.add_argument("model", help="torchvision name (resnet18), transformers:TYPE[:k=v,...], 'digits', or package.module:factory")
    compress.add_argument("--recipe", required=True, help="a recipe file (.toml) or the name of a shipped recipe (fxpress recipes)")
    compress.add_argument("--calib", help="calibration data: 'digits', 'random', or package.module:callable (default: digits for the digits model)")
    compress.add_argument("--train", help="training data for distill / finetune stages (same forms; default: digits for the digits model)")
    compress.add_argument("--eval", help="evaluation batches for the SQNR column (default: the first calibration batches)")
    compress.add_argument("--out", default="fxpress-out", help="output directory (default: %(default)s)")
    compress.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224 (token ids: 1,128)")
    compress.add_argument("--batch-size", type=int, default=32, help="batch size of the data (default: %(default)s)")
    compress.add_argument("--calib-batches", type=int, default=None, help="use at most this many calibration batches")
    compress.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    compress.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    compress.add_argument("--dry-run", action="store_true", help="print the plan (stages, channel groups, quantizable ops) and change nothing")
    compress.add_argument("--no-onnx", action="store_true", help="do not export ONNX")
    compress.add_argument("--no-html", action="store_true", help="no HTML report")
    compress.add_argument("--quiet", action="store_true", help="no progress bars")
    compress.set_defaults(func=_cmd_compress)

    report = sub.add_parser("report", help="show the report of a compress run")
    report.add_argument("path", help="the output directory of fxpress compress, its report.json, or a model.pt2")
    report.add_argument("--format", choices=("text", "markdown", "html"), default="text", help="default: %(default)s")
    report.add_argument("--output", help="with --format html: the file to write (default: report.html next to the report)")
    report.add_argument("--details", action="store_true", help="also print every stage's own report")
    report.add_argument("--open", action="store_true", help="open the HTML report in a browser")
    report.set_defaults(func=_cmd_report)

    recipes = sub.add_parser("recipes", help="list the shipped recipes")
    recipes.set_defaults(func=_cmd_recipes)

    inspect = sub.add_parser("inspect", help="op histogram, parameters and MACs (per sample) of a model or a saved .pt2")
    inspect.add_argument("model", help="torchvision name (resnet18), 'digits', package.module:factory, or a model.pt2 from fxpress")
    inspect.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224")
    inspect.set_defaults(func=_cmd_inspect)

    passes = sub.add_parser("passes", help="list the registered passes")
    passes.set_defaults(func=_cmd_passes)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    from .ir import CaptureError
    from .recipe import RecipeError, StageError
    from .serialize import FormatVersionError, UnsafeFileError
    from .zoo import ModelSpecError

    try:
        return args.func(args)
    except (ModelSpecError, CaptureError, NotADirectoryError, RecipeError, FileNotFoundError, FormatVersionError, UnsafeFileError) as exc:
        print(f"fxpress {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except StageError as exc:
        print(f"fxpress {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
