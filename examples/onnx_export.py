"""Way 3: export to ONNX and run in an onnxruntime session.

    python examples/onnx_export.py [out.onnx]
"""

import sys

import torch
import torchvision

import fxpress
from fxpress.backends import OnnxRuntimeModule


def main(path: str = "resnet18.onnx") -> None:
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 224, 224)

    gm = fxpress.capture(model, (x,))
    gm, _ = fxpress.PassManager(["fold-batch-norm"]).run(gm, (x,))
    result = fxpress.export_onnx(gm, (x,), path)  # onnx.checker + onnxruntime parity, raises on mismatch
    print(f"wrote {result.path} (opset {result.opset}), max |ort - torch| = {max(result.max_abs_diff):.2e}")

    session = OnnxRuntimeModule(result.path, intra_op_threads=2)  # torch tensors in, torch tensors out
    batch = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        print(f"batch of 4 through onnxruntime: max |diff| {(session(batch) - model(batch)).abs().max().item():.2e}")


if __name__ == "__main__":
    main(*sys.argv[1:])
