"""Recovery training on the digits CNN: distillation vs plain fine-tuning after compression, QAT vs PTQ.

    python benchmarks/recovery_digits.py [--splits 30] [--first-split 100] [--epochs 5]

The digits test set is 359 images (one image = 0.28 points), and two recovery methods differ by a few
tenths of a point, so a handful of splits cannot tell them apart. Every figure here is a mean over
``--splits`` train/test splits of ``sklearn.datasets.load_digits`` (split ``s``:
``load_digits_tensors(seed=s)``, a teacher trained on it from seed ``s``), with the paired difference
between methods and its 95 % confidence interval. The default splits (100-129) were not used while
choosing the settings below (those runs used splits 0-7), so the figures are not tuned to them.

Two students: the teacher pruned at 0.7 (``fxpress.prune(teacher, ratio=0.7)``: 0.3 of the channels
stay) and decomposed to 0.3 of its parameters (``fxpress.decompose(budget={"params": 0.3})``). Each
then trains ``--epochs`` epochs with the same optimizer (Adam, cosine decay to 0, batch 64) and data
order, at each learning rate of its grid (``--lr-pruned``, ``--lr-decomposed``):

* fine-tune:          labels only, the teacher unused (``distill(alpha=0, reconstruct=False)``)
* distill, KD only:   Hinton KD (T 4, alpha 0.7), nothing else (``reconstruct=False``)
* distill:            the call the documentation shows: layers re-fitted to the teacher first
                      (``reconstruct``, the default), then KD (T 4, alpha 0.7) with feature hints
                      (``hints="auto"``: for a pruned student, the teacher's features on the kept channels)
* fine-tune after reconstruct:  the ablation (reconstruction, then labels only)

QAT: int4 weights (per channel, symmetric, min/max) / int8 activations (static, histogram) of the
unpruned teacher: PTQ vs ``prepare_qat`` + ``distill`` (2 epochs, lr 1e-3), converted to the integer graph.

Writes ``benchmarks/results/recovery_digits.md`` and ``recovery_digits.png`` (accuracy per epoch).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import fxpress
from fxpress import OpQuant, QuantConfig, TensorSpec
from fxpress.demo import DigitsCNN, accuracy, fit, load_digits_tensors

RESULTS = Path(__file__).resolve().parent / "results"

VARIANTS = {  # name: distill options
    "fine-tune": dict(alpha=0.0, reconstruct=False),
    "distill, KD only": dict(alpha=0.7, temperature=4.0, reconstruct=False),
    "distill (reconstruct + KD + hints)": dict(alpha=0.7, temperature=4.0, reconstruct=True, hints="auto"),
    "fine-tune after reconstruct": dict(alpha=0.0, reconstruct=True),
}
W4A8 = QuantConfig(default=OpQuant("static", TensorSpec(), TensorSpec(dtype=torch.int8, symmetric=True, axis=0, observer="minmax", bits=4)))


def teacher_for(split: int):
    data = load_digits_tensors(seed=split)
    torch.manual_seed(split)
    model = fit(DigitsCNN(), data[0], data[1], epochs=8, lr=3e-3, progress=False)
    return model, data


COMPRESSIONS = {
    "pruned at 0.7": lambda teacher, x: fxpress.prune(teacher, (x,), ratio=0.7),
    "decomposed to 0.3 params": lambda teacher, x: fxpress.decompose(teacher, (x,), budget={"params": 0.3}, progress=False),
}


def recover(teacher, data, compress, epochs: int, lr: float, options: dict, seed: int) -> list[float]:
    """Accuracy after compression (index 0; after the reconstruction where it runs) and after every epoch."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    student = COMPRESSIONS[compress](teacher, x_train[:8])
    curve = [accuracy(student, x_test, y_test)]
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    if options.get("reconstruct"):
        # the accuracy the reconstruction alone reaches, before the first epoch
        fxpress.reconstruct(student, teacher, loader, max_batches=8, progress=False)
        curve[0] = accuracy(student, x_test, y_test)
        options = {**options, "reconstruct": False}
    fxpress.distill(student, teacher, loader, epochs=epochs, lr=lr, progress=False,
                    eval_fn=lambda m: curve.append(accuracy(m, x_test, y_test)), **options)
    return curve


def qat_vs_ptq(teacher, data, seed: int) -> tuple[float, float]:
    x_train, y_train, x_test, y_test = data
    calibration = [x_train[i : i + 32] for i in range(0, 512, 32)]
    ptq = fxpress.quantize(teacher, (x_test[:1],), calibration=calibration, config=W4A8, progress=False)
    torch.manual_seed(seed)
    qat = fxpress.prepare_qat(teacher, (x_test[:1],), W4A8, calibration=calibration, progress=False)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    fxpress.distill(qat, teacher, loader, epochs=2, lr=1e-3, progress=False)
    return accuracy(ptq, x_test, y_test), accuracy(fxpress.convert(qat), x_test, y_test)


def mean(xs):
    return sum(xs) / len(xs)


def paired(a: list[float], b: list[float]) -> str:
    """Mean of a - b over the splits with its 95 % confidence interval (t distribution)."""
    d = [x - y for x, y in zip(a, b)]
    if len(d) < 2:
        return f"{mean(d):+.2f}"
    from scipy.stats import t

    half = t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / len(d) ** 0.5
    return f"{mean(d):+.2f} [{mean(d) - half:+.2f}, {mean(d) + half:+.2f}]"


DISTILL, FINE_TUNE = "distill (reconstruct + KD + hints)", "fine-tune"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", type=int, default=30)
    ap.add_argument("--first-split", type=int, default=100, help="splits first-split .. first-split + splits - 1")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr-pruned", type=float, nargs="+", default=[3e-3, 1e-2])
    ap.add_argument("--lr-decomposed", type=float, nargs="+", default=[1e-3, 3e-3])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    lrs = dict(zip(COMPRESSIONS, (args.lr_pruned, args.lr_decomposed)))
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    teachers, curves, quant = [], {}, []
    splits = range(args.first_split, args.first_split + args.splits)
    for split in splits:
        teacher, data = teacher_for(split)
        teachers.append(accuracy(teacher, data[2], data[3]))
        for compress in COMPRESSIONS:
            for lr in lrs[compress]:
                for name, options in VARIANTS.items():
                    curves.setdefault((compress, lr, name), []).append(recover(teacher, data, compress, args.epochs, lr, options, split))
        quant.append(qat_vs_ptq(teacher, data, split))
        print(f"split {split}: teacher {teachers[-1]:.2f}, " + ", ".join(
            f"{c} {name} @ {lr:g} {curves[(c, lr, name)][-1][-1]:.2f}" for c in COMPRESSIONS for lr in lrs[c] for name in VARIANTS), flush=True)

    final = {key: [c[-1] for c in cs] for key, cs in curves.items()}
    teacher_mean = mean(teachers)
    lines = [
        f"# Recovery training on the digits CNN ({args.splits} splits x 359 test images, {time.perf_counter() - t0:.0f} s)",
        "",
        f"`python benchmarks/recovery_digits.py --splits {args.splits} --first-split {args.first_split} --epochs {args.epochs} "
        f"--lr-pruned {' '.join(f'{lr:g}' for lr in args.lr_pruned)} --lr-decomposed {' '.join(f'{lr:g}' for lr in args.lr_decomposed)}`",
        "",
        f"Teacher: {teacher_mean:.2f} % (splits {splits.start}-{splits.stop - 1}; per split {min(teachers):.2f}-{max(teachers):.2f}). "
        f"{args.epochs} epochs, Adam, cosine, batch 64; the same data order for every method of a split. "
        "Differences are paired over the splits, with 95 % confidence intervals.",
    ]
    for compress in COMPRESSIONS:
        lines += [
            "", f"## {compress}", "",
            "| lr | method | before training | after 1 epoch | final | below teacher | − fine-tune at this lr |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for lr in lrs[compress]:
            for name in VARIANTS:
                cs, f = curves[(compress, lr, name)], final[(compress, lr, name)]
                vs = paired(f, final[(compress, lr, FINE_TUNE)]) if name != FINE_TUNE else ""
                lines.append(f"| {lr:g} | {name} | {mean([c[0] for c in cs]):.2f} | {mean([c[1] for c in cs]):.2f} | {mean(f):.2f} | "
                             f"{teacher_mean - mean(f):.2f} | {vs} |")
        best = {name: max(lrs[compress], key=lambda lr: mean(final[(compress, lr, name)])) for name in (DISTILL, FINE_TUNE)}
        d_best, f_best = final[(compress, best[DISTILL], DISTILL)], final[(compress, best[FINE_TUNE], FINE_TUNE)]
        lines += [
            "",
            f"Each at its best learning rate: distill (lr {best[DISTILL]:g}) {mean(d_best):.2f}, {teacher_mean - mean(d_best):.2f} below the "
            f"teacher; fine-tune (lr {best[FINE_TUNE]:g}) {mean(f_best):.2f}; distill − fine-tune {paired(d_best, f_best)} points.",
        ]
    ptq, qat = [q[0] for q in quant], [q[1] for q in quant]
    lines += [
        "", "## int4 weights / int8 activations (w4a8), unpruned", "",
        "| | accuracy | below teacher | − PTQ |", "|---|---:|---:|---:|",
        f"| PTQ | {mean(ptq):.2f} | {teacher_mean - mean(ptq):.2f} | |",
        f"| QAT + KD (2 epochs) | {mean(qat):.2f} | {teacher_mean - mean(qat):.2f} | {paired(qat, ptq)} |",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recovery_digits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(curves, lrs, args.splits, teacher_mean, args.out / "recovery_digits.png")


def plot(curves: dict, lrs: dict, splits: int, teacher_mean: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(v) for v in lrs.values())
    fig, axes = plt.subplots(len(COMPRESSIONS), cols, figsize=(4.6 * cols, 3.6 * len(COMPRESSIONS)), sharey=True, squeeze=False)
    for row, compress in enumerate(COMPRESSIONS):
        for col, lr in enumerate(lrs[compress]):
            ax = axes[row][col]
            for name in VARIANTS:
                cs = curves[(compress, lr, name)]
                ys = [mean([c[i] for c in cs]) for i in range(len(cs[0]))]
                ax.plot(range(len(ys)), ys, marker="o", label=name)
            ax.axhline(teacher_mean, color="gray", linestyle="--", label="teacher")
            ax.axhline(teacher_mean - 1, color="gray", linestyle=":", label="teacher − 1 point")
            ax.set_title(f"{compress}, lr {lr:g}", fontsize=10)
            ax.set_xlabel("epoch (0: before training)")
            ax.set_ylim(90, 100)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel(f"test accuracy %, mean of {splits} splits", fontsize=9)
    axes[0][-1].legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
