"""Prune the digits CNN by half, then win the accuracy back by distillation, on one process or many.

    python examples/distill_ddp.py                               # one process
    torchrun --nproc-per-node 2 examples/distill_ddp.py          # two processes (gloo on CPU, NCCL on GPUs)
    python examples/distill_ddp.py --epochs 5 --hints auto --out run/

Every rank holds the same teacher and pruned student; each trains on its own shard of every batch
(DistributedSampler), DDP averages the gradients, and only rank 0 prints, writes the checkpoint and
exports ONNX. Fine-tuning (the baseline) and distillation run through the same loop, data, optimizer
and epochs: fine-tuning is ``distill(..., alpha=0.0, reconstruct=False)`` (the hard-label loss
alone, no teacher); distillation first re-fits the pruned layers to the teacher (``reconstruct``, the
normal equations summed over ranks); a third run distills from the images alone, without labels.

``--check DIR``: the small deterministic workload the tests run under two processes and compare with
one process on the same data: PTQ calibration + convert, reconstruction of a pruned student, then
QAT + distillation + convert; rank 0
saves what it got to DIR/result.pt.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import fxpress
from fxpress.demo import DigitsCNN, accuracy, load_digits_tensors, train_digits_cnn
from fxpress.train import distributed as dist_utils


def _threads(n: int | None = None) -> None:
    # one process per core: oversubscribed threads make every rank slower
    torch.set_num_threads(n or max(1, (os.cpu_count() or 1) // dist_utils.world_size()))


def _loader(x, y, batch: int, seed: int) -> DataLoader:
    ds = TensorDataset(x, y)
    world = dist_utils.world_size()
    sampler = DistributedSampler(ds, num_replicas=world, rank=dist_utils.rank(), shuffle=True, seed=seed, drop_last=True)
    return DataLoader(ds, batch_size=batch // world, sampler=sampler, drop_last=True)


class _EpochSeeded:
    """A DataLoader whose DistributedSampler reshuffles every epoch (set_epoch), as DDP loops do;
    ``labels=False`` yields the images alone (distillation needs no labels)."""

    def __init__(self, loader: DataLoader, labels: bool = True):
        self.loader, self.epoch, self.labels = loader, 0, labels

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.loader.sampler.set_epoch(self.epoch)
        self.epoch += 1
        return (batch if self.labels else batch[0] for batch in self.loader)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5, help="fine-tuning / distillation epochs")
    ap.add_argument("--teacher-epochs", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--hints", choices=["none", "auto"], default="none")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, default=1, help="repeat fine-tune/distill with this many seeds and average")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / processes)")
    ap.add_argument("--out", default="fxpress-distill", help="checkpoint and ONNX go here (rank 0)")
    ap.add_argument("--check", metavar="DIR", help="run the small equivalence workload and save DIR/result.pt")
    args = ap.parse_args(argv)
    dist_utils.init_from_env()
    _threads(args.threads)
    if args.check:
        result = equivalence_run()
        if dist_utils.is_main_process():
            Path(args.check).mkdir(parents=True, exist_ok=True)
            torch.save(result, Path(args.check) / "result.pt")
        return

    main_rank = dist_utils.is_main_process()
    torch.manual_seed(0)
    teacher, (x_train, y_train, x_test, y_test) = train_digits_cnn(epochs=args.teacher_epochs, progress=False)
    # every rank must hold the same teacher: take rank 0's weights
    teacher.load_state_dict(dist_utils.broadcast_object(teacher.state_dict()))
    sample = x_train[:8]
    rows = [("teacher", accuracy(teacher, x_test, y_test))]
    rows.append(("pruned, no training", accuracy(fxpress.prune(teacher, (sample,), ratio=args.ratio), x_test, y_test)))
    hints = None if args.hints == "none" else "auto"
    runs = (("fine-tuned", 0.0, True), ("distilled", 0.7, True), ("distilled, no labels", 1.0, False))
    results: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    out = Path(args.out)
    for seed in range(args.seeds):
        for name, alpha, labels in runs:
            torch.manual_seed(seed)
            student = fxpress.prune(teacher, (sample,), ratio=args.ratio)
            data = _EpochSeeded(_loader(x_train, y_train, 64, seed), labels=labels)
            ckpt = out / f"{name.replace(', ', '-').replace(' ', '-')}-seed{seed}.pt"
            if ckpt.exists() and main_rank:
                ckpt.unlink()  # this demo starts fresh; pass an existing checkpoint to resume instead
            dist_utils.barrier()
            fxpress.distill(
                student, teacher, data, epochs=args.epochs, alpha=alpha, temperature=4.0, lr=args.lr,
                hints=hints if alpha > 0 else None, reconstruct=alpha > 0, checkpoint=ckpt, progress=main_rank,
            )
            results[name].append(accuracy(student, x_test, y_test))
            if alpha == 0.7 and seed == 0:
                report = fxpress.distill_report(student)
                last = student
    for name, accs in results.items():
        rows.append((f"{name} ({args.epochs} epochs)", sum(accs) / len(accs)))
    if main_rank:
        exported = fxpress.export_onnx(last, (sample,), out / "distilled.onnx")
        print(report)
        print(f"\ndigits CNN, prune {args.ratio}, {dist_utils.world_size()} process(es), {args.seeds} seed(s)")
        print(f"{'model':32} accuracy %")
        for name, acc in rows:
            print(f"{name:32} {acc:.2f}")
        if args.seeds > 1:
            for name, accs in results.items():
                print(f"  {name} per seed: {', '.join(f'{a:.2f}' for a in accs)}")
        print(f"ONNX: {exported.path} (max |diff| {max(exported.max_abs_diff):.1e})")


# ---------------------------------------------------------------------------------------------
# the equivalence workload: N processes on shards of each batch == 1 process on the whole batches


def _check_data():
    x_train, y_train, _, _ = load_digits_tensors(seed=1)
    batches = [(x_train[i : i + 32], y_train[i : i + 32]) for i in range(0, 32 * 6, 32)]
    test = x_train[256:384]
    return batches, test


def _shard(batch, rank: int, world: int):
    x, y = batch
    n = x.shape[0] // world
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def equivalence_run() -> dict:
    """PTQ (histogram ranges) and QAT + distillation (min/max ranges) on this rank's shard of each batch."""
    from fxpress import QuantConfig, TensorSpec

    rank, world = dist_utils.rank(), dist_utils.world_size()
    batches, test = _check_data()
    mine = [_shard(b, rank, world) for b in batches]
    torch.manual_seed(0)
    teacher = DigitsCNN(width=8).eval()
    sample = test[:2]
    # post-training quantization: each rank calibrates on its shard; convert reduces the observers
    prepared = fxpress.prepare(teacher, (sample,), "int8_static", verify=False)
    fxpress.calibrate(prepared, [x for x, _ in mine[:4]], progress=False)
    ptq = fxpress.convert(prepared, verify=False)
    # reconstruction of a pruned student: the ranks' normal equations are summed, so all solve the full system
    pruned = fxpress.prune(teacher, (sample,), ratio=0.5)
    fxpress.reconstruct(pruned, teacher, [x for x, _ in mine[:4]], progress=False)
    # QAT: min/max activation ranges (reduced exactly by MIN/MAX), distilled with DDP
    minmax = QuantConfig.preset("int8_static").with_default(activation=TensorSpec(observer="minmax"))
    qat = fxpress.prepare_qat(teacher, (sample,), minmax, calibration=[x for x, _ in mine[:4]], progress=False, verify=False)
    sgd = lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9)  # noqa: E731  (Adam would amplify float-order noise in near-zero gradients)
    fxpress.distill(qat, teacher, mine, epochs=2, optimizer=sgd, schedule=None, progress=False)
    trained = {k: v.detach().clone() for k, v in qat.state_dict().items() if not k.startswith("observers.")}
    qat_out = qat(test).detach()
    qm = fxpress.convert(qat, verify=False)
    with torch.no_grad():
        return {
            "world": world,
            "ptq_qparams": _qparams(ptq),
            "ptq_out": ptq(test),
            "reconstructed": {k: v.detach().clone() for k, v in pruned.state_dict().items()},
            "qat_weights": trained,
            "qat_out": qat_out,
            "qat_qparams": _qparams(qm),
            "qat_int8_out": qm(test),
        }


def _qparams(gm) -> list[tuple[str, float, int]]:
    """(node, scale, zero point) of every per-tensor quantize node, in graph order."""
    qd = torch.ops.quantized_decomposed
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target == qd.quantize_per_tensor.default:
            out.append((n.name, float(n.args[1]), int(n.args[2])))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
