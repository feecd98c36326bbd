"""Decompose a CNN to half its parameters, fine-tune it, quantize it, and run it in onnxruntime.

    python examples/decompose.py

Uses scikit-learn's bundled digits (nothing is downloaded): a small CNN is trained for a few
seconds, ``fxpress.decompose`` halves its parameters (rank search across layers; with the calibration
batches the decompositions are data-aware: activation-whitened SVD for the linear head, Tucker-2 /
spatial SVD fitted to the convolutions' outputs; among ranks of nearly equal error the faster one
on this machine is taken), three epochs of fine-tuning recover the accuracy, and the result is
quantized to int8 and exported to ONNX.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxpress
from fxpress.demo import accuracy, load_digits_tensors


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1, stride=2)
        self.c3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = F.relu(self.c3(x))
        return self.fc(x.mean((2, 3)))


def train(model, x, y, epochs, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def main() -> None:
    torch.manual_seed(0)
    xtr, ytr, xte, yte = load_digits_tensors()
    model = Net()
    train(model, xtr, ytr, epochs=12, lr=3e-3)
    model.eval()
    print(f"trained: {accuracy(model, xte, yte):.2f}% accuracy")

    calib = [xtr[i : i + 128] for i in range(0, 512, 128)]
    small = fxpress.decompose(model, (xte[:1],), "auto", budget={"params": 0.5}, calibration=calib, progress=False)
    print(fxpress.decompose_report(small))
    print(f"decomposed: {accuracy(small, xte, yte):.2f}%")
    train(small, xtr, ytr, epochs=3, lr=3e-4)  # the factors are ordinary parameters
    print(f"fine-tuned: {accuracy(small, xte, yte):.2f}%")

    q = fxpress.quantize(small, (xte[:1],), calibration=calib, config="int8_static", progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        exported = fxpress.export_onnx(q, (xte[:1],), Path(tmp) / "small_int8.onnx", rtol=0.05)
        session = exported.session()
        print(f"int8 onnxruntime: {accuracy(lambda x: torch.as_tensor(session(x)), xte, yte):.2f}%")


if __name__ == "__main__":
    main()
