"""Dynamic int8 and weight-only quantization of a BERT encoder in onnxruntime, next to onnxruntime's own tools.

    ./run.sh python benchmarks/quant_bert_dynamic.py [--hidden 512 --layers 6 --heads 8 --intermediate 2048 --seq 128]

A ``transformers.BertModel`` built from a ``BertConfig`` with random weights (nothing downloaded), eval
mode, batch 1, returning the last hidden state; every row runs in onnxruntime (CPU, two intra-op
threads, graph optimizations "all"):

* fp32: ``fxpress.export_onnx`` of the captured float model (also the input of onnxruntime's tools);
* int8 dynamic: ``fxpress.quantize(config="int8_dynamic")`` → ``export_onnx`` (DynamicQuantizeLinear →
  MatMulInteger, fused by onnxruntime into DynamicQuantizeMatMul / MatMulIntegerToFloat) vs
  ``onnxruntime.quantization.quantize_dynamic`` on the fp32 ONNX (int8 weights, per channel, as fxpress);
* int8 / int4 weight-only: ``config="int8_weight_only"`` (default lowering: DequantizeLinear → MatMul,
  which onnxruntime itself turns into MatMulNBits with its session default accuracy level) and
  ``OnnxQuantOptions(weight_only_int8="matmul_nbits")``; ``config="int4_weight_only"`` → MatMulNBits
  (bits 4, blocks of 32), at accuracy_level 0 (float compute, the fxpress graph's numerics) and 4 (int8
  compute inside the kernel); next to onnxruntime's ``MatMulNBitsQuantizer`` (4 bits, block 32, symmetric).

SQNR = 10·log10(Σ y² / Σ (y - ŷ)²) of the last hidden state against fp32 torch eager, over all
evaluation inputs. Parity: onnxruntime against the fxpress torch graph on the same inputs (dynamic
qparams are per batch, so each input is compared with the graph run on that input), as
max|ort - graph| / max|graph| ("rel") and as an SQNR ("dB"). File sizes include the float word
embeddings (fxpress quantizes linears; ``quantize_dynamic`` also quantizes the embedding Gather). Latency: median
of interleaved rounds, each round the median of ``--repeat`` calls. The target of the dynamic path:
fxpress int8 dynamic at least 2x faster than fp32 (speedup column = fp32 latency / row latency).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import fxpress
from _measure import interleaved, outputs, sqnr
from fxpress.backends import OnnxRuntimeModule, optimized_op_counts


class BertLastHidden(torch.nn.Module):
    def __init__(self, bert: torch.nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids):
        return self.bert(input_ids=input_ids).last_hidden_state


def build_bert(hidden: int, layers: int, heads: int, intermediate: int, seq: int) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=max(512, seq), hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertLastHidden(BertModel(config, add_pooling_layer=False)).eval()





def ort_quantize_dynamic(fp32_path: Path, out_path: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32_path), str(out_path), weight_type=QuantType.QInt8, per_channel=True)
    return out_path


def ort_matmul_nbits(fp32_path: Path, out_path: Path, block_size: int = 32) -> Path:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quant = MatMulNBitsQuantizer(onnx.load(str(fp32_path)), bits=4, block_size=block_size, is_symmetric=True)
    quant.process()
    quant.model.save_model_to_file(str(out_path))
    return out_path


KERNELS = ("MatMul", "Gemm", "DynamicQuantize", "MatMulInteger", "MatMulIntegerToFloat", "MatMulNBits", "DequantizeLinear", "FusedMatMul")


def kernel_counts(path: Path) -> str:
    counts = optimized_op_counts(path, optimization_level="all")
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k.startswith(KERNELS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--eval", type=int, default=8, help="evaluation inputs (batch 1)")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-weight-only", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_bert(args.hidden, args.layers, args.heads, args.intermediate, args.seq)
    gen = torch.Generator().manual_seed(1)
    evals = [torch.randint(0, 30522, (1, args.seq), generator=gen) for _ in range(args.eval)]
    x = evals[0]
    ref = outputs(model, evals)

    configs = [("int8 dynamic", "int8_dynamic", None)]
    if not args.skip_weight_only:
        configs += [
            ("int8 weight-only (DQ → MatMul)", "int8_weight_only", None),
            ("int8 weight-only MatMulNBits, acc 0", "int8_weight_only", {"weight_only_int8": "matmul_nbits"}),
            ("int8 weight-only MatMulNBits, acc 4", "int8_weight_only", {"weight_only_int8": "matmul_nbits", "accuracy_level": 4}),
            ("int4 weight-only MatMulNBits, acc 0", "int4_weight_only", None),
            ("int4 weight-only MatMulNBits, acc 4", "int4_weight_only", {"accuracy_level": 4}),
        ]

    rows: list[tuple[str, str, Path, torch.nn.Module | None]] = []  # (label, tool, onnx file, fxpress torch graph)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        fp32_path = fxpress.export_onnx(fxpress.capture(model, (x,)), (x,), tmp / "fp32.onnx").path
        print(f"fp32 export: {time.perf_counter() - start:.1f} s")
        rows.append(("fp32", "fxpress export", fp32_path, None))
        graphs: dict[str, torch.nn.Module] = {}
        for i, (label, preset, options) in enumerate(configs):
            start = time.perf_counter()
            if preset not in graphs:
                graphs[preset] = fxpress.quantize(model, (x,), config=preset, progress=False)
                if preset == "int8_dynamic":
                    print(fxpress.quant_report(graphs[preset]))
            path = fxpress.export_onnx(graphs[preset], (x,), tmp / f"fx{i}.onnx", atol=1e-3, rtol=0.05, quant_options=options).path
            print(f"fxpress {label}: quantize + export {time.perf_counter() - start:.1f} s")
            rows.append((label, "fxpress", path, graphs[preset]))
            if preset == "int8_dynamic":
                start = time.perf_counter()
                rows.append(("int8 dynamic", "ORT quantize_dynamic", ort_quantize_dynamic(fp32_path, tmp / "ort_dyn.onnx"), None))
                print(f"onnxruntime quantize_dynamic: {time.perf_counter() - start:.1f} s")
        if not args.skip_weight_only:
            rows.append(("int4 weight-only MatMulNBits, acc 0", "ORT MatMulNBitsQuantizer", ort_matmul_nbits(fp32_path, tmp / "ort_nbits.onnx"), None))

        print("\nkernels onnxruntime runs (optimization level 'all'):")
        for label, tool, path, _ in rows:
            print(f"  {tool:26} {label:38} {kernel_counts(path)}")
        sessions = {(label, tool): OnnxRuntimeModule(path, intra_op_threads=args.threads) for label, tool, path, _ in rows}
        lat = interleaved(sessions, x, args.repeat, args.rounds, warmup=True)
        sizes = {(label, tool): path.stat().st_size / 2**20 for label, tool, path, _ in rows}
        results = []
        for label, tool, _, graph in rows:
            sess = sessions[(label, tool)]
            ort_out = outputs(sess, evals)
            parity = None
            if graph is not None:
                torch_out = outputs(graph, evals)
                parity = ((ort_out - torch_out).abs().max().item() / torch_out.abs().max().item(), sqnr(torch_out, ort_out))
            results.append((label, tool, lat[(label, tool)], sqnr(ref, ort_out), parity, sizes[(label, tool)]))

    fp32_ms = results[0][2]
    print(
        f"\nBERT encoder hidden {args.hidden}, {args.layers} layers, {args.heads} heads, intermediate {args.intermediate}, "
        f"sequence {args.seq}, batch 1, onnxruntime CPU {args.threads} threads, {args.eval} eval inputs"
    )
    print(f"{'model':38} {'tool':26} {'ms':>8} {'speedup':>8} {'SQNR dB':>8} {'parity rel':>10} {'parity dB':>9} {'MiB':>6}")
    for label, tool, ms, db, parity, mib in results:
        db_s = "inf" if db > 200 else f"{db:.1f}"
        rel, par_db = ("", "") if parity is None else (f"{parity[0]:.1e}", f"{parity[1]:.1f}")
        print(f"{label:38} {tool:26} {ms:8.2f} {fp32_ms / ms:7.2f}x {db_s:>8} {rel:>10} {par_db:>9} {mib:6.1f}")
    ours = next(r for r in results if r[0] == "int8 dynamic" and r[1] == "fxpress")
    theirs = next(r for r in results if r[0] == "int8 dynamic" and r[1] != "fxpress")
    verdict = "meets" if fp32_ms / ours[2] >= 2 else "misses"
    print(
        f"fxpress int8 dynamic: {fp32_ms / ours[2]:.2f}x fp32 ({verdict} the 2x target); "
        f"vs ORT quantize_dynamic: latency ratio {ours[2] / theirs[2]:.3f}, SQNR {ours[3] - theirs[3]:+.1f} dB"
    )


if __name__ == "__main__":
    main()
