"""Channel-pruning coverage: every torchvision classification model, plus BERT, GPT-2 and ViT from
transformers, pruned at ratio 0.5 by fxpress and by Torch-Pruning, side by side (random weights).

    python benchmarks/prune_coverage.py [--jobs 2] [--models resnet18 vit_b_16 ...] [--resume]
    python benchmarks/prune_coverage.py --render        # only re-write the table from the .jsonl
    python benchmarks/prune_coverage.py --readme        # print the compact table for the README

Every (model, tool) pair runs in its own subprocess with a timeout and a resident-memory cap
(--max-rss-gb; Torch-Pruning's graph build on swin grows past 17 GB, and the kernel's OOM killer
could otherwise pick another process), so a crash, a hang or a memory blow-up becomes a table row
instead of ending the run; each worker writes its partial
result after every stage, so a timeout still says how far it got. Pairs are scheduled fxpress, TP,
fxpress, TP, ... on ``--jobs`` slots (one torch thread each), so both tools see the same load.

fxpress, per model: ``fxpress.capture`` (timed), ``fxpress.channel_groups`` on the captured graph
(timed), ``fxpress.prune(ratio=0.5, importance="l2", ignore=<classifier>)`` (timed, including its
verification), the pruned graph's output shape against the original's, the report's MACs / params
ratios and frozen groups, then ``fxpress.export_onnx`` of the pruned graph with its onnxruntime
parity check (atol = rtol = 1e-3, as tests/passes/prune/test_zoo.py).

Torch-Pruning, per model, the recipe of its own examples (examples/torchvision_models/
torchvision_pruning.py, examples/transformers/prune_hf_{bert,vit}.py): ``MagnitudePruner`` with
``MagnitudeImportance(p=2)``, ``pruning_ratio=0.5``, ``ignored_layers`` = the final classifier
(Linear/Conv2d with 1000 outputs), ``round_to=num_heads`` and the ``hidden_dim`` patch for
torchvision's ViT, ``num_heads`` for the HF q/k/v projections and the head-size attribute patch
after pruning; MACs via ``tp.utils.count_ops_and_params`` before and after.

Inputs are batch 1 and small where the architecture allows (64x64 for CNNs); the table states each.
Results go to benchmarks/results/prune_coverage.{jsonl,md}; worker logs to --log-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
HF_MODELS = ["hf_bert", "hf_gpt2", "hf_vit"]
# the ones that take minutes on 2 cores (hundreds of millions of parameters): run last, one at a time
BIG = {
    "vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_128gf", "regnet_y_32gf", "regnet_x_32gf", "regnet_y_16gf",
    "regnet_x_16gf", "convnext_large", "efficientnet_v2_l", "vgg19_bn", "vgg19", "vgg16_bn", "vgg16",
    "wide_resnet101_2", "resnext101_64x4d", "resnext101_32x8d", "swin_v2_b", "swin_b",
}


# --------------------------------------------------------------------------------------------
# models


def all_models() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models)) + HF_MODELS


def input_size(name: str) -> int:
    """Square image side used for ``name`` (small where the architecture allows)."""
    if name.startswith(("vgg", "alexnet")):
        return 224  # classifier after AdaptiveAvgPool(7)/(6): smaller inputs make it an upsampling pool
    if name == "inception_v3":
        return 299
    if name.startswith("swin_v2"):
        return 256
    if name.startswith(("swin", "maxvit")):
        return 224  # window / grid partitions sized for it
    if name == "vit_h_14":
        return 56  # image_size constructor argument, a multiple of the 14-pixel patch
    return 64  # CNNs with global pooling; torchvision ViTs via image_size=64; hf_vit config image_size=64


def build(name: str):
    """(model in eval mode, example inputs tuple, input label, classifier module names)."""
    import torch

    torch.manual_seed(0)
    if name.startswith("hf_"):
        return _build_hf(name)
    import torchvision

    kw = {}
    if name.startswith("vit_"):
        kw["image_size"] = input_size(name)
    if name in ("googlenet", "inception_v3"):
        kw["aux_logits"] = False  # dead in eval anyway; as Torch-Pruning's torchvision script
        kw["init_weights"] = True
    model = torchvision.models.get_model(name, weights=None, **kw).eval()
    s = input_size(name)
    x = torch.randn(1, 3, s, s)
    return model, (x,), f"{s}x{s}", classifier_names(model)


class LastHidden:  # namespace for the wrapper class, built lazily (torch imported in workers only)
    cls = None


def _wrap(model, key: str):
    import torch

    if LastHidden.cls is None:
        class _LastHidden(torch.nn.Module):
            """forward(x) -> last_hidden_state, so the model takes and returns plain tensors."""

            def __init__(self, inner, key):
                super().__init__()
                self.inner = inner
                self.key = key

            def forward(self, x):
                return self.inner(**{self.key: x}).last_hidden_state

        LastHidden.cls = _LastHidden
    return LastHidden.cls(model, key).eval()


def _build_hf(name: str):
    import torch
    import transformers

    seq = 32
    if name == "hf_bert":
        cfg = transformers.BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                      intermediate_size=1024, max_position_embeddings=128)
        model = _wrap(transformers.BertModel(cfg, add_pooling_layer=False), "input_ids")
        x = torch.randint(0, cfg.vocab_size, (1, seq))
        label = f"ids 1x{seq} (hidden 256, 4 layers, 4 heads)"
    elif name == "hf_gpt2":
        cfg = transformers.GPT2Config(vocab_size=1000, n_embd=256, n_layer=4, n_head=4, n_positions=128,
                                      bos_token_id=0, eos_token_id=0)
        model = _wrap(transformers.GPT2Model(cfg), "input_ids")
        x = torch.randint(0, cfg.vocab_size, (1, seq))
        label = f"ids 1x{seq} (hidden 256, 4 layers, 4 heads)"
    elif name == "hf_vit":
        cfg = transformers.ViTConfig(image_size=64, patch_size=16, hidden_size=256, num_hidden_layers=4,
                                     num_attention_heads=4, intermediate_size=1024)
        model = _wrap(transformers.ViTModel(cfg, add_pooling_layer=False), "pixel_values")
        x = torch.randn(1, 3, 64, 64)
        label = "64x64 (patch 16, hidden 256, 4 layers, 4 heads)"
    else:
        raise ValueError(name)
    return model, (x,), label, []  # no classifier: the output is the hidden state


def classifier_names(model) -> list[str]:
    import torch.nn as nn

    out = []
    for n, m in model.named_modules():
        if (isinstance(m, nn.Linear) and m.out_features == 1000) or (isinstance(m, nn.Conv2d) and m.out_channels == 1000):
            out.append(n)
    return out


# --------------------------------------------------------------------------------------------
# workers (one model, one tool, one process)


def _err(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    first = msg[0] if msg else ""
    return f"{type(exc).__name__}: {first[:300]}"


_REASON_SUBS = [
    (re.compile(r" \(node [^)]*\)"), ""),
    (re.compile(r" of its (input|output) \S+"), r" of its \1"),
    (re.compile(r"dim \d+"), "dim"),
    (re.compile(r"model input '[^']*'"), "model input"),
    (re.compile(r"ignored layer '[^']*'"), "ignored layer"),
    (re.compile(r"\d+"), "N"),
]


def reason_kinds(why: str) -> list[str]:
    """A frozen group's reasons with node names and numbers stripped (so they can be counted)."""
    kinds = []
    for part in why.split("; "):
        for pat, rep in _REASON_SUBS:
            part = pat.sub(rep, part)
        part = part.strip()
        if part and part not in kinds:
            kinds.append(part)
    return kinds


_IO = ("model input", "model output", "ignored layer")


def worker_fx(name: str, res: dict, save) -> None:
    import torch

    import fxpress

    model, args, label, ignore = build(name)
    res.update(input=label, ignore=ignore)
    with torch.no_grad():
        res["params_total"] = sum(p.numel() for p in model.parameters())
    save("capture")
    t = time.perf_counter()
    gm = fxpress.capture(model, args)
    res["capture_s"] = time.perf_counter() - t
    res["nodes"] = len(gm.graph.nodes)
    save("channel_groups")
    t = time.perf_counter()
    an = fxpress.channel_groups(gm, args, ignore=ignore)
    _ = an.groups
    res["groups_s"] = time.perf_counter() - t
    res["groups"] = len(an.groups)
    res["prunable"] = len(an.prunable)
    res["unsupported_ops"] = {str(k): len(v) for k, v in getattr(an, "unsupported", {}).items()}
    save("prune")
    t = time.perf_counter()
    pruned = fxpress.prune(gm, args, ratio=0.5, importance="l2", ignore=ignore)
    res["prune_s"] = time.perf_counter() - t
    rep = fxpress.prune_report(pruned)
    res.update(macs_ratio=rep.macs_ratio, params_ratio=rep.params_ratio, macs_before=rep.macs_before,
               pruned_groups=len(rep.pruned_groups), approximate=len(rep.approximate), notes=rep.notes[:3])
    frozen = [(d, w) for d, w in rep.frozen_groups]
    res["frozen"] = len(frozen)
    non_io = []
    kinds = Counter()
    for d, w in frozen:
        ks = reason_kinds(w)
        if not all(k.startswith(_IO) for k in ks):
            non_io.append((d, w))
            kinds.update(k for k in ks if not k.startswith(_IO))
    res["frozen_non_io"] = len(non_io)
    res["frozen_kinds"] = kinds.most_common(4)
    res["frozen_examples"] = [f"{d} -- {w}"[:400] for d, w in non_io[:3]]
    save("run")
    with torch.no_grad():
        ref = gm(*args)
        out = pruned(*args)
    res["out_shape"] = list(out.shape)
    res["shape_ok"] = tuple(out.shape) == tuple(ref.shape)
    save("onnx")
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fxpress-cov-") as d:
        try:
            r = fxpress.export_onnx(pruned, args, Path(d) / f"{name}.onnx", atol=1e-3, rtol=1e-3)
            res["onnx"] = "ok"
            res["onnx_diff"] = r.max_abs_diff
        except Exception as exc:  # noqa: BLE001
            res["onnx"] = _err(exc)
            traceback.print_exc()
    res["onnx_s"] = time.perf_counter() - t


def _tp_heads(model):
    """Torch-Pruning's HF recipe: q/k/v Linear -> head count; the attention modules to patch after."""
    import torch.nn as nn

    heads, attn = {}, []
    for m in model.modules():
        for q, k, v in (("query", "key", "value"), ("q_proj", "k_proj", "v_proj")):
            if all(isinstance(getattr(m, a, None), nn.Linear) for a in (q, k, v)):
                h = getattr(m, "num_attention_heads", None) or getattr(m, "num_heads", None)
                if h:
                    for a in (q, k, v):
                        heads[getattr(m, a)] = h
                    attn.append((m, getattr(m, q)))
    return heads, attn


def worker_tp(name: str, res: dict, save) -> None:
    import torch
    import torch_pruning as tp

    model, args, label, ignore = build(name)
    from importlib.metadata import version

    res.update(input=label, tp_version=version("torch-pruning"))
    x = args[0]
    ignored = [model.get_submodule(n) for n in ignore]
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        ref = model(x)
    save("count_ops")
    macs0, params0 = tp.utils.count_ops_and_params(model, x)
    res.update(macs_before=macs0, params_before=params0)
    kw = {}
    from torchvision.models.vision_transformer import VisionTransformer

    tv_vit = isinstance(model, VisionTransformer)
    if tv_vit:
        kw["round_to"] = model.encoder.layers[0].num_heads
    heads, attn = _tp_heads(model)
    if heads:
        kw["num_heads"] = heads
    save("prune")
    t = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(
        model, example_inputs=x, importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5, ignored_layers=ignored, **kw,
    )
    res["build_s"] = time.perf_counter() - t
    save("step")
    pruner.step()
    res["prune_s"] = time.perf_counter() - t
    if tv_vit:
        model.hidden_dim = model.conv_proj.out_channels
    for m, q in attn:
        n = pruner.num_heads.get(q, None) if hasattr(pruner, "num_heads") else None
        for a in ("num_attention_heads", "num_heads"):
            if hasattr(m, a) and n:
                setattr(m, a, n)
        h = n or getattr(m, "num_attention_heads", None) or getattr(m, "num_heads")
        for a in ("attention_head_size", "head_dim"):
            if hasattr(m, a):
                setattr(m, a, q.out_features // h)
        if hasattr(m, "all_head_size"):
            m.all_head_size = q.out_features
    save("run")
    with torch.no_grad():
        out = model(x)
    res["out_shape"] = list(out.shape)
    res["shape_ok"] = tuple(out.shape) == tuple(ref.shape)
    save("count_ops_after")
    macs1, params1 = tp.utils.count_ops_and_params(model, x)
    res.update(macs_ratio=macs1 / macs0 if macs0 else None, params_ratio=params1 / params0 if params0 else None)


def worker_main(tool: str, name: str, result_path: str, threads: int) -> int:
    import torch

    torch.set_num_threads(threads)
    res: dict = {"model": name, "tool": tool, "status": "running"}

    def save(stage: str) -> None:
        res["stage"] = stage
        tmp = result_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, default=str)
        os.replace(tmp, result_path)

    t0 = time.perf_counter()
    try:
        (worker_fx if tool == "fx" else worker_tp)(name, res, save)
        res["status"] = "ok"
    except Exception as exc:  # noqa: BLE001
        res["status"] = "error"
        res["error"] = _err(exc)
        traceback.print_exc()
    res["total_s"] = time.perf_counter() - t0
    save("done")
    return 0


# --------------------------------------------------------------------------------------------
# driver


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_job(name: str, tool: str, timeout: float, threads: int, log_dir: Path, max_rss: float = 8e9) -> dict:
    log_dir.mkdir(parents=True, exist_ok=True)
    fd, result_path = tempfile.mkstemp(prefix=f"cov-{name}-{tool}-", suffix=".json")
    os.close(fd)
    os.unlink(result_path)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, "--model", name,
           "--result", result_path, "--threads", str(threads)]
    t0 = time.perf_counter()
    timed_out = over_memory = False
    peak = 0
    with open(log_dir / f"{name}.{tool}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        while True:  # poll: the time limit, and a memory cap so the kernel's OOM killer never picks another job
            try:
                rc = proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pass
            rss = _rss_bytes(proc.pid)
            peak = max(peak, rss)
            if time.perf_counter() - t0 > timeout:
                timed_out = True
            elif rss > max_rss:
                over_memory = True
            if timed_out or over_memory:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
                break
    wall = time.perf_counter() - t0
    try:
        with open(result_path) as f:
            res = json.load(f)
        os.unlink(result_path)
    except (OSError, ValueError):
        res = {"model": name, "tool": tool, "stage": "start"}
    res["wall_s"] = wall
    res["peak_rss_gb"] = peak / 1e9
    if over_memory:
        res["status"] = "memory"
        res["error"] = f"killed at {max_rss / 1e9:.0f} GB resident memory after {wall:.0f} s in {res.get('stage')}"
    elif timed_out:
        res["status"] = "timeout"
        res["error"] = f"timeout after {timeout:.0f} s in {res.get('stage')}"
    elif res.get("status") not in ("ok", "error"):
        res["status"] = "killed"
        res["error"] = f"exit code {rc} in {res.get('stage')} (crash or out of memory)"
    return res


def load_results(path: Path) -> dict:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[(r["model"], r["tool"])] = r
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", help="default: every torchvision classification model + hf_bert hf_gpt2 hf_vit")
    ap.add_argument("--tools", nargs="+", default=["fx", "tp"], choices=["fx", "tp"])
    ap.add_argument("--jobs", type=int, default=2, help="parallel subprocesses (one torch thread each)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per (model, tool)")
    ap.add_argument("--big-timeout", type=float, default=2400, help="seconds per (model, tool) for the BIG models")
    ap.add_argument("--tp-timeout", type=float, default=600, help="seconds per model for Torch-Pruning")
    ap.add_argument("--tp-big-timeout", type=float, default=1200, help="seconds per BIG model for Torch-Pruning")
    ap.add_argument("--max-rss-gb", type=float, default=6, help="kill a worker above this resident memory")
    ap.add_argument("--big-max-rss-gb", type=float, default=14, help="the same for the BIG models (run alone)")
    ap.add_argument("--skip-big", action="store_true", help="mark the BIG models 'skipped: time' instead of running them")
    ap.add_argument("--resume", action="store_true", help="keep results already in the .jsonl")
    ap.add_argument("--render", action="store_true", help="only render the Markdown table from the .jsonl")
    ap.add_argument("--readme", action="store_true", help="print the compact table for the README from the .jsonl")
    ap.add_argument("--out", type=Path, default=RESULTS / "prune_coverage.md")
    ap.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()) / "prune_coverage_logs")
    # worker mode
    ap.add_argument("--worker", choices=["fx", "tp"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        sys.exit(worker_main(args.worker, args.model, args.result, args.threads))

    jsonl = args.out.with_suffix(".jsonl")
    if args.render:
        write_table(load_results(jsonl), args.out)
        return
    if args.readme:
        print(readme_table(load_results(jsonl)))
        return
    models = args.models or all_models()
    results = load_results(jsonl) if args.resume else {}
    if not args.resume and jsonl.exists():
        jsonl.unlink()
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()

    def record(r: dict) -> None:
        with lock:
            results[(r["model"], r["tool"])] = r
            with open(jsonl, "a") as f:
                f.write(json.dumps(r, default=str) + "\n")
            summary = r.get("error") or (f"MACs x{r.get('macs_ratio', 0):.3f} shape_ok={r.get('shape_ok')} onnx={r.get('onnx', '-')}")
            print(f"[{time.strftime('%H:%M:%S')}] {r['model']:<22} {r['tool']}: {r['status']:<8} {r.get('wall_s', 0):7.1f} s  {summary}", flush=True)

    small = [m for m in models if m not in BIG]
    big = [m for m in models if m in BIG]
    todo_small = [(m, t) for m in small for t in args.tools if (m, t) not in results]
    todo_big = [(m, t) for m in big for t in args.tools if (m, t) not in results]
    print(f"{len(models)} models, {len(todo_small) + len(todo_big)} (model, tool) runs; logs in {args.log_dir}", flush=True)

    def job(mt):
        m, t = mt
        big_one = m in BIG
        if t == "tp":
            limit = args.tp_big_timeout if big_one else args.tp_timeout
        else:
            limit = args.big_timeout if big_one else args.timeout
        cap = (args.big_max_rss_gb if big_one else args.max_rss_gb) * 1e9
        record(run_job(m, t, limit, 1 if not big_one else 2, args.log_dir, cap))

    with ThreadPoolExecutor(max_workers=args.jobs) as ex:
        list(ex.map(job, todo_small))
    if args.skip_big:
        for m, t in todo_big:
            record({"model": m, "tool": t, "status": "skipped", "error": "skipped: time", "input": "", "wall_s": 0})
    else:
        for mt in todo_big:  # one at a time, two threads: memory and time
            job(mt)
    write_table(results, args.out)
    print(f"wrote {args.out}")


# --------------------------------------------------------------------------------------------
# table


def _f(x, fmt="{:.3f}"):
    return fmt.format(x) if isinstance(x, (int, float)) else "-"


def _short(s: str, n: int = 90) -> str:
    s = (s or "").replace("|", "\\|").replace("\n", " ")
    return s if len(s) <= n else s[: n - 1] + "…"


def fx_status(r: dict) -> str:
    if r.get("status") == "ok":
        return "ok"
    return _short(r.get("error", r.get("status", "?")), 70)


def _short_kind(k: str) -> str:
    k = k.replace("no channel rule for ", "no rule: ").replace(" does not map dim of its ", " fixes its ")
    return k.replace("aten.", "")


def readme_table(results: dict) -> str:
    """Model, input, MACs and params ratios, frozen groups (beyond I/O, with the main reason), TP's result."""
    order = {m: i for i, m in enumerate(all_models())}
    models = sorted({m for m, _ in results}, key=lambda m: order.get(m, 10**6))
    rows = ["| model | input | MACs | params | frozen groups | ONNX | Torch-Pruning MACs |", "|---|---|---:|---:|---|---|---:|"]
    for m in models:
        a, b = results.get((m, "fx"), {}), results.get((m, "tp"), {})
        if "frozen_non_io" in a:
            kinds = a.get("frozen_kinds") or []
            frozen = str(a["frozen_non_io"]) + (f" ({_short_kind(kinds[0][0])})" if kinds else "")
        else:
            frozen = "-"
        if b.get("status") == "ok":
            tpm = _f(b.get("macs_ratio")) + ("" if b.get("shape_ok") else " (output shape changed)")
        else:
            st = b.get("status", "-")
            tpm = {"error": "crash", "memory": "memory blow-up", "timeout": "timeout", "killed": "killed"}.get(st, st)
            if st == "error":
                tpm += f" ({b.get('error', '').split(':')[0]})"
        onnx = "ok" if a.get("onnx") == "ok" else ("fail" if a.get("onnx") else "-")
        rows.append(f"| {m} | {(a.get('input') or '').split(' (')[0]} | {_f(a.get('macs_ratio'))} | {_f(a.get('params_ratio'))} | "
                    f"{frozen} | {onnx} | {tpm} |")
    return "\n".join(rows)


def write_table(results: dict, path: Path) -> None:
    import platform

    models = []
    for (m, _t) in results:
        if m not in models:
            models.append(m)
    order = {m: i for i, m in enumerate(all_models())}
    models.sort(key=lambda m: order.get(m, 10**6))
    fx = {m: results.get((m, "fx"), {}) for m in models}
    tp = {m: results.get((m, "tp"), {}) for m in models}

    n = len(models)
    fx_ran = [m for m in models if fx[m].get("macs_ratio") is not None]
    shape_ok = [m for m in models if fx[m].get("shape_ok")]
    macs_ok = [m for m in models if (fx[m].get("macs_ratio") or 9) <= 0.4]
    onnx_ok = [m for m in models if fx[m].get("onnx") == "ok"]
    all_ok = [m for m in models if fx[m].get("shape_ok") and fx[m].get("onnx") == "ok"]
    no_frozen = [m for m in fx_ran if fx[m].get("frozen_non_io") == 0]
    no_frozen_macs_ok = [m for m in no_frozen if fx[m]["macs_ratio"] <= 0.4]
    tp_ok = [m for m in models if tp[m].get("status") == "ok" and tp[m].get("shape_ok")]
    tp_shape = [m for m in models if tp[m].get("status") == "ok" and not tp[m].get("shape_ok")]
    tp_crash = [m for m in models if tp[m].get("status") in ("error", "killed", "memory")]
    tp_timeout = [m for m in models if tp[m].get("status") == "timeout"]
    lines = [
        "# Channel-pruning coverage at ratio 0.5: fxpress vs Torch-Pruning",
        "",
        f"Generated by `python benchmarks/prune_coverage.py` on {time.strftime('%Y-%m-%d')} "
        f"({platform.machine()}, {os.cpu_count()} cores, shared; random weights, batch 1). "
        "fxpress: `prune(ratio=0.5, importance='l2', ignore=<classifier>)` (default `factors='inner'`: a dim that "
        "is a product of groups, a grouped conv's groups x channels per group or heads x head dim, loses the ratio "
        "through its inner factor, as Torch-Pruning); ONNX parity atol = rtol = 1e-3. "
        "Torch-Pruning: `MagnitudePruner(MagnitudeImportance(p=2), pruning_ratio=0.5, ignored_layers=[classifier])` "
        "with its own ViT / HF-attention recipes. Times are wall seconds with one torch thread per process, one "
        "or two processes at a time (the largest models alone with two threads), on a machine shared with other jobs.",
        "",
        "## Summary",
        "",
        f"- models: {n}",
        f"- fxpress: pruned {len(fx_ran)}/{n}; original output shape {len(shape_ok)}/{n}; "
        f"ONNX export with onnxruntime parity {len(onnx_ok)}/{n}; all three {len(all_ok)}/{n}",
        f"- fxpress MACs <= 0.4x: {len(macs_ok)}/{n}; among the {len(no_frozen)} models with no frozen group "
        f"beyond model input / output / ignored classifier: {len(no_frozen_macs_ok)}/{len(no_frozen)}",
        f"- Torch-Pruning {next((tp[m].get('tp_version') for m in models if tp[m].get('tp_version')), '')}: "
        f"ok with the original output shape {len(tp_ok)}/{n}; ran but changed the output shape {len(tp_shape)}; "
        f"crashed or killed at the memory cap {len(tp_crash)}; timed out {len(tp_timeout)}",
    ]
    if tp_crash or tp_timeout or tp_shape:
        lines.append("  - Torch-Pruning failures: " + ", ".join(
            f"{m} ({'timeout' if m in tp_timeout else 'output shape' if m in tp_shape else 'memory cap' if tp[m].get('status') == 'memory' else 'crash'})"
            for m in models if m in tp_crash or m in tp_timeout or m in tp_shape))
    fx_fail = [m for m in models if m not in all_ok]
    if fx_fail:
        lines.append("  - fxpress failures (any of prune / shape / ONNX): " + ", ".join(fx_fail))
    above = [m for m in fx_ran if fx[m]["macs_ratio"] > 0.4]
    if above:
        lines.append("  - fxpress MACs above 0.4x: " + ", ".join(f"{m} ({fx[m]['macs_ratio']:.2f})" for m in above))
    lines += [
        "",
        "## Per model",
        "",
        "Columns: capture / groups / prune = seconds for `fxpress.capture`, `fxpress.channel_groups` and "
        "`fxpress.prune`; frozen = groups with parameters that are not prunable, all / beyond model input, "
        "model output and the ignored classifier (dims of buffers only, such as index tables, are not counted); "
        "TP s = `MagnitudePruner(...)` construction (its dependency graph) / construction + `step()`; at batch 1 "
        "fxpress's groups s includes a shape re-propagation (meta tensors) only where a rule failed on a "
        "dynamic size.",
        "",
        "| model | input | nodes | capture s | groups s | prune s | shape | MACs | params | frozen | ONNX | "
        "TP | TP MACs | TP params | TP s build / total |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for m in models:
        a, b = fx[m], tp[m]
        shape = "-" if "shape_ok" not in a else ("same" if a["shape_ok"] else f"**{a.get('out_shape')}**")
        if a.get("status") == "ok" or "macs_ratio" in a:
            onnx = a.get("onnx") or fx_status(a)
            onnx = "ok" if onnx == "ok" else _short(onnx, 70)
        else:
            onnx = fx_status(a)
        frozen = "-" if "frozen" not in a else f"{a['frozen']} / {a['frozen_non_io']}"
        if b.get("status") == "ok":
            tps = "ok" if b.get("shape_ok") else f"output shape {b.get('out_shape')}"
        else:
            tps = _short(b.get("error") or b.get("status") or "-", 60)
        lines.append(
            f"| {m} | {a.get('input') or b.get('input') or '-'} | {a.get('nodes', '-')} | {_f(a.get('capture_s'), '{:.1f}')} | "
            f"{_f(a.get('groups_s'), '{:.2f}')} | {_f(a.get('prune_s'), '{:.1f}')} | {shape} | "
            f"{_f(a.get('macs_ratio'))} | {_f(a.get('params_ratio'))} | {frozen} | {onnx} | {tps} | "
            f"{_f(b.get('macs_ratio'))} | {_f(b.get('params_ratio'))} | {_f(b.get('build_s'), '{:.1f}')} / {_f(b.get('prune_s'), '{:.1f}')} |"
        )
    lines += ["", "## Why groups are frozen (fxpress, beyond model input / output / ignored classifier)", "",
              "Top reasons per model, with how many frozen groups each touches (node names and sizes stripped).", ""]
    for m in models:
        kinds = fx[m].get("frozen_kinds") or []
        if kinds:
            lines.append(f"- **{m}** ({fx[m].get('frozen_non_io')}): " + "; ".join(f"{_short(k, 120)} ×{c}" for k, c in kinds))
        ops = fx[m].get("unsupported_ops") or {}
        if ops:
            lines.append(f"  - ops without a channel rule: " + ", ".join(f"{k} ×{v}" for k, v in ops.items()))
    errs = [(m, t, results[(m, t)]) for m in models for t in ("fx", "tp") if (m, t) in results and results[(m, t)].get("error")]
    if errs:
        lines += ["", "## Errors (first line)", ""]
        for m, t, r in errs:
            lines.append(f"- {m} / {'fxpress' if t == 'fx' else 'Torch-Pruning'}: {_short(r['error'], 300)}")
    onnx_errs = [(m, fx[m]["onnx"]) for m in models if fx[m].get("onnx") not in (None, "ok")]
    for m, e in onnx_errs:
        lines.append(f"- {m} / fxpress ONNX: {_short(e, 300)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
