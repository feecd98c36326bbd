"""Channel dependency analysis: one structure test per rule, plus the layout algebra itself.

Each structural test checks which tensors a group ties (and, where the index mapping matters, at
which positions), then that pruning the group with random channels keeps the zeroed-channel oracle:
the physically pruned graph equals the original with those channels' parameters set to zero.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxpress.ir.capture import capture
from fxpress.ir.channels import Leaf, Mismatch, Prod, Sum, analyze_channels, leaves, norm, rule_table, unify
from fxpress.passes.prune.channel_prune import mask_plan
from fxpress.prune_api import prune, prune_report
from tests.models import ALL_SMALL, inverted_residual, mha_block, randomize_bn, residual_block, transformer_block


def _groups_with(an, target: str, dim: int):
    return [g for g in an.groups if any(p.target == target and p.dim == dim for p in g.params)]


def _group(an, target: str, dim: int):
    gs = _groups_with(an, target, dim)
    assert len(gs) == 1, f"{target}[{dim}] is in {len(gs)} groups"
    return gs[0]


def _targets(group) -> set[tuple[str, int]]:
    return {(p.target, p.dim) for p in group.params}


def _coords(an, group, target: str, dim: int) -> list[int]:
    for t, d, c in an.param_coords(group):
        if t == target and d == dim:
            return c.tolist()
    raise AssertionError(f"{target}[{dim}] not in group #{group.id}")


def _check_oracle(model, args, ratio=0.5, **kw):
    """Prune with random channels; the pruned graph equals the zero-masked original."""
    gm = capture(model, args)
    pruned = prune(gm, args, ratio=ratio, importance="random", **kw)
    rep = prune_report(pruned)
    with torch.no_grad():
        ref = mask_plan(gm, rep.plan)(*args) if rep.plan is not None else gm(*args)
        out = pruned(*args)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    return pruned, rep


# ---------------------------------------------------------------------------------------------
# the layout algebra


def test_unify_splits_and_factors_consistently():
    a, b = Leaf(6), Leaf(6)
    c, d = Leaf(2), Leaf(4)
    unify(a, Sum([c, d]))  # a = [c | d]
    unify(b, a)
    ls = leaves(b)
    assert [x.size for x in ls] == [2, 4]
    # factoring a concatenation of equal parts ties the parts
    e, f = Leaf(3), Leaf(3)
    g = Leaf(6)
    unify(g, Sum([e, f]))
    outer, inner = Leaf(2), Leaf(3)
    unify(Prod([outer, inner]), g)
    assert norm(e) is norm(f) is norm(inner)


def test_unify_rejects_incompatible_products():
    x = Leaf(24)
    unify(x, Prod([Leaf(6), Leaf(4)]))
    with pytest.raises(Mismatch):
        unify(x, Prod([Leaf(4), Leaf(6)]))


def test_rule_table_names_ops():
    table = rule_table()
    for op in ("aten.cat.default", "aten.conv2d.default", "aten.view.default", "aten.scaled_dot_product_attention.default"):
        assert op in table
    assert any("pointwise" in k for k in table)


# ---------------------------------------------------------------------------------------------
# rules


class CatChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.fuse = nn.Conv2d(10, 5, 1)

    def forward(self, x):
        return self.fuse(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1))


def test_cat_dim1_concatenates_index_ranges():
    m, args = CatChannels().eval(), (torch.randn(2, 3, 5, 5),)
    an = analyze_channels(capture(m, args))
    ga, gb = _group(an, "a.weight", 0), _group(an, "b.weight", 0)
    assert ga is not gb
    assert ("fuse.weight", 1) in _targets(ga) and ("fuse.weight", 1) in _targets(gb)
    assert _coords(an, ga, "fuse.weight", 1) == [0, 1, 2, 3] + [-1] * 6
    assert _coords(an, gb, "fuse.weight", 1) == [-1] * 4 + list(range(6))
    pruned, _ = _check_oracle(m, args)
    assert pruned.fuse.weight.shape[1] == 2 + 3


class CatLastDim(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(24, 4)

    def forward(self, x):
        return self.c(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=-1))


def test_cat_last_dim_keeps_groups_apart():
    """Torch-Pruning #481: concat on dim -1 merged independent groups."""
    m, args = CatLastDim().eval(), (torch.randn(3, 8),)
    an = analyze_channels(capture(m, args))
    ga, gb = _group(an, "a.weight", 0), _group(an, "b.weight", 0)
    assert ga is not gb and ga.size == 16 and gb.size == 8
    assert _coords(an, gb, "c.weight", 1) == [-1] * 16 + list(range(8))
    _check_oracle(m, args)


class CatSpatial(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=2))


def test_cat_on_spatial_dim_ties_channels_of_both_inputs():
    m, args = CatSpatial().eval(), (torch.randn(2, 3, 4, 4),)
    an = analyze_channels(capture(m, args))
    g = _group(an, "a.weight", 0)
    assert {("a.weight", 0), ("b.weight", 0), ("head.weight", 1)} <= _targets(g)
    _check_oracle(m, args)


class SplitLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 24)
        self.p = nn.Linear(8, 3)
        self.q = nn.Linear(16, 3)

    def forward(self, x):
        a, b = torch.split(F.relu(self.fc(x)), [8, 16], dim=-1)
        return self.p(a) + self.q(b)


def test_split_selects_ranges_and_sizes_are_rewritten():
    m, args = SplitLinear().eval(), (torch.randn(3, 8),)
    an = analyze_channels(capture(m, args))
    g1, g2 = _group(an, "p.weight", 1), _group(an, "q.weight", 1)
    assert g1 is not g2
    assert _coords(an, g2, "fc.weight", 0) == [-1] * 8 + list(range(16))
    pruned, rep = _check_oracle(m, args)
    assert pruned.fc.weight.shape[0] == 4 + 8
    assert any("split sizes" in r for r in rep.rewrites)


class FlattenIntoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.bn(self.conv(x))), 1))


def test_flatten_maps_each_channel_to_a_block_of_features():
    m, args = randomize_bn(FlattenIntoLinear()).eval(), (torch.randn(2, 3, 4, 4),)
    an = analyze_channels(capture(m, args))
    g = _group(an, "conv.weight", 0)
    assert ("fc.weight", 1) in _targets(g)
    assert [p.blocks for p in g.params if p.target == "fc.weight"] == [16]
    assert _coords(an, g, "fc.weight", 1) == [c for c in range(8) for _ in range(16)]
    pruned, _ = _check_oracle(m, args)
    assert pruned.fc.weight.shape == (10, 4 * 16)


class Shuffle(nn.Module):
    """ShuffleNet's unit: two branches, cat, channel shuffle (view-transpose-view), chunk."""

    def __init__(self, c=4):
        super().__init__()
        self.a = nn.Conv2d(3, c, 1)
        self.b = nn.Conv2d(3, c, 1)
        self.p = nn.Conv2d(c, 2, 1)
        self.q = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        u, v = y.chunk(2, dim=1)
        return self.p(u) + self.q(v)


def test_channel_shuffle_permutes_and_ties_branches():
    m, args = Shuffle().eval(), (torch.randn(2, 3, 3, 3),)
    an = analyze_channels(capture(m, args))
    # after the shuffle, channel i of a and channel i of b sit side by side: one group each half
    ga = _groups_with(an, "a.weight", 0)
    assert len(ga) == 2 and all(("b.weight", 0) in _targets(g) for g in ga)
    lo = next(g for g in ga if ("p.weight", 1) in _targets(g))
    # p reads shuffled channels [a0, b0, a1, b1]: a's channel i at positions 2i and b's at 2i+1
    assert _coords(an, lo, "p.weight", 1) == [0, 0, 1, 1]
    assert _coords(an, lo, "a.weight", 0) == [0, 1, -1, -1]
    _check_oracle(m, args)


def test_depthwise_conv_ties_in_and_out_channels():
    m, args = inverted_residual()
    an = analyze_channels(capture(m, args))
    g = _group(an, "expand.weight", 0)
    assert {("dw.weight", 0), ("project.weight", 1), ("bn2.weight", 0)} <= _targets(g)
    assert g.prunable
    _check_oracle(m, args)


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.gn = nn.GroupNorm(4, 12)
        self.out = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        return self.out(F.relu(self.gn(self.g(F.relu(self.a(x))))))


def test_grouped_conv_and_group_norm_prune_within_or_whole_groups():
    m, args = Grouped().eval(), (torch.randn(2, 3, 4, 4),)
    an = analyze_channels(capture(m, args))
    # a's 8 outputs = 4 groups x 2 per group: both factors are classes
    sizes = sorted(g.size for g in _groups_with(an, "a.weight", 0))
    assert sizes == [2, 4]
    # group_norm: channels inside a group are frozen, whole groups are prunable
    gn = _groups_with(an, "gn.weight", 0)
    assert any(g.size == 3 and not g.prunable and "group_norm" in g.why_not for g in gn)
    pruned, rep = _check_oracle(m, args)
    assert any("groups" in r for r in rep.rewrites)


def test_residual_adds_form_one_group():
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 1)
            self.c1 = nn.Conv2d(8, 8, 3, padding=1)
            self.c2 = nn.Conv2d(8, 8, 3, padding=1)
            self.c3 = nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            x = self.stem(x)
            x = x + self.c1(F.relu(x))
            x = x + self.c2(F.relu(x))
            x = x + self.c3(F.relu(x))
            return self.head(x)

    m, args = Chain().eval(), (torch.randn(2, 3, 4, 4),)
    an = analyze_channels(capture(m, args))
    g = _group(an, "stem.weight", 0)
    assert {("c1.weight", 0), ("c2.weight", 0), ("c3.weight", 0), ("head.weight", 1),
            ("c1.weight", 1), ("c3.weight", 1)} <= _targets(g)
    _check_oracle(m, args)


def test_residual_block_output_is_frozen_by_the_model_output():
    m, args = residual_block()
    an = analyze_channels(capture(m, args))
    g = _group(an, "conv3.weight", 0)
    assert not g.prunable and "model output" in g.why_not
    assert "model input" in _group(an, "conv1.weight", 1).why_not


def test_attention_heads_and_head_dims_in_a_transformer_block():
    m, args = transformer_block()
    an = analyze_channels(capture(m, args))
    heads = [g for g in an.prunable if g.size == 4]
    assert len(heads) == 1
    assert {("qkv.weight", 0), ("proj.weight", 1)} <= _targets(heads[0])
    # q and k share a head dim (contracted); v has its own; the MLP hidden is separate
    assert sorted(g.size for g in an.prunable) == [4, 8, 8, 64]
    pruned, rep = _check_oracle(m, args)
    assert any("scale kept" in r for r in rep.rewrites)
    assert any("reshape" in r or "shape" in r for r in rep.rewrites)


def test_multihead_attention_module_prunes_heads():
    m, args = mha_block()
    an = analyze_channels(capture(m, args))
    assert any(g.size == 4 and g.prunable for g in an.groups)  # 4 heads
    # in_proj's (q, k, v) selector is fixed by select(): frozen, with the op named
    sel = [g for g in an.groups if g.size == 3]
    assert sel and "aten.select" in sel[0].why_not
    _check_oracle(m, args)


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = torch.cumsum(F.relu(self.a(x)), dim=1)  # no channel rule: must not be guessed as elementwise
        return self.c(F.relu(self.b(y)))


def test_unknown_op_freezes_and_is_named():
    m, args = Unknown().eval(), (torch.randn(2, 3, 4, 4),)
    an = analyze_channels(capture(m, args))
    g = _group(an, "a.weight", 0)
    assert not g.prunable and "aten.cumsum" in g.why_not
    assert _group(an, "b.weight", 0).prunable
    summary = an.summary()
    assert "aten.cumsum" in summary and "no channel rule" in summary
    _check_oracle(m, args)


class Sliced(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 1)
        self.b = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.b(F.relu(self.a(x))[:, 2:10])


def test_slice_bounds_are_rewritten():
    m, args = Sliced().eval(), (torch.randn(2, 3, 4, 4),)
    an = analyze_channels(capture(m, args))
    groups = _groups_with(an, "a.weight", 0)
    assert sorted(g.size for g in groups) == [2, 2, 8]
    _check_oracle(m, args)


class BadReshape(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 24)
        self.out = nn.Linear(24, 2)

    def forward(self, x):
        y = F.relu(self.fc(x))
        y = y.view(-1, 6, 4).reshape(-1, 4, 6)  # 6 x 4 regrouped as 4 x 6: no class layout fits both
        return self.out(y.reshape(-1, 24))


def test_reshape_that_cannot_be_mapped_freezes():
    m, args = BadReshape().eval(), (torch.randn(3, 4),)
    an = analyze_channels(capture(m, args))
    groups = _groups_with(an, "fc.weight", 0)
    assert groups and not any(g.prunable for g in groups)
    assert any("reshape" in g.why_not for g in groups)
    _check_oracle(m, args)


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.fc = nn.Linear(16, 3)

    def forward(self, idx):
        return self.fc(self.emb(idx)).mean(1)


def test_embedding_dim_is_prunable_vocabulary_frozen():
    m, args = Embed().eval(), (torch.randint(0, 20, (2, 5)),)
    an = analyze_channels(capture(m, args))
    assert _group(an, "emb.weight", 1).prunable
    assert not _group(an, "emb.weight", 0).prunable
    _check_oracle(m, args)


class LNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 16)
        self.ln = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc2(self.ln(self.fc1(x)))


def test_layer_norm_is_approximate_or_frozen():
    m, args = LNModel().eval(), (torch.randn(3, 4),)
    gm = capture(m, args)
    g = _group(analyze_channels(gm), "ln.weight", 0)
    assert g.prunable and g.approximate and "statistics" in g.approximate[0]
    g2 = _group(analyze_channels(gm, layer_norm="freeze"), "ln.weight", 0)
    assert not g2.prunable
    pruned = prune(gm, args, ratio=0.5)
    assert pruned.ln.weight.shape == (8,)
    assert prune_report(pruned).approximate
    assert pruned(*args).shape == (3, 2)


def test_ignore_by_module_path_and_unknown_name():
    m, args = CatChannels().eval(), (torch.randn(2, 3, 5, 5),)
    gm = capture(m, args)
    an = analyze_channels(gm, ignore=["a"])
    assert "ignored layer 'a'" in _group(an, "a.weight", 0).why_not
    assert _group(an, "b.weight", 0).prunable
    with pytest.raises(ValueError, match="'fusee'.*did you mean 'fuse'"):
        analyze_channels(gm, ignore=["fusee"])


def test_summary_lists_groups_and_frozen_reasons():
    m, args = CatChannels().eval(), (torch.randn(2, 3, 5, 5),)
    text = analyze_channels(capture(m, args)).summary()
    assert "prunable" in text and "a.weight[dim 0]" in text and "model input 'x'" in text and "model output" in text


class Ein(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 12))
        self.w2 = nn.Parameter(torch.randn(12, 3))

    def forward(self, x):
        return torch.einsum("bj,jk->bk", torch.relu(torch.einsum("bi,ij->bj", x, self.w1)), self.w2)


def test_einsum_ties_dims_by_letter():
    m, args = Ein().eval(), (torch.randn(2, 4),)
    an = analyze_channels(capture(m, args))
    g = _group(an, "w1", 1)
    assert ("w2", 0) in _targets(g) and g.prunable
    pruned, _ = _check_oracle(m, args)
    assert pruned.w1.shape == (4, 6)


# ---------------------------------------------------------------------------------------------
# pad, roll, indexing, new tensors, expand_as (swin's window attention uses all of them)


class ChannelsLastPad(nn.Module):
    """[B, H, W, C] features padded on W only (pad pair (0, 0) on C), as swin pads to the window."""

    def __init__(self, pad=(0, 0, 1, 1)):
        super().__init__()
        self.pad = pad
        self.a = nn.Linear(3, 8)
        self.b = nn.Linear(8 + pad[0] + pad[1], 2)

    def forward(self, x):
        y = F.relu(self.a(x.permute(0, 2, 3, 1)))
        return self.b(F.pad(y, self.pad))


def test_pad_ties_dims_with_zero_padding_and_freezes_padded_ones():
    m, args = ChannelsLastPad().eval(), (torch.randn(2, 3, 4, 4),)
    an = analyze_channels(capture(m, args))
    g = _group(an, "a.weight", 0)
    assert g.prunable and ("b.weight", 1) in _targets(g)
    pruned, _ = _check_oracle(m, args)
    assert pruned.a.weight.shape == (4, 3)
    # padding the channel dim itself freezes it, with the pad named
    m2 = ChannelsLastPad(pad=(0, 2, 1, 0)).eval()
    g2 = _group(analyze_channels(capture(m2, args)), "a.weight", 0)
    assert not g2.prunable and "padded dim 3" in g2.why_not


class Rolled(nn.Module):
    """swin's shifted windows: roll along H and W of [B, H, W, C]."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        y = F.relu(self.a(x.permute(0, 2, 3, 1)))
        return self.b(torch.roll(y, shifts=(-1, -1), dims=(1, 2)))


def test_roll_freezes_rolled_dims_only():
    m, args = Rolled().eval(), (torch.randn(2, 3, 4, 4),)
    gm = capture(m, args)
    an = analyze_channels(gm)
    assert _group(an, "a.weight", 0).prunable
    rolled = [key for key in an.spaces if key[0].target == torch.ops.aten.roll.default]
    frozen = [norm(an.spaces[k]).frozen for k in rolled if k[2] in (1, 2)]
    assert frozen and all(f and any("rolled dim" in r for r in f) for f in frozen)
    _check_oracle(m, args)


class RelativeBias(nn.Module):
    """swin's relative position bias: table[index] gives a [N*N, heads] bias added per head."""

    def __init__(self, n=3, heads=4, k=5):
        super().__init__()
        self.n, self.heads = n, heads
        self.table = nn.Parameter(torch.randn(k, heads))
        self.register_buffer("index", torch.randint(0, k, (n * n,)))
        self.logits = nn.Linear(6, heads * n)
        self.out = nn.Linear(heads * n, 2)

    def forward(self, x):  # x: [B, n, 6]
        b = x.shape[0]
        a = self.logits(x).view(b, self.n, self.heads, self.n).permute(0, 2, 1, 3)  # [B, heads, n, n]
        bias = self.table[self.index].view(self.n, self.n, self.heads).permute(2, 0, 1)
        a = F.relu(a + bias)
        return self.out(a.permute(0, 2, 1, 3).reshape(b, self.n, self.heads * self.n))


def test_index_ties_the_table_to_heads_and_freezes_the_gathered_dim():
    m, args = RelativeBias().eval(), (torch.randn(2, 3, 6),)
    an = analyze_channels(capture(m, args))
    heads = _group(an, "table", 1)
    assert heads.prunable and ("logits.weight", 0) in _targets(heads) and ("out.weight", 1) in _targets(heads)
    rows = _group(an, "table", 0)
    assert not rows.prunable and "indexed dim 0" in rows.why_not
    _check_oracle(m, args, factors="outer")  # prune the heads


class Gathers(nn.Module):
    """index_select, gather and w[:, i, :, j] (non-adjacent index tensors: gathered dims go first)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)
        self.register_buffer("i", torch.tensor([1, 0]))
        self.register_buffer("j", torch.tensor([1, 3]))

    def forward(self, x):  # [B, 4, 4]
        y = F.relu(self.a(x))  # [B, 4, 8]
        s = y.index_select(1, self.j)  # [B, 2, 8]
        g = torch.gather(y, 1, self.j.view(1, 2, 1).expand(y.shape[0], 2, y.shape[2]))  # [B, 2, 8]
        w = y.view(y.shape[0], 2, 2, 8).permute(0, 1, 3, 2)  # [B, 2, 8, 2]
        t = w[:, self.i, :, self.j % 2].permute(1, 0, 2)  # [2, B, 8] -> [B, 2, 8]
        return self.b(s + g + t)


def test_index_select_gather_and_advanced_indexing_keep_channels():
    m, args = Gathers().eval(), (torch.randn(3, 4, 4),)
    an = analyze_channels(capture(m, args))
    assert _group(an, "a.weight", 0).prunable
    pruned, _ = _check_oracle(m, args)
    assert pruned.a.weight.shape == (4, 4)


class NewTensors(nn.Module):
    """x.new_zeros((...)) lends only dtype/device; gate.expand_as(y) broadcasts onto y."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.gate = nn.Linear(8, 1)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        y = F.relu(self.a(x))
        mask = y.new_zeros((3, 3))
        mask[1:, :] = 1.0
        return self.b(torch.sigmoid(self.gate(y)).expand_as(y) * y) + mask.sum()


def test_new_zeros_and_expand_as_keep_channels():
    m, args = NewTensors().eval(), (torch.randn(2, 5, 4),)
    an = analyze_channels(capture(m, args))
    g = _group(an, "a.weight", 0)
    assert g.prunable and ("b.weight", 1) in _targets(g) and ("gate.weight", 1) in _targets(g)
    _check_oracle(m, args)


# ---------------------------------------------------------------------------------------------
# batch-1 captures


def _signature(an):
    return sorted((str(g.size), g.prunable, tuple(sorted((p.target, p.dim) for p in g.params))) for g in an.groups)


@pytest.mark.parametrize("name", sorted(ALL_SMALL))
def test_batch_one_capture_analyses_like_batch_two_without_a_fake_tensor_pass(name, monkeypatch):
    """A batch-1 capture may carry literal 1s where the batch flows (mha_block's MLP): the analysis
    re-propagates shapes with meta tensors only when a rule failed on a dynamic size, and never
    needs the slow fake-tensor pass for these models."""
    import fxpress.ir.channels as channels

    def no_fake(*a, **k):
        raise AssertionError("fake-tensor pass used")

    monkeypatch.setattr(channels, "_fake_shapes", no_fake)
    m1, a1 = ALL_SMALL[name](batch=1)
    m2, a2 = ALL_SMALL[name](batch=2)
    one = analyze_channels(capture(m1, a1))
    assert _signature(one) == _signature(analyze_channels(capture(m2, a2)))
    if name == "mha_block":
        assert one._fix, "expected stored batch-1 shapes that disagree"
