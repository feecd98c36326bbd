"""The cost model: MACs/FLOPs against torch.utils.flop_counter, parameter counts, conventions."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from models import ALL_SMALL, mobilenet_v3_small, resnet18, tiny_bert
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import fxpress
from fxpress.ir.cost import NodeCost, count_params, node_costs, param_bytes, total_flops, total_macs
from fxpress.passes import get_pass


def _reference_flops(model: nn.Module, args: tuple) -> int:
    """FlopCounterMode on eager: the math SDPA kernel (the CPU fused kernel is not counted) and
    MultiheadAttention's slow path (its fused fast path is not counted either)."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
            model(*args)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", sorted(ALL_SMALL))
def test_mac_ops_match_flop_counter_on_small_models(name):
    model, args = ALL_SMALL[name]()
    gm = fxpress.capture(model, args)
    ref = _reference_flops(model, args)
    assert ref > 0
    assert 2 * total_macs(gm) == pytest.approx(ref, rel=0.01)
    mac_flops = sum(c.flops for c in node_costs(gm) if c.macs)
    assert mac_flops == 2 * total_macs(gm)  # FLOPs of a MAC op are exactly 2 x MACs


@pytest.mark.slow
@pytest.mark.parametrize("factory", [resnet18, mobilenet_v3_small, tiny_bert], ids=lambda f: f.__name__)
def test_mac_ops_match_flop_counter_on_real_architectures(factory):
    model, args = factory()
    gm = fxpress.capture(model, args)
    assert 2 * total_macs(gm) == pytest.approx(_reference_flops(model, args), rel=0.01)


@pytest.mark.slow
def test_resnet18_known_numbers():
    model, args = resnet18(batch=1, size=224)
    gm = fxpress.capture(model, args)
    # the widely quoted 1.82 GMACs and 11.69 M parameters of resnet18 at 224x224
    assert total_macs(gm) == pytest.approx(1.814e9, rel=0.01)
    assert count_params(model) == 11_689_512
    assert count_params(gm) == 11_689_512  # BN statistics are buffers, like in eager
    assert param_bytes(gm) == 4 * 11_689_512
    # folding BN drops gamma and beta (2C) and adds a conv bias (C): C fewer per BN
    bn_channels = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    get_pass("fold-batch-norm")(gm)
    assert count_params(gm) == 11_689_512 - bn_channels


def _conv_gm(conv: nn.Module, x: torch.Tensor):
    return fxpress.capture(conv.eval(), (x,))


@pytest.mark.parametrize(
    "conv, shape, macs",
    [
        # out 2x8x6x6, C_in 3, kernel 3x3: 2*8*36 * 3*9
        (nn.Conv2d(3, 8, 3), (2, 3, 8, 8), 2 * 8 * 36 * 3 * 9),
        # groups=2: C_in/groups = 2
        (nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 5, 5), 2 * 6 * 25 * 2 * 9),
        # depthwise: one input channel per output
        (nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), (2, 8, 4, 4), 2 * 8 * 16 * 1 * 9),
        # the aten.conv2d.padding overload
        (nn.Conv2d(3, 4, 3, padding="same"), (1, 3, 5, 5), 1 * 4 * 25 * 3 * 9),
        (nn.Conv1d(4, 6, 3), (2, 4, 10), 2 * 6 * 8 * 4 * 3),
        (nn.Conv3d(2, 4, 3), (1, 2, 4, 4, 4), 1 * 4 * 8 * 2 * 27),
        # transposed: every input element feeds C_out/groups * kernel outputs
        (nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), (2, 4, 3, 3), 2 * 4 * 9 * 3 * 9),
        (nn.ConvTranspose1d(4, 2, 4, stride=2), (1, 4, 5), 1 * 4 * 5 * 2 * 4),
    ],
    ids=["conv2d", "grouped", "depthwise", "padding-same", "conv1d", "conv3d", "conv_transpose2d", "conv_transpose1d"],
)
def test_conv_macs_by_formula_and_flop_counter(conv, shape, macs):
    x = torch.randn(*shape)
    gm = _conv_gm(conv, x)
    (cost,) = [c for c in node_costs(gm) if c.macs]
    assert cost.macs == macs
    assert cost.flops == 2 * macs
    assert cost.params == sum(p.numel() for p in conv.parameters())
    assert 2 * macs == _reference_flops(conv, (x,))


def test_linear_matmul_and_attention_formulas():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 8)
            self.w = nn.Parameter(torch.randn(8, 4))

        def forward(self, x):  # x: [2, 5, 16]
            h = self.fc(x)  # 2*5*8 outputs x 16
            y = h @ self.w  # matmul: 2*5*4 outputs x 8
            q = h.reshape(2, 5, 2, 4).transpose(1, 2)  # [2, 2, 5, 4]
            a = F.scaled_dot_product_attention(q, q, q)  # B*H*L*S*(E+Ev) = 2*2*5*5*8
            return torch.bmm(y, y.transpose(1, 2)), a  # bmm: 2*5*5 outputs x 4

    model, x = Mixed().eval(), torch.randn(2, 5, 16)
    gm = fxpress.capture(model, (x,), dynamic_batch=False)  # the reshape names the batch
    by_op = {}
    for c in node_costs(gm):
        by_op[c.op] = by_op.get(c.op, 0) + c.macs
    assert by_op["aten.linear"] == 2 * 5 * 8 * 16
    assert by_op["aten.matmul"] == 2 * 5 * 4 * 8
    assert by_op["aten.scaled_dot_product_attention"] == 2 * 2 * 5 * 5 * 8
    assert by_op["aten.bmm"] == 2 * 5 * 5 * 4
    assert 2 * total_macs(gm) == _reference_flops(model, (x,))


def test_elementwise_ops_cost_flops_only():
    class Pointwise(nn.Module):
        def forward(self, x):
            return torch.relu(x * 2 + 1).reshape(-1)

    gm = fxpress.capture(Pointwise(), (torch.randn(2, 3, 4),))
    costs = {c.op: c for c in node_costs(gm)}
    for op in ("aten.mul", "aten.add", "aten.relu"):
        assert costs[op].macs == 0
        assert costs[op].flops == 24  # one per output element
    assert costs["aten.reshape"].flops == 0  # data movement is free
    assert total_macs(gm) == 0
    assert total_flops(gm) == 3 * 24


def test_symbolic_batch_is_evaluated_at_the_sample_size():
    model, args = ALL_SMALL["mlp"](batch=3)
    gm = fxpress.capture(model, args)
    assert any(isinstance(s, torch.SymInt) for s in gm.graph.find_nodes(op="placeholder")[0].meta["val"].shape)
    assert total_macs(gm) == 3 * (16 * 32 + 32 * 32 + 32 * 10)
    model1, args1 = ALL_SMALL["mlp"](batch=1)
    assert total_macs(fxpress.capture(model1, args1)) * 3 == total_macs(gm)  # linear in the batch


def test_node_costs_cover_every_call_and_count_params_per_node():
    model, args = ALL_SMALL["conv_bn_relu_cnn"]()
    gm = fxpress.capture(model, args)
    costs = node_costs(gm)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert [c.node_name for c in costs] == [n.name for n in calls]
    assert all(isinstance(c, NodeCost) for c in costs)
    conv1 = next(c for c in costs if c.node_name == "conv2d")
    assert conv1.params == model.conv1.weight.numel() + model.conv1.bias.numel()
    bn1 = next(c for c in costs if c.op == "aten.batch_norm")
    assert bn1.macs == 0 and bn1.flops > 0
    assert bn1.params == 4 * 8  # gamma, beta, running mean and var of 8 channels


def test_count_params_ties_and_buffers():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4, bias=False)
            self.b = nn.Linear(4, 4, bias=False)
            self.b.weight = self.a.weight
            self.register_buffer("stat", torch.zeros(3))

        def forward(self, x):
            return self.b(self.a(x)) + self.stat.sum()

    model, x = Tied().eval(), torch.randn(2, 4)
    assert count_params(model) == 16  # the tied weight once
    assert count_params(model, buffers=True) == 19
    gm = fxpress.capture(model, (x,))
    assert count_params(gm) == 16
    assert count_params(gm, buffers=True) == 19
    assert param_bytes(gm) == 64
    assert sum(c.params for c in node_costs(gm) if c.op == "aten.linear") == 32  # read twice


def test_int8_weights_count_as_parameters():
    gm = fxpress.capture(nn.Linear(4, 3).eval(), (torch.randn(2, 4),))
    from fxpress.ir.graph import set_attr_value

    before = param_bytes(gm)
    w = next(n for n in gm.graph.find_nodes(op="get_attr") if n.target == "weight")
    set_attr_value(gm, w.target, torch.ones(3, 4, dtype=torch.int8))  # stored as a buffer
    assert count_params(gm) == 15
    assert param_bytes(gm) == before - 12 * 3  # 12 weights shrink from 4 bytes to 1


def test_cost_errors_are_clear():
    with pytest.raises(TypeError, match="capture"):
        node_costs(nn.Linear(2, 2))
    with pytest.raises(TypeError):
        count_params("model")
    gm = fxpress.capture(nn.Linear(4, 3).eval(), (torch.randn(2, 4),))
    lin = next(n for n in gm.graph.nodes if n.op == "call_function")
    del lin.meta["val"]
    with pytest.raises(ValueError, match="meta"):
        node_costs(gm)


def test_macs_per_sample_do_not_depend_on_the_capture_batch():
    from fxpress.ir.cost import graph_batch, macs_per_sample

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10)).eval()
    one = fxpress.capture(model, (torch.randn(1, 3, 8, 8),))
    four = fxpress.capture(model, (torch.randn(4, 3, 8, 8),))
    per_sample = 36 * 8 * 27 + 288 * 10
    assert graph_batch(four) == (4, True) and total_macs(four) == 4 * per_sample
    assert macs_per_sample(one) == macs_per_sample(four) == per_sample
