"""Property test: random architectures built from the supported ops keep both pruning oracles.

A drawn program stacks feature maps (all 6x6): conv-bn-relu blocks, residual blocks (conv-bn + add),
concatenations of two earlier maps, depthwise and grouped convolutions, channel shuffles, halves
taken by chunk, and ends in
a head that either pools or flattens (H*W = 36 features per channel) into a linear. For each:
(a) ratio 0 gives bit-identical outputs; (b) pruning random channels at a drawn ratio gives the
outputs of the original with those channels' parameters zeroed (atol 1e-4, rtol 1e-4).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxpress.ir.capture import capture
from fxpress.passes.prune.channel_prune import mask_plan
from fxpress.prune_api import prune, prune_report
from tests.models import randomize_bn


class Program(nn.Module):
    def __init__(self, steps: list[tuple], head: str):
        super().__init__()
        self.steps = steps
        self.layers = nn.ModuleList()
        chans = [3]
        for step in steps:
            kind = step[0]
            if kind == "conv":
                _, src, c, k = step
                self.layers.append(nn.Sequential(nn.Conv2d(chans[src], c, k, padding=k // 2), nn.BatchNorm2d(c), nn.ReLU()))
                chans.append(c)
            elif kind == "res":
                _, src = step
                c = chans[src]
                self.layers.append(nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)))
                chans.append(c)
            elif kind == "cat":
                _, a, b = step
                self.layers.append(nn.Identity())
                chans.append(chans[a] + chans[b])
            elif kind == "dw":
                _, src = step
                c = chans[src]
                self.layers.append(nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.ReLU()))
                chans.append(c)
            elif kind == "group":
                _, src, c = step
                self.layers.append(nn.Conv2d(chans[src], c, 1, groups=2))
                chans.append(c)
            elif kind == "shuffle":
                _, src = step
                self.layers.append(nn.Identity())
                chans.append(chans[src])
            elif kind == "chunk":
                _, src, _part = step
                self.layers.append(nn.Identity())
                chans.append(chans[src] // 2)
        self.head_kind = head
        c = chans[-1]
        self.head = nn.Linear(c * 36 if head == "flatten" else c, 5)

    def forward(self, x):
        feats = [x]
        for step, layer in zip(self.steps, self.layers):
            kind = step[0]
            if kind in ("conv", "dw", "group"):
                feats.append(layer(feats[step[1]]))
            elif kind == "res":
                feats.append(F.relu(layer(feats[step[1]]) + feats[step[1]]))
            elif kind == "cat":
                feats.append(torch.cat([feats[step[1]], feats[step[2]]], dim=1))
            elif kind == "shuffle":
                y = feats[step[1]]
                n, c, h, w = y.shape
                feats.append(y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w))
            elif kind == "chunk":
                feats.append(feats[step[1]].chunk(2, dim=1)[step[2]])
        y = feats[-1]
        y = y.flatten(1) if self.head_kind == "flatten" else F.adaptive_avg_pool2d(y, 1).flatten(1)
        return self.head(y)


@st.composite
def programs(draw):
    chans = [3]
    steps: list[tuple] = []
    n = draw(st.integers(2, 6))
    for _ in range(n):
        choices = ["conv", "conv"]
        if len(chans) > 1:
            choices += ["res", "dw", "cat"]
        if any(c % 2 == 0 for c in chans[1:]):
            choices += ["group", "shuffle", "chunk"]
        kind = draw(st.sampled_from(choices))
        if kind == "conv":
            src = draw(st.integers(0, len(chans) - 1))
            c = draw(st.integers(2, 8))
            steps.append(("conv", src, c, draw(st.sampled_from([1, 3]))))
            chans.append(c)
        elif kind in ("res", "dw"):
            src = draw(st.integers(1, len(chans) - 1))
            steps.append((kind, src))
            chans.append(chans[src])
        elif kind == "cat":
            a = draw(st.integers(1, len(chans) - 1))
            b = draw(st.integers(1, len(chans) - 1))
            steps.append(("cat", a, b))
            chans.append(chans[a] + chans[b])
        else:
            even = [i for i in range(1, len(chans)) if chans[i] % 2 == 0]
            src = draw(st.sampled_from(even))
            if kind == "group":
                c = 2 * draw(st.integers(1, 4))
                steps.append(("group", src, c))
                chans.append(c)
            elif kind == "chunk":
                steps.append(("chunk", src, draw(st.integers(0, 1))))
                chans.append(chans[src] // 2)
            else:
                steps.append(("shuffle", src))
                chans.append(chans[src])
    return steps, draw(st.sampled_from(["pool", "flatten"]))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs(), st.sampled_from([0.25, 0.5, 0.75]), st.integers(0, 2**16))
def test_random_architectures_keep_both_oracles(program, ratio, seed):
    torch.manual_seed(seed)
    steps, head = program
    model = randomize_bn(Program(steps, head)).eval()
    args = (torch.randn(2, 3, 6, 6),)
    gm = capture(model, args)
    with torch.no_grad():
        ref = gm(*args)
        same = prune(gm, args, ratio=0.0, verify=False)(*args)
    assert torch.equal(same, ref)
    pruned = prune(gm, args, ratio=ratio, importance="random", seed=seed, verify=False)
    rep = prune_report(pruned)
    with torch.no_grad():
        out = pruned(*args)
        expected = mask_plan(gm, rep.plan)(*args) if rep.plan is not None else ref
    assert out.shape == ref.shape
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
