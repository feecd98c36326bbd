"""Channel spaces and dependency analysis for structured pruning, over the captured ATen graph.

The model
---------
Every dimension of every tensor value in the graph (activations, parameters, buffers) is a
*channel space*. Each space is described by a *layout tree* over *channel classes*:

- ``Leaf``: a class of ``n`` channels. Classes are the nodes of a union-find: two spaces that hold
  the same channels at the same indices share (a root of) the same leaf. Removing channel ``i`` of a
  class removes index ``i`` from every place the class occurs.
- ``Sum(a, b, ...)``: concatenation of index ranges (``cat``, ``split``, ``slice``): indices
  ``[0, |a|)`` are ``a``'s, ``[|a|, |a|+|b|)`` are ``b``'s.
- ``Prod(a, b, ...)``: a row-major product (``view``/``reshape``/``flatten``, grouped convolutions,
  attention heads): index ``i*|b| + j`` is channel ``i`` of ``a`` combined with channel ``j`` of ``b``.
  Flattening ``[N, C, H, W]`` into ``[N, C*H*W]`` gives ``Prod(C, H, W)``: removing channel ``c``
  removes the block ``[c*H*W, (c+1)*H*W)`` of the next linear's in-features. Splitting a hidden size
  into ``(heads, head_dim)`` gives ``Prod(heads, head_dim)``; both factors are classes of their own.

An op rule *unifies* the trees of the spaces it relates. Unification refines classes where needed
(a leaf is split into ``Sum`` parts or factored into ``Prod`` factors; the refinement applies to
every place the class occurs, i.e. "a split of a class splits all its members at the same relative
position") and unions leaves of equal length. Layouts that cannot be matched (``[6, 4] -> [4, 6]``)
freeze every class involved. Each op touches each of its spaces a constant number of times, and
union-find with path halving makes the whole analysis near-linear in the graph size.

Fail closed
-----------
- An op without a rule freezes every space of its inputs and outputs; the summary names the op.
- A rule must account for every dimension of every tensor it reads or writes: a dimension it does
  not map (a convolution's kernel and spatial dims, a reduced dim, the softmax dim) is frozen.
- Model inputs and outputs are frozen; so are sizes read as numbers (``sym_size`` of a static dim).
- Pointwise ops are recognised by ATen's own ``Tag.pointwise`` (a declared property of the op, not a
  name match), plus a short explicit list of untagged ones (dropout, copies, hardswish).

A class is *prunable* when its size is a constant >= 2, nothing froze it, and it occurs in at least
one ``nn.Parameter`` (so there is something to shrink; buffers such as running statistics shrink
along, but a class found only in buffers -- a position-id table -- is not a channel). Classes in no
parameter or buffer are irrelevant and not reported. ``layer_norm``/``rms_norm`` tie their normalized
dims to their affine parameters but mark the class *approximate*: removing channels changes the
normalization statistics (``layer_norm="freeze"`` freezes them instead).

Soundness does not depend on the order the rules run in: splitting, factoring and aliasing a class
only re-describe the same indices, and unions only add constraints, so every tie made earlier still
holds at the end. What the order can change is granularity (how finely a class is split).

Limits (each fails closed, with the reason in the summary): strided slices; a reshape whose factors
cannot be aligned (``[6, 4] -> [4, 6]``); grouped-query attention; group norm prunes whole groups
only; padded, rolled and indexed (gathered) dims are frozen (their other dims tie); ops not in the
table (``cumsum``, ``scatter``, factories such as ``arange``, ...). Attention has heads and head
dims as separate groups (q/k share a head dim, v has its own).

Ratios over product dims
------------------------
A ratio is meant for tensor dims: pruning at 0.5 should halve a channel dim, not each class in it.
Where a dim is a product of two or more prunable classes (a grouped conv's input
``Prod(groups, channels per group)``, attention's ``Prod(heads, head_dim)``), pruning every factor at
``r`` would remove ``1 - (1 - r) ** k`` of the dim (75% at 0.5 for two factors). So each prunable
class gets a *share* ``e`` of the ratio and keeps ``(1 - r) ** e`` of its channels
(``ChannelAnalysis.product_shares``); the factors of every product share it so that the dim keeps
``1 - r``. The policy (``factors``) picks the factor: "inner" (the default) prunes the last factor
(row-major) -- channels per group and head dims; every group and head stays, as Torch-Pruning does
-- which is also what makes a grouped conv's MACs fall to ``(1 - r) ** 2`` like an ungrouped one's
(MACs are output channels x input channels *per group*); "outer" prunes whole groups and whole heads
(head dims and group widths stay, which SDPA kernels and per-group conv kernels like, but a grouped
conv's MACs fall only to ``1 - r``); "balanced" gives each of ``k`` factors ``e = 1/k``. Either choice
prefers a factor that is elsewhere the *only* prunable class of an activation dim (a grouped conv
whose channels per group a group norm freezes can shrink only by whole groups). A class in no product
of prunable classes has ``e = 1``; ``round_to`` rounds each factor to the multiple that keeps the
activation dims it occurs in multiples of ``round_to`` (``ChannelAnalysis.round_units``).

Shapes: the sizes come from ``meta["val"]``. A graph captured from a batch-1 sample may carry literal
1s where the dynamic batch flows (size-oblivious export; e.g. the MLP after torchvision's attention).
Those can only make rules fail (sizes that disagree, a reshape that cannot be grouped), never tie
wrong channels, because the batch symbol never equals a static size. So the analysis runs on the
stored shapes and, only when a rule failed on a tensor with a dynamic size in a batch-1 capture,
re-propagates the shapes (meta tensors with the batch at a prime, one pass of ~0.1 ms per node; a
fake-tensor pass if that cannot map the sizes back) and analyses again with the ones that differ.

Pruning a set of classes then (see ``PruningPlan``) gives, for each space, the kept indices
(``index_select`` of parameters) and the new size (shape constants in the graph: view/reshape sizes,
split sizes, slice bounds, head counts via reshape sizes, ``layer_norm``'s normalized_shape, group
counts, the attention scale) -- each rule comes with the rewrite of its op's shape arguments.
"""

from __future__ import annotations

import difflib
import math
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import sympy
import torch
import torch.fx as fx

from .graph import get_attr_value, op_name

__all__ = [
    "resolve_ignore",
    "ChannelAnalysis",
    "ChannelGroup",
    "FACTOR_POLICIES",
    "ParamDim",
    "PruningPlan",
    "analyze_channels",
    "rule_table",
]

aten = torch.ops.aten

# ---------------------------------------------------------------------------------------------
# sizes: python ints for static dims, sympy expressions for symbolic (dynamic batch) ones

Size = Any  # int | sympy.Expr


def _is_int(s: Size) -> bool:
    return type(s) is int


_DIV_CACHE: dict[tuple, Any] = {}
_NUM_CACHE: dict[Any, int] = {}


def _eq(a: Size, b: Size) -> bool:
    if type(a) is int and type(b) is int:
        return a == b
    if type(a) is int or type(b) is int:
        return False  # symbolic sizes are kept as expressions only when they are not constants
    return a == b or sympy.expand(a - b) == 0


def _div(a: Size, b: Size) -> Size | None:
    """a / b when it divides exactly (a positive int, or a monomial in the size symbols), else None."""
    if type(a) is int and type(b) is int:
        return a // b if b and a % b == 0 else None
    key = (a, b)
    if key in _DIV_CACHE:
        return _DIV_CACHE[key]
    q = sympy.cancel(sympy.sympify(a) / sympy.sympify(b))
    _, den = sympy.fraction(q)
    res: Any = None
    if den == 1:
        if q.is_Integer:
            res = int(q) if int(q) > 0 else None
        else:
            coeff, _ = q.as_coeff_Mul()
            if coeff.is_Integer and coeff > 0 and len(sympy.Add.make_args(q)) == 1 and q.is_polynomial(*q.free_symbols):
                res = q
    _DIV_CACHE[key] = res
    return res


def _num(s: Size) -> int:
    """A number that orders sizes consistently (symbols evaluated at a large surrogate value)."""
    if type(s) is int:
        return s
    if s not in _NUM_CACHE:
        _NUM_CACHE[s] = int(s.subs({sym: 1009 for sym in s.free_symbols}))
    return _NUM_CACHE[s]


def _mul(a: Size, b: Size) -> Size:
    if type(a) is int and type(b) is int:
        return a * b
    r = sympy.sympify(a) * b
    return int(r) if r.is_Integer else r


def _add(a: Size, b: Size) -> Size:
    if type(a) is int and type(b) is int:
        return a + b
    r = sympy.sympify(a) + b
    return int(r) if r.is_Integer else r


def size_of(s: Any) -> Size:
    """int for a static size, a sympy expression for a symbolic one."""
    if isinstance(s, int):
        return int(s)
    if isinstance(s, torch.SymInt):
        expr = s.node.expr
        return int(expr) if expr.is_Integer else expr
    raise TypeError(f"not a size: {s!r}")


# ---------------------------------------------------------------------------------------------
# layout trees and the union-find over classes


class Mismatch(Exception):
    """Two layouts cannot be matched (the caller freezes every class of both)."""


_MAX_REASONS = 4


class Leaf:
    """A channel class. Only the union-find root's fields (alias, frozen, approx) are meaningful."""

    __slots__ = ("parent", "rank", "size", "alias", "frozen", "approx", "uid")
    _next = 0

    def __init__(self, size: Size):
        self.parent = self
        self.rank = 0
        self.size = size
        self.alias: Any = None  # the tree this class was refined into (split or factored)
        self.frozen: list[str] | None = None
        self.approx: list[str] | None = None
        Leaf._next += 1
        self.uid = Leaf._next

    def __repr__(self) -> str:
        return f"L{self.uid}[{self.size}]"


class Sum:
    __slots__ = ("parts", "size")

    def __init__(self, parts: list):
        self.parts = parts
        s: Size = 0
        for p in parts:
            s = _add(s, p.size)
        self.size = s

    def __repr__(self) -> str:
        return "Sum(" + ", ".join(map(repr, self.parts)) + ")"


class Prod:
    __slots__ = ("parts", "size")

    def __init__(self, parts: list):
        self.parts = parts
        s: Size = 1
        for p in parts:
            s = _mul(s, p.size)
        self.size = s

    def __repr__(self) -> str:
        return "Prod(" + ", ".join(map(repr, self.parts)) + ")"


def mk_sum(parts: list):
    parts = [p for p in parts if not (type(p.size) is int and p.size == 0)]
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return Leaf(0)
    return Sum(parts)


def mk_prod(parts: list):
    kept = [p for p in parts if not (type(p.size) is int and p.size == 1)]
    if len(kept) == 1:
        return kept[0]
    if not kept:
        return parts[0] if parts else Leaf(1)
    return Prod(kept)


def find(x: Leaf) -> Leaf:
    while x.parent is not x:
        x.parent = x.parent.parent
        x = x.parent
    return x


def norm(t):
    """The normal form: a root leaf, a Sum of non-Sums, or a Prod of non-Prods not led by a Sum."""
    if type(t) is Leaf:
        r = find(t)
        a = r.alias
        if a is None:
            return r
        n = norm(a)
        r.alias = n
        return n
    if type(t) is Sum:
        parts = []
        for p in t.parts:
            q = norm(p)
            if type(q) is Sum:
                parts.extend(q.parts)
            elif not (type(q.size) is int and q.size == 0):
                parts.append(q)
        return mk_sum(parts)
    parts = []
    for p in t.parts:
        q = norm(p)
        if type(q) is Prod:
            parts.extend(q.parts)
        else:
            parts.append(q)
    kept = [p for p in parts if not (type(p.size) is int and p.size == 1)]
    if not kept:
        return parts[0]
    if type(kept[0]) is Sum:  # distribute a leading sum: (a + b) x c = a x c + b x c
        rest = kept[1:]
        return norm(Sum([mk_prod([p] + rest) for p in kept[0].parts]))
    return kept[0] if len(kept) == 1 else Prod(kept)


def leaves(t) -> list[Leaf]:
    """The root leaves of a (normalized) tree, each once, in index order of first occurrence."""
    out: list[Leaf] = []
    seen: set[int] = set()
    stack = [norm(t)]
    while stack:
        x = stack.pop()
        if type(x) is Leaf:
            r = find(x)
            if r.alias is not None:
                stack.append(norm(r))
            elif id(r) not in seen:
                seen.add(id(r))
                out.append(r)
        else:
            stack.extend(reversed(x.parts))
    return out


def _add_reasons(old: list[str] | None, new: Iterable[str]) -> list[str]:
    out = list(old or [])
    for r in new:
        if r not in out and len(out) < _MAX_REASONS:
            out.append(r)
    return out


def freeze_tree(t, reason: str) -> None:
    for leaf in leaves(t):
        if leaf.frozen is None or (reason not in leaf.frozen and len(leaf.frozen) < _MAX_REASONS):
            leaf.frozen = _add_reasons(leaf.frozen, [reason])


def mark_approx(t, reason: str) -> None:
    for leaf in leaves(t):
        leaf.approx = _add_reasons(leaf.approx, [reason])


def _union(a: Leaf, b: Leaf) -> None:
    if a.rank < b.rank:
        a, b = b, a
    b.parent = a
    if a.rank == b.rank:
        a.rank += 1
    if b.frozen:
        a.frozen = _add_reasons(a.frozen, b.frozen)
    if b.approx:
        a.approx = _add_reasons(a.approx, b.approx)


def _alias(r: Leaf, t) -> None:
    """Refine class ``r`` into the layout ``t`` (same size): every occurrence of r now reads t."""
    if r in leaves(t):
        raise Mismatch(f"a class of {r.size} channels would contain itself")
    r.alias = t
    if r.frozen:
        for reason in r.frozen:
            freeze_tree(t, reason)
    if r.approx:
        for reason in r.approx:
            mark_approx(t, reason)


def _split(t, k: Size):
    """An equivalent ``(first k indices, rest)`` of ``t``, refining classes as needed."""
    t = norm(t)
    if type(t) is Leaf:
        if not (_is_int(t.size) and _is_int(k)):
            raise Mismatch(f"cannot split a dynamic size {t.size} at {k}")
        a, b = Leaf(k), Leaf(t.size - k)
        _alias(t, Sum([a, b]))
        return a, b
    if type(t) is Sum:
        acc: Size = 0
        for i, p in enumerate(t.parts):
            end = _add(acc, p.size)
            if _eq(end, k):
                return mk_sum(t.parts[: i + 1]), mk_sum(t.parts[i + 1 :])
            if _num(end) > _num(k):
                if not (_is_int(k) and _is_int(acc)):
                    raise Mismatch(f"cannot split a dynamic size at {k}")
                p1, p2 = _split(p, k - acc)
                return mk_sum(t.parts[:i] + [p1]), mk_sum([p2] + t.parts[i + 1 :])
            acc = end
        raise Mismatch(f"split point {k} outside a range of {t.size}")
    f1, rest = t.parts[0], t.parts[1:]
    inner = mk_prod(rest).size
    q = _div(k, inner)
    if q is not None:
        a, b = _split(f1, q)
        return mk_prod([a] + rest), mk_prod([b] + rest)
    if not (_is_int(k) and _is_int(inner)):
        raise Mismatch(f"cannot split a dynamic layout at {k}")
    # the cut falls inside one block of the outer factor: isolate that block, then cut the inner
    # factors (a refinement of classes shared by every block, so all blocks stay alike)
    i, r = divmod(k, inner)
    head, mid = _split(f1, i) if i else (None, f1)
    one, tail = _split(mid, 1) if _num(mid.size) > 1 else (mid, None)
    del one
    r1, r2 = _split(mk_prod(rest), r)
    first = [mk_prod([head] + rest)] if head is not None else []
    second = [mk_prod([tail] + rest)] if tail is not None else []
    return mk_sum(first + [r1]), mk_sum([r2] + second)


def _factor(t, k: Size):
    """An equivalent ``(outer of size k, inner)`` row-major factorization of ``t``."""
    t = norm(t)
    m = _div(t.size, k)
    if m is None:
        raise Mismatch(f"{t.size} channels do not factor as {k} x ...")
    if type(t) is Leaf:
        a, b = Leaf(k), Leaf(m)
        _alias(t, Prod([a, b]))
        return a, b
    if type(t) is Prod:
        f1, rest = t.parts[0], t.parts[1:]
        s1 = f1.size
        if _eq(s1, k):
            return f1, mk_prod(rest)
        if _div(s1, k) is not None:
            a, b = _factor(f1, k)
            return a, mk_prod([b] + rest)
        q = _div(k, s1)
        if q is not None:
            c, d = _factor(mk_prod(rest), q)
            return mk_prod([f1, c]), d
        raise Mismatch(f"{t.size} channels laid out as {[p.size for p in t.parts]} do not factor as {k} x {m}")
    # a Sum of k equal-length parts is a product: (which part) x (index in part); the parts are
    # then the same channels, and the part index is a fixed structure (frozen)
    if not _is_int(k):
        raise Mismatch(f"cannot factor a concatenation by a dynamic size {k}")
    pieces, rest = [], t
    for _ in range(k - 1):
        a, rest = _split(rest, m)
        pieces.append(a)
    pieces.append(rest)
    for p in pieces[1:]:
        unify(pieces[0], p)
    sel = Leaf(k)
    sel.frozen = [f"selects one of {k} concatenated parts"]
    return sel, pieces[0]


def unify(a, b) -> None:
    """Make layouts ``a`` and ``b`` (of equal size) the same channels, index by index."""
    a, b = norm(a), norm(b)
    if a is b:
        return
    if not _eq(a.size, b.size):
        raise Mismatch(f"sizes differ: {a.size} vs {b.size}")
    ta, tb = type(a), type(b)
    if ta is Leaf and tb is Leaf:
        _union(a, b)
    elif ta is Leaf:
        _alias(a, b)
    elif tb is Leaf:
        _alias(b, a)
    elif ta is Sum or tb is Sum:
        _unify_seq(a.parts if ta is Sum else [a], b.parts if tb is Sum else [b], _split)
    else:
        _unify_seq(a.parts, b.parts, _factor)


def _unify_seq(xs: list, ys: list, cut: Callable) -> None:
    xs, ys = list(reversed(xs)), list(reversed(ys))
    while xs and ys:
        x, y = norm(xs.pop()), norm(ys.pop())
        if cut is _factor:
            if type(x) is Prod:
                xs.extend(reversed(x.parts))
                ys.append(y)
                continue
            if type(y) is Prod:
                ys.extend(reversed(y.parts))
                xs.append(x)
                continue
            if _is_int(x.size) and x.size == 1:
                ys.append(y)
                continue
            if _is_int(y.size) and y.size == 1:
                xs.append(x)
                continue
        sx, sy = x.size, y.size
        if _eq(sx, sy):
            unify(x, y)
        elif _num(sx) > _num(sy):
            x1, x2 = cut(x, sy)
            unify(x1, y)
            xs.append(x2)
        else:
            y1, y2 = cut(y, sx)
            unify(x, y1)
            ys.append(y2)
    rest = [norm(t) for t in xs + ys]
    if any(not (_is_int(t.size) and t.size in (0, 1)) for t in rest):
        raise Mismatch("layouts of different structure")


# ---------------------------------------------------------------------------------------------
# materialization: kept indices, new sizes, channel coordinates


def _kept(t, decisions: dict[Leaf, torch.Tensor]) -> torch.Tensor | None:
    """Kept positions of a layout (None: all kept)."""
    t = norm(t)
    if type(t) is Leaf:
        return decisions.get(t)
    subs = [_kept(p, decisions) for p in t.parts]
    if all(s is None for s in subs):
        return None
    sizes = [int(p.size) for p in t.parts]
    subs = [torch.arange(n) if s is None else s for s, n in zip(subs, sizes)]
    if type(t) is Sum:
        out, off = [], 0
        for s, n in zip(subs, sizes):
            out.append(s + off)
            off += n
        return torch.cat(out)
    idx = torch.zeros(1, dtype=torch.long)
    for s, n in zip(subs, sizes):
        idx = (idx[:, None] * n + s[None, :]).reshape(-1)
    return idx


def _new_size(t, decisions: dict[Leaf, torch.Tensor]) -> Size:
    t = norm(t)
    if type(t) is Leaf:
        d = decisions.get(t)
        return t.size if d is None else int(d.numel())
    acc: Size = 0 if type(t) is Sum else 1
    for p in t.parts:
        s = _new_size(p, decisions)
        acc = _add(acc, s) if type(t) is Sum else _mul(acc, s)
    return acc


def _coords(t) -> dict[Leaf, torch.Tensor]:
    """For each class in a (static) layout: its channel index at every position (-1 elsewhere)."""
    t = norm(t)
    n = int(t.size)
    if type(t) is Leaf:
        return {t: torch.arange(n)}
    out: dict[Leaf, torch.Tensor] = {}
    if type(t) is Sum:
        off = 0
        for p in t.parts:
            size = int(p.size)
            for leaf, c in _coords(p).items():
                arr = out.setdefault(leaf, torch.full((n,), -1, dtype=torch.long))
                seg = arr[off : off + size]
                arr[off : off + size] = torch.where(c >= 0, c, seg)
            off += size
        return out
    sizes = [int(p.size) for p in t.parts]
    for j, p in enumerate(t.parts):
        outer, inner = math.prod(sizes[:j]), math.prod(sizes[j + 1 :])
        for leaf, c in _coords(p).items():
            full = c.view(1, -1, 1).expand(outer, sizes[j], inner).reshape(n)
            if leaf in out:
                out[leaf] = torch.where(out[leaf] >= 0, out[leaf], full)
            else:
                out[leaf] = full
    return out


# ---------------------------------------------------------------------------------------------
# the analysis

Key = tuple  # (node, item): item is None for a tensor-valued node, an int for an element of a tuple


class Unsupported(Exception):
    """A rule cannot handle this call (the engine freezes everything the call touches)."""


@dataclass(frozen=True)
class ParamDim:
    """One dimension of a parameter/buffer where a group occurs (``target`` is the attribute path)."""

    target: str
    dim: int
    size: int
    is_parameter: bool
    blocks: int = 1  # positions per channel of the group in this dim (e.g. head_dim for a head)

    def __str__(self) -> str:
        extra = f" ({self.blocks} per channel)" if self.blocks != 1 else ""
        return f"{self.target}[dim {self.dim}]{extra}"


@dataclass(eq=False)
class ChannelGroup:
    """A class of channels that must be pruned together: removing channel i removes it everywhere."""

    id: int
    size: Any
    params: list[ParamDim]
    activations: list[str]
    frozen: list[str]
    approximate: list[str]
    leaf: Leaf = field(repr=False)

    @property
    def prunable(self) -> bool:
        return self.why_not is None

    @property
    def why_not(self) -> str | None:
        """None for a prunable group, else why it is not."""
        if self.frozen:
            return "; ".join(self.frozen)
        if not _is_int(self.size):
            return f"its size {self.size} depends on the dynamic input size"
        if self.size < 2:
            return "a single channel"
        if not any(p.is_parameter for p in self.params):
            return "only buffers, no parameter (an index or mask table, not channels)"
        return None

    def describe(self, limit: int = 6) -> str:
        names = [str(p) for p in self.params]
        head = ", ".join(names[:limit]) + (f", ... ({len(names)} tensor dims)" if len(names) > limit else "")
        return f"#{self.id} {self.size} ch: {head}"


@dataclass
class PruningPlan:
    """Which channels of which classes to keep; shared by the pass and the test oracles."""

    analysis: "ChannelAnalysis"
    keep: dict[Leaf, torch.Tensor]  # class root -> sorted kept channel indices

    def kept(self, key: Key, dim: int) -> torch.Tensor | None:
        return _kept(self.analysis.tree(key, dim, create=False), self.keep)

    def new_size(self, key: Key, dim: int) -> Size:
        return _new_size(self.analysis.tree(key, dim, create=False), self.keep)

    def old_size(self, key: Key, dim: int) -> Size:
        return norm(self.analysis.tree(key, dim, create=False)).size

    def changed(self, key: Key, dim: int) -> bool:
        t = self.analysis.spaces.get((key[0], key[1], dim))
        return t is not None and any(leaf in self.keep for leaf in leaves(t))

    def tree_new_size(self, t) -> Size:
        return _new_size(t, self.keep)

    def param_kept(self) -> dict[str, list[torch.Tensor | None]]:
        """For each attribute target that changes: per dim, the kept indices (None: unchanged)."""
        out: dict[str, list[torch.Tensor | None]] = {}
        for target, nodes in self.analysis.attr_nodes.items():
            node = nodes[0]
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                continue
            per_dim = []
            for d in range(val.dim()):
                per_dim.append(self.kept((node, None), d) if (node, None, d) in self.analysis.spaces else None)
            if any(k is not None for k in per_dim):
                out[target] = per_dim
        return out


class ChannelAnalysis:
    """The channel spaces of a captured graph, their layouts, and the groups (see module docstring)."""

    def __init__(self, gm: fx.GraphModule, *, layer_norm: str = "approximate", ignore: Sequence[str] = ()):
        if layer_norm not in ("approximate", "freeze"):
            raise ValueError(f"layer_norm must be 'approximate' or 'freeze', got {layer_norm!r}")
        self.gm = gm
        self.layer_norm = layer_norm
        self.notes: list[str] = []
        self._fix: dict[Key, tuple] | None = None  # shapes that replace untrustworthy meta["val"] ones
        self._reset()
        self._run()
        if self._suspect and _batch_one(gm):
            # a graph captured from a batch-1 sample may carry literal 1s where the batch flows; a
            # rule that failed on a dynamic-size tensor may have failed on those: re-propagate the
            # shapes (meta tensors, one cheap pass) and, where any disagree, analyse again
            fix = _consistent_shapes(gm, self.notes)
            if fix:
                self._fix = fix
                self._reset()
                self._run()
        if ignore:
            self._apply_ignore(list(ignore))

    def _reset(self) -> None:
        self.spaces: dict[tuple, Any] = {}  # (node, item, dim) -> layout tree
        self.aux: dict[fx.Node, dict] = {}  # per node facts the shape rewrite needs
        self.unsupported: dict[str, list[str]] = defaultdict(list)
        self.attr_nodes: dict[str, list[fx.Node]] = defaultdict(list)
        self._shapes: dict[Key, tuple] = {}
        self._groups: list[ChannelGroup] | None = None
        self.ignored: dict[str, list[str]] = {}
        self._suspect = False  # a rule failed where a dynamic size was involved (see __init__)

    # ---- spaces
    def shape(self, key: Key) -> tuple:
        s = self._shapes.get(key)
        if s is None:
            s = self._fix.get(key) if self._fix is not None else None
            if s is None:
                node, item = key
                val = node.meta["val"]
                if item is not None:
                    val = val[item]
                s = tuple(size_of(x) for x in val.shape)
            self._shapes[key] = s
        return s

    def _dynamic(self, keys: Iterable[Key]) -> bool:
        return any(not _is_int(x) for k in keys for x in self.shape(k))

    def tree(self, key: Key, dim: int, *, create: bool = True):
        k = (key[0], key[1], dim)
        t = self.spaces.get(k)
        if t is None:
            if not create:
                raise KeyError(f"no channel space for {key[0].name} dim {dim}")
            t = Leaf(self.shape(key)[dim])
            self.spaces[k] = t
        return t

    def freeze(self, key: Key, dim: int, reason: str) -> None:
        freeze_tree(self.tree(key, dim), reason)

    # ---- the walk over the graph
    def _run(self) -> None:
        attr_by_tensor: dict[int, fx.Node] = {}
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                for key in _tensor_keys(node):
                    for d in range(len(self.shape(key))):
                        self.freeze(key, d, f"model input '{node.name}'")
            elif node.op == "get_attr":
                val = node.meta.get("val")
                if not isinstance(val, torch.Tensor):
                    continue
                self.attr_nodes[node.target].append(node)
                try:
                    tensor = get_attr_value(self.gm, node.target)
                except AttributeError:
                    tensor = None
                first = self.attr_nodes[node.target][0]
                if first is node and tensor is not None:
                    first = attr_by_tensor.setdefault(id(tensor), node)
                if first is not node:  # the same tensor read twice: one set of channels
                    for d in range(val.dim()):
                        self._unify_spaces((first, None), d, (node, None), d, "shared weight")
            elif node.op == "output":
                for arg in _flat_nodes(node.args):
                    for key in _tensor_keys(arg):
                        for d in range(len(self.shape(key))):
                            self.freeze(key, d, "model output")
            elif node.op == "call_function":
                self._apply_rule(node)
            else:
                self._freeze_all(node, f"{node.op} {node.target} has no channel rule")
                self.unsupported[f"{node.op} {node.target}"].append(node.name)

    def _unify_spaces(self, ka: Key, da: int, kb: Key, db: int, why: str) -> None:
        ta, tb = self.tree(ka, da), self.tree(kb, db)
        try:
            unify(ta, tb)
        except Mismatch as exc:
            self._suspect = True
            reason = f"{why}: {exc}"
            freeze_tree(ta, reason)
            freeze_tree(tb, reason)

    def _io_keys(self, node: fx.Node) -> list[Key]:
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node) and isinstance(node.args[1], int):
            src = node.args[0]
            if src.op == "call_function" and isinstance(src.meta.get("val"), (list, tuple)):
                return [k for k in _tensor_keys(src) if k[1] == node.args[1]] + _tensor_keys(node)
        keys = []
        for arg in _flat_nodes((node.args, node.kwargs)):
            keys.extend(_tensor_keys(arg))
        keys.extend(_tensor_keys(node))
        return keys

    def _freeze_all(self, node: fx.Node, reason: str) -> None:
        for key in self._io_keys(node):
            for d in range(len(self.shape(key))):
                self.freeze(key, d, reason)

    def _apply_rule(self, node: fx.Node) -> None:
        rule = _lookup_rule(node.target)
        keys = self._io_keys(node)
        if rule is None:
            if not keys:
                return  # arithmetic on sizes, assertions: no tensor, no channel
            name = op_name(node)
            self.unsupported[name].append(node.name)
            self._freeze_all(node, f"no channel rule for {name} (node {node.name})")
            return
        ctx = _Ctx(self, node)
        try:
            rule(ctx)
        except Unsupported as exc:
            self._suspect = self._suspect or self._dynamic(keys)
            self._freeze_all(node, f"{op_name(node)} (node {node.name}): {exc}")
            return
        for key in keys:
            for d in range(len(self.shape(key))):
                if (key[0], key[1], d) not in ctx.touched:
                    if not _is_int(self.shape(key)[d]):
                        self._suspect = True
                    who = "output" if key[0] is node else f"input {key[0].name}"
                    self.freeze(key, d, f"{op_name(node)} (node {node.name}) does not map dim {d} of its {who}")

    # ---- ignored layers
    def _apply_ignore(self, ignore: list[str]) -> None:
        for item, hits in resolve_ignore(self.gm, ignore).items():
            self.ignored[item] = [n.name for n in hits]
            for node in hits:
                for key in _tensor_keys(node):
                    for d in range(len(self.shape(key))):
                        self.freeze(key, d, f"ignored layer '{item}'")

    # ---- groups
    @property
    def groups(self) -> list[ChannelGroup]:
        """Every class that occurs in a parameter or buffer, in graph order."""
        if self._groups is None:
            self._groups = self._collect()
        return self._groups

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    @property
    def frozen(self) -> list[ChannelGroup]:
        return [g for g in self.groups if not g.prunable]

    def _collect(self) -> list[ChannelGroup]:
        params: dict[Leaf, list[ParamDim]] = defaultdict(list)
        acts: dict[Leaf, list[str]] = defaultdict(list)
        order: dict[Leaf, int] = {}
        param_ids = {id(p) for p in self.gm.parameters()}
        for (node, item, d), t in self.spaces.items():
            ls = leaves(t)
            if not ls:
                continue
            if node.op == "get_attr":
                if self.attr_nodes[node.target][0] is not node:
                    continue
                tensor = get_attr_value(self.gm, node.target)
                n = int(norm(t).size) if _is_int(norm(t).size) else 0
                for leaf in ls:
                    order.setdefault(leaf, len(order))
                    blocks = n // int(leaf.size) if _is_int(leaf.size) and leaf.size else 1
                    params[leaf].append(ParamDim(node.target, d, n, id(tensor) in param_ids, blocks))
            else:
                label = f"{node.name}[{d}]" if item is None else f"{node.name}[{item}][{d}]"
                for leaf in ls:
                    acts[leaf].append(label)
        groups = []
        for leaf in sorted(params, key=order.__getitem__):
            groups.append(
                ChannelGroup(
                    id=len(groups),
                    size=leaf.size,
                    params=params[leaf],
                    activations=acts.get(leaf, []),
                    frozen=list(leaf.frozen or []),
                    approximate=list(leaf.approx or []),
                    leaf=leaf,
                )
            )
        return groups

    # ---- how a ratio splits over the factors of product spaces
    def product_shares(self, policy: str = "inner") -> dict[ChannelGroup, float]:
        """For each prunable group, the exponent ``e`` of its keep fraction: pruning at ratio ``r``
        keeps ``(1 - r) ** e`` of its channels, so that a product dim loses ``r``, not
        ``1 - (1 - r) ** k`` (see "Ratios over product dims" in the module docstring).

        ``policy`` picks, in each product of two or more prunable classes (a grouped conv's groups x
        channels per group, attention's heads x head dim), the factor that takes the ratio (e = 1;
        the others keep every channel, e = 0): "inner" the last (row-major: channels per group,
        head dims), "outer" the first (whole groups, whole heads) -- either way preferring a factor
        that is elsewhere the only prunable class of an activation dim (a grouped conv whose output
        channels per group a group norm freezes shrinks through its groups); "balanced" gives each
        of k factors e = 1/k. Groups in no such product get e = 1. Where two chosen factors meet in
        one product (conflicting choices), each takes 1/k there: a product never loses more than r.
        """
        if policy not in FACTOR_POLICIES:
            raise ValueError(f"factors must be one of {', '.join(map(repr, FACTOR_POLICIES))}, got {policy!r}")
        prunable = {g.leaf: g for g in self.prunable}
        constraints = _product_constraints(self.spaces.values(), prunable.keys())
        share: dict[Leaf, float] = {}
        if policy == "balanced":
            for fs in constraints:
                for f in fs:
                    for x in f:
                        share[x] = min(share.get(x, 1.0), 1.0 / len(fs))
        elif constraints:
            sole: set[Leaf] = set()  # the only prunable class of some activation dim (term)
            seen: set[tuple] = set()
            for (node, _item, _d), t in self.spaces.items():
                if node.op == "get_attr":
                    continue
                for term in _product_terms(norm(t), exact=True) or ():
                    key = tuple(id(x) for x in term)
                    if key in seen:
                        continue
                    seen.add(key)
                    p = [x for x in term if x in prunable]
                    if len(p) == 1:
                        sole.add(p[0])
            chosen: set[Leaf] = set()
            excluded: set[Leaf] = set()
            for fs in constraints:
                hit = [i for i, f in enumerate(fs) if any(x in chosen for x in f)]
                if not hit:
                    cands = [i for i, f in enumerate(fs) if any(x not in excluded for x in f)]
                    if not cands:
                        continue
                    pool = [i for i in cands if any(x in sole for x in fs[i])] or cands
                    hit = [pool[-1] if policy == "inner" else pool[0]]
                for i in hit:  # the chosen factor: all its classes not excluded elsewhere
                    chosen.update(x for x in fs[i] if x not in excluded)
                for j, f in enumerate(fs):
                    if j not in hit:
                        excluded.update(x for x in f if x not in chosen)
            for fs in constraints:
                for f in fs:
                    for x in f:
                        share[x] = 1.0 if x in chosen else 0.0
            for fs in constraints:
                k = sum(1 for f in fs if any(x in chosen for x in f))
                if k > 1:
                    for f in fs:
                        for x in f:
                            if x in chosen:
                                share[x] = min(share[x], 1.0 / k)
        return {g: share.get(leaf, 1.0) for leaf, g in prunable.items()}

    def round_units(self, round_to: int, shares: dict[ChannelGroup, float]) -> dict[ChannelGroup, int]:
        """For each prunable group, the multiple its kept channel count must be so that every
        activation dim it occurs in keeps a multiple of ``round_to`` channels: ``round_to`` where it
        is a dim's only factor, ``round_to / gcd(round_to, n)`` where it is multiplied by
        ``n`` channels that are not pruned (a grouped conv's 32 groups times the channels per
        group: any count is a multiple of 8 channels), the lcm over its occurrences."""
        if round_to <= 1:
            return {g: 1 for g in shares}
        by_leaf = {g.leaf: g for g in shares}
        pruned = {g.leaf for g, e in shares.items() if e > 0}
        units: dict[Leaf, int] = {}
        seen: set[tuple] = set()
        for (node, _item, _d), t in self.spaces.items():
            if node.op == "get_attr":
                continue
            for term in _product_terms(norm(t)):
                key = tuple(id(x) for x in term)
                if key in seen:
                    continue
                seen.add(key)
                for leaf in term:
                    if leaf not in pruned:
                        continue
                    rest = 1
                    for other in term:
                        if other is not leaf and other not in pruned and _is_int(other.size):
                            rest *= other.size
                    u = round_to // math.gcd(round_to, rest)
                    units[leaf] = math.lcm(units.get(leaf, 1), u)
        return {g: (units.get(leaf, round_to) if leaf in pruned else 1) for leaf, g in by_leaf.items()}

    def param_coords(self, group: ChannelGroup) -> list[tuple[str, int, torch.Tensor]]:
        """Where the group's channels sit in each parameter dim: (target, dim, channel index per position)."""
        out = []
        for p in group.params:
            node = self.attr_nodes[p.target][0]
            c = _coords(self.tree((node, None), p.dim, create=False)).get(group.leaf)
            if c is not None:
                out.append((p.target, p.dim, c))
        return out

    def summary(self, *, limit: int = 40) -> str:
        groups = self.groups
        pr = [g for g in groups if g.prunable]
        fr = [g for g in groups if not g.prunable]
        nch = sum(int(g.size) for g in pr)
        lines = [
            f"channel groups of {self.gm.meta.get('fxpress', {}).get('source', type(self.gm).__name__)}: "
            f"{len(self.gm.graph.nodes)} nodes, {len(groups)} groups with parameters: "
            f"{len(pr)} prunable ({nch} channels), {len(fr)} not prunable"
        ]
        if pr:
            lines.append("prunable:")
            for g in pr[:limit]:
                extra = "  [approximate: " + "; ".join(g.approximate) + "]" if g.approximate else ""
                lines.append(f"  {g.describe()}{extra}")
            if len(pr) > limit:
                lines.append(f"  ... {len(pr) - limit} more")
        kernel = [g for g in fr if g.frozen == [KERNEL_WINDOW]]
        tables = [g for g in fr if g.frozen != [KERNEL_WINDOW] and not any(p.is_parameter for p in g.params)]
        table_ids = {id(g) for g in tables}
        shown = [g for g in fr if g.frozen != [KERNEL_WINDOW] and not (_is_int(g.size) and g.size < 2) and id(g) not in table_ids]
        if shown:
            lines.append("not prunable:")
            for g in shown[:limit]:
                lines.append(f"  {g.describe(3)} -- {g.why_not}")
            if len(shown) > limit:
                lines.append(f"  ... {len(shown) - limit} more")
        hidden = len(fr) - len(shown)
        if hidden:
            single = hidden - len(kernel) - len(tables)
            lines.append(f"  (not listed: {len(kernel)} convolution kernel-window dims, {len(tables)} dims of buffers only "
                         f"(index tables, not channels), {single} single-channel dims)")
        if self.unsupported:
            ops = ", ".join(f"{op} x{len(ns)} ({', '.join(ns[:3])}{', ...' if len(ns) > 3 else ''})" for op, ns in self.unsupported.items())
            lines.append(f"ops without a channel rule (their spaces are frozen): {ops}")
        return "\n".join(lines)

    __str__ = summary

    def __repr__(self) -> str:
        return f"<ChannelAnalysis: {len(self.groups)} groups, {len(self.prunable)} prunable>"

    # ---- applying a plan to the graph's shape constants
    def rewrite_shapes(self, plan: PruningPlan) -> list[str]:
        """Rewrite the shape arguments of every call whose spaces change (see each rule's rewrite)."""
        changes = []
        for node in list(self.gm.graph.nodes):
            if node.op != "call_function":
                continue
            rw = _lookup_rewrite(node.target)
            if rw is None:
                continue
            if not any(plan.changed(k, d) for k in self._io_keys(node) for d in range(len(self.shape(k)))):
                continue
            msg = rw(self, node, plan)
            if msg:
                changes.append(f"{node.name}: {msg}")
        return changes


def resolve_ignore(
    gm: fx.GraphModule, ignore: Sequence[str], *, what: str = "ignored layers",
    how: str = "Name a module path (e.g. 'layer4.1.conv2' or 'fc') or a graph node name.",
) -> dict[str, list[fx.Node]]:
    """The call nodes each ignored name covers: a module path (the module and everything inside
    it) or a node name. A name that matches nothing raises ValueError naming it (with close matches):
    "{what} not found in the model: ... {how}"."""
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    paths = {n: _module_path(n) for n in calls}
    out: dict[str, list[fx.Node]] = {}
    missing = []
    for item in ignore:
        hits = [n for n in calls if n.name == item or paths[n] == item or paths[n].startswith(item + ".")]
        if hits:
            out[item] = hits
        else:
            missing.append(item)
    if missing:
        known: set[str] = {n.name for n in calls}
        for p in paths.values():
            while p:
                known.add(p)
                p = p.rpartition(".")[0]
        parts = []
        for item in missing:
            close = difflib.get_close_matches(item, sorted(known), n=3)
            parts.append(f"{item!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
        raise ValueError(
            f"{what} not found in the model: " + "; ".join(parts) + f". {how}"
        )
    return out


def analyze_channels(gm: fx.GraphModule, *, layer_norm: str = "approximate", ignore: Sequence[str] = ()) -> ChannelAnalysis:
    """Channel dependency analysis of a captured graph (see the module docstring)."""
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"analyze_channels takes a captured GraphModule, got {type(gm).__name__}")
    return ChannelAnalysis(gm, layer_norm=layer_norm, ignore=ignore)


def _batch_one(gm: fx.GraphModule) -> bool:
    """Whether a placeholder has a dynamic dim whose sample size was < 2 (a batch-1 capture)."""
    for p in gm.graph.find_nodes(op="placeholder"):
        val = p.meta.get("val")
        if isinstance(val, torch.Tensor):
            for s in val.shape:
                if isinstance(s, torch.SymInt) and (s.node.hint is None or s.node.hint < 2):
                    return True
    return False


def _consistent_shapes(gm: fx.GraphModule, notes: list[str]) -> dict[Key, tuple] | None:
    """Shapes that replace the captured ``meta["val"]`` ones where those cannot be trusted.

    A graph captured from a sample of batch 1 (size-oblivious export) carries some ``meta["val"]``
    with a literal 1 where the dynamic batch flows (e.g. the MLP after torchvision's attention).
    The shapes are re-propagated with meta tensors, the batch at a prime (1009), and mapped back to
    the batch symbol; where that cannot be done (several dynamic sizes, an op without a meta kernel,
    a size that does not map back), by a fake-tensor pass with a dynamic-dim hint of 7 (several
    times slower). Returns the shapes that differ from the stored ones (None or {}: none differ).
    """
    try:
        fix = _meta_shapes(gm)
    except Exception:  # noqa: BLE001 - an op without a meta kernel, a data-dependent size: the fallback
        fix = None
    if fix is not None:
        return fix
    return _fake_shapes(gm, notes)


_PRIME = 1009


def _meta_shapes(gm: fx.GraphModule) -> dict[Key, tuple] | None:
    placeholders = gm.graph.find_nodes(op="placeholder")
    syms = set()
    for p in placeholders:
        val = p.meta.get("val")
        if isinstance(val, torch.Tensor):
            for x in val.shape:
                if isinstance(x, torch.SymInt):
                    syms.add(x.node.expr)
    if len(syms) != 1 or not next(iter(syms)).is_Symbol:
        return None
    sym = next(iter(syms))
    meta = torch.device("meta")

    class _Prop(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            if n.op == "placeholder":
                v = n.meta.get("val")
                if not isinstance(v, torch.Tensor):
                    return v
                return torch.empty([_PRIME if isinstance(x, torch.SymInt) else int(x) for x in v.shape], dtype=v.dtype, device=meta)
            if n.op == "get_attr":
                v = get_attr_value(self.module, n.target)
                return torch.empty_like(v, device=meta) if isinstance(v, torch.Tensor) else v
            if n.op == "call_function":
                if n.meta.get("val") is None and n.target is not operator.getitem:
                    return None  # assertions (_assert_tensor_metadata, ...) and other ops without a value
                if "device" in n.kwargs:
                    args, kwargs = self.fetch_args_kwargs_from_env(n)
                    return n.target(*args, **dict(kwargs, device=meta))
            return super().run_node(n)

    interp = _Prop(gm, garbage_collect_values=False)
    interp.run(*[None] * len(placeholders))
    env = interp.env
    fix: dict[Key, tuple] = {}
    for node in gm.graph.nodes:
        for key in _tensor_keys(node):
            stored = node.meta["val"] if key[1] is None else node.meta["val"][key[1]]
            got = env.get(node)
            if key[1] is not None:
                got = got[key[1]] if isinstance(got, (list, tuple)) else None
            if not isinstance(got, torch.Tensor) or got.dim() != stored.dim():
                return None
            new, changed = [], False
            for a, v in zip(stored.shape, got.shape):
                a, v = size_of(a), int(v)
                if _is_int(a) and a == v:
                    new.append(a)
                    continue
                if not _is_int(a) and a.free_symbols <= {sym} and int(a.subs(sym, _PRIME)) == v:
                    new.append(a)
                    continue
                changed = True
                if v % _PRIME == 0:
                    new.append(v // _PRIME * sym if v // _PRIME != 1 else sym)
                elif v < _PRIME:
                    new.append(v)
                else:
                    return None
            if changed:
                fix[key] = tuple(new)
    return fix


def _fake_shapes(gm: fx.GraphModule, notes: list[str]) -> dict[Key, tuple] | None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    placeholders = gm.graph.find_nodes(op="placeholder")
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    results: dict[fx.Node, Any] = {}

    class _Prop(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            if n.op == "placeholder":
                v = n.meta.get("val")
                if not isinstance(v, torch.Tensor):
                    r = v
                else:
                    dyn = [isinstance(x, torch.SymInt) for x in v.shape]
                    real = torch.empty([7 if d else int(x) for d, x in zip(dyn, v.shape)], dtype=v.dtype)
                    ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC if d else DimDynamic.STATIC for d in dyn])
                    r = mode.from_tensor(real, symbolic_context=ctx)
            elif n.op == "get_attr":
                v = get_attr_value(self.module, n.target)
                r = mode.from_tensor(v, static_shapes=True) if isinstance(v, torch.Tensor) else v
            elif n.op == "output":
                return super().run_node(n)
            else:
                with mode:
                    r = super().run_node(n)
            results[n] = r
            return r

    try:
        _Prop(gm).run(*[None] * len(placeholders))
    except Exception as exc:  # noqa: BLE001 - fall back to the stored values, and say so
        notes.append(f"shapes taken from meta['val'] (re-propagation failed: {type(exc).__name__}: {exc})")
        return None
    fix: dict[Key, tuple] = {}
    for node, val in results.items():
        for key in _tensor_keys(node):
            v = val if key[1] is None else (val[key[1]] if isinstance(val, (list, tuple)) else None)
            if isinstance(v, torch.Tensor):
                fix[key] = tuple(size_of(x) for x in v.shape)
    return fix


FACTOR_POLICIES = ("inner", "outer", "balanced")


def _product_constraints(trees: Iterable[Any], prunable: Iterable[Leaf]) -> list[list[list[Leaf]]]:
    """Every product (a ``Prod`` node of a normalized layout) with two or more factors holding
    prunable classes, as its list of factors (each the prunable classes under that factor, in
    row-major order), each distinct product once."""
    prunable = set(prunable)
    seen: set[tuple] = set()
    out: list[list[list[Leaf]]] = []

    def walk(t) -> list[Leaf]:
        if type(t) is Leaf:
            return [t] if t in prunable else []
        if type(t) is Sum:
            res: list[Leaf] = []
            for p in t.parts:
                res.extend(x for x in walk(p) if x not in res)
            return res
        sets = [walk(f) for f in t.parts]
        nonempty = [fs for fs in sets if fs]
        if len(nonempty) >= 2:
            key = tuple(tuple(id(x) for x in fs) for fs in nonempty)
            if key not in seen:
                seen.add(key)
                out.append(nonempty)
        res = []
        for fs in sets:
            res.extend(x for x in fs if x not in res)
        return res

    for t in trees:
        t = norm(t)
        if type(t) is not Leaf:
            walk(t)
    return out


_MAX_TERMS = 256


def _product_terms(t, exact: bool = False) -> list[list[Leaf]] | None:
    """A normalized layout as a sum of products of classes (each term the classes multiplied in
    one index range). Past _MAX_TERMS terms: None when ``exact``, else each class alone (the
    conservative answer for rounding)."""

    def expand(t) -> list[list[Leaf]] | None:
        if type(t) is Leaf:
            return [[t]]
        if type(t) is Sum:
            out: list[list[Leaf]] = []
            for p in t.parts:
                sub = expand(p)
                if sub is None:
                    return None
                out.extend(sub)
            return out if len(out) <= _MAX_TERMS else None
        terms: list[list[Leaf]] = [[]]
        for f in t.parts:
            ft = expand(f)
            if ft is None:
                return None
            terms = [a + b for a in terms for b in ft]
            if len(terms) > _MAX_TERMS:
                return None
        return terms

    out = expand(t)
    if out is None and not exact:
        return [[x] for x in leaves(t)]
    return out


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").replace("L['self']", "")


def _tensor_keys(x: Any) -> list[Key]:
    if not isinstance(x, fx.Node):
        return []
    val = x.meta.get("val")
    if isinstance(val, torch.Tensor):
        return [(x, None)]
    if isinstance(val, (list, tuple)) and x.op == "call_function" and x.target is not operator.getitem:
        return [(x, i) for i, v in enumerate(val) if isinstance(v, torch.Tensor)]
    return []


def _flat_nodes(x: Any) -> list[fx.Node]:
    out: list[fx.Node] = []

    def walk(a):
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                walk(b)
        elif isinstance(a, dict):
            for b in a.values():
                walk(b)

    walk(x)
    return out


# ---------------------------------------------------------------------------------------------
# rule context


class _Ctx:
    def __init__(self, an: ChannelAnalysis, node: fx.Node):
        self.an = an
        self.node = node
        self.touched: set[tuple] = set()
        self.a = _bind(node)
        self.out: Key = (node, None)

    def key(self, x: Any) -> Key | None:
        if isinstance(x, fx.Node) and isinstance(x.meta.get("val"), torch.Tensor):
            return (x, None)
        return None

    def shape(self, key: Key) -> tuple:
        return self.an.shape(key)

    def nd(self, key: Key) -> int:
        return len(self.an.shape(key))

    def touch(self, key: Key, d: int) -> None:
        self.touched.add((key[0], key[1], d % max(self.nd(key), 1)))

    def t(self, key: Key, d: int):
        d = d % self.nd(key)
        self.touched.add((key[0], key[1], d))
        return self.an.tree(key, d)

    def define(self, key: Key, d: int, tree, why: str = "") -> None:
        """Space (key, d) is ``tree``: assigned directly when new, else unified."""
        d = d % self.nd(key)
        self.touched.add((key[0], key[1], d))
        k = (key[0], key[1], d)
        cur = self.an.spaces.get(k)
        if cur is None:
            if not _eq(norm(tree).size, self.shape(key)[d]):
                self.an._suspect = self.an._suspect or not (_is_int(norm(tree).size) and _is_int(self.shape(key)[d]))
                reason = (f"{op_name(self.node)} (node {self.node.name}): sizes disagree "
                          f"({norm(tree).size} vs {self.shape(key)[d]})")
                freeze_tree(tree, reason)
                self.an.freeze(key, d, reason)
                return
            self.an.spaces[k] = tree
        else:
            self.unify(cur, tree, why)

    def same(self, ka: Key, da: int, kb: Key, db: int) -> None:
        """Dim ``da`` of ``ka`` and dim ``db`` of ``kb`` hold the same channels in the same order."""
        self.define(kb, db, self.t(ka, da))

    def unify(self, ta, tb, why: str = "") -> None:
        try:
            unify(ta, tb)
        except Mismatch as exc:
            self.an._suspect = self.an._suspect or self.an._dynamic(self.an._io_keys(self.node))
            reason = f"{op_name(self.node)} (node {self.node.name}){' ' + why if why else ''}: {exc}"
            freeze_tree(ta, reason)
            freeze_tree(tb, reason)

    def freeze(self, key: Key, d: int, reason: str) -> None:
        freeze_tree(self.t(key, d), f"{op_name(self.node)} (node {self.node.name}): {reason}")

    def broadcast(self, src: Key, dst: Key, src_dims: Sequence[int] | None = None, dst_dims: Sequence[int] | None = None) -> None:
        """Tie ``src`` to ``dst`` by broadcasting (aligned from the right); size-1 src dims tie nothing."""
        sd = list(range(self.nd(src))) if src_dims is None else list(src_dims)
        dd = list(range(self.nd(dst))) if dst_dims is None else list(dst_dims)
        ss, ds = self.shape(src), self.shape(dst)
        for i in range(1, len(sd) + 1):
            a = sd[-i]
            if i > len(dd):
                if _is_int(ss[a]) and ss[a] == 1:
                    self.touch(src, a)
                continue
            b = dd[-i]
            if _eq(ss[a], ds[b]):
                self.same(src, a, dst, b)
            elif _is_int(ss[a]) and ss[a] == 1:
                self.touch(src, a)


def _bind(node: fx.Node) -> dict[str, Any]:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return {"args": node.args}
    out: dict[str, Any] = {}
    pos = 0
    for a in target._schema.arguments:
        if not a.kwarg_only and pos < len(node.args):
            out[a.name] = node.args[pos]
            pos += 1
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
        else:
            out[a.name] = None
    return out


def _set_arg(node: fx.Node, name: str, value: Any) -> None:
    """Set a schema argument by name (positional when it was given positionally)."""
    target = node.target
    pos = 0
    for a in target._schema.arguments:
        if a.name == name:
            if not a.kwarg_only and pos < len(node.args):
                args = list(node.args)
                args[pos] = value
                node.args = tuple(args)
            elif not a.kwarg_only and pos == len(node.args):
                node.args = tuple(node.args) + (value,)
            else:
                kwargs = dict(node.kwargs)
                kwargs[name] = value
                node.kwargs = kwargs
            return
        if not a.kwarg_only:
            pos += 1
    raise KeyError(name)


def _set_arg_positional(node: fx.Node, name: str, value: Any) -> None:
    """Set an argument, filling earlier positional arguments with their schema defaults."""
    target = node.target
    args = list(node.args)
    for i, a in enumerate(target._schema.arguments):
        if a.kwarg_only:
            break
        if a.name == name:
            while len(args) < i:
                b = target._schema.arguments[len(args)]
                args.append(node.kwargs.get(b.name, b.default_value if b.has_default_value() else None))
            if len(args) == i:
                args.append(value)
            else:
                args[i] = value
            node.args = tuple(args)
            kwargs = {k: v for k, v in node.kwargs.items() if k not in {x.name for x in target._schema.arguments[: len(args)]}}
            node.kwargs = kwargs
            return
    _set_arg(node, name, value)


# ---------------------------------------------------------------------------------------------
# the rule table

_RULES: dict[Any, Callable[[_Ctx], None]] = {}
_REWRITES: dict[Any, Callable[[ChannelAnalysis, fx.Node, PruningPlan], str | None]] = {}
_DOCS: dict[str, str] = {}


def _rule(*ops: Any, rewrite: Callable | None = None, doc: str = ""):
    def deco(fn):
        for op in ops:
            if op is None:
                continue
            _RULES[op] = fn
            if rewrite is not None:
                _REWRITES[op] = rewrite
            _DOCS[str(op)] = doc or (fn.__doc__ or "").strip().splitlines()[0]
        return fn

    return deco


def _ops(*names: str) -> list[Any]:
    """OpOverloads by 'name.overload' (missing ones in this torch are skipped)."""
    out = []
    for n in names:
        base, _, ov = n.partition(".")
        packet = getattr(aten, base, None)
        if packet is None:
            continue
        op = getattr(packet, ov or "default", None)
        if op is not None:
            out.append(op)
    return out


_EXTRA_POINTWISE = set(
    _ops(
        "hardswish", "hardswish_", "dropout", "dropout_", "feature_dropout", "alpha_dropout", "feature_alpha_dropout",
        "clone", "contiguous", "alias", "detach", "detach_", "lift_fresh_copy", "_to_copy", "to.dtype", "to.device",
        "to.dtype_layout", "to.other", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
        "copy_", "copy", "fill_.Scalar", "fill.Scalar", "fill_.Tensor", "fill.Tensor", "zero_", "zero", "hardsigmoid_", "silu_", "gelu_", "mish", "mish_",
    )
)


def _is_pointwise(target: Any) -> bool:
    if target in _EXTRA_POINTWISE:
        return True
    if not isinstance(target, torch._ops.OpOverload):
        return False
    if torch.Tag.pointwise in target.tags:
        return True
    name = target._schema.name.split("::")[-1]
    if target.namespace == "aten" and name.endswith("_") and not name.startswith("_"):
        packet = getattr(aten, name[:-1], None)
        ov = getattr(packet, target._overloadname, None) if packet is not None else None
        return ov is not None and torch.Tag.pointwise in ov.tags
    return False


def _lookup_rule(target: Any):
    rule = _RULES.get(target)
    if rule is not None:
        return rule
    if _is_pointwise(target):
        return _pointwise
    return None


def _lookup_rewrite(target: Any):
    return _REWRITES.get(target)


def rule_table() -> dict[str, str]:
    """Each op with a channel rule and what the rule ties (pointwise ops: ATen's Tag.pointwise)."""
    table = dict(sorted(_DOCS.items()))
    table["<any op tagged torch.Tag.pointwise>"] = "broadcasting elementwise: aligned dims tie; size-1 dims tie nothing"
    return table


def _pointwise(ctx: _Ctx) -> None:
    """Elementwise with broadcasting: each input dim equal to the aligned output dim ties to it."""
    node = ctx.node
    outs = _tensor_keys(node)
    if not outs:
        # ops returning nothing (in-place assertions): their inputs keep their dims
        for arg in _flat_nodes((node.args, node.kwargs)):
            for key in _tensor_keys(arg):
                for d in range(ctx.nd(key)):
                    ctx.touch(key, d)
        return
    out = outs[0]
    for arg in _flat_nodes((node.args, node.kwargs)):
        for key in _tensor_keys(arg):
            if key[0] is node:
                continue
            ctx.broadcast(key, out)
    for o in outs[1:]:  # e.g. native_dropout's mask: same shape as the output
        for d in range(ctx.nd(o)):
            ctx.same(out, d, o, d)
    for d in range(ctx.nd(out)):
        if (node, None, d) not in ctx.touched and _is_int(ctx.shape(out)[d]) and ctx.shape(out)[d] == 1:
            ctx.touch(out, d)


_rule(*_ops("native_dropout"), doc="elementwise: output and mask tie to the input")(_pointwise)
_rule(*_EXTRA_POINTWISE, doc="elementwise (copies, dtype casts, dropout, *_like, hardswish)")(_pointwise)


@_rule(*_ops("prelu", "_prelu_kernel"))
def _prelu(ctx: _Ctx) -> None:
    """prelu: elementwise; a per-channel weight ties to dim 1."""
    x, w = ctx.key(ctx.a["self"]), ctx.key(ctx.a["weight"])
    for d in range(ctx.nd(x)):
        ctx.same(x, d, ctx.out, d)
    if ctx.nd(w) == 1 and ctx.nd(x) >= 2 and _eq(ctx.shape(w)[0], ctx.shape(x)[1]):
        ctx.same(w, 0, x, 1)
    elif all(_is_int(s) and s == 1 for s in ctx.shape(w)):
        for d in range(ctx.nd(w)):
            ctx.touch(w, d)


def _sym_size(ctx: _Ctx) -> None:
    """sym_size: reads a size as a number; a static dim read this way is frozen."""
    x = ctx.key(ctx.a["self"])
    dim = ctx.a["dim"] % ctx.nd(x)
    for d in range(ctx.nd(x)):
        if d != dim or not _is_int(ctx.shape(x)[d]):
            ctx.touch(x, d)


_rule(*_ops("sym_size.int"))(_sym_size)


# ---- contractions


@_rule(*_ops("linear"))
def _linear(ctx: _Ctx) -> None:
    """linear: x[..., K] W[N, K] b[N] -> y[..., N]; K ties x and W dim 1; N ties W dim 0, b, y."""
    x, w, b = ctx.key(ctx.a["input"]), ctx.key(ctx.a["weight"]), ctx.key(ctx.a["bias"])
    nx = ctx.nd(x)
    if ctx.nd(w) != 2:
        raise Unsupported("weight is not 2-D")
    for d in range(nx - 1):
        ctx.same(x, d, ctx.out, d)
    ctx.same(x, nx - 1, w, 1)
    ctx.same(w, 0, ctx.out, ctx.nd(ctx.out) - 1)
    if b is not None:
        ctx.broadcast(b, ctx.out)


def _matmul_like(ctx: _Ctx, a: Key, b: Key) -> None:
    na, nb, out = ctx.nd(a), ctx.nd(b), ctx.out
    no = ctx.nd(out)
    ka = na - 1
    kb = nb - 2 if nb >= 2 else 0
    ctx.same(a, ka, b, kb)
    od = no - 1
    if nb >= 2:
        ctx.same(b, nb - 1, out, od)
        od -= 1
    if na >= 2:
        ctx.same(a, na - 2, out, od)
        od -= 1
    batch_out = list(range(od + 1))
    if na > 2:
        ctx.broadcast(a, out, list(range(na - 2)), batch_out)
    if nb > 2:
        ctx.broadcast(b, out, list(range(nb - 2)), batch_out)


@_rule(*_ops("matmul", "mm", "bmm"))
def _matmul(ctx: _Ctx) -> None:
    """matmul/mm/bmm: contracted dims tie; rows/cols tie to the output; batch dims broadcast."""
    a = ctx.key(ctx.a["self"])
    b = ctx.key(ctx.a.get("other", ctx.a.get("mat2")))
    _matmul_like(ctx, a, b)


@_rule(*_ops("addmm"))
def _addmm(ctx: _Ctx) -> None:
    """addmm: bias + mat1 @ mat2."""
    _matmul_like(ctx, ctx.key(ctx.a["mat1"]), ctx.key(ctx.a["mat2"]))
    ctx.broadcast(ctx.key(ctx.a["self"]), ctx.out)


def _conv_groups_rewrite(an: ChannelAnalysis, node: fx.Node, plan: PruningPlan) -> str | None:
    g = an.aux.get(node, {}).get("groups")
    if g is None:
        return None
    old, new = norm(g).size, plan.tree_new_size(g)
    if old == new:
        return None
    _set_arg_positional(node, "groups", int(new))
    return f"groups {old} -> {new}"


KERNEL_WINDOW = "kernel window of a convolution (not a channel)"


def _conv_core(ctx: _Ctx, x: Key, w: Key, b: Key | None, groups: int, transposed: bool) -> None:
    nw = ctx.nd(w)
    for d in range(2, nw):
        freeze_tree(ctx.t(w, d), KERNEL_WINDOW)
    batched = ctx.nd(x) == nw
    c = 1 if batched else 0
    if batched:
        ctx.same(x, 0, ctx.out, 0)
    if not _is_int(groups) or groups < 1:
        raise Unsupported(f"groups={groups}")
    if not transposed:
        cin_pg = ctx.t(w, 1)
        if groups == 1:
            ctx.define(x, c, cin_pg)
            ctx.same(w, 0, ctx.out, c)
        else:
            g = Leaf(groups)
            ctx.an.aux.setdefault(ctx.node, {})["groups"] = g
            ctx.unify(ctx.t(x, c), Prod([g, cin_pg]), "input channels by group")
            cout = ctx.shape(w)[0]
            ctx.unify(ctx.t(w, 0), Prod([g, Leaf(cout // groups)]), "output channels by group")
            ctx.same(w, 0, ctx.out, c)
    else:
        # weight: [C_in, C_out / groups, k...]
        ctx.same(x, c, w, 0)
        if groups == 1:
            ctx.same(w, 1, ctx.out, c)
        else:
            g = Leaf(groups)
            ctx.an.aux.setdefault(ctx.node, {})["groups"] = g
            cin = ctx.shape(w)[0]
            ctx.unify(ctx.t(w, 0), Prod([g, Leaf(cin // groups)]), "input channels by group")
            ctx.unify(ctx.t(ctx.out, c), Prod([g, ctx.t(w, 1)]), "output channels by group")
    if b is not None:
        ctx.same(ctx.out, c, b, 0)


_CONVS = _ops("conv1d", "conv2d", "conv3d", "conv1d.padding", "conv2d.padding", "conv3d.padding")
_CONV_T = _ops("conv_transpose1d", "conv_transpose2d.input", "conv_transpose3d.input")


@_rule(*_CONVS, rewrite=_conv_groups_rewrite)
def _conv(ctx: _Ctx) -> None:
    """conv: x.C ties W dim 1 (groups=1); W dim 0 ties b and y.C. Grouped (incl. depthwise):
    x.C = groups x (W dim 1) and W dim 0 = groups x (out per group); whole groups prune by
    rewriting `groups`. Kernel and spatial dims are frozen."""
    a = ctx.a
    _conv_core(ctx, ctx.key(a["input"]), ctx.key(a["weight"]), ctx.key(a["bias"]), a["groups"], False)


@_rule(*_CONV_T, rewrite=_conv_groups_rewrite)
def _conv_transpose(ctx: _Ctx) -> None:
    """conv_transpose: x.C ties W dim 0; W dim 1 (x groups) ties b and y.C; grouped as conv."""
    a = ctx.a
    _conv_core(ctx, ctx.key(a["input"]), ctx.key(a["weight"]), ctx.key(a["bias"]), a["groups"], True)


@_rule(*_ops("convolution", "_convolution"), rewrite=_conv_groups_rewrite)
def _convolution(ctx: _Ctx) -> None:
    """convolution (decomposed form): conv or conv_transpose by its `transposed` flag."""
    a = ctx.a
    _conv_core(ctx, ctx.key(a["input"]), ctx.key(a["weight"]), ctx.key(a["bias"]), a["groups"], bool(a["transposed"]))


# ---- normalizations


def _per_channel_norm(ctx: _Ctx, x: Key, vectors: Sequence[Any]) -> None:
    nx = ctx.nd(x)
    outs = _tensor_keys(ctx.node)
    for d in range(nx):
        ctx.same(x, d, outs[0], d)
    if nx < 2:
        raise Unsupported("input without a channel dim")
    for v in vectors:
        k = ctx.key(v)
        if k is not None:
            ctx.same(x, 1, k, 0)
    for o in outs[1:]:  # saved statistics / updated running stats: per channel, or empty
        for d in range(ctx.nd(o)):
            if _eq(ctx.shape(o)[d], ctx.shape(x)[1]):
                ctx.same(x, 1, o, d)
            elif _is_int(ctx.shape(o)[d]) and ctx.shape(o)[d] in (0, 1):
                ctx.touch(o, d)


@_rule(*_ops("batch_norm", "instance_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
             "_native_batch_norm_legit_functional", "native_batch_norm", "_batch_norm_with_update",
             "_batch_norm_no_update", "_native_batch_norm_legit.no_stats", "cudnn_batch_norm"))
def _batch_norm(ctx: _Ctx) -> None:
    """batch_norm/instance_norm: y ties x; x.C ties weight, bias, running stats (per channel: exact)."""
    a = ctx.a
    _per_channel_norm(ctx, ctx.key(a["input"]), [a.get("weight"), a.get("bias"), a.get("running_mean"), a.get("running_var")])


def _normalized_shape_rewrite(an: ChannelAnalysis, node: fx.Node, plan: PruningPlan) -> str | None:
    x = (node.args[0], None)
    old = list(_bind(node)["normalized_shape"])
    nd = len(an.shape(x))
    new = [plan.new_size(x, nd - len(old) + i) for i in range(len(old))]
    if all(_eq(a, b) for a, b in zip(old, new)):
        return None
    _set_arg(node, "normalized_shape", [int(s) for s in new])
    return f"normalized_shape {old} -> {new}"


@_rule(*_ops("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"), rewrite=_normalized_shape_rewrite)
def _layer_norm(ctx: _Ctx) -> None:
    """layer_norm/rms_norm: y ties x; normalized dims tie weight/bias -- approximate (statistics change)."""
    a = ctx.a
    x = ctx.key(a["input"])
    shape = list(a["normalized_shape"])
    nx, k = ctx.nd(x), len(shape)
    outs = _tensor_keys(ctx.node)
    for d in range(nx):
        ctx.same(x, d, outs[0], d)
    for o in outs[1:]:  # mean / rstd: leading dims, then size-1 dims
        for d in range(ctx.nd(o)):
            if d < nx - k:
                ctx.same(x, d, o, d)
            else:
                ctx.touch(o, d)
    for name in ("weight", "bias"):
        p = ctx.key(a.get(name))
        if p is not None:
            for i in range(k):
                ctx.same(x, nx - k + i, p, i)
    why = f"{op_name(ctx.node)} (node {ctx.node.name}) normalizes over these channels"
    for i in range(k):
        if ctx.an.layer_norm == "freeze":
            freeze_tree(ctx.t(x, nx - k + i), why)
        else:
            mark_approx(ctx.t(x, nx - k + i), why + "; removing channels changes its statistics")


def _group_norm_rewrite(an: ChannelAnalysis, node: fx.Node, plan: PruningPlan) -> str | None:
    g = an.aux.get(node, {}).get("groups")
    if g is None:
        return None
    old, new = norm(g).size, plan.tree_new_size(g)
    if old == new:
        return None
    _set_arg(node, "num_groups", int(new))
    return f"num_groups {old} -> {new}"


@_rule(*_ops("group_norm"), rewrite=_group_norm_rewrite)
def _group_norm(ctx: _Ctx) -> None:
    """group_norm: x.C = groups x (channels per group); whole groups prune exactly (num_groups is
    rewritten); channels inside a group are frozen (removing one changes the group's statistics)."""
    a = ctx.a
    x = ctx.key(a["input"])
    groups = a["num_groups"]
    for d in range(ctx.nd(x)):
        ctx.same(x, d, ctx.out, d)
    c = ctx.shape(x)[1]
    if not _is_int(c) or c % groups:
        raise Unsupported("channels not divisible by groups")
    g = Leaf(groups)
    cpg = Leaf(c // groups)
    if c // groups > 1:
        cpg.frozen = [f"group_norm (node {ctx.node.name}): channels inside a group share its statistics"]
    ctx.unify(ctx.t(x, 1), Prod([g, cpg]), "channels by group")
    ctx.an.aux.setdefault(ctx.node, {})["groups"] = g
    for name in ("weight", "bias"):
        p = ctx.key(a.get(name))
        if p is not None:
            ctx.same(x, 1, p, 0)


@_rule(*_ops("embedding"))
def _embedding(ctx: _Ctx) -> None:
    """embedding: y[..., D] ties weight dim 1; index dims tie y's leading dims; the vocabulary is frozen."""
    w, idx = ctx.key(ctx.a["weight"]), ctx.key(ctx.a["indices"])
    ni = ctx.nd(idx)
    for d in range(ni):
        ctx.same(idx, d, ctx.out, d)
    ctx.same(w, 1, ctx.out, ni)
    ctx.freeze(w, 0, "the vocabulary (rows looked up by index)")


# ---- attention


def _sdpa_rewrite(an: ChannelAnalysis, node: fx.Node, plan: PruningPlan) -> str | None:
    a = _bind(node)
    q = (a["query"], None)
    nq = len(an.shape(q))
    old = an.shape(q)[nq - 1]
    new = plan.new_size(q, nq - 1)
    if _eq(old, new) or a.get("scale") is not None:
        return None
    _set_arg(node, "scale", 1.0 / math.sqrt(int(old)))
    return f"head dim {old} -> {new}; scale kept at 1/sqrt({old})"


@_rule(*_ops("scaled_dot_product_attention"), rewrite=_sdpa_rewrite)
def _sdpa(ctx: _Ctx) -> None:
    """scaled_dot_product_attention: q/k head dims tie (contracted), v's ties the output's; batch and
    head dims tie across q, k, v, output (heads prune whole); query length ties the output; the key
    length is frozen (softmax over it). A pruned head dim keeps the original 1/sqrt(E) scale."""
    a = ctx.a
    q, k, v = ctx.key(a["query"]), ctx.key(a["key"]), ctx.key(a["value"])
    out = ctx.out
    if a.get("enable_gqa") and not _eq(ctx.shape(q)[-3], ctx.shape(k)[-3]):
        raise Unsupported("grouped-query attention (enable_gqa with fewer key heads)")
    nq, nk, nv, no = ctx.nd(q), ctx.nd(k), ctx.nd(v), ctx.nd(out)
    batch = list(range(no - 2))
    for key, n in ((q, nq), (k, nk), (v, nv)):
        ctx.broadcast(key, out, list(range(n - 2)), batch)
    ctx.same(q, nq - 1, k, nk - 1)
    ctx.same(v, nv - 1, out, no - 1)
    ctx.same(q, nq - 2, out, no - 2)
    ctx.same(k, nk - 2, v, nv - 2)
    ctx.freeze(k, nk - 2, "softmax over the key positions")
    m = ctx.key(a.get("attn_mask"))
    if m is not None:
        nm = ctx.nd(m)
        if nm >= 1:
            if _eq(ctx.shape(m)[nm - 1], ctx.shape(k)[nk - 2]):
                ctx.same(k, nk - 2, m, nm - 1)
            elif ctx.shape(m)[nm - 1] == 1:
                ctx.touch(m, nm - 1)
        if nm >= 2:
            ctx.broadcast(m, out, list(range(nm - 1)), list(range(no - 1)))


@_rule(*_ops("_softmax", "softmax.int", "_log_softmax", "log_softmax.int", "_safe_softmax"))
def _softmax(ctx: _Ctx) -> None:
    """softmax: every dim but the normalized one ties to the output; that one is frozen."""
    x = ctx.key(ctx.a["self"])
    dim = ctx.a["dim"] % ctx.nd(x)
    for d in range(ctx.nd(x)):
        if d != dim:
            ctx.same(x, d, ctx.out, d)


# ---- spatial ops: channels pass through, spatial dims are frozen


def _spatial(k: int):
    def rule(ctx: _Ctx) -> None:
        node = ctx.node
        first = node.args[0]
        x = ctx.key(first)
        nx = ctx.nd(x)
        for o in _tensor_keys(node):
            for d in range(nx - k):
                ctx.same(x, d, o, d)

    rule.__doc__ = f"pooling/interpolation: leading dims tie to the output, the last {k} (spatial) are frozen"
    return rule


for _k, _names in {
    1: ("max_pool1d", "avg_pool1d", "adaptive_avg_pool1d", "adaptive_max_pool1d", "max_pool1d_with_indices",
        "upsample_nearest1d", "upsample_nearest1d.vec", "upsample_linear1d", "upsample_linear1d.vec",
        "reflection_pad1d", "replication_pad1d"),
    2: ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_max_pool2d",
        "max_pool2d_with_indices", "upsample_nearest2d", "upsample_nearest2d.vec", "upsample_bilinear2d",
        "upsample_bilinear2d.vec", "upsample_bicubic2d", "upsample_bicubic2d.vec", "_upsample_nearest_exact2d",
        "_upsample_nearest_exact2d.vec", "reflection_pad2d", "replication_pad2d", "_upsample_bilinear2d_aa",
        "_upsample_bilinear2d_aa.vec"),
    3: ("max_pool3d", "avg_pool3d", "adaptive_avg_pool3d", "max_pool3d_with_indices", "upsample_nearest3d",
        "upsample_nearest3d.vec", "upsample_trilinear3d", "upsample_trilinear3d.vec", "reflection_pad3d",
        "replication_pad3d"),
}.items():
    _rule(*_ops(*_names))(_spatial(_k))


@_rule(*_ops("constant_pad_nd", "pad"))
def _pad(ctx: _Ctx) -> None:
    """pad: a dim whose (before, after) pad is (0, 0) ties to the output, as do the dims the pad
    list does not reach; a really padded (or cropped) dim is frozen."""
    x = ctx.key(ctx.a["self"])
    pad = list(ctx.a["pad"])
    nx = ctx.nd(x)
    for d in range(nx):
        i = nx - 1 - d  # the pad list runs from the last dim backwards, a (before, after) pair each
        pair = pad[2 * i : 2 * i + 2]
        if not pair or all(isinstance(p, int) and p == 0 for p in pair):
            ctx.same(x, d, ctx.out, d)
        else:
            ctx.freeze(x, d, f"padded dim {d} (pad {pair})")
            ctx.freeze(ctx.out, d, f"padded dim {d} (pad {pair})")


@_rule(*_ops("roll"))
def _roll(ctx: _Ctx) -> None:
    """roll: a rolled dim is frozen (a cyclic shift of its positions); the other dims tie to the
    output. A roll of the flattened tensor (no dims) freezes every dim."""
    x = ctx.key(ctx.a["self"])
    nx = ctx.nd(x)
    dims = list(ctx.a.get("dims") or [])
    if not dims:
        raise Unsupported("roll of the flattened tensor")
    rolled = {d % nx for d in dims}
    for d in range(nx):
        if d in rolled:
            ctx.freeze(x, d, f"rolled dim {d} (cyclic shift)")
            ctx.freeze(ctx.out, d, f"rolled dim {d} (cyclic shift)")
        else:
            ctx.same(x, d, ctx.out, d)


def _index_tensors(ctx: _Ctx, indices: Sequence[Any]) -> list[tuple[int, Key]]:
    out = []
    for i, t in enumerate(indices):
        if t is None:
            continue
        k = ctx.key(t)
        if k is None:
            raise Unsupported("an index that is not a tensor")
        if k[0].meta["val"].dtype in (torch.bool, torch.uint8):
            raise Unsupported("a boolean mask index (data-dependent positions)")
        out.append((i, k))
    return out


@_rule(*_ops("index.Tensor", "_unsafe_index.Tensor"))
def _index(ctx: _Ctx) -> None:
    """index (advanced indexing, x[..., idx, ...] with integer index tensors): the indexed dims of
    x are frozen (positions are gathered); x's other dims tie to the output dims they land on; the
    index tensors' dims tie (broadcast) to the output's gathered dims."""
    x = ctx.key(ctx.a["self"])
    nx, no = ctx.nd(x), ctx.nd(ctx.out)
    idx = _index_tensors(ctx, list(ctx.a["indices"]))
    pos = [i for i, _ in idx]
    if not idx:
        for d in range(nx):
            ctx.same(x, d, ctx.out, d)
        return
    nb = no - (nx - len(pos))  # rank of the broadcast index shape
    adjacent = pos == list(range(pos[0], pos[-1] + 1))
    first = pos[0] if adjacent else 0
    # adjacent index tensors put the broadcast dims where they stand, else in front (numpy rules)
    for j, d in enumerate(d for d in range(nx) if d not in pos):
        if not adjacent:
            od = nb + j
        else:
            od = d if d < first else d - len(pos) + nb
        ctx.same(x, d, ctx.out, od)
    for d in pos:
        ctx.freeze(x, d, f"indexed dim {d} (gathered positions)")
    for _, k in idx:
        ctx.broadcast(k, ctx.out, None, list(range(first, first + nb)))


@_rule(*_ops("index_select"))
def _index_select(ctx: _Ctx) -> None:
    """index_select: the indexed dim of x is frozen; the index ties to that output dim; the other
    dims tie to the output."""
    x, i = ctx.key(ctx.a["self"]), ctx.key(ctx.a["index"])
    nx = ctx.nd(x)
    dim = ctx.a["dim"] % max(nx, 1)
    for d in range(nx):
        if d == dim:
            ctx.freeze(x, d, f"indexed dim {d} (gathered positions)")
        else:
            ctx.same(x, d, ctx.out, d)
    if ctx.nd(i) == 1 and nx >= 1:
        ctx.same(i, 0, ctx.out, dim)
    else:
        for d in range(ctx.nd(i)):
            ctx.touch(i, d)


@_rule(*_ops("gather"))
def _gather(ctx: _Ctx) -> None:
    """gather along ``dim``: the output has the index's shape; that dim of x is frozen (gathered);
    every other dim ties index, output and (where the sizes agree) x."""
    x, i = ctx.key(ctx.a["self"]), ctx.key(ctx.a["index"])
    nx = ctx.nd(x)
    if ctx.nd(i) != nx:
        raise Unsupported("index rank differs from the input's")
    dim = ctx.a["dim"] % max(nx, 1)
    for d in range(nx):
        ctx.same(i, d, ctx.out, d)
        if d == dim:
            ctx.freeze(x, d, f"gathered dim {d}")
        elif _eq(ctx.shape(x)[d], ctx.shape(i)[d]):
            ctx.same(x, d, ctx.out, d)
        else:
            ctx.freeze(x, d, f"dim {d} is read partially by the index")


@_rule(*_ops("new_zeros", "new_ones", "new_empty", "new_full"))
def _new_tensor(ctx: _Ctx) -> None:
    """new_zeros/new_ones/new_full/new_empty: the input lends only its dtype and device (its dims
    are untouched); the new tensor's dims have constant sizes and are frozen."""
    x = ctx.key(ctx.a["self"])
    for d in range(ctx.nd(x)):
        ctx.touch(x, d)
    for d in range(ctx.nd(ctx.out)):
        ctx.freeze(ctx.out, d, "a new tensor of a constant size")


@_rule(*_ops("expand_as"))
def _expand_as(ctx: _Ctx) -> None:
    """expand_as: the output has ``other``'s shape (its dims tie to other's); x's dims broadcast
    onto it (size-1 dims tie nothing)."""
    x, o = ctx.key(ctx.a["self"]), ctx.key(ctx.a["other"])
    for d in range(ctx.nd(o)):
        ctx.same(o, d, ctx.out, d)
    ctx.broadcast(x, ctx.out)


@_rule(*_ops("pixel_shuffle"))
def _pixel_shuffle(ctx: _Ctx) -> None:
    """pixel_shuffle(r): x.C = y.C x r x r (the r x r factor goes to space and is frozen)."""
    x = ctx.key(ctx.a["self"])
    r = ctx.a["upscale_factor"]
    nx = ctx.nd(x)
    for d in range(nx - 3):
        ctx.same(x, d, ctx.out, d)
    rr = Leaf(r * r)
    rr.frozen = [f"pixel_shuffle (node {ctx.node.name}): sub-pixel factor"]
    ctx.unify(ctx.t(x, nx - 3), Prod([ctx.t(ctx.out, nx - 3), rr]))


# ---- reductions


def _reduce_dims(ctx: _Ctx, x: Key) -> tuple[set[int], bool]:
    a = ctx.a
    nx = ctx.nd(x)
    dims = a.get("dim")
    if dims is None or dims == []:
        dims = list(range(nx))
    elif isinstance(dims, int):
        dims = [dims]
    keep = bool(a.get("keepdim", False))
    return {d % max(nx, 1) for d in dims}, keep


@_rule(*_ops("mean.dim", "sum.dim_IntList", "amax", "amin", "var.correction", "var.dim", "std.correction", "std.dim",
             "prod.dim_int", "logsumexp", "max.dim", "min.dim", "argmax", "argmin", "any.dim", "all.dim", "any.dims",
             "all.dims", "linalg_vector_norm", "norm.ScalarOpt_dim", "mean.default", "sum.default", "var_mean.correction",
             "std_mean.correction"))
def _reduce(ctx: _Ctx) -> None:
    """reductions: kept dims tie to the output; reduced dims are frozen (removing a channel changes the result)."""
    x = ctx.key(ctx.a["self"])
    red, keep = _reduce_dims(ctx, x)
    for o in _tensor_keys(ctx.node):
        j = 0
        for d in range(ctx.nd(x)):
            if d in red:
                if keep:
                    ctx.touch(o, j)
                    j += 1
                continue
            ctx.same(x, d, o, j)
            j += 1


# ---- concatenation, splitting, indexing


@_rule(*_ops("cat", "concat", "concatenate"))
def _cat(ctx: _Ctx) -> None:
    """cat: the output's cat dim is the concatenation of the inputs' index ranges (any dim); other dims tie."""
    tensors = [ctx.key(t) for t in ctx.a["tensors"]]
    out = ctx.out
    no = ctx.nd(out)
    dim = ctx.a["dim"] % no
    parts = []
    for k in tensors:
        if k is None:
            continue
        if ctx.nd(k) != no:  # legacy cat skips 1-D empty tensors
            for d in range(ctx.nd(k)):
                ctx.touch(k, d)
            continue
        for d in range(no):
            if d != dim:
                ctx.same(k, d, out, d)
        parts.append(ctx.t(k, dim))
    ctx.define(out, dim, Sum(parts), "concatenation")


@_rule(*_ops("stack"))
def _stack(ctx: _Ctx) -> None:
    """stack: each input dim ties to the output dim it lands on; the new dim is frozen."""
    tensors = [ctx.key(t) for t in ctx.a["tensors"]]
    out = ctx.out
    dim = ctx.a["dim"] % ctx.nd(out)
    for k in tensors:
        for d in range(ctx.nd(k)):
            ctx.same(k, d, out, d if d < dim else d + 1)


def _split_rewrite(an: ChannelAnalysis, node: fx.Node, plan: PruningPlan) -> str | None:
    a = _bind(node)
    x = (a["self"], None)
    dim = a["dim"] % len(an.shape(x))
    outs = _tensor_keys(node)
    old = [an.shape(o)[dim] for o in outs]
    new = [plan.new_size(o, dim) for o in outs]
    if all(_eq(o, n) for o, n in zip(old, new)):
        return None
    if not all(_is_int(n) for n in new):
        raise ValueError(f"cannot rewrite {node.name}: pruned split sizes depend on the dynamic size")
    node.target = aten.split_with_sizes.default
    node.args = (a["self"], [int(n) for n in new], dim)
    node.kwargs = {}
    return f"split sizes {old} -> {new}"


@_rule(*_ops("split.Tensor", "split_with_sizes", "split.sizes", "chunk", "unsafe_split.Tensor", "unsafe_split_with_sizes",
             "tensor_split.sections", "tensor_split.indices"), rewrite=_split_rewrite)
def _split_op(ctx: _Ctx) -> None:
    """split/chunk: the input's split dim is the concatenation of the outputs' ranges; other dims tie."""
    x = ctx.key(ctx.a["self"])
    nx = ctx.nd(x)
    dim = ctx.a.get("dim", 0) % nx
    outs = _tensor_keys(ctx.node)
    for o in outs:
        for d in range(nx):
            if d != dim:
                ctx.same(x, d, o, d)
    parts = [ctx.t(o, dim) for o in outs]
    ctx.unify(ctx.t(x, dim), Sum(parts), "split ranges")


@_rule(*_ops("unbind.int"))
def _unbind(ctx: _Ctx) -> None:
    """unbind: every other dim ties to each output; the unbound dim is frozen."""
    x = ctx.key(ctx.a["self"])
    dim = ctx.a["dim"] % ctx.nd(x)
    for o in _tensor_keys(ctx.node):
        for d in range(ctx.nd(x)):
            if d != dim:
                ctx.same(x, d, o, d if d < dim else d - 1)
    ctx.freeze(x, dim, f"unbound dim {dim} (each position is a separate output)")


@_rule(*_ops("select.int"))
def _select(ctx: _Ctx) -> None:
    """select: a fixed index of one dim (frozen); the other dims tie to the output."""
    x = ctx.key(ctx.a["self"])
    dim = ctx.a["dim"] % ctx.nd(x)
    for d in range(ctx.nd(x)):
        if d != dim:
            ctx.same(x, d, ctx.out, d if d < dim else d - 1)
    ctx.freeze(x, dim, f"selects position {ctx.a['index']} of dim {dim} (a fixed position, e.g. q/k/v of a fused projection)")


def _slice_bounds(n: Size, start: Any, end: Any) -> tuple[int, int] | None:
    if not _is_int(n) or not isinstance(start if start is not None else 0, int) or not isinstance(end if end is not None else n, int):
        return None
    s = 0 if start is None else start
    e = n if end is None else end
    s = max(0, min(n, s + n if s < 0 else s))
    e = max(s, min(n, e + n if e < 0 else e))
    return s, e


def _slice_rewrite(an: ChannelAnalysis, node: fx.Node, plan: PruningPlan) -> str | None:
    info = an.aux.get(node, {}).get("slice")
    if info is None:
        return None
    pre, dim, start, end, n = info
    new_start = int(plan.tree_new_size(pre)) if pre is not None else 0
    new_len = int(plan.new_size(node_key(node), dim))
    if node.target == aten.narrow.default:
        _set_arg(node, "start", new_start)
        _set_arg(node, "length", new_len)
        return f"narrow start {start} -> {new_start}, length {end - start} -> {new_len}"
    msgs = []
    if new_start != start:
        _set_arg_positional(node, "start", new_start)
        msgs.append(f"start {start} -> {new_start}")
    if end < n:  # an end at (or past) the old size still means "to the end"
        _set_arg_positional(node, "end", new_start + new_len)
        msgs.append(f"end {end} -> {new_start + new_len}")
    return ", ".join(msgs) or None


def node_key(node: fx.Node) -> Key:
    return (node, None)


@_rule(*_ops("slice.Tensor", "narrow"), rewrite=_slice_rewrite)
def _slice(ctx: _Ctx) -> None:
    """slice/narrow (step 1): the input dim is (before, output, after) ranges; bounds are rewritten."""
    a = ctx.a
    x = ctx.key(a["self"])
    nx = ctx.nd(x)
    dim = a["dim"] % nx
    for d in range(nx):
        if d != dim:
            ctx.same(x, d, ctx.out, d)
    n = ctx.shape(x)[dim]
    if ctx.node.target == aten.narrow.default:
        start, length = a["start"], a["length"]
        if not isinstance(start, int) or not isinstance(length, int):
            return
        bounds = _slice_bounds(n, start, start + length)
    else:
        if a.get("step", 1) != 1:
            return  # strided slices: dim frozen
        bounds = _slice_bounds(n, a.get("start"), a.get("end"))
    if bounds is None:
        return
    s, e = bounds
    if s == 0 and e == n:
        ctx.same(x, dim, ctx.out, dim)
        ctx.an.aux.setdefault(ctx.node, {})["slice"] = (None, dim, 0, n, n)
        return
    pre = Leaf(s) if s else None
    post = Leaf(n - e) if e < n else None
    mid = ctx.t(ctx.out, dim)
    ctx.unify(ctx.t(x, dim), Sum([p for p in (pre, mid, post) if p is not None]), "slice ranges")
    ctx.an.aux.setdefault(ctx.node, {})["slice"] = (pre, dim, s, e, n)


def _getitem(ctx: _Ctx) -> None:
    src, i = ctx.node.args
    val = src.meta.get("val") if isinstance(src, fx.Node) else None
    if not (isinstance(val, (list, tuple)) and isinstance(ctx.node.meta.get("val"), torch.Tensor)):
        raise Unsupported("indexing a tensor with Python getitem")
    key = (src, i)
    for d in range(ctx.nd(ctx.out)):
        ctx.same(key, d, ctx.out, d)


_rule(operator.getitem, doc="getitem of a multi-output op: the element's dims")(_getitem)


# ---- views: the reshape rule (dims grouped by equal products, layouts unified as row-major products)


def _reshape_groups(ins: Sequence[Size], outs: Sequence[Size]) -> list[tuple[list[int], list[int]]] | None:
    ai = [i for i, s in enumerate(ins) if not (_is_int(s) and s == 1)]
    bi = [i for i, s in enumerate(outs) if not (_is_int(s) and s == 1)]
    groups = []
    i = j = 0
    while i < len(ai) and j < len(bi):
        ga, gb = [ai[i]], [bi[j]]
        pa, pb = ins[ai[i]], outs[bi[j]]
        i += 1
        j += 1
        while not _eq(pa, pb):
            if _num(pa) < _num(pb):
                if i >= len(ai):
                    return None
                pa = _mul(pa, ins[ai[i]])
                ga.append(ai[i])
                i += 1
            else:
                if j >= len(bi):
                    return None
                pb = _mul(pb, outs[bi[j]])
                gb.append(bi[j])
                j += 1
        groups.append((ga, gb))
    if i < len(ai) or j < len(bi):
        return None
    return groups


def _reshape(ctx: _Ctx) -> None:
    """view/reshape/flatten/unflatten/squeeze/unsqueeze: dims grouped by equal size products; each
    group's input and output layouts unify as row-major products (a merge keeps the outer dim's
    channels as blocks of the inner size; a split factors the channels)."""
    x = ctx.key(ctx.node.args[0])
    out = ctx.out
    ins, outs = ctx.shape(x), ctx.shape(out)
    groups = _reshape_groups(ins, outs)
    if groups is None:
        raise Unsupported(f"cannot group {list(ins)} -> {list(outs)} into equal products")
    for d, s in enumerate(ins):
        if _is_int(s) and s == 1:
            ctx.touch(x, d)
    for d, s in enumerate(outs):
        if _is_int(s) and s == 1:
            ctx.touch(out, d)
    for ga, gb in groups:
        if len(ga) == 1 and len(gb) == 1:
            ctx.same(x, ga[0], out, gb[0])
            continue
        tin = mk_prod([ctx.t(x, d) for d in ga])
        tout = mk_prod([ctx.t(out, d) for d in gb])
        ctx.unify(tin, tout, f"reshape {list(ins)} -> {list(outs)}")


def _shape_arg_rewrite(arg_name: str, first_dim: Callable[[fx.Node, ChannelAnalysis], int]):
    def rewrite(an: ChannelAnalysis, node: fx.Node, plan: PruningPlan) -> str | None:
        out = node_key(node)
        a = _bind(node)
        sizes = list(a[arg_name])
        d0 = first_dim(node, an)
        new_sizes = []
        sym_changed = []
        for i, s in enumerate(sizes):
            d = d0 + i
            old, new = an.shape(out)[d], plan.new_size(out, d)
            if _eq(old, new) or (isinstance(s, int) and s == -1):
                new_sizes.append(s)
            elif _is_int(new):
                new_sizes.append(int(new))
            else:
                sym_changed.append((i, old, new))
                new_sizes.append(s)
        if sym_changed:
            has_minus_one = any(isinstance(s, int) and s == -1 for s in new_sizes)
            if len(sym_changed) == 1 and not has_minus_one:
                new_sizes[sym_changed[0][0]] = -1
            else:
                for i, old, new in sym_changed:
                    ratio = sympy.nsimplify(sympy.sympify(new) / old)
                    p, q = sympy.fraction(ratio)
                    if not (p.is_Integer and q.is_Integer) or not isinstance(sizes[i], fx.Node):
                        raise ValueError(f"cannot rewrite dynamic size {old} -> {new} of {node.name}")
                    with node.graph.inserting_before(node):
                        v = node.graph.call_function(operator.mul, (sizes[i], int(p)))
                        if int(q) != 1:
                            v = node.graph.call_function(operator.floordiv, (v, int(q)))
                    new_sizes[i] = v
        if new_sizes == sizes:
            return None
        _set_arg(node, arg_name, new_sizes)
        return f"{arg_name} {_fmt(sizes)} -> {_fmt(new_sizes)}"

    return rewrite


def _fmt(sizes: list) -> str:
    return "[" + ", ".join(s.name if isinstance(s, fx.Node) else str(s) for s in sizes) + "]"


# view's schema names its sizes "size", reshape's "shape"
_rule(*_ops("view", "_unsafe_view", "view_copy"), rewrite=_shape_arg_rewrite("size", lambda n, an: 0))(_reshape)
_rule(*_ops("reshape"), rewrite=_shape_arg_rewrite("shape", lambda n, an: 0))(_reshape)
_rule(*_ops("flatten.using_ints", "squeeze", "squeeze.dim", "squeeze.dims", "unsqueeze", "squeeze_copy.dim", "unsqueeze_copy"))(_reshape)
_rule(*_ops("unflatten.int"), rewrite=_shape_arg_rewrite("sizes", lambda n, an: _bind(n)["dim"] % len(an.shape((n.args[0], None)))))(_reshape)


@_rule(*_ops("permute", "permute_copy"))
def _permute(ctx: _Ctx) -> None:
    """permute: output dim i is input dim dims[i]."""
    x = ctx.key(ctx.a["self"])
    for i, d in enumerate(ctx.a["dims"]):
        ctx.same(x, d % ctx.nd(x), ctx.out, i)


@_rule(*_ops("transpose.int", "transpose_copy.int", "swapaxes", "swapdims"))
def _transpose(ctx: _Ctx) -> None:
    """transpose: two dims swap."""
    x = ctx.key(ctx.a["self"])
    n = ctx.nd(x)
    d0 = ctx.a.get("dim0", ctx.a.get("axis0")) % n
    d1 = ctx.a.get("dim1", ctx.a.get("axis1")) % n
    for d in range(n):
        ctx.same(x, d, ctx.out, d1 if d == d0 else d0 if d == d1 else d)


@_rule(*_ops("t", "numpy_T", "t_copy"))
def _t(ctx: _Ctx) -> None:
    """t: 2-D transpose."""
    x = ctx.key(ctx.a["self"])
    n = ctx.nd(x)
    for d in range(n):
        ctx.same(x, d, ctx.out, n - 1 - d)


_EXPAND_REWRITE = _shape_arg_rewrite("size", lambda n, an: 0)


@_rule(*_ops("expand", "expand_copy"), rewrite=_EXPAND_REWRITE)
def _expand(ctx: _Ctx) -> None:
    """expand: dims kept tie; broadcast (size-1 -> n) dims are new, their size constant is rewritten."""
    x = ctx.key(ctx.a["self"])
    out = ctx.out
    nx, no = ctx.nd(x), ctx.nd(out)
    xs, os_ = ctx.shape(x), ctx.shape(out)
    for i in range(1, no + 1):
        b = no - i
        if i <= nx:
            a = nx - i
            if _eq(xs[a], os_[b]):
                ctx.same(x, a, out, b)
                continue
            ctx.touch(x, a)
        ctx.touch(out, b)


@_rule(*_ops("einsum"))
def _einsum(ctx: _Ctx) -> None:
    """einsum (no ellipsis): dims labelled with the same letter tie (size-1 broadcasts tie nothing)."""
    eq = ctx.a["equation"].replace(" ", "")
    if "..." in eq or "->" not in eq:
        raise Unsupported(f"equation {eq!r} (ellipsis or implicit output)")
    lhs, rhs = eq.split("->")
    terms = lhs.split(",")
    keys = [ctx.key(t) for t in ctx.a["tensors"]]
    labelled = [(k, term) for k, term in zip(keys, terms)] + [(ctx.out, rhs)]
    first: dict[str, tuple[Key, int]] = {}
    for k, term in labelled:
        if k is None or len(term) != ctx.nd(k):
            raise Unsupported(f"equation {eq!r} does not match the operand ranks")
        for d, letter in enumerate(term):
            size = ctx.shape(k)[d]
            if _is_int(size) and size == 1:
                ctx.touch(k, d)
                continue
            if letter in first:
                fk, fd = first[letter]
                ctx.same(fk, fd, k, d)
            else:
                first[letter] = (k, d)
                ctx.t(k, d)


def _assert_metadata_rewrite(an: ChannelAnalysis, node: fx.Node, plan: PruningPlan) -> str | None:
    a = _bind(node)
    if a.get("size") is None and a.get("stride") is None:
        return None
    _set_arg(node, "size", None)
    _set_arg(node, "stride", None)
    return "size/stride assertion dropped (the sizes changed)"


@_rule(*_ops("_assert_tensor_metadata"), rewrite=_assert_metadata_rewrite)
def _assert_metadata(ctx: _Ctx) -> None:
    """_assert_tensor_metadata: no output; a size assertion is dropped when the sizes change."""
    x = ctx.key(ctx.a["a"])
    for d in range(ctx.nd(x)):
        ctx.touch(x, d)
