"""fxpress's decomposed convolutions vs TensorLy-Torch's factorized ones at equal parameters, in one run.

    python benchmarks/decompose_vs_tltorch.py [--ratio 0.25] [--size 224] [--models resnet18,vgg11]
                                              [--cp-max-channels 128] [--threads 1]

For every distinct k x k convolution (k > 1) of torchvision's resnet18 and vgg11 (random weights:
nothing can be downloaded here), at the input size it sees in a ``--size`` image:

* TensorLy-Torch: ``tltorch.FactorizedConv.from_conv(conv, rank=ratio, factorization=...,
  implementation="factorized")`` for CP (its default factorization) and for Tucker with the spatial
  modes kept full (``fixed_rank_modes=(2, 3)``: its strongest Tucker; the default also shrinks the
  3x3 modes and does worse). Its parameter count P is what fxpress gets.
* fxpress: ``fxpress.decompose(conv, x, ["auto", "cp"], rank=P / P0, round_to=1)``: per layer, the
  method (Tucker-2, spatial SVD, or -- up to ``--cp-max-channels`` -- its own CP: 2 restarts of
  tensorly's CP-ALS, 200 iterations) and ranks with the lowest error at <= P parameters, emitted as
  plain convolutions (CP: 1x1 -> depthwise kx1 -> depthwise 1xk -> 1x1).

Columns: parameters, relative weight error ``||W - W_hat|| / ||W||``, relative output error on a
random batch (N(0, 1) inputs: there is no data for these layers), eager PyTorch latency of the layer
at batch 1 (median of interleaved rounds, ``--threads`` intra-op threads), for the original conv
too. tltorch's CP-ALS on large kernels takes many minutes on this machine (426 s for one 256x256
layer at rank 0.25), so CP is run only up to ``--cp-max-channels``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn as nn

import fxpress
from _measure import interleaved
from fxpress.ir.cost import count_params


def conv_layers(model: nn.Module, size: int) -> list[tuple[str, nn.Conv2d, tuple[int, ...]]]:
    found = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: found.append((name, mod, tuple(inp[0].shape))))
             for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    for h in hooks:
        h.remove()
    seen, out = set(), []
    for name, conv, shape in found:
        key = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.groups, shape[2:])
        if key not in seen:
            seen.add(key)
            out.append((name, conv, shape))
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.25, help="tltorch's rank: the fraction of parameters kept")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--models", default="resnet18,vgg11")
    ap.add_argument("--cp-max-channels", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--round-to", type=int, default=1, help="fxpress's rank rounding (1: use the whole parameter budget)")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    import torchvision
    import tltorch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for model_name in args.models.split(","):
        model = getattr(torchvision.models, model_name)().eval()
        for name, conv, shape in conv_layers(model, args.size):
            x = torch.randn(2, *shape[1:])
            x1 = x[:1]
            with torch.no_grad():
                ref = conv(x)
            p0 = params(conv)
            label = f"{model_name}.{name} {conv.in_channels}->{conv.out_channels} {conv.kernel_size[0]}x{conv.kernel_size[1]}" \
                    f"{' s2' if conv.stride[0] == 2 else ''} @{shape[2]}"
            timed = {"conv": conv}
            entries = []
            for fac, kw in (("cp", {}), ("tucker", {"fixed_rank_modes": (2, 3)})):
                if fac == "cp" and max(conv.in_channels, conv.out_channels) > args.cp_max_channels:
                    continue
                t = time.perf_counter()
                theirs = tltorch.FactorizedConv.from_conv(conv, rank=args.ratio, factorization=fac, implementation="factorized", **kw)
                t_theirs = time.perf_counter() - t
                P = params(theirs)
                with torch.no_grad():
                    W_hat = theirs.weight.to_tensor()
                    e_theirs = (rel(W_hat, conv.weight), rel(theirs(x), ref))
                t = time.perf_counter()
                small_kernel = max(conv.in_channels, conv.out_channels) <= args.cp_max_channels
                ours = fxpress.decompose(conv, (x1,), ["auto", "cp"] if small_kernel else "auto", rank=min(P / p0, 0.999),
                                         round_to=args.round_to, fold_batch_norm=False, progress=False, verify=False)
                t_ours = time.perf_counter() - t
                rep = fxpress.decompose_report(ours)
                dec = rep.decomposed
                with torch.no_grad():
                    e_ours = (dec[0].weight_error if dec else 0.0, rel(ours(x), ref))
                how = f"{dec[0].method} {dec[0].ranks}" if dec else "left alone"
                timed[f"tltorch-{fac}"] = theirs
                timed[f"fxpress@{fac}"] = ours
                entries.append((fac, P, count_params(ours), how, e_theirs, e_ours, t_theirs, t_ours))
            with torch.no_grad():
                lat = interleaved(timed, x1, args.repeat, args.rounds, warmup=True)
            for fac, P, P_ours, how, e_theirs, e_ours, t_theirs, t_ours in entries:
                rows.append(dict(layer=label, fac=fac, p0=p0, P=P, P_ours=P_ours, how=how, e_theirs=e_theirs, e_ours=e_ours,
                                 lat_conv=lat["conv"], lat_theirs=lat[f"tltorch-{fac}"], lat_ours=lat[f"fxpress@{fac}"],
                                 t_theirs=t_theirs, t_ours=t_ours))
                r = rows[-1]
                print(f"{label:42} vs tltorch-{fac:6}  params {P:>9,} / {P_ours:>9,} (of {p0:,})  out err {e_theirs[1]:.3f} / {e_ours[1]:.3f}"
                      f"  ms {r['lat_theirs']:.2f} / {r['lat_ours']:.2f} (conv {r['lat_conv']:.2f})  [{how}]", flush=True)

    print(f"\nat rank ratio {args.ratio} (tltorch's parameter count = fxpress's budget), input {args.size}x{args.size}, "
          f"batch 1 latency, {args.threads} thread(s); random weights and inputs")
    head = ("layer", "vs", "params tltorch", "params fxpress", "fxpress method", "weight err tl / fx", "output err tl / fx",
            "ms tl / fx / conv", "decompose s tl / fx")
    body = [(r["layer"], r["fac"], f"{r['P']:,}", f"{r['P_ours']:,}", r["how"], f"{r['e_theirs'][0]:.3f} / {r['e_ours'][0]:.3f}",
             f"{r['e_theirs'][1]:.3f} / {r['e_ours'][1]:.3f}", f"{r['lat_theirs']:.2f} / {r['lat_ours']:.2f} / {r['lat_conv']:.2f}",
             f"{r['t_theirs']:.1f} / {r['t_ours']:.1f}") for r in rows]
    widths = [max(len(str(row[i])) for row in [head, *body]) for i in range(len(head))]
    for row in [head, tuple("-" * w for w in widths), *body]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    for fac in ("cp", "tucker"):
        sel = [r for r in rows if r["fac"] == fac]
        if not sel:
            continue
        lower = sum(r["e_ours"][1] < r["e_theirs"][1] for r in sel)
        faster = sum(r["lat_ours"] < r["lat_theirs"] for r in sel)
        within = sum(r["P_ours"] <= r["P"] for r in sel)
        gm_err = math.exp(statistics.mean(math.log(r["e_ours"][1] / r["e_theirs"][1]) for r in sel))
        gm_lat = math.exp(statistics.mean(math.log(r["lat_ours"] / r["lat_theirs"]) for r in sel))
        print(f"\nvs tltorch {fac}: {len(sel)} layers; fxpress params <= tltorch's on {within}; lower output error on {lower} "
              f"(geomean error ratio fxpress/tltorch {gm_err:.3f}); faster on {faster} (geomean latency ratio {gm_lat:.3f})")


if __name__ == "__main__":
    main()
