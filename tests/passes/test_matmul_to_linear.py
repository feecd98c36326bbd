"""matmul-to-linear: x @ W (+ b) with a constant weight becomes aten.linear; activation products stay."""

import pytest
import torch
from torch import nn

import fxpress
from fxpress.passes import PassManager

aten = torch.ops.aten


class Conv1D(nn.Module):
    """GPT-2's layer: the weight is stored [in, out] and applied with addmm."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.1)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        shape = x.shape[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(shape)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = Conv1D(8, 12)
        self.w = nn.Parameter(torch.randn(12, 6) * 0.1)
        self.v = nn.Parameter(torch.randn(6, 4) * 0.1)

    def forward(self, x):
        h = torch.relu(self.c(x))                 # addmm
        h = h @ self.w                            # matmul with batch dims
        scores = h @ h.transpose(-1, -2)          # activation x activation: not a layer
        return torch.mm(h.reshape(-1, 6), self.v), scores


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_products_with_constant_weights_become_linear_and_compute_the_same():
    torch.manual_seed(0)
    model = Mixed().eval()
    x = torch.randn(2, 5, 8)
    gm = fxpress.capture(model, (x,))
    out, report = PassManager(["matmul-to-linear"]).run(gm, (x,))  # the manager checks the exactness claim
    targets = _targets(out)
    assert targets.count(aten.linear.default) == 3
    assert aten.addmm.default not in targets and aten.mm.default not in targets
    assert len([t for t in targets if t in (aten.matmul.default, aten.bmm.default)]) == 1  # the attention-like product
    for got, want in zip(out(x), model(x)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert all(p.requires_grad for p in out.parameters())
    assert len(report.passes[0].changed) == 3


def test_gpt2_layers_are_quantized_weight_only():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=200, n_positions=32)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = transformers.GPT2LMHeadModel(cfg)

        def forward(self, ids):
            return self.m(ids).logits

    model = LM().eval()
    ids = torch.randint(0, 200, (2, 8))
    qm = fxpress.quantize(model, (ids,), config="int4_weight_only", progress=False)
    rep = fxpress.quant_report(qm)
    # c_attn, c_proj, c_fc, mlp.c_proj (Conv1D, addmm) and lm_head (linear)
    assert rep.quantized("linear") == rep.total("linear") == 5
