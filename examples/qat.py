"""Quantization-aware training of the digits CNN, side by side with post-training quantization.

    python examples/qat.py                 # PTQ int8 vs QAT int8 (fake quant + distillation), ONNX fused
    python examples/qat.py --bn train --freeze-bn-after 40 --learnable-scales
    python examples/qat.py --weight-bits 4 --lr 1e-3   # int4 weights / int8 activations (runs in onnxruntime)
    python examples/qat.py --bits 4 --lr 1e-3          # 4-bit weights and activations, where PTQ loses more

QAT starts where PTQ ends (the same calibration batches), trains with fake quantization in the loop
and the float model as teacher, and converts to the same Q/DQ graph PTQ gives: it exports to ONNX
and onnxruntime fuses it into QLinearConv/QGemm the same way.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import fxpress
from fxpress import OpQuant, QuantConfig, TensorSpec
from fxpress.backends import optimized_op_counts
from fxpress.demo import accuracy, train_digits_cnn


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-epochs", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2, help="QAT epochs")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--bn", choices=["fold", "train"], default="fold")
    ap.add_argument("--freeze-bn-after", type=int, default=None)
    ap.add_argument("--learnable-scales", action="store_true", help="LSQ")
    ap.add_argument("--bits", type=int, default=8, help="activation bits, and weight bits unless --weight-bits (activations below 8: fxpress graph only, no ONNX)")
    ap.add_argument("--weight-bits", type=int, default=None, help="weight bits (4: int4 values in int8 containers, which onnxruntime runs)")
    ap.add_argument("--out", default=None, help="directory for the ONNX files (default: a temporary one)")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model, (x_train, y_train, x_test, y_test) = train_digits_cnn(epochs=args.teacher_epochs, progress=False)
    sample = x_test[:1]
    calibration = [x_train[i : i + 32] for i in range(0, 32 * 16, 32)]

    wbits = args.weight_bits or args.bits
    config = "int8_static" if args.bits == wbits == 8 else QuantConfig(
        default=OpQuant("static", TensorSpec(bits=args.bits), TensorSpec(dtype=torch.int8, symmetric=True, axis=0, observer="minmax", bits=wbits))
    )
    tag = f"w{wbits}a{args.bits}" if wbits != args.bits else f"int{args.bits}"
    ptq = fxpress.quantize(model, (sample,), calibration=calibration, config=config, progress=False)
    qat = fxpress.prepare_qat(
        model, (sample,), config, calibration=calibration, bn=args.bn, freeze_bn_after=args.freeze_bn_after,
        learnable_scales=args.learnable_scales, progress=False,
    )
    data = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True)
    fxpress.distill(qat, model, data, epochs=args.epochs, lr=args.lr, progress=False)
    qat_float = accuracy(qat, x_test, y_test)  # fake-quantized, before conversion
    qm = fxpress.convert(qat)

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fxpress-qat-"))
    rows = [("float", accuracy(model, x_test, y_test), "")]
    for name, gm in ((f"PTQ {tag}", ptq), (f"QAT {tag}", qm)):
        rows.append((f"{name} (fxpress graph)", accuracy(gm, x_test, y_test), ""))
        if args.bits != 8:
            continue  # onnxruntime's QLinear kernels take 8-bit activations
        exported = fxpress.export_onnx(gm, (sample,), out / f"{name.split()[0].lower()}_{tag}.onnx", rtol=0.05)
        fused = optimized_op_counts(exported.path)
        kernels = ", ".join(f"{v} {k}" for k, v in sorted(fused.items()) if k.startswith(("QLinear", "QGemm")))
        session = exported.session(intra_op_threads=1)
        rows.append((f"{name} (onnxruntime)", accuracy(session, x_test, y_test), kernels))
    print(f"QAT: {args.epochs} epochs, lr {args.lr:g}, bn={args.bn}, LSQ={args.learnable_scales}; fake-quant graph {qat_float:.2f} %")
    print(f"{'model':28} {'accuracy %':>10}  onnxruntime kernels")
    for name, acc, note in rows:
        print(f"{name:28} {acc:10.2f}  {note}")
    print(fxpress.quant_report(qm))


if __name__ == "__main__":
    main(sys.argv[1:])
