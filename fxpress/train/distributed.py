"""torch.distributed helpers for calibration, distillation and QAT (launched with torchrun).

Every helper is a no-op in a single process (``torch.distributed`` not initialized, or one rank), so
the same script runs under ``python`` and under ``torchrun --nproc-per-node N``.

* ``sync_observers(gm)``: reduce every calibration observer of a prepared graph across ranks in place
  (min/max by MIN/MAX, histograms by SUM, see ``Observer.all_reduce_``), so all ranks convert to the
  same qparams. ``fxpress.convert`` calls it, so every rank must call ``convert``.
* ``sync_batch_norm_stats(gm)``: average batch-norm running statistics over ranks (each rank
  normalizes its own batches, as DDP without SyncBatchNorm does; the running statistics are then
  made equal, so every rank holds the same model).
* ``all_reduce_sum_(tensor)``: sum a tensor over ranks in place (reconstruction's normal equations).
* ``rank()``, ``world_size()``, ``is_main_process()``, ``barrier()``, ``broadcast_object(obj)``.
* ``init_from_env(backend=None)``: ``dist.init_process_group`` from torchrun's environment variables
  (gloo on CPU, NCCL where there are GPUs) when they are set.

Only rank 0 writes files (checkpoints, ONNX) in the scripts and in ``fxpress.distill``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.fx as fx

__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "is_main_process",
    "barrier",
    "broadcast_object",
    "init_from_env",
    "sync_observers",
    "sync_batch_norm_stats",
    "all_equal",
    "all_reduce_sum_",
]


def is_distributed() -> bool:
    """True when torch.distributed is initialized with more than one rank."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (itself in a single process)."""
    if not is_distributed():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def init_from_env(backend: str | None = None) -> bool:
    """Initialize the default process group from torchrun's variables; False when not launched so.

    backend: None picks NCCL when CUDA is available, else gloo.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return True


def _device() -> torch.device:
    import torch.distributed as dist

    if "nccl" in str(dist.get_backend()).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sync_observers(gm: torch.nn.Module, group=None) -> int:
    """Reduce the statistics of every calibration observer under ``gm.observers`` across ranks.

    Returns the number of observers reduced (0 in a single process). Observers are visited in name
    order, the same on every rank. Fake-quant modules (QAT) are skipped: they already reduce a copy
    of their statistics whenever they refresh their qparams.
    """
    if not is_distributed():
        return 0
    from ..passes.quant.insert_observers import OBSERVER_ROOT
    from ..passes.quant.observers import Observer

    root = getattr(gm, OBSERVER_ROOT, None)
    if root is None:
        return 0
    n = 0
    for _, mod in sorted(root.named_children()):
        if isinstance(mod, Observer):
            mod.all_reduce_(group)
            n += 1
    return n


def _batch_norm_stat_targets(gm: fx.GraphModule) -> list[str]:
    aten = torch.ops.aten
    targets: list[str] = []
    for node in gm.graph.nodes:
        args: tuple = ()
        if node.op == "call_function" and node.target in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default):
            args = node.args[3:5]
        elif node.op == "call_module" and str(node.target).startswith("qat_batch_norms."):
            args = node.args[3:5]
        for a in args:
            if isinstance(a, fx.Node) and a.op == "get_attr" and a.target not in targets:
                targets.append(a.target)
    return targets


def sync_batch_norm_stats(model: torch.nn.Module, group=None) -> int:
    """Average batch-norm running mean/var over ranks (graph attributes or eager BatchNorm buffers)."""
    if not is_distributed():
        return 0
    import torch.distributed as dist

    from ..ir.graph import get_attr_value

    if isinstance(model, fx.GraphModule):
        tensors = [get_attr_value(model, t) for t in _batch_norm_stat_targets(model)]
    else:
        tensors = [
            b
            for m in model.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for b in (m.running_mean, m.running_var)
            if b is not None
        ]
    if not tensors:
        return 0
    device = _device()
    flat = torch.cat([t.detach().reshape(-1).to(device, torch.float64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].reshape(t.shape).to(t))
            offset += t.numel()
    return len(tensors)


def all_equal(value: Any) -> bool:
    """True when ``value`` (picklable) is the same on every rank."""
    if not is_distributed():
        return True
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return all(g == gathered[0] for g in gathered)


def all_reduce_sum_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (on the backend's device); the tensor itself in one process."""
    if not is_distributed():
        return tensor
    import torch.distributed as dist

    buf = tensor.detach().to(_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    tensor.copy_(buf.to(tensor.device))
    return tensor
