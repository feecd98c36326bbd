"""torchvision architectures (random weights, 224x224, batch 1) pruned at ratio 0.5.

For each: the pruned graph runs with the same output shape, MACs drop to <= 0.4x of the original,
it exports to ONNX with onnxruntime parity (fxpress.export_onnx's check), and the zeroed-channel
oracle holds -- exactly for the CNNs, while ViT's residual stream goes through layer norms and is
marked approximate in the report (its oracle is not exact by nature, so only shapes are compared).
"""

from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.ir.capture import capture
from fxpress.passes.prune.channel_prune import mask_plan
from fxpress.prune_api import prune, prune_report
from tests.models import randomize_bn

pytestmark = pytest.mark.slow

CASES = {
    # name: (exact oracle, MACs bound)
    "resnet18": (True, 0.4),
    "mobilenet_v2": (True, 0.4),
    "shufflenet_v2_x0_5": (True, 0.4),
    "vit_b_16": (False, 0.4),
}


def _model(name: str) -> torch.nn.Module:
    import torchvision

    model = randomize_bn(getattr(torchvision.models, name)(weights=None)).eval()
    if name.startswith("vit"):
        with torch.no_grad():  # torchvision zero-initializes the classifier: make the output informative
            torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


@pytest.mark.parametrize("name", sorted(CASES))
def test_torchvision_prune_half(name, tmp_path):
    exact, bound = CASES[name]
    model = _model(name)
    args = (torch.randn(1, 3, 224, 224),)
    gm = capture(model, args)
    pruned = prune(gm, args, ratio=0.5, importance="l2")
    rep = prune_report(pruned)
    with torch.no_grad():
        ref = gm(*args)
        out = pruned(*args)
    assert out.shape == ref.shape
    assert rep.macs_ratio <= bound, str(rep)
    assert rep.params_after < rep.params_before
    if exact:
        assert not rep.approximate
        with torch.no_grad():
            expected = mask_plan(gm, rep.plan)(*args)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-3)
    else:
        assert rep.approximate  # layer norms over pruned channels
    res = fxpress.export_onnx(pruned, args, tmp_path / f"{name}.onnx", atol=1e-3, rtol=1e-3)
    assert res.max_abs_diff is not None
    # the pruned graph keeps the dynamic batch
    x2 = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert pruned(x2).shape == (2, *ref.shape[1:])


def test_tiny_bert_heads_and_ffn_exact():
    """HF BERT (2 layers, 2 heads): head dims and FFN prune (heads x head dims lose the ratio
    together: factors="inner" keeps the heads); the hidden stream is the model
    output (frozen), so no layer norm is crossed and the zeroed-channel oracle is exact; the
    position-id buffer is not a channel group."""
    from tests.models import tiny_bert

    model, args = tiny_bert()
    gm = capture(model, args)
    pruned = prune(gm, args, ratio=0.5)
    rep = prune_report(pruned)
    assert not rep.approximate
    sizes = dict((c.target, c.after) for c in rep.layers)
    # the query's 64 rows are 2 heads x 32 dims: half of them go, as 16 dims in each head
    assert sizes["bert.encoder.layer.0.attention.self.query.weight"] == (32, 64)
    assert sizes["bert.encoder.layer.0.intermediate.dense.weight"] == (64, 64)
    assert not any("position_ids" in t for t in sizes)
    with torch.no_grad():
        torch.testing.assert_close(pruned(*args), mask_plan(gm, rep.plan)(*args), atol=1e-4, rtol=1e-4)
