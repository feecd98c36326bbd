"""Helpers every pass uses to read and edit a captured GraphModule.

Parameters live on the module as attributes reached by ``get_attr`` nodes; these helpers read
them, register new ones with unique names, keep ``meta["val"]`` on new nodes, and drop attributes
no node refers to any more (so sizes and state_dicts reflect the rewritten graph).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

__all__ = [
    "get_attr_value",
    "set_attr_value",
    "add_constant",
    "fake_mode_of",
    "fake_value",
    "prune_unused_attributes",
    "is_constant",
    "node_label",
    "op_name",
    "is_pure",
    "input_nodes",
    "global_pool_keepdim",
]

aten = torch.ops.aten


def _resolve(root: torch.nn.Module, qualname: str) -> tuple[torch.nn.Module, str]:
    *path, leaf = qualname.split(".")
    mod = root
    for part in path:
        mod = getattr(mod, part)
    return mod, leaf


def get_attr_value(gm: torch.nn.Module, target: str) -> Any:
    """The tensor (or module) a ``get_attr`` target names."""
    mod, leaf = _resolve(gm, target)
    return getattr(mod, leaf)


def set_attr_value(gm: torch.nn.Module, target: str, value: torch.Tensor, *, parameter: bool | None = None) -> None:
    """Store ``value`` at ``target``, creating intermediate modules; parameters stay parameters."""
    *path, leaf = target.split(".")
    mod = gm
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    old = getattr(mod, leaf, None)
    if parameter is None:
        parameter = isinstance(old, torch.nn.Parameter) or old is None
    # a replaced parameter keeps its trainability (fine-tuning after folding or pruning trains it);
    # a new one is trainable
    trainable = old.requires_grad if isinstance(old, torch.nn.Parameter) else True
    if hasattr(mod, leaf):
        delattr(mod, leaf)
    if parameter and value.is_floating_point():
        mod.register_parameter(leaf, torch.nn.Parameter(value.detach(), requires_grad=trainable))
    else:
        mod.register_buffer(leaf, value.detach())


def fake_mode_of(gm: fx.GraphModule) -> FakeTensorMode:
    """The FakeTensorMode the graph's ``meta["val"]`` live in (a new one if the graph has none)."""
    # read the mode off the values: detect_fake_mode would prefer an ambient Dynamo tracing context
    for node in gm.graph.nodes:
        mode = getattr(node.meta.get("val"), "fake_mode", None)
        if mode is not None:
            return mode
    return FakeTensorMode(allow_non_fake_inputs=True)


def fake_value(gm: fx.GraphModule, tensor: torch.Tensor) -> torch.Tensor:
    return fake_mode_of(gm).from_tensor(tensor, static_shapes=True)


def add_constant(gm: fx.GraphModule, name: str, value: torch.Tensor, *, before: fx.Node) -> fx.Node:
    """Register ``value`` under a fresh attribute derived from ``name``; return a get_attr node for it."""
    base = name.replace("/", ".")
    target, i = base, 1
    while _has_attr(gm, target):
        target, i = f"{base}_{i}", i + 1
    set_attr_value(gm, target, value, parameter=value.is_floating_point())
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(target)
    node.meta["val"] = fake_value(gm, value)
    return node


def _has_attr(gm: torch.nn.Module, target: str) -> bool:
    try:
        get_attr_value(gm, target)
        return True
    except AttributeError:
        return False


def prune_unused_attributes(gm: fx.GraphModule) -> list[str]:
    """Delete parameters and buffers that no ``get_attr`` node refers to; return their names."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    # tensors of a called submodule (an observer's statistics, a fake-quant's scale) are its own state
    called = tuple(f"{n.target}." for n in gm.graph.nodes if n.op == "call_module")
    removed = []
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name not in used and not name.startswith(called):
            mod, leaf = _resolve(gm, name)
            if hasattr(mod, leaf):
                delattr(mod, leaf)
                removed.append(name)
    return removed


def is_constant(node: Any) -> bool:
    """A graph input to a computation that is known without running the model: get_attr or a literal."""
    if isinstance(node, fx.Node):
        return node.op == "get_attr"
    if isinstance(node, (list, tuple)):
        return all(is_constant(a) for a in node)
    return True


def input_nodes(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def op_name(node: fx.Node) -> str:
    """A short readable name of what a node computes: ``aten.conv2d``, ``getitem``, ``placeholder``."""
    if node.op != "call_function":
        return node.op
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        ns = target.namespace
        return f"{ns}.{target._schema.name.split('::')[-1]}"
    return getattr(target, "__name__", str(target))


def node_label(node: fx.Node) -> str:
    """How reports name a node: its graph name and, where known, the module path it came from."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        path = path.replace("L['self'].", "").replace("L['self']", "")
        if path:
            return f"{node.name} ({path})"
    return node.name


def is_pure(node: fx.Node) -> bool:
    """True when a call can be evaluated ahead of time: no mutation, no randomness, no side effect."""
    if node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        if target._schema.is_mutable:
            return False
        if torch.Tag.nondeterministic_seeded in target.tags:
            return False
        return True
    return not node.is_impure()


def iter_calls(gm: fx.GraphModule, targets: Iterable[Any]) -> list[fx.Node]:
    targets = set(targets)
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def global_pool_keepdim(node: fx.Node) -> bool | None:
    """keepdim when ``node`` averages over every spatial dim of an N-C-spatial tensor, else None."""
    if node.target not in (aten.adaptive_avg_pool2d.default, aten.mean.dim) or not isinstance(node.args[0], fx.Node):
        return None
    val = node.args[0].meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    rank = val.dim()
    if rank < 3:
        return None
    if node.target is aten.adaptive_avg_pool2d.default and rank == 4:
        return True if list(node.args[1]) == [1, 1] else None
    if node.target is aten.mean.dim:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if dims is not None and sorted(d % rank for d in dims) == list(range(2, rank)):
            return bool(keepdim)
    return None
