"""The ``torch.compile`` backend ``"fxpress"``: Dynamo graph → fxpress IR → passes → a target.

Usage::

    torch.compile(model, backend="fxpress")                                         # passes + inductor
    torch.compile(model, backend="fxpress", options={"target": "onnxruntime"})      # passes + onnxruntime
    torch.compile(model, backend="fxpress", options={"passes": ["fold-batch-norm"], "target": "eager"})

How a Dynamo subgraph is handled (once per subgraph; graph breaks give several):

1. Dynamo lifts parameters and buffers (and, under ``dynamic=True``, float module attributes such
   as ``eps``) to graph inputs. They are *frozen*: turned back into constants of the graph (like
   inductor's ``freezing``), because compression passes rewrite weights. Recompile after changing
   weights in place.
2. Dynamo's SymInt inputs (sizes, under dynamic shapes) are re-derived from the tensor inputs, and
   the graph is captured with ``torch.export`` into the same ATen IR as ``fxpress.capture``, keeping
   the dimensions Dynamo made dynamic.
3. The configured passes run (``options["passes"]``; safe exact passes by default).
4. The target runs it: ``"inductor"`` (default), ``"onnxruntime"`` (exported to ONNX and run in an
   ``InferenceSession``, torch tensors in and out) or ``"eager"``.

Passes need an inference graph: where autograd must flow (grad mode on and parameters requiring
grad) the subgraph goes to the target unchanged, with one warning saying so, as inductor does with
freezing. A subgraph that cannot be lowered falls back the same way with one warning naming the
cause; ``options={"fallback": "raise"}`` turns that into an error for debugging. Either way
``compile_reports()`` gets a ``FallbackReport`` for the subgraph: no passes, and why it fell back.
"""

from __future__ import annotations

import difflib
import logging
import re
import warnings
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch.export import Dim

from ..ir.capture import capture
from ..ir.graph import set_attr_value
from ..passes import PassManager, PipelineReport

__all__ = ["fxpress_backend", "BackendOptions", "FallbackReport", "compile_reports", "register", "DEFAULT_PASSES", "TARGETS"]

log = logging.getLogger("fxpress")

DEFAULT_PASSES: tuple[str, ...] = ("fold-constants", "fold-batch-norm", "eliminate-dead-code")
TARGETS = ("inductor", "onnxruntime", "eager")
FALLBACKS = ("warn", "raise")

_reports: deque = deque(maxlen=64)
_warned: set[str] = set()


def compile_reports() -> list[PipelineReport]:
    """Pipeline reports of the subgraphs the backend compiled most recently (oldest first).

    A subgraph that ran without passes (autograd needed, or lowering failed) has a ``FallbackReport``:
    ``report.fell_back`` is True for those (False for the others) and ``report.reason`` says why.
    """
    return list(_reports)


@dataclass
class FallbackReport(PipelineReport):
    """The report of a subgraph the backend ran unchanged: no passes ran. ``reason`` says why
    (``"grad"``: autograd must flow through it; ``"lowering"``: it could not be lowered, see
    ``error``), ``target`` where it ran instead."""

    reason: str = ""
    target: str = ""
    error: str = ""
    fell_back = True  # class attribute: a PipelineReport of a compiled subgraph has none (see compile_reports)

    def __str__(self) -> str:
        why = {
            "grad": "the graph needs gradients (grad mode on, parameters require grad); call it under "
            "torch.no_grad() or torch.inference_mode() for passes",
            "lowering": f"it could not be lowered ({self.error})",
        }.get(self.reason, self.reason)
        return f"fxpress fell back: no passes ran on this subgraph, it runs unchanged on {self.target}: {why}"


def _fall_back(reason: str, gm: fx.GraphModule, example_inputs: list, opts: "BackendOptions", error: str = "") -> Callable:
    target = "eager" if opts.target == "onnxruntime" else opts.target
    report = FallbackReport(reason=reason, target=target, error=error)
    _reports.append(report)
    log.info("%s", report)
    return _unchanged(gm, example_inputs, opts)


@dataclass(frozen=True)
class BackendOptions:
    """Options accepted through ``torch.compile(..., options={...})``.

    passes: pass names / ``(name, options)`` pairs / Pass instances to run on each subgraph.
    target: ``"inductor"``, ``"onnxruntime"`` or ``"eager"``.
    verify: check the IR invariants after every pass (slower compiles; on in tests).
    dump_dir: write each subgraph's code after every pass to this directory.
    ort_threads: onnxruntime intra-op threads (default: onnxruntime's choice).
    fallback: what to do with a subgraph that cannot be lowered: ``"warn"`` (run it unchanged on the
        target, or eagerly for onnxruntime, with one warning) or ``"raise"``.
    """

    passes: tuple = DEFAULT_PASSES
    target: str = "inductor"
    verify: bool = False
    dump_dir: str | None = None
    ort_threads: int | None = None
    fallback: str = "warn"
    inductor_mode: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, options: dict | None, mode: str | None = None) -> "BackendOptions":
        options = dict(options or {})
        known = [f.name for f in fields(cls) if f.name != "inductor_mode"]
        for key in options:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown fxpress backend option {key!r}.{hint} Known options: {', '.join(known)}.")
        if "passes" in options:
            passes = options["passes"]
            if isinstance(passes, str) or not isinstance(passes, Sequence):
                raise TypeError(f"options['passes'] must be a list of pass names, got {passes!r}")
            options["passes"] = tuple(passes)
        target = options.get("target", "inductor")
        if target not in TARGETS:
            raise ValueError(f"unknown fxpress target {target!r}; choose one of {', '.join(TARGETS)}.")
        if options.get("fallback", "warn") not in FALLBACKS:
            raise ValueError(f"options['fallback'] must be one of {FALLBACKS}, got {options['fallback']!r}")
        threads = options.get("ort_threads")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"options['ort_threads'] must be a positive int, got {threads!r}")
        return cls(**options, inductor_mode=mode)


def _warn_once(key: str, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, stacklevel=3)


def fxpress_backend(gm: fx.GraphModule, example_inputs: list, *, options: dict | None = None, mode: str | None = None):
    """A Dynamo backend: ``(GraphModule, example_inputs) -> callable`` (see the module docstring)."""
    from ..passes import get_pass

    opts = BackendOptions.parse(options, mode)
    for spec in opts.passes:  # fail fast on unknown pass names, before any tracing
        get_pass(spec[0], **spec[1]) if isinstance(spec, tuple) else get_pass(spec)

    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        _warn_once(
            "grad",
            "fxpress: this graph needs gradients (grad mode is on and parameters require grad), so it runs "
            f"without fxpress passes on {opts.target}. For inference, call the compiled model under "
            "torch.no_grad() or torch.inference_mode().",
        )
        return _fall_back("grad", gm, example_inputs, opts)

    try:
        # a fresh tracing context: our exports must not add guards to the shape env Dynamo is building
        with torch._guards.tracing(None):
            lowered = lower_dynamo_graph(gm, example_inputs)
            aten_gm, report = PassManager(list(opts.passes), verify=opts.verify, dump_dir=opts.dump_dir).run(
                lowered.gm, lowered.inputs if opts.verify else None
            )
            runner = _build_target(aten_gm, lowered.inputs, opts)
    except Exception as exc:
        if opts.fallback == "raise":
            raise
        _warn_once(
            f"lower:{type(exc).__name__}:{str(exc)[:80]}",
            f"fxpress: a subgraph could not be lowered ({type(exc).__name__}: {_short(exc)}); it runs unchanged "
            f"on {'eager' if opts.target == 'onnxruntime' else opts.target} instead. "
            'Pass options={"fallback": "raise"} to see the full error.',
        )
        return _fall_back("lowering", gm, example_inputs, opts, error=f"{type(exc).__name__}: {_short(exc)}")
    report.fell_back = False  # type: ignore[attr-defined] - compile_reports() entries all say whether they fell back
    _reports.append(report)
    log.info("fxpress compiled a subgraph for %s:\n%s", opts.target, report)
    keep = lowered.input_indices

    def compiled(*args):
        return runner(*[args[i] for i in keep])

    compiled.fxpress_report = report  # type: ignore[attr-defined]
    return compiled


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else "")[:300]


def _unchanged(gm: fx.GraphModule, example_inputs: list, opts: BackendOptions) -> Callable:
    if opts.target == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)
    return gm.forward


def _build_target(aten_gm: fx.GraphModule, inputs: tuple, opts: BackendOptions) -> Callable:
    if opts.target == "eager":
        return aten_gm
    if opts.target == "inductor":
        # compile_fx, not torch.compile: Dynamo runs a backend's result with itself disabled, so a
        # torch.compile'd function returned from here would silently run eagerly, never compiled.
        from torch._guards import TracingContext, detect_fake_mode, tracing
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = dict(list_mode_options(opts.inductor_mode)) if opts.inductor_mode is not None else {}
        if _has_qdq(aten_gm):
            # int8 kernels need: the x86 patterns registered (torchao), the graph in their layout
            # (on this capture, never the user's module), and freezing (weights as constants)
            from ..passes.quant.inductor_layout import InductorInt8Layout, register_inductor_int8_patterns

            why = register_inductor_int8_patterns()
            if why is not None:
                _warn_once("int8-patterns", f"fxpress: quantized ops run as dequantize + float ops in inductor: {why}.")
            layout = InductorInt8Layout()(aten_gm)
            log.info("fxpress: %s", layout.report)
            aten_gm = layout.gm
            patches["freezing"] = True
        aten_gm = _plain_graph_module(aten_gm)
        # compile for the shapes the capture kept dynamic: its placeholders' fake values, not the sample
        fakes = [n.meta.get("val") for n in aten_gm.graph.find_nodes(op="placeholder")]
        fake_mode = detect_fake_mode(fakes) if all(isinstance(f, torch.Tensor) for f in fakes) else None
        with torch.no_grad():  # an inference graph (grad-needing graphs never reach here)
            if fake_mode is None:
                return compile_fx(aten_gm, list(inputs), config_patches=patches)
            with tracing(TracingContext(fake_mode)):
                return compile_fx(aten_gm, fakes, config_patches=patches)
    from .onnx_export import export_onnx

    result = export_onnx(aten_gm, inputs, path=None, check=opts.verify)
    session = result.session(intra_op_threads=opts.ort_threads)

    def run_onnxruntime(*args):
        out = session(*args)
        return out if isinstance(out, tuple) else (out,)

    return run_onnxruntime


def _plain_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A plain ``fx.GraphModule`` over ``gm``'s graph and the tensors it reads, for inductor.

    A graph from ``torch.export`` (``ExportedProgram.module()``, as ``capture`` and ``load`` give) is a
    ``_StatefulGraphModule`` carrying forward hooks (``_create_stateful_graph_module``'s lambdas that
    register nn.Module inputs, and the input check), ``range_constraints``, a ``shape_env`` and fxpress's
    ``meta``. AOTAutograd / inductor pickle the module they are given into their cache key: a local
    lambda fails that ("Failed to pickle cache key ... Can't pickle local object
    '_create_stateful_graph_module.<locals>.<lambda>'") and bypasses the cache, and per-process state
    makes keys differ between runs. Inductor needs none of it: only the graph and its constants.
    """
    plain = fx.GraphModule(gm, gm.graph)  # copies the get_attr/call_module targets only; no hooks, no extra state
    torch.nn.Module.train(plain, gm.training)
    return plain


def _has_qdq(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and getattr(n.target, "namespace", None) == "quantized_decomposed" for n in gm.graph.nodes)


# ---------------------------------------------------------------------------------------------
# Dynamo graph → fxpress IR


@dataclass
class LoweredGraph:
    gm: fx.GraphModule  # the ATen-level graph, parameters as constants
    inputs: tuple  # the real tensor inputs it takes
    input_indices: list[int]  # where those inputs sit among Dynamo's example_inputs


_SOURCE_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_]\w*)|\[(\d+)\]")


def _frozen_name(root: torch.nn.Module, source_name: str, index: int) -> str:
    """``L['self']._modules['bn']._buffers['running_mean']`` → ``bn.running_mean`` (unique on root)."""
    path = source_name.removeprefix("L['self']")
    parts = ["".join(groups).replace(".", "_") for groups in _SOURCE_PART.findall(path)]
    name = ".".join(parts) if source_name.startswith("L['self']") and parts else ""
    if not name or _taken(root, name):
        name = f"_frozen.input_{index}"
    return name


def _taken(root: torch.nn.Module, name: str) -> bool:
    obj: Any = root
    for part in name.split("."):
        if isinstance(obj, torch.Tensor) or not hasattr(obj, part):
            return isinstance(obj, torch.Tensor)
        obj = getattr(obj, part)
    return True


def _source_name(node: fx.Node) -> str:
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", "")
    return name() if callable(name) else (name or "")


def _is_weight(node: fx.Node, value: Any) -> bool:
    """Parameters, buffers, and module attributes Dynamo passes as tensors (eps under dynamic=True)."""
    if isinstance(value, torch.nn.Parameter):
        return True
    name = _source_name(node)
    if "_buffers[" in name or "_parameters[" in name:
        return True
    wrapped = getattr(node.meta.get("grapharg"), "pass_arg_as_tensor", False)
    return bool(wrapped) and (name.startswith("L['self']") or "_modules[" in name)


def _mutated(node: fx.Node) -> bool:
    for user in node.users:
        target = user.target
        name = target if isinstance(target, str) else getattr(target, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and user.args and user.args[0] is node:
            return True
    return False


def lower_dynamo_graph(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> LoweredGraph:
    """Freeze weights, re-derive size inputs, and capture a Dynamo subgraph as fxpress IR."""
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, value_map)
    graph.output(out)
    root = torch.nn.Module()
    for name, buf in gm.named_buffers():
        set_attr_value(root, name, buf, parameter=False)
    for name, param in gm.named_parameters():
        set_attr_value(root, name, param, parameter=True)

    placeholders = [value_map[n] for n in gm.graph.find_nodes(op="placeholder")]
    tensor_inputs: list[torch.Tensor] = []
    indices: list[int] = []
    dynamic: list[dict | None] = []
    sizes: list[tuple[int, fx.Node]] = []
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if isinstance(value, torch.Tensor) and _is_weight(node, value) and not _mutated(node):
            _inline_scalar_reads(graph, node, value)
            if not node.users:
                graph.erase_node(node)
                continue
            target = _frozen_name(root, _source_name(node), i)
            set_attr_value(root, target, value, parameter=isinstance(value, torch.nn.Parameter))
            with graph.inserting_before(node):
                const = graph.get_attr(target)
            node.replace_all_uses_with(const)
            graph.erase_node(node)
        elif isinstance(value, torch.Tensor):
            tensor_inputs.append(value)
            indices.append(i)
            example = node.meta.get("example_value")
            shape = example.shape if isinstance(example, torch.Tensor) else value.shape
            # AUTO: dims Dynamo left symbolic stay dynamic unless the graph itself specializes them
            dims = {d: Dim.AUTO for d, s in enumerate(shape) if isinstance(s, torch.SymInt)}
            dynamic.append(dims or None)
        elif isinstance(value, (int, torch.SymInt)):
            sizes.append((i, node))
        else:
            raise TypeError(f"Dynamo graph input {node.name} is a {type(value).__name__}; only tensors and sizes are supported")

    tensor_nodes = [n for n in graph.find_nodes(op="placeholder") if n not in {s for _, s in sizes}]
    for i, node in sizes:
        _replace_size_input(graph, node, tensor_nodes)

    new_gm = fx.GraphModule(root, graph)
    new_gm.eval()
    dynamic_shapes = tuple(dynamic) if any(d is not None for d in dynamic) else None
    with torch._guards.tracing(None):  # keep guards out of the shape env Dynamo is building
        aten_gm = capture(new_gm, tuple(tensor_inputs), dynamic_batch=False, dynamic_shapes=dynamic_shapes)
    return LoweredGraph(aten_gm, tuple(tensor_inputs), indices)


def _inline_scalar_reads(graph: fx.Graph, node: fx.Node, value: torch.Tensor) -> None:
    """Replace ``node.item()`` reads of a frozen 0-d tensor by the Python number itself."""
    if value.dim() != 0:
        return
    for user in list(node.users):
        if user.op == "call_method" and user.target == "item":
            number = value.item()
            for reader in list(user.users):
                reader.args = fx.node.map_arg(reader.args, lambda a: number if a is user else a)
                reader.kwargs = fx.node.map_arg(reader.kwargs, lambda a: number if a is user else a)
            graph.erase_node(user)


def _replace_size_input(graph: fx.Graph, node: fx.Node, tensor_nodes: list[fx.Node]) -> None:
    """Replace a SymInt graph input by ``aten.sym_size(x, d)`` of the tensor input it measures."""
    symbol = node.meta.get("example_value")
    for tensor in tensor_nodes:
        example = tensor.meta.get("example_value")
        if not isinstance(example, torch.Tensor):
            continue
        for d, s in enumerate(example.shape):
            if isinstance(s, torch.SymInt) and str(s) == str(symbol):
                with graph.inserting_after(tensor):
                    size = graph.call_function(torch.ops.aten.sym_size.int, (tensor, d))
                node.replace_all_uses_with(size)
                graph.erase_node(node)
                return
    raise TypeError(f"size input {node.name} ({symbol}) is not the size of any tensor input")


def register() -> None:
    """Make ``backend="fxpress"`` resolvable in this process.

    When fxpress is installed, the entry point (group ``torch_dynamo_backends``) already makes the
    name resolvable in a fresh process; registering it here too would clash, so it is skipped.
    """
    from torch._dynamo.backends import registry

    registry._discover_entrypoint_backends()
    if "fxpress" in registry._BACKENDS and registry._BACKENDS["fxpress"] is not None:
        return
    if "fxpress" not in registry._COMPILER_FNS:
        registry.register_backend(fxpress_backend, name="fxpress")
