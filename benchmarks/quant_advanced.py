"""Advanced post-training quantization: what CLE, bias correction and SmoothQuant buy, in SQNR.

    ./run.sh python benchmarks/quant_advanced.py [--models mobilenet_v2,resnet18,bert] [--calib 16]

Each model is quantized with fxpress's static int8 preset (uint8 per-tensor activations with the
histogram-MSE observer, int8 per-channel weights) and with per-tensor int8 weights (the setting CLE
was designed for), plain and with each option:

    plain | +CLE (equalize=True) | +BC (bias_correction=True) | +CLE+BC | +SQ (smooth_quant=0.5) | +SQ+BC

SQNR = 10·log10(Σ y² / Σ (y - ŷ)²) of the model output against fp32 on held-out inputs (not the
calibration batches). All models have random weights (nothing is downloaded), so absolute numbers
say little about accuracy; the differences between columns are what this measures. "n/a": the
option has nothing to rewrite in that model (CLE needs conv/linear pairs joined by relu-like ops,
which BERT's GELU MLPs are not; SmoothQuant is for linears fed by outlier channels, which the CNNs
have only in their classifier).

* mobilenet_v2 / resnet18 (torchvision, weights=None), 16 calibration batches. Random init leaves
  every batch norm at mean 0 / var 1 / gamma 1, under which activations vanish layer by layer
  (mobilenet_v2's logits come out ~1e-9) and nothing is left to quantize. So BN running statistics
  are estimated on the random inputs (train-mode passes: activations normalized as in a trained
  net). Two versions: "bn" (gamma 1) and "uneven" (gamma drawn log-uniformly from [0.02, 2]
  before estimating: after folding, per-channel weight and activation ranges then differ by up
  to 100x, as they do in trained networks, the situation CLE was made for). A deep random
  network amplifies any perturbation layer by layer (each mobilenet_v2 layer alone quantizes at
  38-41 dB, the 52 together end near 5 dB: see ``compare_nodes(mode="local")``), so its absolute
  SQNRs are far below a trained network's.
* bert: transformers BertModel (hidden 256, 4 layers, 4 heads, intermediate 1024, seq 128), random
  weights. Real BERT/OPT/LLaMA LayerNorm outputs have a few outlier channels 10-100x larger than
  the rest; random init has none, so we MIMIC them: in every LayerNorm, 4 fixed channels get
  gamma = 25 and beta = 5. Two versions: "outliers" as just described (the outlier channels then
  dominate every linear's output and the output energy), and "outliers, small weights", where the
  weight columns that read those channels in the linears after each LayerNorm are divided by 25
  too, as when trained layers use massive activations like biases (the outliers then carry no more
  of the signal than any other channel). Two configs: the default (residual adds quantized too)
  and W8A8 linears/matmuls only (LayerNorm, softmax, residual adds in float: SmoothQuant's
  setting). Cells for bert give two SQNRs: all channels / the 252 non-outlier channels of the last
  hidden state (the outlier channels dominate the first).
"""

from __future__ import annotations

import argparse
import time

import torch

import fxpress
from fxpress.passes.quant.config import OpQuant, QuantConfig, TensorSpec
from fxpress.passes.quant.debug import sqnr

VARIANTS = {
    "plain": {},
    "+CLE": {"equalize": True},
    "+BC": {"bias_correction": True},
    "+CLE+BC": {"equalize": True, "bias_correction": True},
    "+SQ": {"smooth_quant": 0.5},
    "+SQ+BC": {"smooth_quant": 0.5, "bias_correction": True},
}
PER_TENSOR_W = QuantConfig(default=OpQuant("static", TensorSpec(), TensorSpec(dtype=torch.int8, symmetric=True, axis=None, observer="minmax")))


def realistic_bn(model: torch.nn.Module, batches: list[torch.Tensor], uneven: bool, seed: int = 0) -> torch.nn.Module:
    """BN running statistics estimated on ``batches``; with ``uneven``, first log-uniform gamma in [0.02, 2]."""
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for bn in bns:
            if uneven:
                u = torch.rand(bn.num_features, generator=gen)
                bn.weight.copy_(torch.exp(torch.log(torch.tensor(0.02)) + u * torch.log(torch.tensor(100.0))))
                bn.bias.copy_(torch.randn(bn.num_features, generator=gen) * 0.1)
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the passes below
        model.train()
        for x in batches:
            model(x)
    return model.eval()


class BertLastHidden(torch.nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids):
        return self.bert(input_ids=input_ids).last_hidden_state


OUTLIERS = torch.tensor([7, 61, 130, 201])


def bert_with_outliers(seq: int, small_weights: bool = False) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
        max_position_embeddings=max(seq, 128), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    bert = BertModel(config, add_pooling_layer=False)
    model = BertLastHidden(bert).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight[OUTLIERS] = 25.0
                m.bias[OUTLIERS] = 5.0
        if small_weights:  # the linears right after each LayerNorm: q/k/v (previous output LN) and the FFN input
            for layer in bert.encoder.layer:
                for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value, layer.intermediate.dense):
                    lin.weight[:, OUTLIERS] /= 25.0
    return model


def build(name: str, args, gen: torch.Generator):
    if name.startswith("bert"):
        model = bert_with_outliers(args.seq, small_weights=name.endswith("small_weights"))
        make = lambda: torch.randint(0, 1000, (args.batch, args.seq), generator=gen)  # noqa: E731
        return model, [make() for _ in range(args.calib)], [make() for _ in range(args.eval)]
    import torchvision

    arch, _, bn = name.partition(":")
    model = torchvision.models.get_model(arch, weights=None)
    make = lambda: torch.randn(args.batch, 3, args.size, args.size, generator=gen)  # noqa: E731
    calib, evals = [make() for _ in range(args.calib)], [make() for _ in range(args.eval)]
    realistic_bn(model, [make() for _ in range(8)], uneven=bn == "uneven")
    return model, calib, evals


def applies(model_name: str, variant: str) -> bool:
    bert = model_name.startswith("bert")
    if "CLE" in variant:
        return not bert
    if "SQ" in variant:
        return bert
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenet_v2:bn,mobilenet_v2:uneven,resnet18:uneven,bert,bert_small_weights")
    parser.add_argument("--calib", type=int, default=16, help="calibration batches")
    parser.add_argument("--eval", type=int, default=4, help="held-out evaluation batches")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=96, help="image size for the CNNs")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    variants = args.variants.split(",")
    rows = []
    keep = torch.ones(256, dtype=torch.bool)
    keep[OUTLIERS] = False
    for name in args.models.split(","):
        gen = torch.Generator().manual_seed(1)
        model, calib, evals = build(name, args, gen)
        x = (calib[0],)
        with torch.no_grad():
            ref = torch.cat([model(e) for e in evals])
        gm = fxpress.capture(model, x)
        if name.startswith("bert"):
            configs = [("default", "int8_static"), ("linear+matmul", QuantConfig.preset("int8_static", op_kinds=("linear", "matmul")))]
        else:
            configs = [("per-channel W", "int8_static"), ("per-tensor W", PER_TENSOR_W)]
        for cfg_name, cfg in configs:
            row = [f"{name} ({cfg_name})"]
            for v in variants:
                if not applies(name, v):
                    row.append(None)
                    continue
                start = time.perf_counter()
                qm = fxpress.quantize(gm, x, calibration=calib, config=cfg, progress=False, verify=False, **VARIANTS[v])
                with torch.no_grad():
                    out = torch.cat([qm(e) for e in evals])
                cell = f"{sqnr(ref, out):.1f}"
                if name.startswith("bert"):
                    cell += f" / {sqnr(ref[..., keep], out[..., keep]):.1f}"
                row.append(cell)
                print(f"  {row[0]:40} {v:8} {cell:>12} dB  ({time.perf_counter() - start:.0f} s)", flush=True)
            rows.append(row)
    print(f"\nOutput SQNR (dB) vs fp32, int8 static, {args.calib} calibration batches of {args.batch}, {args.eval} held-out batches")
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'model (config)':{width}}" + "".join(f"{v:>13}" for v in variants))
    for row in rows:
        print(f"{row[0]:{width}}" + "".join(f"{'n/a' if c is None else c:>13}" for c in row[1:]))


if __name__ == "__main__":
    main()
