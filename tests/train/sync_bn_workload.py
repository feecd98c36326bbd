"""Synchronized batch norm in N processes, the workload ``test_distributed.py`` runs under torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/train/sync_bn_workload.py DIR

Rank 0 saves DIR/result.pt. ``function_run`` calls ``sync_batch_norm`` (and an eager ``nn.BatchNorm2d``
under ``SyncBatchNorms``) on unequal shards of one batch, an empty shard included; ``distill_run``
distills a pruned DigitsCNN (batch norms kept, training) and a ``prepare_qat(bn="train")`` graph with
SGD, each rank on its half of every batch. The test runs ``distill_run`` in one process on the whole
batches and compares.

The QAT graph trains with its fake quantization switched off (``fake_quant_enabled = False``; its
``QATBatchNorm`` modules are what is checked): rounding onto the int8 grid turns float-rounding
differences into whole quantization steps wherever a value sits near a rounding boundary. Even one
process, fed the same batches with their rows permuted, drifts by 1e-4 after 3 steps with fake
quantization on (6e-8 with it off), so a float tolerance cannot hold there, synchronized or not.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import fxpress
from fxpress.demo import DigitsCNN, load_digits_tensors
from fxpress.train import distributed as dist_utils

FUNCTION_SPLITS = ((0, 5, 16), (0, 16, 16))  # rank r takes rows [bounds[r], bounds[r + 1]): 5 + 11, then 16 + none


def function_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 4, 4, generator=g) * 3 + 1
    dy = torch.randn(16, 3, 4, 4, generator=g)
    w, b = torch.randn(3, generator=g), torch.randn(3, generator=g)
    rm, rv = torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.5
    return x, dy, w, b, rm, rv


def function_run() -> list[dict]:
    """Per split: output, input gradient (rows in order), summed weight/bias gradients, running stats."""
    import torch.distributed as dist

    rank, world = dist_utils.rank(), dist_utils.world_size()
    x, dy, w0, b0, rm0, rv0 = function_data()
    results = []
    for bounds in FUNCTION_SPLITS:
        lo, hi = bounds[rank], bounds[rank + 1]
        out = {}
        for kind in ("function", "eager"):
            xr = x[lo:hi].clone().requires_grad_(True)
            if kind == "function":
                w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
                rm, rv = rm0.clone(), rv0.clone()
                y = dist_utils.sync_batch_norm(xr, w, b, rm, rv, 0.1, 1e-5)
            else:
                bn = torch.nn.BatchNorm2d(3, momentum=0.1).train()
                with torch.no_grad():
                    bn.weight.copy_(w0), bn.bias.copy_(b0), bn.running_mean.copy_(rm0), bn.running_var.copy_(rv0)
                w, b, rm, rv = bn.weight, bn.bias, bn.running_mean, bn.running_var
                with dist_utils.SyncBatchNorms():
                    y = bn(xr)
            (y * dy[lo:hi]).sum().backward()  # a sum over rows: the ranks' losses add up to the whole batch's
            gw, gb = w.grad.clone(), b.grad.clone()
            dist.all_reduce(gw), dist.all_reduce(gb)
            rows = [None] * world
            dist.all_gather_object(rows, (y.detach(), xr.grad))
            out[kind] = {
                "y": torch.cat([r[0] for r in rows]), "gx": torch.cat([r[1] for r in rows]), "gw": gw, "gb": gb,
                "rm": rm.clone(), "rv": rv.clone(), "stats_equal": dist_utils.all_equal((rm.tolist(), rv.tolist())),
            }
        results.append(out)
    return results


def _batches():
    x, y, _, _ = load_digits_tensors(seed=1)
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, 32 * 3, 32)], x[256:320]


def distill_run(sync_bn: bool = True, qat: bool = True) -> dict:
    """This rank's half of every batch (the whole batches in one process), 2 epochs of SGD each."""
    from fxpress import QuantConfig, TensorSpec
    from fxpress.passes.quant.fake_quant import fake_quant_modules

    rank, world = dist_utils.rank(), dist_utils.world_size()
    batches, test = _batches()
    n = 32 // world
    mine = [(x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]) for x, y in batches]
    torch.manual_seed(0)
    teacher = DigitsCNN(width=8).eval()
    sample = test[:2]
    sgd = lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9)  # noqa: E731
    opts = dict(epochs=2, optimizer=sgd, schedule=None, progress=False, reconstruct=False, sync_bn=sync_bn)
    result: dict = {"world": world}

    student = fxpress.prune(teacher, (sample,), ratio=0.5, verify=False)  # keeps the batch norms: they train
    code, hooks = student.code, list(student._forward_pre_hooks.values())
    fxpress.distill(student, teacher, mine, **opts)
    result["pruned"] = {k: v.detach().clone() for k, v in student.state_dict().items()}
    with torch.no_grad():
        result["pruned_out"] = student(test)
    # the student came back as it went in: the same graph, no wrapped forward, no hooks
    result["pruned_untouched"] = student.code == code and "forward" not in vars(student) and list(student._forward_pre_hooks.values()) == hooks
    if not qat:
        return result

    minmax = QuantConfig.preset("int8_static").with_default(activation=TensorSpec(observer="minmax"))
    qat = fxpress.prepare_qat(teacher, (sample,), minmax, bn="train", calibration=[x for x, _ in mine[:2]], progress=False, verify=False)
    for fq in fake_quant_modules(qat).values():
        fq.fake_quant_enabled = False  # see the module docstring: the batch norms are under test
    fxpress.distill(qat, teacher, mine, **opts)
    result["qat"] = {k: v.detach().clone() for k, v in qat.state_dict().items() if not k.startswith("observers.")}
    with torch.no_grad():
        result["qat_out"] = qat(test)
    return result


def main(out: str) -> None:
    dist_utils.init_from_env()
    torch.set_num_threads(1)
    result = {"function": function_run(), "synced": distill_run(sync_bn=True), "unsynced": distill_run(sync_bn=False, qat=False)}
    if dist_utils.is_main_process():
        Path(out).mkdir(parents=True, exist_ok=True)
        torch.save(result, Path(out) / "result.pt")


if __name__ == "__main__":
    main(sys.argv[1])
