"""Small models and helpers for the decomposition tests."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxpress

aten = torch.ops.aten


class ConvNet(nn.Module):
    """One conv with the given geometry."""

    def __init__(self, cin=16, cout=32, k=3, stride=1, padding=1, dilation=1, groups=1, bias=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)

    def forward(self, x):
        return self.conv(x)


class FunctionalConv(nn.Module):
    """F.conv2d with a weight parameter (no module): asymmetric (per-axis) padding and 'same'."""

    def __init__(self, cin=8, cout=24, k=(3, 5), padding=(1, 2), stride=(2, 1), dilation=(1, 2), groups=1, bias=False):
        super().__init__()
        self.w = nn.Parameter(torch.randn(cout, cin // groups, *k) * 0.2)
        self.b = nn.Parameter(torch.randn(cout) * 0.1) if bias else None
        self.args = (stride, padding, dilation, groups)

    def forward(self, x):
        stride, padding, dilation, groups = self.args
        return F.conv2d(x, self.w, self.b, stride, padding, dilation, groups)


class MLP(nn.Module):
    def __init__(self, sizes=(48, 64, 64, 10), bias=True):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for i, l in enumerate(self.layers):
            x = l(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class SmallCNN(nn.Module):
    def __init__(self, width=32, classes=10):
        super().__init__()
        self.c1 = nn.Conv2d(3, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, width, 3, padding=1)
        self.c3 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.c4 = nn.Conv2d(2 * width, 2 * width, 1)
        self.fc1 = nn.Linear(2 * width, 64)
        self.fc2 = nn.Linear(64, classes)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        x = torch.relu(self.c4(x))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


def count(gm, *targets) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in targets)


def convs(gm) -> int:
    return count(gm, aten.conv2d.default, aten.conv2d.padding)


def linears(gm) -> int:
    return count(gm, aten.linear.default)


def run_pass(gm, name, inputs, **options):
    gm, report = fxpress.PassManager([(name, options)]).run(gm, inputs)
    return gm, report[name]


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
