"""Small local architectures with random weights, for tests across fxpress.

Every factory returns ``(model.eval(), example_inputs)`` where ``example_inputs`` is a tuple at
batch 2 (or ``batch=`` as given). Batch norms get non-trivial running statistics (random means,
variances away from 1, random affine parameters), so folding them is actually exercised: with the
default statistics (mean 0, var 1, gamma 1, beta 0) a broken fold would still look exact.

``ALL_SMALL`` maps a name to each cheap factory (milliseconds to build, well under a second to
capture); ``resnet18``, ``mobilenet_v3_small`` and ``tiny_bert`` build real architectures with
random weights (``weights=None`` / a config; nothing is downloaded) for ``@pytest.mark.slow`` tests.

Factories draw from the global RNG; the autouse fixture in conftest seeds it per test, so a test
sees the same weights on every run.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ALL_SMALL",
    "randomize_bn",
    "mlp",
    "conv_bn_relu_cnn",
    "residual_block",
    "inverted_residual",
    "concat_block",
    "transformer_block",
    "mha_block",
    "conv_transpose_bn",
    "linear_bn1d",
    "resnet18",
    "mobilenet_v3_small",
    "tiny_bert",
    "count_calls",
]

Factory = Callable[..., tuple[nn.Module, tuple]]


def randomize_bn(model: nn.Module) -> nn.Module:
    """Give every batch norm random running stats and affine parameters (all well conditioned)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.5)
                    m.running_var.copy_(torch.rand_like(m.running_var) * 1.5 + 0.25)
                    m.num_batches_tracked.fill_(10)
                if m.affine:
                    m.weight.copy_(torch.rand_like(m.weight) + 0.5)
                    m.bias.copy_(torch.randn_like(m.bias) * 0.2)
    return model


def _ready(model: nn.Module) -> nn.Module:
    return randomize_bn(model).eval()


# ---------------------------------------------------------------------------------------------
# small models


class MLP(nn.Module):
    def __init__(self, d_in: int = 16, hidden: int = 32, d_out: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = F.gelu(self.fc2(x))
        return self.fc3(x)


def mlp(batch: int = 2):
    return _ready(MLP()), (torch.randn(batch, 16),)


class ConvBNReLUCNN(nn.Module):
    """conv-BN-ReLU x3 (one with bias=False, one strided), global pool, linear head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def conv_bn_relu_cnn(batch: int = 2):
    return _ready(ConvBNReLUCNN()), (torch.randn(batch, 3, 16, 16),)


class ResidualBlock(nn.Module):
    """ResNet basic block with a projection shortcut (conv-BN) and an identity one."""

    def __init__(self, c_in: int = 8, c_out: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=2, bias=False), nn.BatchNorm2d(c_out))
        self.conv3 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = F.relu(out + self.down(x))
        return F.relu(self.bn3(self.conv3(out)) + out)


def residual_block(batch: int = 2):
    return _ready(ResidualBlock()), (torch.randn(batch, 8, 12, 12),)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, depthwise 3x3, 1x1 project (linear bottleneck), residual."""

    def __init__(self, c: int = 8, expand: int = 4):
        super().__init__()
        hidden = c * expand
        self.expand = nn.Conv2d(c, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu6(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        return x + self.bn3(self.project(y))


def inverted_residual(batch: int = 2):
    return _ready(InvertedResidual()), (torch.randn(batch, 8, 10, 10),)


class ConcatBlock(nn.Module):
    """Inception-style branches concatenated on channels, then a DenseNet-style cat with the input."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(c, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.b3 = nn.Sequential(nn.Conv2d(c, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.bp = nn.Conv2d(c, 2, 1)
        self.fuse = nn.Conv2d(c + 4 + 6 + 2, 8, 1)

    def forward(self, x):
        pooled = F.avg_pool2d(x, 3, stride=1, padding=1)
        y = torch.cat([self.b1(x), self.b3(x), self.bp(pooled)], dim=1)
        return self.fuse(torch.cat([x, y], dim=1))


def concat_block(batch: int = 2):
    return _ready(ConcatBlock()), (torch.randn(batch, 8, 8, 8),)


class TransformerBlock(nn.Module):
    """Pre-norm encoder block: hand-written multi-head attention with SDPA, LayerNorm, GELU MLP."""

    def __init__(self, d: int = 32, heads: int = 4, ff: int = 64):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, ff)
        self.ff2 = nn.Linear(ff, d)

    def forward(self, x):
        b, s, d = x.shape
        h = self.ln1(x)
        q, k, v = self.qkv(h).split(d, dim=-1)
        q, k, v = (t.reshape(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        return x + self.ff2(F.gelu(self.ff1(self.ln2(x))))


def transformer_block(batch: int = 2):
    return _ready(TransformerBlock()), (torch.randn(batch, 8, 32),)


class MHABlock(nn.Module):
    """Post-norm encoder block built on nn.MultiheadAttention (batch_first)."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln1 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.ln2 = nn.LayerNorm(d)

    def forward(self, x):
        x = self.ln1(x + self.attn(x, x, x, need_weights=False)[0])
        return self.ln2(x + self.mlp(x))


def mha_block(batch: int = 2):
    return _ready(MHABlock()), (torch.randn(batch, 6, 32),)


class ConvTransposeBN(nn.Module):
    """Grouped transposed conv (upsampling) + BN, then a plain transposed conv + BN."""

    def __init__(self):
        super().__init__()
        self.up1 = nn.ConvTranspose2d(8, 12, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.bn1 = nn.BatchNorm2d(12)
        self.up2 = nn.ConvTranspose2d(12, 4, 2, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.up2(F.relu(self.bn1(self.up1(x)))))


def conv_transpose_bn(batch: int = 2):
    return _ready(ConvTransposeBN()), (torch.randn(batch, 8, 5, 5),)


class LinearBN1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 24)
        self.bn1 = nn.BatchNorm1d(24)
        self.fc2 = nn.Linear(24, 8, bias=False)
        self.bn2 = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn2(self.fc2(F.relu(self.bn1(self.fc1(x)))))


def linear_bn1d(batch: int = 2):
    return _ready(LinearBN1d()), (torch.randn(batch, 16),)


ALL_SMALL: dict[str, Factory] = {
    "mlp": mlp,
    "conv_bn_relu_cnn": conv_bn_relu_cnn,
    "residual_block": residual_block,
    "inverted_residual": inverted_residual,
    "concat_block": concat_block,
    "transformer_block": transformer_block,
    "mha_block": mha_block,
    "conv_transpose_bn": conv_transpose_bn,
    "linear_bn1d": linear_bn1d,
}

# ---------------------------------------------------------------------------------------------
# real architectures with random weights (slow: seconds to capture)


def resnet18(batch: int = 2, size: int = 64):
    import torchvision

    return _ready(torchvision.models.resnet18(weights=None)), (torch.randn(batch, 3, size, size),)


def mobilenet_v3_small(batch: int = 2, size: int = 64):
    import torchvision

    return _ready(torchvision.models.mobilenet_v3_small(weights=None)), (torch.randn(batch, 3, size, size),)


class BertLastHidden(nn.Module):
    """forward(input_ids) -> last_hidden_state, so the model takes and returns plain tensors."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids):
        return self.bert(input_ids=input_ids).last_hidden_state


def tiny_bert(batch: int = 2, seq: int = 16):
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertLastHidden(BertModel(config, add_pooling_layer=False))
    return model.eval(), (torch.randint(0, config.vocab_size, (batch, seq)),)


def count_calls(gm: torch.fx.GraphModule, *names: str) -> int:
    """How many call_function nodes of a graph call an op whose name contains one of ``names``."""
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and any(name in str(node.target) for name in names):
            n += 1
    return n
