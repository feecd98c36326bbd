"""fxpress's decomposed convolutions vs TensorLy-Torch's factorized ones at equal parameters, in one run.

    python benchmarks/decompose_vs_tltorch.py [--ratio 0.25] [--size 224] [--models resnet18,vgg11]
                                              [--cp-max-channels 128] [--threads 1] [--objectives balanced,error]

For every distinct k x k convolution (k > 1) of torchvision's resnet18 and vgg11 (random weights:
nothing can be downloaded here), at the input size it sees in a ``--size`` image:

* TensorLy-Torch: ``tltorch.FactorizedConv.from_conv(conv, rank=ratio, factorization=...,
  implementation="factorized")`` for CP (its default factorization) and for Tucker with the spatial
  modes kept full (``fixed_rank_modes=(2, 3)``: its strongest Tucker; the default also shrinks the
  3x3 modes and does worse). Its parameter count P is fxpress's budget for that layer.
* fxpress, like for like: against CP, ``fxpress.decompose(conv, x, "cp", rank=P / P0, round_to=1)``
  (its CP: 2 restarts of tensorly's CP-ALS, 200 iterations, emitted as 1x1 -> one depthwise kh x kw
  whose kernel is computed from the two stored factors -> 1x1); against Tucker, ``method="auto"``
  (per layer Tucker-2 or spatial SVD, HOOI ranks chosen at <= P parameters). Each with every
  objective in ``--objectives``: "balanced" (fxpress's default: the candidates' latencies are
  measured on this machine and traded against error, 2x faster worth 5% more error) and "error"
  (the lowest predicted error, nothing timed).

Columns: parameters, relative weight error ``||W - W_hat|| / ||W||``, relative output error on a
random batch (N(0, 1) inputs: there is no data for these layers), eager PyTorch latency of the layer
at batch 1 (median of interleaved rounds whose order rotates, ``--threads`` intra-op threads), for
the original conv too; all of a layer's models are timed in the same rounds. fxpress's result is
timed as a plain ``torch.fx.GraphModule`` of its graph (the same ATen calls): the module
``fxpress.capture`` returns also runs torch.export's input-constraint check on every call, a fixed
cost per model call (about 0.14 ms; ~10 us for an nn.Module) that is not the layer's; it is timed
too, for the headline objective, and its median overhead printed. tltorch's CP-ALS on
large kernels takes many minutes on this machine (426 s for one 256x256 layer at rank 0.25), so CP
is compared only up to ``--cp-max-channels``. The load average is printed before and after: this
is a shared 2-core machine.
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
from fxpress.passes.decompose.common import format_ranks


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


def plain(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The same graph without the captured module's per-call input-constraint hooks."""
    out = torch.fx.GraphModule(gm, gm.graph)
    out._in_spec, out._out_spec = gm._in_spec, gm._out_spec
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.25, help="tltorch's rank: the fraction of parameters kept")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--models", default="resnet18,vgg11")
    ap.add_argument("--cp-max-channels", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--round-to", type=int, default=1, help="fxpress's rank rounding (1: use the whole parameter budget)")
    ap.add_argument("--objectives", default="balanced,error", help="fxpress objectives to run (the first is the headline)")
    ap.add_argument("--factorizations", default="cp,tucker", help="tltorch factorizations to compare with")
    ap.add_argument("--tucker-methods", default="auto",
                    help="fxpress methods against tltorch's Tucker (like for like: 'auto' = Tucker-2 / spatial SVD; "
                         "'auto,cp' also lets fxpress take CP where it fits <= --cp-max-channels)")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    import torchvision
    import tltorch

    objectives = args.objectives.split(",")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = open("/proc/loadavg").read().split()[:3]
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
            small_kernel = max(conv.in_channels, conv.out_channels) <= args.cp_max_channels
            for fac, kw in (("cp", {}), ("tucker", {"fixed_rank_modes": (2, 3)})):
                if fac not in args.factorizations.split(",") or fac == "cp" and not small_kernel:
                    continue
                method = "cp" if fac == "cp" else [m for m in args.tucker_methods.split(",") if m != "cp" or small_kernel]
                t = time.perf_counter()
                theirs = tltorch.FactorizedConv.from_conv(conv, rank=args.ratio, factorization=fac, implementation="factorized", **kw)
                t_theirs = time.perf_counter() - t
                P = params(theirs)
                with torch.no_grad():
                    W_hat = theirs.weight.to_tensor()
                    e_theirs = (rel(W_hat, conv.weight), rel(theirs(x), ref))
                timed[f"tltorch-{fac}"] = theirs
                ours = {}
                for obj in objectives:
                    t = time.perf_counter()
                    m = fxpress.decompose(conv, (x1,), method, rank=min(P / p0, 0.999), objective=obj,
                                          round_to=args.round_to, fold_batch_norm=False, progress=False, verify=False)
                    t_ours = time.perf_counter() - t
                    dec = fxpress.decompose_report(m).decomposed
                    with torch.no_grad():
                        e_ours = (dec[0].weight_error if dec else 0.0, rel(m(x), ref))
                    how = f"{dec[0].method} {format_ranks(dec[0].ranks)}" if dec else "left alone"
                    timed[f"fxpress-{obj}@{fac}"] = plain(m)
                    if obj == objectives[0]:
                        timed[f"fxpress-{obj}@{fac}+check"] = m
                    ours[obj] = dict(P=count_params(m), how=how, e=e_ours, t=t_ours)
                entries.append((fac, P, e_theirs, t_theirs, ours))
            with torch.no_grad():
                lat = interleaved(timed, x1, args.repeat, args.rounds, warmup=True)
            for fac, P, e_theirs, t_theirs, ours in entries:
                for obj, o in ours.items():
                    o["ms"] = lat[f"fxpress-{obj}@{fac}"]
                rows.append(dict(layer=label, fac=fac, p0=p0, P=P, e_theirs=e_theirs, t_theirs=t_theirs, ours=ours,
                                 lat_conv=lat["conv"], lat_theirs=lat[f"tltorch-{fac}"],
                                 check=lat[f"fxpress-{objectives[0]}@{fac}+check"] - lat[f"fxpress-{objectives[0]}@{fac}"]))
                head = ours[objectives[0]]
                print(f"{label:42} vs tltorch-{fac:6}  params {P:>9,} / {head['P']:>9,} (of {p0:,})  out err {e_theirs[1]:.3f} / "
                      + " / ".join(f"{o['e'][1]:.3f}" for o in ours.values())
                      + f"  ms {lat[f'tltorch-{fac}']:.2f} / " + " / ".join(f"{o['ms']:.2f}" for o in ours.values())
                      + f" (conv {lat['conv']:.2f})  [" + "; ".join(f"{k}: {o['how']}" for k, o in ours.items()) + "]", flush=True)

    load_after = open("/proc/loadavg").read().split()[:3]
    print(f"\nthe captured module's input check, per call: median {statistics.median(r['check'] for r in rows):.3f} ms "
          f"(range {min(r['check'] for r in rows):.3f} .. {max(r['check'] for r in rows):.3f}) on top of the plain graph's time")
    print(f"\nat rank ratio {args.ratio} (tltorch's parameter count = fxpress's budget), input {args.size}x{args.size}, "
          f"batch 1 latency, {args.threads} thread(s), {args.rounds} interleaved rounds x {args.repeat}; random weights and inputs; "
          f"load average {' '.join(load_before)} before, {' '.join(load_after)} after")
    tags = " / ".join(f"fx {o}" for o in objectives)
    head = ("layer", "vs", "params tl / fx", f"fxpress method ({', '.join(objectives)})", "weight err tl / fx",
            f"output err tl / {tags}", f"ms tl / {tags} / conv", "decompose s tl / fx")
    body = []
    for r in rows:
        o0 = r["ours"][objectives[0]]
        body.append((r["layer"], r["fac"], f"{r['P']:,} / {o0['P']:,}", "; ".join(o["how"] for o in r["ours"].values()),
                     f"{r['e_theirs'][0]:.3f} / {o0['e'][0]:.3f}",
                     f"{r['e_theirs'][1]:.3f} / " + " / ".join(f"{o['e'][1]:.3f}" for o in r["ours"].values()),
                     f"{r['lat_theirs']:.2f} / " + " / ".join(f"{o['ms']:.2f}" for o in r["ours"].values()) + f" / {r['lat_conv']:.2f}",
                     f"{r['t_theirs']:.1f} / {o0['t']:.1f}"))
    widths = [max(len(str(row[i])) for row in [head, *body]) for i in range(len(head))]
    for row in [head, tuple("-" * w for w in widths), *body]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    for obj in objectives:
        for fac in ("cp", "tucker"):
            sel = [r for r in rows if r["fac"] == fac]
            if not sel:
                continue
            mine = [r["ours"][obj] for r in sel]
            lower = sum(o["e"][1] < r["e_theirs"][1] for o, r in zip(mine, sel))
            faster = sum(o["ms"] < r["lat_theirs"] for o, r in zip(mine, sel))
            both = [r["layer"] for o, r in zip(mine, sel) if o["e"][1] < r["e_theirs"][1] and o["ms"] < r["lat_theirs"]]
            within = sum(o["P"] <= r["P"] for o, r in zip(mine, sel))
            gm_err = math.exp(statistics.mean(math.log(o["e"][1] / r["e_theirs"][1]) for o, r in zip(mine, sel)))
            gm_lat = math.exp(statistics.mean(math.log(o["ms"] / r["lat_theirs"]) for o, r in zip(mine, sel)))
            missed = [r["layer"] for r in sel if r["layer"] not in both]
            print(f"\nfxpress objective={obj} vs tltorch {fac}: {len(sel)} layers; params <= tltorch's on {within}; lower output error on "
                  f"{lower} (geomean error ratio fxpress/tltorch {gm_err:.3f}); faster on {faster} (geomean latency ratio {gm_lat:.3f}); "
                  f"both on {len(both)}" + (f" (not: {', '.join(missed)})" if missed else ""))


if __name__ == "__main__":
    main()
