"""Static int8 quantization of resnet18, side by side with the tools users pick today, in one run.

    ./run.sh python benchmarks/quant_resnet18.py [--model resnet18] [--calib 16] [--skip-pt2e]

Both sides get the same 16 calibration batches and are measured on the same held-out inputs
(torchvision model with random weights, batch 1, two threads):

fxpress runs its int8_static preset with ``bias_correction=True`` (the default preset's SQNR is
printed too).

* deployment: fxpress int8 ONNX in onnxruntime vs ``onnxruntime.quantization.quantize_static``
  (QDQ, per-channel int8 weights, uint8 activations, MinMax calibration: its defaults) on the same
  fp32 ONNX export; both next to fp32 onnxruntime.
* torch.compile: ``torch.compile(qm, backend="fxpress")`` vs PT2E (torchao ``X86InductorQuantizer``,
  strict export, ``prepare_pt2e``/``convert_pt2e``, inductor with freezing); both next to fp32 inductor.

SQNR = 10·log10(Σ y² / Σ (y - ŷ)²) of the logits against fp32 eager, over all evaluation inputs.
Latency: median of interleaved rounds. Ratios fxpress / peer: ≤ 1.0 is as fast or faster.
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


def ort_quantize_static(fp32_path: Path, out_path: Path, calib: list[torch.Tensor]) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import onnx

    name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{name: x.numpy()} for x in calib])

        def get_next(self):
            return next(self.it, None)

    pre = out_path.with_name("pre.onnx")
    quant_pre_process(str(fp32_path), str(pre))
    quantize_static(
        str(pre), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
    )
    return out_path


def pt2e_quantize(model, example, calib):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    exported = torch.export.export(model, (example,), strict=True).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():  # its export is static at batch 1: the same calibration images, one at a time
        for batch in calib:
            for x in batch.split(1):
                prepared(x)
    return convert_pt2e(prepared)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--calib", type=int, default=16, help="calibration batches (batch 1 each... see --calib-batch)")
    parser.add_argument("--calib-batch", type=int, default=4)
    parser.add_argument("--eval", type=int, default=16, help="evaluation inputs (batch 1)")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-pt2e", action="store_true")
    parser.add_argument("--skip-ort", action="store_true")
    args = parser.parse_args()

    import torchvision

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(args.calib_batch, 3, 224, 224, generator=gen) for _ in range(args.calib)]
    evals = [torch.randn(1, 3, 224, 224, generator=gen) for _ in range(args.eval)]
    x = evals[0]
    ref = outputs(model, evals)
    rows = []

    start = time.perf_counter()
    plain = fxpress.quantize(model, (x,), calibration=calib, config="int8_static", progress=False)
    fx_quant_s = time.perf_counter() - start
    start = time.perf_counter()
    qm = fxpress.quantize(model, (x,), calibration=calib, config="int8_static", progress=False, bias_correction=True)
    fx_bc_s = time.perf_counter() - start
    print(fxpress.quant_report(qm))
    print(f"fxpress quantize (prepare + calibrate + convert): {fx_quant_s:.1f} s; with bias correction {fx_bc_s:.1f} s")
    print(f"fxpress graph SQNR: int8_static {sqnr(ref, outputs(plain, evals)):.1f} dB, with bias correction {sqnr(ref, outputs(qm, evals)):.1f} dB")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_ort:
            fp32_path = fxpress.export_onnx(fxpress.capture(model, (x,)), (x,), tmp / "fp32.onnx").path
            ours_path = fxpress.export_onnx(qm, (x,), tmp / "ours.onnx", rtol=0.05).path
            start = time.perf_counter()
            theirs_path = ort_quantize_static(fp32_path, tmp / "ort.onnx", calib)
            ort_quant_s = time.perf_counter() - start
            print(f"onnxruntime quantize_static: {ort_quant_s:.1f} s")
            sessions = {name: OnnxRuntimeModule(p, intra_op_threads=2) for name, p in [("fp32", fp32_path), ("fxpress", ours_path), ("ort", theirs_path)]}
            for name, p in [("fxpress", ours_path), ("ort", theirs_path)]:
                fused = optimized_op_counts(p)
                print(f"{name} int8 ONNX after onnxruntime optimization: " + ", ".join(f"{k} {v}" for k, v in sorted(fused.items()) if k.startswith(("QLinear", "QGemm", "MatMulInteger", "Conv", "Gemm", "MatMul"))))
            lat = interleaved(sessions, x, args.repeat, args.rounds)
            s_ours, s_ort = sqnr(ref, outputs(sessions["fxpress"], evals)), sqnr(ref, outputs(sessions["ort"], evals))
            rows += [
                ("onnxruntime fp32", lat["fp32"], None),
                ("onnxruntime int8, ORT quantize_static", lat["ort"], s_ort),
                ("onnxruntime int8, fxpress", lat["fxpress"], s_ours),
            ]
            ratio_ort = (lat["fxpress"] / lat["ort"], s_ours - s_ort)

        if not args.skip_pt2e:
            with torch.no_grad():
                torch._dynamo.reset()
                fp32_c = torch.compile(model)
                ours_c = torch.compile(qm, backend="fxpress")
                pt2e = pt2e_quantize(model, x, calib)
                with torch._inductor.config.patch(freezing=True):
                    pt2e_c = torch.compile(pt2e)
                    for fn in (fp32_c, ours_c, pt2e_c):
                        fn(x)
                lat = interleaved({"fp32": fp32_c, "fxpress": ours_c, "pt2e": pt2e_c}, x, args.repeat, args.rounds)
                s_ours, s_pt2e = sqnr(ref, outputs(ours_c, evals)), sqnr(ref, outputs(pt2e_c, evals))
            rows += [
                ("inductor fp32", lat["fp32"], None),
                ("inductor int8, PT2E X86InductorQuantizer", lat["pt2e"], s_pt2e),
                ("inductor int8, torch.compile(backend='fxpress')", lat["fxpress"], s_ours),
            ]
            ratio_pt2e = (lat["fxpress"] / lat["pt2e"], s_ours - s_pt2e)

    print(f"\n{args.model}, batch 1, {torch.get_num_threads()} threads, {args.calib} calibration batches of {args.calib_batch}, {args.eval} eval inputs")
    print(f"{'runtime / quantizer':50} {'latency ms':>10} {'SQNR dB':>8}")
    for name, ms, db in rows:
        print(f"{name:50} {ms:10.2f} {'' if db is None else f'{db:8.1f}':>8}")
    if not args.skip_ort:
        print(f"fxpress / ORT quantize_static: latency ratio {ratio_ort[0]:.3f}, SQNR {ratio_ort[1]:+.1f} dB")
    if not args.skip_pt2e:
        print(f"fxpress / PT2E: latency ratio {ratio_pt2e[0]:.3f}, SQNR {ratio_pt2e[1]:+.1f} dB")


if __name__ == "__main__":
    main()
