"""torch.distributed helpers for calibration, distillation and QAT (launched with torchrun).

Every helper is a no-op in a single process (``torch.distributed`` not initialized, or one rank), so
the same script runs under ``python`` and under ``torchrun --nproc-per-node N``.

* ``sync_observers(gm)``: reduce every calibration observer of a prepared graph across ranks in place
  (min/max by MIN/MAX, histograms by SUM, see ``Observer.all_reduce_``), so all ranks convert to the
  same qparams. ``fxpress.convert`` calls it, so every rank must call ``convert``.
* ``SyncBatchNorms()`` (a context) and ``sync_batch_norms_in_forward(module)``: synchronized batch
  norm (``nn.SyncBatchNorm``'s semantics) for captured graphs, ``prepare_qat(bn="train")`` graphs and
  eager batch norms, on any device and backend (gloo included): while it is active, every batch norm
  that trains (``aten.batch_norm``, ``native_batch_norm``, ``_native_batch_norm_legit``,
  ``torch.batch_norm``, ``F.batch_norm`` called with ``training=True``) normalizes with the mean and
  variance of the global batch, all ranks' samples (ranks may hold different numbers), its backward
  reduces the gradient terms over ranks as well, and the running statistics are updated from the
  global statistics, so they stay equal on all ranks. N ranks with per-rank shards then compute what
  one process computes on the whole batch (within float rounding). Nothing in the model changes: the
  calls are redirected (a ``TorchFunctionMode``) only while the context, or the module's forward, runs.
  Inference batch norms, and every call where no process group is initialized, run untouched. ``fxpress.distill`` uses it
  for the forwards DDP runs (``sync_bn=True``, the default).
* ``sync_batch_norm(x, weight, bias, running_mean, running_var, momentum, eps)``: the function itself.
* ``sync_batch_norm_stats(gm)``: average batch-norm running statistics over ranks (for batch norms
  that normalized each rank's own batches, as DDP without SyncBatchNorm does; the running statistics
  are then made equal, so every rank holds the same model; synchronized ones are equal already).
* ``all_reduce_sum_(tensor)``: sum a tensor over ranks in place (reconstruction's normal equations).
* ``rank()``, ``world_size()``, ``is_main_process()``, ``barrier()``, ``broadcast_object(obj)``.
* ``init_from_env(backend=None)``: ``dist.init_process_group`` from torchrun's environment variables
  (gloo on CPU, NCCL where there are GPUs) when they are set.

Only rank 0 writes files (checkpoints, ONNX) in the scripts and in ``fxpress.distill``.
"""

from __future__ import annotations

import functools
import numbers
import os
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.overrides import TorchFunctionMode

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
    "sync_batch_norm",
    "SyncBatchNorms",
    "sync_batch_norms_in_forward",
    "has_batch_norms",
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


def _device(group=None) -> torch.device:
    """Where the backend of ``group`` (default: the world) communicates: the current GPU for NCCL, else the CPU."""
    import torch.distributed as dist

    if "nccl" in str(dist.get_backend(group)).lower() and torch.cuda.is_available():
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
    device = _device(group)
    flat = torch.cat([t.detach().reshape(-1).to(device, torch.float64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].reshape(t.shape).to(t))
            offset += t.numel()
    return len(tensors)


# ---------------------------------------------------------------------------------------------
# synchronized batch norm: the statistics of the global batch, in forward and backward


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm over the samples of every rank (``x`` is this rank's ``[N, C, *]`` shard).

    Forward: each rank's (count, per-channel mean, sum of squared deviations) are all-gathered and
    combined (Chan et al.'s parallel variance, in float64), so ranks may hold different numbers of
    samples (or none). Backward: the per-channel sums of dy and dy * x_hat are all-reduced, which
    makes the input gradient that of the global batch norm; the weight and bias gradients stay
    local (DDP reduces them with the others). The arithmetic is plain tensor ops, unlike
    ``torch.nn.modules._functions.SyncBatchNorm``, whose fused kernels exist for CUDA only.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, group):  # type: ignore[override]
        import torch.distributed as dist

        c = x.shape[1]
        shape = [1, c] + [1] * (x.dim() - 2)
        dims = [0, *range(2, x.dim())]
        xc = x if x.dtype in (torch.float32, torch.float64) else x.float()
        acc = _acc_dtype(x.device)
        n = x.numel() // c if c else 0
        if n:
            mean = xc.mean(dims)
            m2 = (xc - mean.view(shape)).square().sum(dims)
        else:  # an empty shard still takes part in the collective, with count 0
            mean = m2 = xc.new_zeros(c)
        local = torch.cat([torch.full((1,), float(n), dtype=acc, device=x.device), mean.to(acc), m2.to(acc)])
        world = dist.get_world_size(group)
        buf = local.to(_device(group))
        parts = [torch.empty_like(buf) for _ in range(world)]
        dist.all_gather(parts, buf, group=group)
        stats = torch.stack(parts).to(x.device)
        counts, means, m2s = stats[:, :1], stats[:, 1 : 1 + c], stats[:, 1 + c :]
        total = float(counts.sum())
        if total <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(total)} over {world} rank(s)")
        g_mean = (counts * means).sum(0) / total
        g_m2 = (m2s + counts * (means - g_mean).square()).sum(0)
        if running_mean is not None:
            running_mean.copy_(((1 - momentum) * running_mean.to(acc) + momentum * g_mean).to(running_mean.dtype))
        if running_var is not None:  # unbiased, as torch's batch norm keeps it
            running_var.copy_(((1 - momentum) * running_var.to(acc) + momentum * (g_m2 / (total - 1))).to(running_var.dtype))
        mean_c = g_mean.to(xc.dtype)
        invstd_c = torch.rsqrt(g_m2 / total + eps).to(xc.dtype)
        y = (xc - mean_c.view(shape)) * invstd_c.view(shape)
        if weight is not None:
            y = y * weight.to(xc.dtype).view(shape)
        if bias is not None:
            y = y + bias.to(xc.dtype).view(shape)
        ctx.save_for_backward(x, weight, mean_c, invstd_c)
        ctx.total, ctx.group = total, group
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(mean_c, invstd_c)
        return y.to(x.dtype), mean_c, invstd_c

    @staticmethod
    def backward(ctx, dy, _dmean, _dinvstd):  # type: ignore[override]
        import torch.distributed as dist

        x, weight, mean, invstd = ctx.saved_tensors
        c = x.shape[1]
        shape = [1, c] + [1] * (x.dim() - 2)
        dims = [0, *range(2, x.dim())]
        xc = x if x.dtype in (torch.float32, torch.float64) else x.float()
        dyc = dy.to(xc.dtype)
        xhat = (xc - mean.view(shape)) * invstd.view(shape)
        sum_dy = dyc.sum(dims)
        sum_dy_xhat = (dyc * xhat).sum(dims)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # the same on every rank (the same model), so every rank joins
            both = torch.cat([sum_dy, sum_dy_xhat]).to(_acc_dtype(x.device))
            buf = both.to(_device(ctx.group))
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=ctx.group)
            g_dy, g_dy_xhat = (buf.to(x.device) / ctx.total).to(xc.dtype).split(c)
            scale = invstd * weight.to(xc.dtype) if weight is not None else invstd
            gx = ((dyc - g_dy.view(shape) - xhat * g_dy_xhat.view(shape)) * scale.view(shape)).to(x.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            gw = sum_dy_xhat.to(weight.dtype)
        if ctx.needs_input_grad[2]:
            gb = sum_dy.to(ctx.bias_dtype)
        return gx, gw, gb, None, None, None, None, None


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _sync_batch_norm(x, weight, bias, running_mean, running_var, momentum, eps, group) -> tuple:
    """(output, mean, invstd) of the global batch norm; torch's batch norm where no group is set up."""
    if not _initialized():
        return torch.ops.aten.native_batch_norm.default(x, weight, bias, running_mean, running_var, True, momentum, eps)
    if x.dim() < 2:
        raise ValueError(f"batch norm expects an input of at least 2 dims [N, C, ...], got {list(x.shape)}")
    return _SyncBatchNormFunction.apply(x, weight, bias, running_mean, running_var, float(momentum), float(eps), group)


def sync_batch_norm(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    group=None,
) -> torch.Tensor:
    """A training batch norm whose statistics are those of every rank's samples together.

    ``input`` is this rank's ``[N, C, *]`` shard (ranks may hold different N); the running statistics
    (if given) are updated in place from the global mean and unbiased variance, the same on every
    rank. Every rank of ``group`` must call it, in the same order, in forward and in backward.
    Without an initialized process group it is ``aten.batch_norm(..., training=True)``.
    """
    return _sync_batch_norm(input, weight, bias, running_mean, running_var, momentum, eps, group)[0]


_aten = torch.ops.aten
_ATEN_BN_ARGS = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
# batch-norm entry points -> (argument names, defaults, whether they return (output, mean, invstd))
_SYNCABLE: dict[Callable, tuple[tuple[str, ...], dict, bool]] = {
    _aten.batch_norm.default: (_ATEN_BN_ARGS, {}, False),
    _aten.native_batch_norm.default: (_ATEN_BN_ARGS, {}, True),
    _aten._native_batch_norm_legit.default: (_ATEN_BN_ARGS, {}, True),
    torch.batch_norm: (_ATEN_BN_ARGS, {}, False),
    torch.nn.functional.batch_norm: (
        ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
        {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5},
        False,
    ),
}
_GRAPH_BATCH_NORMS = set(_SYNCABLE) | {_aten._native_batch_norm_legit_no_training.default}  # train() makes it a batch_norm


class SyncBatchNorms(TorchFunctionMode):
    """While active, batch norms that train use the statistics of the global batch (all ranks).

        with dist_utils.SyncBatchNorms():
            loss = loss_fn(model(x_shard), y_shard)
        loss.backward()          # the backward needs no context: it reduces over ranks by itself

    Calls of ``aten.batch_norm`` (captured graphs, ``prepare_qat(bn="train")``'s batch norms),
    ``native_batch_norm``, ``_native_batch_norm_legit``, ``torch.batch_norm`` and ``F.batch_norm``
    (eager ``nn.BatchNorm*``) with ``training=True`` go to ``sync_batch_norm``; everything else, and
    every call when no process group is initialized, runs as it would. Nothing is rewritten, so the
    model stays as it was; the backward of the forwards run in it reduces over the ranks too.
    """

    def __init__(self, group=None):
        super().__init__()
        self.group = group

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        spec = _SYNCABLE.get(func)
        if spec is not None and _initialized():
            names, defaults, as_tuple = spec
            a = {**defaults, **dict(zip(names, args)), **kwargs}
            x, momentum = a.get("input"), a.get("momentum")
            if a.get("training") and isinstance(x, torch.Tensor) and x.dim() >= 2 and isinstance(momentum, numbers.Real):
                out = _sync_batch_norm(x, a.get("weight"), a.get("bias"), a.get("running_mean"), a.get("running_var"), momentum, a.get("eps", 1e-5), self.group)
                return tuple(out) if as_tuple else out[0]
        return func(*args, **kwargs)


def has_batch_norms(module: torch.nn.Module) -> bool:
    """True when ``module`` holds a batch norm that can train: an eager ``nn.BatchNorm*``, a QAT batch
    norm (``prepare_qat(bn="train")``) or a batch-norm op in a captured graph."""
    from ..passes.quant.fake_quant import QATBatchNorm

    for m in module.modules():
        if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, QATBatchNorm)):
            return True
        if isinstance(m, fx.GraphModule) and any(n.op == "call_function" and n.target in _GRAPH_BATCH_NORMS for n in m.graph.nodes):
            return True
    return False


def sync_batch_norms_in_forward(module: torch.nn.Module, group=None) -> Callable[[], None] | None:
    """Run ``module``'s forward under ``SyncBatchNorms(group)`` from now on (what ``fxpress.distill``
    does to the module DDP wraps). Returns a function that undoes it; None, and nothing changes, in
    a single process or when ``module`` has no batch norm (``has_batch_norms``)."""
    if not is_distributed() or not has_batch_norms(module):
        return None
    forward = module.forward

    @functools.wraps(forward)
    def synced_forward(*args, **kwargs):
        with SyncBatchNorms(group):
            return forward(*args, **kwargs)

    module.forward = synced_forward  # an instance attribute: nothing else of the module changes

    def undo() -> None:
        if module.__dict__.get("forward") is synced_forward:
            del module.forward

    return undo


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

    buf = tensor.detach().to(_device(group))
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    tensor.copy_(buf.to(tensor.device))
    return tensor
