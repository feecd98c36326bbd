"""Invariants every pass must keep, checked by the pass manager after each pass.

1. The graph lints (well-formed, topologically ordered, every get_attr target exists).
2. Every placeholder, get_attr and call node has ``meta["val"]``.
3. ``meta["val"]`` is consistent: propagating fake tensors through the graph again gives the same
   shapes and dtypes as stored (symbolic sizes compared by expression).
4. For passes that claim exactness: the outputs on the sample inputs equal those before the pass
   within the stated tolerance.

``refresh_meta`` recomputes ``meta["val"]`` for passes that change shapes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.fx.experimental._config as fx_config
from torch.utils import _pytree as pytree

from .graph import fake_mode_of, get_attr_value

__all__ = ["VerificationError", "verify_graph", "refresh_meta", "compare_outputs", "max_abs_diff"]


class VerificationError(AssertionError):
    """A graph broke one of the IR invariants; the message names the node."""


class _FakeProp(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, mode):
        super().__init__(gm, garbage_collect_values=True)
        self.mode = mode
        self.results: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "placeholder":
            result = n.meta["val"]
        elif n.op == "get_attr":
            result = self.mode.from_tensor(get_attr_value(self.module, n.target), static_shapes=True)
        elif n.op == "output":
            return super().run_node(n)
        else:
            with self.mode:
                result = super().run_node(n)
        self.results[n] = result
        return result


def _propagate(gm: fx.GraphModule) -> dict[fx.Node, Any]:
    mode = fake_mode_of(gm)
    prop = _FakeProp(gm, mode)
    placeholders = gm.graph.find_nodes(op="placeholder")
    # Reason about sizes as capture did: without size-oblivious reasoning a decomposition that
    # checks `size == 1` would specialize a dynamic batch captured from a sample of 1 to 1.
    with fx_config.patch(backed_size_oblivious=True):
        prop.run(*[p.meta.get("val") for p in placeholders])
    return prop.results


def refresh_meta(gm: fx.GraphModule) -> None:
    """Recompute ``meta["val"]`` of every node from the placeholders' values and the attributes."""
    for node, val in _propagate(gm).items():
        node.meta["val"] = val


def _signature(val: Any) -> Any:
    if isinstance(val, torch.Tensor):
        return (tuple(str(s) for s in val.shape), val.dtype)
    if isinstance(val, (list, tuple)):
        return tuple(_signature(v) for v in val)
    if isinstance(val, torch.SymInt):
        return str(val)
    return type(val).__name__


def verify_graph(gm: fx.GraphModule, *, check_meta: bool = True) -> None:
    """Raise VerificationError if the graph breaks an IR invariant (see the module docstring)."""
    try:
        gm.graph.lint()
    except Exception as exc:  # noqa: BLE001
        raise VerificationError(f"graph does not lint: {exc}") from exc
    if not check_meta:
        return
    missing = [n.name for n in gm.graph.nodes if n.op != "output" and "val" not in n.meta]
    if missing:
        raise VerificationError(f"nodes without meta['val']: {', '.join(missing[:10])}")
    try:
        fresh = _propagate(gm)
    except Exception as exc:  # noqa: BLE001
        raise VerificationError(f"fake-tensor propagation failed: {type(exc).__name__}: {exc}") from exc
    for node, val in fresh.items():
        if node.op == "get_attr":
            continue
        stored = node.meta.get("val")
        if _signature(stored) != _signature(val):
            raise VerificationError(
                f"meta['val'] of {node.name} ({node.target}) is stale: stored {_signature(stored)}, "
                f"recomputed {_signature(val)}"
            )


def max_abs_diff(ref: Any, out: Any) -> list[float]:
    """Max absolute difference per tensor leaf of two output structures.

    NaN in both at the same place counts as equal; a NaN (or inf) in only one of them is an
    infinite difference, so a pass that starts producing NaNs can never pass a tolerance check.
    """
    ref_leaves = [x for x in pytree.tree_leaves(ref) if isinstance(x, torch.Tensor)]
    out_leaves = [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
    if len(ref_leaves) != len(out_leaves):
        raise VerificationError(f"output count changed: {len(ref_leaves)} → {len(out_leaves)}")
    diffs = []
    for i, (a, b) in enumerate(zip(ref_leaves, out_leaves)):
        if a.shape != b.shape:
            raise VerificationError(f"output {i} changed shape: {tuple(a.shape)} → {tuple(b.shape)}")
        if not a.numel():
            diffs.append(0.0)
            continue
        a64, b64 = a.double(), b.double()
        diff = (a64 - b64).abs()
        same_special = (a64.isnan() & b64.isnan()) | (a64.isinf() & (a64 == b64))
        diff = torch.where(same_special, torch.zeros_like(diff), diff.nan_to_num(nan=float("inf")))
        diffs.append(diff.max().item())
    return diffs


def compare_outputs(ref: Any, out: Any, *, atol: float, rtol: float, what: str) -> None:
    """Raise VerificationError naming the worst output if ``out`` differs from ``ref`` beyond tolerance."""
    ref_leaves = [x for x in pytree.tree_leaves(ref) if isinstance(x, torch.Tensor)]
    out_leaves = [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
    diffs = max_abs_diff(ref, out)
    for i, (a, b, d) in enumerate(zip(ref_leaves, out_leaves, diffs)):
        finite = a.double().abs().nan_to_num(nan=0.0, posinf=0.0)
        bound = atol + rtol * (finite.max().item() if finite.numel() else 0.0)
        if d > bound:
            raise VerificationError(
                f"{what}: output {i} differs by up to {d:.3g} (allowed {bound:.3g} = atol {atol:g} + rtol {rtol:g} * max|ref|)"
            )
