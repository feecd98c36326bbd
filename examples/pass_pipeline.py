"""Way 2: a programmatic pass pipeline over the captured graph.

    python examples/pass_pipeline.py
"""

import torch
import torchvision

import fxpress


def main() -> None:
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 224, 224)

    gm = fxpress.capture(model, (x,))  # ATen-level torch.fx GraphModule, batch dimension dynamic
    pm = fxpress.PassManager(["fold-batch-norm", "eliminate-dead-code"], verify=True)
    gm, report = pm.run(gm, (x,))  # verify: IR invariants + exactness checked after each pass
    print(report)

    batch = torch.randn(8, 3, 224, 224)  # captured from one image, runs on eight
    with torch.no_grad():
        print(f"max |diff| vs eager on a batch of 8: {(gm(batch) - model(batch)).abs().max().item():.2e}")
    remaining = sum(1 for n in gm.graph.nodes if "batch_norm" in str(n.target))
    print(f"batch-norm nodes left: {remaining}")


if __name__ == "__main__":
    main()
