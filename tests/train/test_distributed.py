"""Two processes (torchrun, gloo, DDP) give what one process gives on the same data.

The workload is ``examples/distill_ddp.py --check``: each rank takes its half of every batch;
PTQ calibrates on it and ``convert`` reduces the observers; a pruned student is reconstructed
(normal equations summed over ranks); QAT calibrates, distills under DDP
(SGD) and converts. The single-process reference runs the same function here on the whole batches.

Tolerances: min/max ranges reduce exactly (MIN/MAX), so QAT's weights, outputs and int8 qparams
agree to float rounding (1e-6); histogram ranges (PTQ's default) are summed after re-binning each
rank's histogram onto the common range, so PTQ scales agree within 1 % (measured 0.3 %) and the
int8 outputs within 2 % of their range.

Batch norms that train (a pruned student's, ``prepare_qat(bn="train")``'s) are synchronized under DDP
(``distill(sync_bn=True)``): ``sync_bn_workload.py`` checks that 2 ranks on half batches train what one
process trains on the whole batches, and that without synchronization they do not.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fxpress
from fxpress.train import distributed as dist_utils

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "distill_ddp.py"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _two_processes_and_one(script: Path, args: list[str], tmp_path: Path, single_run) -> tuple[dict, dict]:
    """Run ``script`` under torchrun with 2 processes while ``single_run()`` runs here; return
    (single_run's result, the torchrun run's ``result.pt``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        single = single_run()  # meanwhile, the same workload in this one process
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-4000:]
    return single, torch.load(tmp_path / "result.pt", weights_only=False)


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available in this build")
def test_two_processes_equal_one_process(tmp_path):
    example = _load(EXAMPLE, "distill_ddp_example")
    single, multi = _two_processes_and_one(EXAMPLE, ["--check", str(tmp_path)], tmp_path, example.equivalence_run)
    assert (single["world"], multi["world"]) == (1, 2)

    # reconstruction: normal equations summed over ranks == the whole batches' system
    for k, w in single["reconstructed"].items():
        torch.testing.assert_close(multi["reconstructed"][k], w, atol=1e-5, rtol=1e-4, msg=k)

    # QAT + DDP distillation with min/max ranges: the same to float rounding
    for k, w in single["qat_weights"].items():
        torch.testing.assert_close(multi["qat_weights"][k], w, atol=1e-6, rtol=1e-5, msg=k)
    torch.testing.assert_close(multi["qat_out"], single["qat_out"], atol=1e-6, rtol=1e-5)
    assert [q[0] for q in multi["qat_qparams"]] == [q[0] for q in single["qat_qparams"]]
    assert [v for q in multi["qat_qparams"] for v in q[1:]] == pytest.approx([v for q in single["qat_qparams"] for v in q[1:]], rel=1e-6)
    torch.testing.assert_close(multi["qat_int8_out"], single["qat_int8_out"], atol=1e-6, rtol=1e-5)

    # PTQ with histogram ranges: summed histograms on a common range, close but not bit-equal
    assert len(multi["ptq_qparams"]) == len(single["ptq_qparams"]) > 0
    for (name, s1, z1), (_, s2, z2) in zip(single["ptq_qparams"], multi["ptq_qparams"]):
        assert abs(s1 - s2) <= 0.01 * s1 and abs(z1 - z2) <= 1, name
    ref = single["ptq_out"]
    assert (multi["ptq_out"] - ref).abs().max() <= 0.02 * (ref.max() - ref.min())


def test_single_process_helpers_are_no_ops():
    from fxpress.demo import DigitsCNN

    model = DigitsCNN(width=4).eval()
    x = torch.rand(2, 1, 8, 8)
    prepared = fxpress.prepare(model, (x,))
    assert dist_utils.world_size() == 1 and dist_utils.is_main_process() and not dist_utils.is_distributed()
    assert dist_utils.sync_observers(prepared) == 0 and dist_utils.sync_batch_norm_stats(fxpress.capture(model, (x,))) == 0
    assert dist_utils.broadcast_object({"a": 1}) == {"a": 1} and dist_utils.all_equal(3)
    assert dist_utils.init_from_env() is False or dist.is_initialized()


WORKLOAD = Path(__file__).resolve().parent / "sync_bn_workload.py"


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available in this build")
def test_two_processes_with_training_batch_norms_equal_one_process(tmp_path):
    """Synchronized batch norm: 2 ranks on half batches == 1 process on the whole batches.

    ``sync_bn_workload.py`` under torchrun: ``sync_batch_norm`` and an eager BatchNorm2d under
    ``SyncBatchNorms`` on unequal shards (5 + 11 rows, then 16 + 0); a pruned DigitsCNN whose batch
    norms train, and a ``prepare_qat(bn="train")`` graph (its QATBatchNorm modules), distilled for
    2 epochs x 3 steps of SGD. Measured: weights and running statistics within 2.4e-7 of one process
    synchronized, 2.1e-3 apart with ``sync_bn=False`` (each rank normalizing its own half).
    """
    workload = _load(WORKLOAD, "sync_bn_workload")
    single, multi = _two_processes_and_one(WORKLOAD, [str(tmp_path)], tmp_path, lambda: workload.distill_run(sync_bn=True))
    assert (single["world"], multi["synced"]["world"]) == (1, 2)

    # the function itself, and eager batch norms through F.batch_norm, against torch's batch norm
    x, dy, w, b, rm, rv = workload.function_data()
    for t in (x, w, b):
        t.requires_grad_(True)
    y = torch.nn.functional.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    gx, gw, gb = torch.autograd.grad((y * dy).sum(), (x, w, b))
    for split, got in zip(workload.FUNCTION_SPLITS, multi["function"]):
        for kind, r in got.items():
            msg = f"{kind}, rows split at {split}"
            assert r["stats_equal"], msg  # every rank holds the same running statistics
            for name, ref in (("y", y), ("gx", gx), ("gw", gw), ("gb", gb), ("rm", rm), ("rv", rv)):
                torch.testing.assert_close(r[name], ref.detach(), atol=1e-5, rtol=1e-5, msg=f"{msg}: {name}")

    # distillation: weights and batch-norm running statistics as one process gets them
    synced, unsynced = multi["synced"], multi["unsynced"]
    assert synced["pruned_untouched"] and single["pruned_untouched"]  # the student graph comes back as it was
    for part in ("pruned", "qat"):
        assert any("running_var" in k for k in single[part]), part  # the batch norms are there, and trained
        for k, v in single[part].items():
            torch.testing.assert_close(synced[part][k], v, atol=1e-5, rtol=1e-5, msg=f"{part}: {k}")
    torch.testing.assert_close(synced["pruned_out"], single["pruned_out"], atol=1e-5, rtol=1e-5)

    # without synchronization each rank normalizes its own half: the same run is measurably different
    worst = max((unsynced["pruned"][k] - v).abs().max().item() for k, v in single["pruned"].items() if v.is_floating_point())
    assert worst > 1e-4, worst


def test_sync_batch_norm_in_one_process_changes_nothing():
    """Without a process group: the context passes every call through (bit-identical), distill's hook
    installs nothing, and the function is torch's training batch norm."""
    from fxpress.demo import DigitsCNN

    torch.manual_seed(0)
    model = DigitsCNN(width=4).eval()
    x = torch.rand(6, 1, 8, 8)
    pruned = fxpress.prune(model, (x[:2],), ratio=0.5, verify=False)
    folded = fxpress.prepare_qat(model, (x[:2],), progress=False, verify=False)  # bn="fold": no batch norm left
    trained = fxpress.prepare_qat(model, (x[:2],), bn="train", progress=False, verify=False)
    assert dist_utils.has_batch_norms(model) and dist_utils.has_batch_norms(pruned) and dist_utils.has_batch_norms(trained)
    assert not dist_utils.has_batch_norms(folded) and not dist_utils.has_batch_norms(torch.nn.Linear(2, 2))
    assert dist_utils.sync_batch_norms_in_forward(pruned) is None and "forward" not in vars(pruned)

    twin = fxpress.prune(model, (x[:2],), ratio=0.5, verify=False)
    pruned.train()
    twin.train()
    with dist_utils.SyncBatchNorms():
        y = pruned(x)
    y.sum().backward()
    y_ref = twin(x)
    y_ref.sum().backward()
    assert torch.equal(y, y_ref)
    for (k, a), (_, b) in zip(pruned.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), k
    for (k, a), (_, b) in zip(pruned.named_parameters(), twin.named_parameters()):
        assert torch.equal(a.grad, b.grad), k

    w, b, rm, rv = torch.rand(3), torch.rand(3), torch.zeros(3), torch.ones(3)
    xs = torch.randn(4, 3, 5)
    out = dist_utils.sync_batch_norm(xs, w, b, rm.clone(), rv.clone(), 0.1, 1e-5)
    assert torch.equal(out, torch.nn.functional.batch_norm(xs, rm, rv, w, b, True, 0.1, 1e-5))
