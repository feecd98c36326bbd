"""Ratios over product dims: a tensor dim that is a product of prunable channel groups (a grouped
conv's groups x channels per group, attention's heads x head dim) loses ``ratio``, not
``1 - (1 - ratio) ** 2``; ``factors`` picks which factor shrinks; global pruning, ``round_to`` and
iterative steps keep the rule. Each case also checks the zeroed-channel oracle.

The invariant behind all of them: after pruning at ``r``, no tensor dim of the graph keeps less
than ``1 - r`` of its channels (rounding only keeps more).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxpress.ir.capture import capture
from fxpress.ir.channels import analyze_channels
from fxpress.passes.prune.channel_prune import mask_plan
from fxpress.prune_api import prune, prune_report
from tests.models import ALL_SMALL, mha_block, randomize_bn, transformer_block


def _grouped():
    """The reported case: a 16-channel stream through a conv with 4 groups of 4."""
    m = nn.Sequential(nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3, groups=4, padding=1), nn.Conv2d(16, 8, 1)).eval()
    return m, (torch.randn(2, 8, 8, 8),)


class ResNeXtBlock(nn.Module):
    """1x1 -> grouped 3x3 (8 groups of 4) -> 1x1, batch norms, a residual."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(16, 32, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(32)
        self.g = nn.Conv2d(32, 32, 3, padding=1, groups=8, bias=False)
        self.bn_g = nn.BatchNorm2d(32)
        self.c = nn.Conv2d(32, 16, 1, bias=False)
        self.bn_c = nn.BatchNorm2d(16)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = F.relu(self.bn_a(self.a(x)))
        y = F.relu(self.bn_g(self.g(y)))
        return self.head(F.relu(x + self.bn_c(self.c(y))))


def _resnext():
    return randomize_bn(ResNeXtBlock()).eval(), (torch.randn(2, 3, 6, 6),)


def _check(model, args, **kw):
    """Prune; the oracle holds; no tensor dim keeps less than 1 - ratio of its channels."""
    gm = capture(model, args)
    pruned = prune(gm, args, **kw)
    rep = prune_report(pruned)
    assert rep.plan is not None and rep.layers
    with torch.no_grad():
        torch.testing.assert_close(pruned(*args), mask_plan(gm, rep.plan)(*args), atol=1e-5, rtol=1e-4)
    ratio = kw.get("ratio", 0.5)
    an = rep.plan.analysis
    for (node, item, d) in an.spaces:
        old, new = rep.plan.old_size((node, item), d), rep.plan.new_size((node, item), d)
        if isinstance(old, int) and old != new:
            assert new >= (1 - ratio) * old - 1e-9, f"{node.name}[{d}]: {old} -> {new} loses more than {ratio}"
    return pruned, rep


def test_grouped_conv_dim_loses_the_ratio_not_each_factor():
    """16 channels in 4 groups at ratio 0.5 keep 8 (not 4): the 4 groups stay, 2 channels each."""
    m, args = _grouped()
    pruned, rep = _check(m, args, ratio=0.5, importance="random")
    assert pruned.get_submodule("0").weight.shape[0] == 8
    assert pruned.get_submodule("1").weight.shape == (8, 2, 3, 3)
    assert pruned.get_submodule("2").weight.shape == (8, 8, 1, 1)
    assert not any("groups" in r for r in rep.rewrites)  # still 4 groups
    # MACs: 1x1 in 0.5, grouped (out 0.5 x in-per-group 0.5) 0.25, 1x1 out 0.5 -- as an ungrouped chain
    conv_macs = [8 * 16, 16 * 4 * 9, 16 * 8]
    after = [8 * 8, 8 * 2 * 9, 8 * 8]
    expected = sum(after) / sum(conv_macs)
    assert abs(rep.macs_ratio - expected) < 0.02, (rep.macs_ratio, expected)


def test_factors_outer_prunes_whole_groups_and_balanced_splits():
    m, args = _grouped()
    pruned, rep = _check(m, args, ratio=0.5, importance="l2", factors="outer")
    assert pruned.get_submodule("1").weight.shape == (8, 4, 3, 3)  # 2 groups of 4
    assert any("groups 4 -> 2" in r for r in rep.rewrites)
    pruned, rep = _check(m, args, ratio=0.5, importance="l2", factors="balanced")
    # each factor keeps (1 - 0.5) ** 0.5 = 0.71: 4 -> 3 groups, 4 -> 3 channels per group
    assert pruned.get_submodule("1").weight.shape == (9, 3, 3, 3)
    with pytest.raises(ValueError, match="factors"):
        prune(m, args, ratio=0.5, factors="heads")


def test_product_shares_by_policy():
    m, args = _grouped()
    an = analyze_channels(capture(m, args))

    def tied(g):
        return {(p.target, p.dim) for p in g.params}

    groups = next(g for g in an.prunable if {("0.weight", 0), ("1.weight", 0)} <= tied(g) and ("1.weight", 1) not in tied(g))
    shares = {pol: an.product_shares(pol) for pol in ("inner", "outer", "balanced")}
    assert shares["inner"][groups] == 0.0 and shares["outer"][groups] == 1.0
    assert sorted(shares["inner"].values()) == [0.0, 1.0, 1.0]
    assert sorted(shares["outer"].values()) == [0.0, 0.0, 1.0]
    assert set(shares["balanced"].values()) == {0.5}
    with pytest.raises(ValueError):
        an.product_shares("both")


@pytest.mark.parametrize("factors", ["inner", "outer", "balanced"])
def test_attention_heads_times_head_dim_loses_the_ratio(factors):
    """transformer_block: 4 heads x 8 dims. q/k/v and the attention output lose half (not 3/4)."""
    m, args = transformer_block()
    pruned, rep = _check(m, args, ratio=0.5, importance="l2", factors=factors)
    rows = pruned.qkv.weight.shape[0]
    assert rows == {"inner": 48, "outer": 48, "balanced": 3 * 3 * 6}[factors], rows
    heads_pruned = any(before == 4 and after < 4 for _, before, after in rep.pruned_groups)
    dims_pruned = any(before == 8 and after < 8 for _, before, after in rep.pruned_groups)
    assert (heads_pruned, dims_pruned) == {"inner": (False, True), "outer": (True, False), "balanced": (True, True)}[factors]
    if factors != "balanced":
        assert any("factors=" in n for n in rep.notes)  # the report says which groups stayed whole


def test_multihead_attention_module_loses_the_ratio():
    m, args = mha_block()
    pruned, _ = _check(m, args, ratio=0.5, importance="l2")
    inproj = next(v for k, v in pruned.named_parameters() if k.endswith("in_proj_weight"))
    assert inproj.shape == (48, 32)  # (q, k, v) x 4 heads x 4 of 8 dims


def test_round_to_counts_the_channels_of_the_product_dim():
    """8 groups x 4 channels with round_to=8: keeping 2 per group keeps 16 channels, a multiple of 8
    (rounding each factor to 8 would keep all 4 per group)."""
    m, args = _resnext()
    pruned, _ = _check(m, args, ratio=0.5, importance="l2", round_to=8)
    assert pruned.g.weight.shape == (16, 2, 3, 3)
    assert pruned.a.weight.shape[0] == 16
    for name, p in pruned.named_parameters():
        if name.endswith("weight") and p.dim() == 4 and name not in ("stem.weight", "head.weight"):
            assert p.shape[0] % 8 == 0, (name, p.shape)
    # a round_to no dim of the grouped stream can meet below its size: the stream stays
    with pytest.warns(UserWarning, match="nothing was pruned"):
        assert prune(m, args, ratio=0.5, round_to=64).g.weight.shape == (32, 4, 3, 3)


def test_global_pruning_keeps_the_shares():
    m, args = _resnext()
    gm = capture(m, args)
    pruned, rep = _check(gm, args, ratio=0.5, importance="l2", global_pruning=True)
    assert not any("groups" in r for r in rep.rewrites)  # the groups factor has share 0
    an = analyze_channels(gm)
    live = [g for g, e in an.product_shares("inner").items() if e > 0]
    removed = sum(before - after for _, before, after in rep.pruned_groups)
    assert removed == int(sum(g.size for g in live) * 0.5)


def test_iterative_steps_reach_the_same_product_dims():
    m, args = _resnext()
    one = prune(m, args, ratio=0.5, importance="l1")
    two = prune(m, args, ratio=0.5, importance="l1", iterative_steps=2)
    assert {k: v.shape for k, v in one.state_dict().items()} == {k: v.shape for k, v in two.state_dict().items()}
    assert one.g.weight.shape == (16, 2, 3, 3)


@pytest.mark.parametrize("factors", ["inner", "outer", "balanced"])
@pytest.mark.parametrize("name", sorted(ALL_SMALL) + ["grouped", "resnext"])
def test_no_dim_loses_more_than_the_ratio(name, factors):
    model, args = {"grouped": _grouped, "resnext": _resnext}.get(name, ALL_SMALL.get(name))()
    _check(model, args, ratio=0.6, importance="random", factors=factors)
