"""Way 1: torch.compile with the fxpress backend.

Runs fxpress's passes (batch-norm folding, constant folding, dead-code elimination by default) on
every graph Dynamo captures, then hands the result to inductor or onnxruntime.

    python examples/compile_backend.py
"""

import torch
import torchvision

import fxpress


def main() -> None:
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 224, 224)

    fast = torch.compile(model, backend="fxpress")  # passes + inductor
    ort = torch.compile(model, backend="fxpress", options={"target": "onnxruntime"})  # passes + onnxruntime

    with torch.no_grad():  # passes run on inference graphs; with autograd on, the graph runs unchanged
        expected = model(x)
        for name, compiled in [("inductor", fast), ("onnxruntime", ort)]:
            out = compiled(x)
            print(f"{name:12} max |diff| vs eager: {(out - expected).abs().max().item():.2e}")
    print(fxpress.compile_reports()[-1])


if __name__ == "__main__":
    main()
