"""Save and load compressed models: ``fxpress.save(model, "model.pt2")`` / ``fxpress.load("model.pt2")``.

The file is a ``torch.export`` archive (``.pt2``, a zip) of the compressed graph, re-exported with the
graph's dynamic dims, plus one JSON extra file, ``extra/fxpress.json``: the format version, the
fxpress / torch / Python versions that wrote it, the example inputs' shapes and dtypes, and what
fxpress knows about the model (``gm.meta["fxpress"]``: the quantization config, the prune /
decompose / sparsity / distill / convert reports, the recipe and the pipeline report of a recipe
run), encoded as JSON. Loading gives back an fxpress graph, the same as the one saved:

- identical outputs, on any batch size the saved graph accepted (the batch stays dynamic);
- quantized graphs keep their Q/DQ ops, integer weights and the very same scales / zero points;
- pruned graphs keep their smaller tensors and rewritten shape constants, decomposed graphs their
  factor layers, sparse graphs their zeros (these are just the graph and its tensors);
- ``.train()`` / ``.eval()`` work (``fxpress.ir.mode``), the reports come back
  (``fxpress.quant_report``, ``prune_report``, ``decompose_report``, ``sparsity_report`` work on
  the loaded graph), and ``fxpress.quantize`` / ``prune`` / ``export_onnx`` take it like any graph.

What is safe, and why (torch 2.14's ``.pt2`` archive): the graph is JSON (``models/<name>.json``,
ops named by their registered names, nothing executed to read it); plain tensors are raw bytes
described by JSON (``data/weights/weight_N`` plus ``model_weights_config.json`` with dtype, sizes,
strides), i.e. the same idea as safetensors. ``torch.export.load`` does unpickle in four places:
tensor-subclass weights and constants (``use_pickle: true``, loaded with ``weights_only=False``),
custom/opaque script objects, legacy ``.pt`` weight files, and the sample inputs
(``weights_only=True`` first, but with a *fallback to* ``weights_only=False`` when that fails).
So ``fxpress.load`` audits the archive before handing it to torch: only the files fxpress writes
may be present, every payload must be raw bytes (``use_pickle: false``), no script objects or
legacy files, and the sample inputs must load with ``torch.load(weights_only=True)`` (tensors and
containers only), so the fallback can never run. A file that fails the audit is refused with the
reason; ``load(path, trusted=True)`` skips the audit for files you made yourself (it may then
unpickle, like ``torch.export.load``). ``save`` refuses models whose tensors would be pickled
(tensor subclasses, e.g. semi-structured sparse weights).

Weights alone: ``save_weights`` / ``load_weights`` write and read a ``.safetensors`` file of every
tensor the graph computes with (parameters, buffers, integer weights, qparams), e.g. to ship
fine-tuned weights for a structure the receiver already has; loading checks names, shapes and dtypes.

Format versions: ``FORMAT_VERSION`` is written into every file. A file from another version is
refused with a ``FormatVersionError`` naming both versions and what to do (re-save it with the
fxpress that wrote it, or re-run the compression).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import importlib
import io
import json
import os
import platform
import re
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

__all__ = ["save", "load", "save_weights", "load_weights", "read_metadata", "FORMAT_VERSION", "FormatVersionError", "UnsafeFileError"]

FORMAT_VERSION = 1
FORMAT_NAME = "fxpress.pt2"
EXTRA_FILE = "fxpress.json"
# meta entries that hold tensors, graph nodes or pass objects: rebuilt (example_inputs) or not kept
_SKIP_META = {"example_inputs", "float_passes", "pre_convert"}


class FormatVersionError(ValueError):
    """The file was written in another fxpress model format version than this fxpress reads."""


class UnsafeFileError(ValueError):
    """The archive holds something ``torch.export.load`` would unpickle (or files fxpress never writes)."""


# ---------------------------------------------------------------------------------------------
# JSON encoding of gm.meta["fxpress"]: fxpress dataclasses, tuples, Counters, dtypes


class _Unencodable(Exception):
    pass


def encode(obj: Any) -> Any:
    """A JSON-able form of ``obj``; raises _Unencodable for tensors, graph nodes, callables, ..."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else {"__float__": repr(obj)}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.SymInt):
        return str(obj)  # a symbolic size (the dynamic batch) inside a recorded shape
    if isinstance(obj, enum.Enum):
        return encode(obj.value)
    if isinstance(obj, Counter):
        return {"__counter__": [[encode(k), encode(v)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v) for v in obj]}
    if isinstance(obj, list):
        return [encode(v) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v) for k, v in obj.items()}
        return {"__items__": [[encode(k), encode(v)] for k, v in obj.items()]}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        if not cls.__module__.startswith("fxpress."):
            raise _Unencodable(f"{cls.__module__}.{cls.__qualname__}")
        fields, dropped = {}, []
        for f in dataclasses.fields(obj):
            if not f.init:
                continue
            try:
                fields[f.name] = encode(getattr(obj, f.name))
            except _Unencodable:
                dropped.append(f.name)
        out = {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields, "text": _text(obj)}
        if dropped:
            out["dropped"] = dropped
        return out
    raise _Unencodable(type(obj).__name__)


def _text(obj: Any) -> str | None:
    try:
        return str(obj)
    except Exception:  # noqa: BLE001 - a report whose __str__ fails must not stop saving
        return None


def decode(obj: Any) -> Any:
    """The inverse of ``encode``: fxpress dataclasses are rebuilt (only classes of the fxpress package);
    one that cannot be rebuilt stays a dict with its ``text``."""
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__dtype__" in obj:
        dtype = getattr(torch, obj["__dtype__"], None)
        return dtype if isinstance(dtype, torch.dtype) else obj["__dtype__"]
    if "__counter__" in obj:
        return Counter({_hashable(decode(k)): decode(v) for k, v in obj["__counter__"]})
    if "__tuple__" in obj:
        return tuple(decode(v) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_hashable(decode(k)): decode(v) for k, v in obj["__items__"]}
    if "__dataclass__" in obj:
        return _rebuild(obj)
    return {k: decode(v) for k, v in obj.items()}


def _hashable(v: Any) -> Any:
    return tuple(_hashable(x) for x in v) if isinstance(v, list) else v


def _rebuild(obj: dict) -> Any:
    module_name, _, qualname = obj["__dataclass__"].partition(":")
    fields = {k: decode(v) for k, v in obj.get("fields", {}).items()}
    if module_name == "fxpress" or module_name.startswith("fxpress."):
        try:
            cls: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                cls = getattr(cls, part)
            if isinstance(cls, type) and dataclasses.is_dataclass(cls):
                return cls(**fields)
        except Exception:  # noqa: BLE001 - a renamed class or a changed field: keep the data readable
            pass
    return {"type": qualname, **fields, "text": obj.get("text")}


def _node_meta(gm: fx.GraphModule) -> dict:
    """fxpress's per-node notes (``node.meta["fxpress_*"]``: why an op stayed float, which method
    emitted a decomposed factor, ...) by node name; re-exporting keeps the names of the nodes."""
    out: dict[str, dict] = {}
    for node in gm.graph.nodes:
        for key, value in node.meta.items():
            if key.startswith("fxpress_"):
                try:
                    out.setdefault(node.name, {})[key] = encode(value)
                except _Unencodable:
                    pass
    return out


def _restore_node_meta(gm: fx.GraphModule, data: dict) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, entries in data.items():
        node = nodes.get(name)
        if node is not None:
            node.meta.update({k: decode(v) for k, v in entries.items()})


def _encode_meta(meta: dict) -> tuple[dict, list[str]]:
    out, dropped = {}, []
    for key, value in meta.items():
        if key in _SKIP_META:
            continue
        try:
            out[key] = encode(value)
        except _Unencodable:
            text = _text(value)
            if text is not None and not isinstance(value, (torch.Tensor, torch.nn.Module)):
                out[key] = {"__text__": text}
            else:
                dropped.append(key)
    return out, dropped


def _decode_meta(meta: dict) -> dict:
    return {k: (v["__text__"] if isinstance(v, dict) and "__text__" in v else decode(v)) for k, v in meta.items()}


# ---------------------------------------------------------------------------------------------
# save


def _versions() -> dict:
    from . import __version__

    return {"fxpress": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _is_graph(model: Any) -> bool:
    return isinstance(model, fx.GraphModule) and any("val" in n.meta for n in model.graph.nodes)


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _export_args(gm: fx.GraphModule, min_dynamic: int = 2) -> tuple:
    """Concrete inputs built from the placeholders' ``meta["val"]``: the captured sizes, except that a
    dynamic dim gets at least ``min_dynamic`` (torch.export specializes a dim whose sample size is 1)."""
    from torch.fx.experimental.symbolic_shapes import optimization_hint

    args = []
    gen = torch.Generator().manual_seed(0)
    for node in _placeholders(gm):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise ValueError(f"input {node.name!r} of the graph is not a tensor ({type(val).__name__}); fxpress.save takes tensor inputs only")
        shape = []
        for s in val.shape:
            if isinstance(s, torch.SymInt):
                shape.append(max(int(optimization_hint(s, fallback=2)), min_dynamic))
            else:
                shape.append(int(s))
        if val.dtype.is_floating_point:
            args.append(torch.randn(shape, generator=gen).to(val.dtype))
        else:
            args.append(torch.zeros(shape, dtype=val.dtype))
    return tuple(args)


def _input_specs(gm: fx.GraphModule) -> list[dict]:
    specs = []
    for node in _placeholders(gm):
        val = node.meta.get("val")
        dims = [s if isinstance(s, int) else str(s) for s in val.shape] if isinstance(val, torch.Tensor) else None
        specs.append({"name": node.name, "shape": dims, "dtype": str(getattr(val, "dtype", "")).removeprefix("torch.")})
    return specs


def _check_plain_tensors(gm: torch.nn.Module) -> None:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    for name, t in [*gm.named_parameters(), *gm.named_buffers(), *_attr_tensors(gm)]:
        data = t.data if isinstance(t, torch.nn.Parameter) else t
        if type(data) is not torch.Tensor or is_traceable_wrapper_subclass(data):
            raise ValueError(
                f"tensor {name!r} is a {type(data).__name__}, which torch.export would store with pickle; fxpress.save keeps "
                "files pickle-free. Save the model before converting weights to tensor subclasses (e.g. sparsify(..., "
                "semi_structured=True) converts after loading)."
            )


def _attr_tensors(gm: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Plain tensor attributes the graph reads with get_attr (not registered as parameter or buffer)."""
    if not isinstance(gm, fx.GraphModule):
        return []
    known = {n for n, _ in gm.named_parameters()} | {n for n, _ in gm.named_buffers()}
    out = []
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in known:
            obj: Any = gm
            try:
                for part in node.target.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                continue
            if isinstance(obj, torch.Tensor):
                out.append((node.target, obj))
    return out


def save(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    example_inputs: Any = None,
    report: Any = None,
    recipe: Any = None,
    extra: dict | None = None,
) -> Path:
    """Write ``model`` (a graph from fxpress, or an eager module with ``example_inputs``) to ``path`` (.pt2).

    report: a ``CompressionReport`` (or anything with ``to_dict()``) stored with the model
    (``fxpress report model.pt2`` shows it). recipe: the ``Recipe`` that made it. extra: more
    JSON-able information. The model is not changed. Returns the path.
    """
    from .ir.capture import capture, normalize_inputs

    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"fxpress.save writes torch.export archives; give a path ending in .pt2, got {str(path)!r}")
    if _is_graph(model):
        gm = model
    elif isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise ValueError("an eager module needs example_inputs to be captured: fxpress.save(model, path, example_inputs=(x,))")
        gm = capture(model.eval(), normalize_inputs(example_inputs))
    else:
        raise TypeError(f"fxpress.save takes a torch.nn.Module or a graph from fxpress, got {type(model).__name__}")
    _check_plain_tensors(gm)
    was_training = gm.training
    dynamic = True
    try:
        if was_training:
            gm.eval()  # save the inference form; load() gives .train() back
        ep, dynamic = _reexport(gm)
    finally:
        if was_training:
            gm.train()
    if not dynamic:
        import warnings

        warnings.warn(f"fxpress.save: {path.name} was saved with static input shapes (the graph does not run on other batch "
                      "sizes of its dynamic dims, e.g. a reshape with a fixed batch)", stacklevel=2)

    meta, dropped = _encode_meta(getattr(gm, "meta", {}).get("fxpress", {}))
    node_meta = _node_meta(gm)
    doc = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **{f"{k}_version": v for k, v in _versions().items()},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": _input_specs(gm),
        "meta": meta,
        "meta_not_saved": dropped,
        "node_meta": node_meta,
        "dynamic_shapes": dynamic,
    }
    if report is not None:
        doc["report"] = report.to_dict() if hasattr(report, "to_dict") else encode(report)
    if recipe is not None:
        doc["recipe"] = recipe.to_dict() if hasattr(recipe, "to_dict") else recipe
    if extra:
        doc["extra"] = extra
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial.pt2")
    torch.export.save(ep, tmp, extra_files={EXTRA_FILE: json.dumps(doc, indent=1, default=str)})
    os.replace(tmp, path)
    return path


def _reexport(gm: fx.GraphModule) -> tuple[torch.export.ExportedProgram, bool]:
    """torch.export the graph with its dynamic dims (sampled at 2, then at the captured sizes); a graph
    whose "dynamic" dims are really fixed (a reshape to the captured batch) is exported static.
    Returns (program, dynamic)."""
    from .backends.onnx_export import _captured_dynamic_shapes

    errors = []
    for min_dynamic, dynamic in ((2, True), (1, True), (1, False)):
        args = _export_args(gm, min_dynamic)
        shapes = _captured_dynamic_shapes(gm, args) if dynamic else None
        if dynamic and shapes is None:
            continue
        try:
            return torch.export.export(gm, args, dynamic_shapes=shapes, strict=False), dynamic and shapes is not None
        except Exception as exc:  # noqa: BLE001 - try the next, stricter form; all errors are reported below
            errors.append(str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
    raise RuntimeError("fxpress.save: re-exporting the graph failed: " + " | ".join(dict.fromkeys(errors)))


# ---------------------------------------------------------------------------------------------
# load

# the files torch.export.save writes for one model without AOTI payloads, below the archive's root folder
_ALLOWED = [
    r"archive_format", r"archive_version", r"byteorder", r"\.data/version", r"\.data/serialization_id", r"version",
    r"models/model\.json",
    r"data/weights/model_weights_config\.json", r"data/weights/weight_\d+",
    r"data/constants/model_constants_config\.json", r"data/constants/tensor_\d+",
    r"data/sample_inputs/model\.pt",
    r"extra/" + re.escape(EXTRA_FILE),
]
_ALLOWED_RE = re.compile(r"(?:[^/]+/)?(?:" + "|".join(_ALLOWED) + r")")


def _audit(path: Path, zf: zipfile.ZipFile) -> None:
    """Refuse anything ``torch.export.load`` would unpickle (see the module docstring)."""
    names = zf.namelist()
    odd = [n for n in names if not n.endswith("/") and not _ALLOWED_RE.fullmatch(n)]
    if odd:
        raise UnsafeFileError(
            f"{path} holds files fxpress never writes ({', '.join(odd[:5])}{', ...' if len(odd) > 5 else ''}); "
            "refusing to load it. If you made this file yourself and trust it, use fxpress.load(path, trusted=True)."
        )
    for name in names:
        if name.endswith(("model_weights_config.json", "model_constants_config.json")):
            try:
                config = json.loads(zf.read(name)).get("config", {})
            except (ValueError, AttributeError) as exc:
                raise UnsafeFileError(f"{path}: {name} is not valid JSON ({exc})") from None
            for key, entry in config.items():
                if not isinstance(entry, dict) or entry.get("use_pickle") is not False:
                    raise UnsafeFileError(
                        f"{path}: tensor {key!r} is stored with pickle ({name}); refusing to load it. "
                        "Use fxpress.load(path, trusted=True) only for files you trust."
                    )
                if not str(entry.get("path_name", "")).startswith(("weight_", "tensor_")):
                    raise UnsafeFileError(f"{path}: {key!r} is stored as a script object ({entry.get('path_name')}); refusing to load it")
        elif name.endswith("data/sample_inputs/model.pt"):
            try:
                torch.load(io.BytesIO(zf.read(name)), weights_only=True)
            except Exception as exc:  # noqa: BLE001
                raise UnsafeFileError(
                    f"{path}: the sample inputs do not load as plain tensors (torch.load weights_only=True: "
                    f"{str(exc).splitlines()[0][:200]}); torch.export.load would retry with full unpickling, so fxpress refuses. "
                    "Use fxpress.load(path, trusted=True) only for files you trust."
                ) from None


def _read_doc(path: Path, zf: zipfile.ZipFile) -> dict:
    found = [n for n in zf.namelist() if n.endswith("extra/" + EXTRA_FILE)]
    if not found:
        raise ValueError(
            f"{path} is a .pt2 archive without {EXTRA_FILE}: it was not written by fxpress.save. "
            "Load it with torch.export.load (which may unpickle: only for files you trust)."
        )
    try:
        doc = json.loads(zf.read(found[0]))
    except ValueError as exc:
        raise ValueError(f"{path}: {EXTRA_FILE} is not valid JSON ({exc})") from None
    return doc


def _check_version(path: Path, doc: dict) -> None:
    version = doc.get("format_version")
    if doc.get("format") != FORMAT_NAME or not isinstance(version, int):
        raise FormatVersionError(f"{path}: {EXTRA_FILE} does not name the fxpress model format ({FORMAT_NAME!r} with a format_version)")
    if version == FORMAT_VERSION:
        return
    from . import __version__

    wrote = doc.get("fxpress_version", "?")
    head = (f"{path} is in fxpress model format version {version} (written by fxpress {wrote}); "
            f"this fxpress ({__version__}) reads format version {FORMAT_VERSION}")
    if version > FORMAT_VERSION:
        upgrade = f"fxpress {wrote} or later" if _newer(wrote, __version__) else f"an fxpress that reads format version {version}"
        what = f"The file is newer: upgrade to {upgrade} to load it"
    else:
        by = f"fxpress {wrote}" if wrote != __version__ and wrote != "?" else "the fxpress that wrote it"
        what = (f"The file is older: load it with {by} and save it again with this version, or re-run the compression "
                "(the recipe is stored in the file: fxpress.read_metadata(path)['recipe'])")
    raise FormatVersionError(f"{head}. {what}.")


def _newer(a: str, b: str) -> bool:
    """Whether version string ``a``'s release number (1.2.3) is later than ``b``'s (False when either has none)."""
    ra, rb = (re.match(r"\d+(?:\.\d+)*", str(v)) for v in (a, b))
    if ra is None or rb is None:
        return False
    return tuple(map(int, ra.group().split("."))) > tuple(map(int, rb.group().split(".")))


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON document stored in a file from ``fxpress.save`` (versions, inputs, reports, recipe),
    without loading the model."""
    path = Path(path)
    with zipfile.ZipFile(path) as zf:
        return _read_doc(path, zf)


def load(path: str | os.PathLike, *, trusted: bool = False) -> fx.GraphModule:
    """Load a model written by ``fxpress.save``: an fxpress graph in eval mode with its reports.

    trusted: skip the safety audit (see the module docstring): for files you made yourself only.
    Raises ``FormatVersionError`` for another format version, ``UnsafeFileError`` when the archive
    holds something that would be unpickled.
    """
    from .ir.input_check import install_input_check
    from .ir.mode import enable_train_eval

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such model file: {path}")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not a .pt2 archive (not a zip file); fxpress.load reads files from fxpress.save") from None
    with zf:
        doc = _read_doc(path, zf)
        _check_version(path, doc)
        if not trusted:
            _audit(path, zf)
    extra = {EXTRA_FILE: ""}
    ep = torch.export.load(path, extra_files=extra)
    gm = ep.module(check_guards=False)
    enable_train_eval(gm)
    torch.nn.Module.train(gm, False)
    _restore_node_meta(gm, doc.get("node_meta", {}))
    meta = _decode_meta(doc.get("meta", {}))
    example = ep.example_inputs[0] if ep.example_inputs else None
    if example is not None:
        meta["example_inputs"] = tuple(example)
    meta["loaded_from"] = str(path)
    meta["saved_with"] = {k: doc.get(k) for k in ("fxpress_version", "torch_version", "python_version", "created")}
    if "report" in doc:
        meta["report_dict"] = doc["report"]
    if "recipe" in doc:
        meta["recipe"] = doc["recipe"]
    gm.meta["fxpress"] = meta
    install_input_check(gm)  # in place of torch.export's per-call check: same errors made clear, ~0.1 ms less a call
    return gm


# ---------------------------------------------------------------------------------------------
# weights alone (safetensors)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers(), *_attr_tensors(model)]:
        out.setdefault(name, t.detach())
    return out


def save_weights(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write every tensor ``model`` computes with (parameters, buffers, integer weights, qparams) to a
    ``.safetensors`` file (no pickle, memory-mappable)."""
    from safetensors.torch import save_file

    path = Path(path)
    seen: dict[Any, str] = {}
    tensors = {}
    for name, t in _weights(model).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        t = t.contiguous()
        if key is not None and key in seen:
            t = t.clone()  # safetensors refuses shared storage; tied tensors are stored twice
        elif key is not None:
            seen[key] = name
        tensors[name] = t
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "fxpress.weights", "format_version": str(FORMAT_VERSION), **_versions()})
    return path


def load_weights(model: torch.nn.Module, path: str | os.PathLike, *, strict: bool = True) -> torch.nn.Module:
    """Copy the tensors of a ``save_weights`` file into ``model`` (in place; returns it).

    Names, shapes and dtypes must match (a pruned or decomposed structure must be loaded into the
    same structure: ``fxpress.load`` the .pt2 first). strict: every tensor of the model must be in the file.
    """
    from safetensors import safe_open

    path = Path(path)
    ours = _weights(model)
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        missing = sorted(set(ours) - names)
        unexpected = sorted(names - set(ours))
        if unexpected or (strict and missing):
            parts = []
            if missing:
                parts.append(f"missing from the file: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
            if unexpected:
                parts.append(f"not in the model: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
            raise ValueError(f"{path} does not match the model's tensors ({'; '.join(parts)})")
        with torch.no_grad():
            for name in names:
                src = f.get_tensor(name)
                dst = ours[name]
                if src.shape != dst.shape or src.dtype != dst.dtype:
                    raise ValueError(
                        f"{path}: tensor {name!r} is {tuple(src.shape)} {src.dtype} in the file but {tuple(dst.shape)} {dst.dtype} "
                        "in the model (a different structure: load the matching .pt2 with fxpress.load)"
                    )
                dst.copy_(src)
    return model

