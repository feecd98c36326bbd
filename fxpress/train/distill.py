"""Knowledge distillation: train a compressed student to match the original teacher.

    student = fxpress.prune(model, (x,), ratio=0.5)
    student = fxpress.distill(student, teacher=model, data=loader, epochs=3,
                              loss="kd", temperature=4.0, alpha=0.7, hints="auto")
    print(fxpress.distill_report(student))

Losses (per batch; means over the batch, so data-parallel ranks average to the full batch):

* ``loss="kd"`` (Hinton et al. 2015): ``KL(softmax(t/T) || softmax(s/T)) * T²`` on the first output
  tensor of each model (classes on the last dim). With labels in the batch the loss is
  ``alpha * KD + (1 - alpha) * hard``, hard = cross entropy (integer labels, or class
  probabilities), or MSE for float labels shaped like the output; without labels it is KD alone.
* ``loss="mse"``: mean squared error between the outputs (regression, embeddings), mixed with the
  hard loss the same way. Or a callable ``loss(student_out, teacher_out) -> scalar``.
* hints (FitNets-style feature losses), ``hint_weight * mean over pairs`` (default 0.1: on the
  digits CNN pruned by half, weight 1 pulled the narrower student towards the teacher's features at
  the task's expense, 97.96 % vs 98.89 % without hints; 0.1 and 0.02 gave 98.89 %): ``hint_loss="mse"`` is the
  squared error divided by the teacher feature's mean square (scale-free), ``"cosine"`` is
  1 - cosine similarity along the channel dim. Where a pruned student kept a subset of the teacher's
  channels, the teacher's feature is cut to the kept channels (the pruning plans say which: no
  adapter). Otherwise, where widths differ, a learned
  adapter (a linear map along the channel dim: a 1×1 convolution for NCHW features) maps the
  student's channels onto the teacher's; it starts at the least-squares fit on the first batch and
  trains with the student (it is not part of the returned model).

``hints="auto"`` pairs tensors by node name (fxpress keeps the captured names of nodes a pass did not
rewrite, so the student and a capture of the teacher share them). A student node is a hint point when

1. it ends a block: the output of an activation (relu, relu6/hardtanh, hardswish, gelu, silu), of a
   residual ``add``, of a pooling or ``cat`` (an ``add`` read only by an activation yields to it);
2. a node of the same name exists in the teacher with a float tensor of the same rank whose sizes
   agree except for at most one non-batch dim (the channels, bridged by an adapter);
3. it is downstream of (or is) a node the compression rewrote: a node the teacher does not have
   (a decomposed factor, a fake-quant) or whose shape differs (pruned channels);
4. it is not a model output (the output loss covers those).

When more than ``max_hints`` (4) qualify, evenly spaced ones are kept, always including the last.
``hints`` may also be a list of node names or a ``{student_name: teacher_name}`` dict. The report
lists the pairs and why other candidates were left out.

Data: an iterable of batches (re-iterated each epoch): a tensor (inputs only), a tuple/list (the
model's inputs first, then labels), or a dict (inputs by name; labels under "labels", "label",
"targets", "target" or "y"). The teacher runs in eval mode under ``torch.no_grad``; its mode is
restored afterwards. Captured student graphs train through their ``.train()``/``.eval()``.

Distributed (``torchrun``): with ``torch.distributed`` initialized, the student (and the adapters) are
wrapped in DistributedDataParallel (``broadcast_buffers=False``: observers and batch-norm statistics
stay per rank and are reduced explicitly), each rank passes its own shard of the data (a
DistributedSampler), all ranks must see the same number of batches, and only rank 0 writes
checkpoints and shows progress. Batch norms that train (a pruned or decomposed student's, in train
mode; ``prepare_qat(bn="train")``'s; eager ``nn.BatchNorm*``) are synchronized (``sync_bn=True``, the
default; ``nn.SyncBatchNorm``'s semantics, on any backend, gloo included): they normalize with the
mean and variance of the global batch, all ranks' samples together, in forward and backward, and
update their running statistics from it, so N processes on per-rank shards train what one process
trains on the whole batches (within float rounding). Nothing in the student is rewritten: the
batch-norm calls are redirected (``fxpress.train.distributed.SyncBatchNorms``) only in the forwards
DDP runs, so the returned student is the same graph, with no tie to a process group. With
``sync_bn=False`` each rank normalizes its own shard (what DDP without SyncBatchNorm does). Either
way the running statistics are then averaged over ranks after every epoch (a no-op when synchronized:
they are equal already).

Checkpoints: ``checkpoint="run/distill.pt"`` saves after every epoch (student and adapter weights,
optimizer, schedule, epoch, history, RNG state); with ``resume=True`` a run finds the file and
continues after its last epoch. A progress bar shows the running losses (tqdm; hidden when not a
terminal, or with ``progress=False``). ``eval_fn(student) -> float | dict`` runs after every epoch,
with the student in eval mode; its results go into the report.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from . import distributed as dist_utils

__all__ = ["distill", "DistillReport", "HintPair", "distill_report", "select_hints", "lr_schedule"]

aten = torch.ops.aten

_LOSSES = ("kd", "mse")
_HINT_LOSSES = ("mse", "cosine")
_LABEL_KEYS = ("labels", "label", "targets", "target", "y")

_ACTIVATIONS = {
    aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default, aten.relu6.default,
    aten.hardswish.default, aten.hardswish_.default, aten.gelu.default, aten.silu.default, aten.silu_.default,
}
_BLOCK_OUTPUTS = _ACTIVATIONS | {
    aten.add.Tensor, aten.add_.Tensor, aten.mean.dim, aten.adaptive_avg_pool2d.default, aten.avg_pool2d.default,
    aten.max_pool2d.default, aten.cat.default,
}


# ---------------------------------------------------------------------------------------------
# report


@dataclass
class HintPair:
    student: str
    teacher: str
    student_shape: tuple
    teacher_shape: tuple
    adapter: str | None = None  # e.g. "1x1 conv 16 -> 32 (dim 1)"
    kept: torch.Tensor | None = field(default=None, repr=False)  # teacher positions the student kept (pruned dim)

    def __str__(self) -> str:
        via = f" via {self.adapter}" if self.adapter else ""
        return f"{self.student} {list(self.student_shape)} -> {self.teacher} {list(self.teacher_shape)}{via}"


@dataclass
class DistillReport:
    """What ``distill`` did: settings, hint pairs, and per-epoch losses and evaluation results."""

    loss: str
    temperature: float
    alpha: float
    hints: list[HintPair] = field(default_factory=list)
    skipped_hints: list[tuple[str, str]] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    resumed_from: int | None = None
    world_size: int = 1
    reconstruction: Any = None  # the ReconstructReport of the layer re-fit before training, if it ran

    @property
    def final(self) -> dict:
        return self.epochs[-1] if self.epochs else {}

    def __str__(self) -> str:
        head = f"distillation: loss {self.loss}, T {self.temperature:g}, alpha {self.alpha:g}, {self.world_size} process(es)"
        lines = [head]
        if self.resumed_from is not None:
            lines.append(f"  resumed after epoch {self.resumed_from}")
        if self.reconstruction is not None:
            lines += ["  " + line for line in str(self.reconstruction).splitlines()]
        if self.hints:
            lines.append(f"  feature hints ({len(self.hints)}):")
            lines += [f"    {h}" for h in self.hints]
        if self.skipped_hints:
            lines.append(f"  hint candidates left out ({len(self.skipped_hints)}):")
            lines += [f"    {n}: {why}" for n, why in self.skipped_hints[:20]]
        for e in self.epochs:
            parts = [f"epoch {e['epoch']}", f"loss {e['loss']:.4f}"]
            parts += [f"{k} {e[k]:.4f}" for k in ("kd", "mse", "hard", "hint") if k in e]
            parts += [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in e.get("eval", {}).items()]
            parts.append(f"{e['time_s']:.1f} s")
            lines.append("  " + ", ".join(parts))
        return "\n".join(lines)


def distill_report(student: nn.Module) -> DistillReport:
    """The report ``distill`` attached to the student it trained."""
    rep = getattr(student, "meta", {}).get("fxpress", {}).get("distill_report") if isinstance(student, fx.GraphModule) else None
    rep = rep or getattr(student, "_fxpress_distill_report", None)
    if rep is None:
        raise ValueError("this model was not trained by fxpress.distill (no distillation report attached)")
    return rep


# ---------------------------------------------------------------------------------------------
# hints


def _is_graph(m: Any) -> bool:
    return isinstance(m, fx.GraphModule) and any("val" in n.meta for n in m.graph.nodes)


def _shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and val.is_floating_point():
        # plain values: a symbolic size (the dynamic batch) as its name, so reports stay copyable
        return tuple(int(d) if isinstance(d, int) else str(d) for d in val.shape)
    return None


def _same_size(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # symbolic sizes that cannot be compared: the batch dim
        return True


def _differing_dims(s: tuple, t: tuple) -> list[int] | None:
    if len(s) != len(t):
        return None
    return [d for d in range(1, len(s)) if not _same_size(s[d], t[d])]


def select_hints(
    student: fx.GraphModule, teacher: fx.GraphModule, hints: Any = "auto", *, max_hints: int = 4
) -> tuple[list[HintPair], list[tuple[str, str]]]:
    """The (student, teacher) tensor pairs for feature hints, and the candidates left out with why."""
    from .reconstruct import _kept_channels

    kept_maps = _kept_channels(student)
    t_nodes = {n.name: n for n in teacher.graph.nodes}
    s_nodes = {n.name: n for n in student.graph.nodes}
    skipped: list[tuple[str, str]] = []

    def pair(s_name: str, t_name: str) -> HintPair | None:
        if s_name not in s_nodes:
            raise ValueError(f"hint {s_name!r} is not a node of the student graph; node names look like {_examples(s_nodes)}")
        if t_name not in t_nodes:
            raise ValueError(f"hint {t_name!r} is not a node of the teacher graph; node names look like {_examples(t_nodes)}")
        s_shape, t_shape = _shape(s_nodes[s_name]), _shape(t_nodes[t_name])
        if s_shape is None or t_shape is None:
            skipped.append((s_name, "not a floating-point tensor in both graphs"))
            return None
        dims = _differing_dims(s_shape, t_shape)
        if dims is None or len(dims) > 1:
            skipped.append((s_name, f"shapes {list(s_shape)} and {list(t_shape)} differ in more than one dim"))
            return None
        adapter, kept = None, None
        if dims:
            d = dims[0]
            kept = kept_maps.get((t_name, d)) if s_name == t_name else None
            if kept is not None and kept.numel() == s_shape[d]:
                adapter = f"the {s_shape[d]} kept of {t_shape[d]} channels (dim {d})"
            else:
                kept = None
                kind = "1x1 conv" if len(s_shape) == 4 and d == 1 else "linear"
                adapter = f"{kind} {s_shape[d]} -> {t_shape[d]} (dim {d})"
        return HintPair(s_name, t_name, s_shape, t_shape, adapter, kept)

    if hints is None or hints is False:
        return [], []
    if isinstance(hints, dict):
        pairs = [pair(s, t) for s, t in hints.items()]
        return [p for p in pairs if p is not None], skipped
    if isinstance(hints, (list, tuple)):
        pairs = [pair(s, s) for s in hints]
        return [p for p in pairs if p is not None], skipped
    if hints != "auto":
        raise ValueError(f"hints must be None, 'auto', a list of node names or a {{student: teacher}} dict, got {hints!r}")

    # 3. what the compression touched, and everything downstream of it
    affected: set[fx.Node] = set()
    for node in student.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        t = t_nodes.get(node.name)
        rewritten = t is None or t.op != node.op or (_shape(node) is not None and _shape(t) is not None and _differing_dims(_shape(node), _shape(t)) != [])
        if node.op == "get_attr":
            rewritten = rewritten and t is None  # a new constant is only a rewrite when something reads it
        if rewritten or any(a in affected for a in node.all_input_nodes):
            affected.add(node)
    outputs = set(student.graph.output_node().all_input_nodes)
    candidates: list[fx.Node] = []
    for node in student.graph.nodes:
        if node.op != "call_function" or node.target not in _BLOCK_OUTPUTS:
            continue
        users = list(node.users)
        if node.target not in _ACTIVATIONS and len(users) == 1 and users[0].op == "call_function" and users[0].target in _ACTIVATIONS:
            continue  # the activation after it ends the block
        if node in outputs:
            skipped.append((node.name, "a model output (covered by the output loss)"))
            continue
        if node.name not in t_nodes:
            skipped.append((node.name, "no node of this name in the teacher"))
            continue
        if node not in affected:
            continue  # untouched by the compression: nothing to recover there
        candidates.append(node)
    pairs = [p for p in (pair(n.name, n.name) for n in candidates) if p is not None]
    if len(pairs) > max_hints:
        keep = sorted({round(i * (len(pairs) - 1) / max(1, max_hints - 1)) for i in range(max_hints)})
        for i, p in enumerate(pairs):
            if i not in keep:
                skipped.append((p.student, f"more than max_hints={max_hints} candidates; evenly spaced ones kept"))
        pairs = [pairs[i] for i in keep]
    return pairs, skipped


def _examples(nodes: dict) -> str:
    names = [n for n, node in nodes.items() if node.op == "call_function"][:5]
    return ", ".join(repr(n) for n in names)


class ChannelAdapter(nn.Module):
    """A linear map along one dim (the channels): a 1×1 convolution for NCHW features."""

    def __init__(self, dim: int, c_in: int, c_out: int):
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(c_in, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.movedim(self.dim, -1)).movedim(-1, self.dim)

    @torch.no_grad()
    def fit_(self, s: torch.Tensor, t: torch.Tensor, ridge: float = 1e-3) -> None:
        """Least-squares start: the map that best predicts ``t`` from ``s`` on one batch."""
        S = s.movedim(self.dim, -1).reshape(-1, s.shape[self.dim]).double()
        T = t.movedim(self.dim, -1).reshape(-1, t.shape[self.dim]).double()
        S1 = torch.cat([S, torch.ones(S.shape[0], 1, dtype=S.dtype)], 1)
        gram = S1.T @ S1
        gram += ridge * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(gram.shape[0], dtype=gram.dtype)
        sol = torch.linalg.solve(gram, S1.T @ T)  # [c_in + 1, c_out]
        self.proj.weight.copy_(sol[:-1].T.to(self.proj.weight))
        self.proj.bias.copy_(sol[-1].to(self.proj.bias))


class _Tap(fx.Interpreter):
    """Run a graph and keep the values of the named nodes (no copy of the graph, no patching)."""

    def __init__(self, gm: fx.GraphModule, names: Sequence[str]):
        super().__init__(gm, garbage_collect_values=True)
        self.names = set(names)
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = out
        return out


def _run_with_taps(gm: fx.GraphModule, args: tuple, names: Sequence[str]) -> tuple[Any, list[torch.Tensor]]:
    if not names:
        return gm(*args), []
    tap = _Tap(gm, names)
    out = tap.run(*pytree.tree_leaves(args))
    return out, [tap.values[n] for n in names]


class _StudentStep(nn.Module):
    """The student and its hint adapters as one module (what DDP wraps): returns (output, adapted hints)."""

    def __init__(self, student: nn.Module, names: Sequence[str], adapters: dict[str, nn.Module]):
        super().__init__()
        self.student = student
        self.names = list(names)
        self.adapters = nn.ModuleDict({str(i): adapters[n] for i, n in enumerate(self.names) if n in adapters})

    def forward(self, *args):
        out, feats = _run_with_taps(self.student, args, self.names) if self.names else (self.student(*args), [])
        feats = [self.adapters[str(i)](f) if str(i) in self.adapters else f for i, f in enumerate(feats)]
        return out, feats


# ---------------------------------------------------------------------------------------------
# losses


def _first_tensor(out: Any) -> torch.Tensor:
    for leaf in pytree.tree_leaves(out):
        if isinstance(leaf, torch.Tensor):
            return leaf
    raise ValueError("the model returned no tensor to distill")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's KL(softmax(t/T) || softmax(s/T)) * T², classes on the last dim, mean over rows."""
    c = student.shape[-1]
    s = F.log_softmax(student.reshape(-1, c).float() / temperature, dim=-1)
    t = F.log_softmax(teacher.reshape(-1, c).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def _hard_loss(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if not labels.is_floating_point():
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1))
    if labels.shape == out.shape:
        if out.dim() >= 2 and _is_distribution(labels):  # class probabilities (soft labels)
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1, out.shape[-1]))
        return F.mse_loss(out, labels)
    raise ValueError(f"labels of shape {list(labels.shape)} do not fit the output {list(out.shape)}: give class indices or targets shaped like the output")


def _is_distribution(labels: torch.Tensor) -> bool:
    return bool((labels >= 0).all()) and torch.allclose(labels.sum(-1), torch.ones(()), atol=1e-3)


def _hint_loss(kind: str, s: torch.Tensor, t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    s, t = s.float(), t.float()
    if kind == "mse":
        return (s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-8)
    return 1 - F.cosine_similarity(s, t, dim=channel_dim if s.dim() > 1 else 0, eps=1e-8).mean()


# ---------------------------------------------------------------------------------------------
# data


def _arity(model: nn.Module) -> int:
    if _is_graph(model):
        return sum(1 for n in model.graph.nodes if n.op == "placeholder")
    return 1


def _split(batch: Any, model: nn.Module, arity: int) -> tuple[tuple, dict, torch.Tensor | None]:
    """(positional inputs, keyword inputs, labels or None) of one batch."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None
    if isinstance(batch, (list, tuple)):
        if len(batch) < arity:
            raise ValueError(f"a batch holds {len(batch)} items but the model takes {arity} inputs")
        labels = batch[arity] if len(batch) > arity else None
        return tuple(batch[:arity]), {}, labels
    if isinstance(batch, dict):
        labels = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
        inputs = {k: v for k, v in batch.items() if k not in _LABEL_KEYS}
        if _is_graph(model):
            names = [n.target for n in model.graph.nodes if n.op == "placeholder"]
            missing = [k for k in names if k not in inputs]
            if missing:
                raise ValueError(f"a dict batch must hold the model inputs {names} by name; missing {missing}")
            return tuple(inputs[k] for k in names), {}, labels
        return (), inputs, labels
    raise TypeError(f"a batch must be a tensor, a tuple/list (inputs, then labels) or a dict, got {type(batch).__name__}")


def _to(x: Any, device: torch.device | None) -> Any:
    if device is None:
        return x
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, x)


# ---------------------------------------------------------------------------------------------
# checkpoints


def _save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save leaves the previous checkpoint


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state()}


# ---------------------------------------------------------------------------------------------
# the loop


def _check_options(loss, temperature, alpha, hint_loss, hint_weight, epochs, max_hints) -> None:
    if not callable(loss) and loss not in _LOSSES:
        raise ValueError(
            f"unknown loss {loss!r}: use 'kd' (Hinton logits distillation), 'mse' (match outputs), "
            "or a callable loss(student_out, teacher_out) -> scalar"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a positive number (typically 1-8; 4 is common), got {temperature!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (the weight of the distillation loss against the hard-label loss) must be in [0, 1], got {alpha!r}")
    if hint_loss not in _HINT_LOSSES:
        raise ValueError(f"unknown hint_loss {hint_loss!r}: use 'mse' (normalized squared error) or 'cosine'")
    if isinstance(hint_weight, bool) or not isinstance(hint_weight, (int, float)) or hint_weight < 0:
        raise ValueError(f"hint_weight must be a number >= 0, got {hint_weight!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if isinstance(max_hints, bool) or not isinstance(max_hints, int) or max_hints < 1:
        raise ValueError(f"max_hints must be an integer >= 1, got {max_hints!r}")


def _is_quantized(gm: nn.Module) -> bool:
    """QAT (fake quant) or calibration observers in the graph: reconstruction is for float students."""
    from .qat import is_qat

    return is_qat(gm) or hasattr(gm, "observers")


def _teacher_graph(teacher: nn.Module, args: tuple) -> fx.GraphModule:
    if _is_graph(teacher):
        return teacher
    from ..ir.capture import capture

    return capture(teacher, args)  # shares the teacher's weights; only read under no_grad


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable,
    *,
    epochs: int = 1,
    loss: str | Callable = "kd",
    temperature: float = 4.0,
    alpha: float = 0.7,
    hints: Any = None,
    hint_loss: str = "mse",
    hint_weight: float = 0.1,
    max_hints: int = 4,
    optimizer: torch.optim.Optimizer | Callable | None = None,
    lr: float = 1e-3,
    schedule: str | None = "cosine",
    warmup: float = 0.1,
    eval_fn: Callable[[nn.Module], Any] | None = None,
    reconstruct: bool = True,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    max_steps: int | None = None,
    device: torch.device | str | None = None,
    ddp: bool = True,
    sync_bn: bool = True,
) -> nn.Module:
    """Train ``student`` to match ``teacher`` on ``data``; return the student (trained in place, eval mode).

    See the module docstring for losses, hints, data, checkpoints and distributed runs.
    optimizer: None (Adam with ``lr``), a factory ``f(params) -> Optimizer``, or an optimizer over
    the student's parameters (the adapters are added to it as a parameter group).
    schedule: "cosine" (decay to 0 over the run) or None (constant). warmup: the fraction of the run's
    steps over which the learning rate first rises linearly from 1 % of ``lr`` (default 0.1; 0 for
    none): Adam's first steps are as large as ``lr`` whatever the gradient, which throws a
    reconstructed start away (digits CNN decomposed to 0.3 of its parameters, 5 epochs, mean of 8
    splits: lr 3e-3 98.22 % without, 98.99 % with warmup=0.1; lr 1e-2 80.9 % without). max_steps: stop each epoch after this many
    batches (for quick runs). device: where to train (default: where the student's parameters are).
    ddp: wrap in DistributedDataParallel when torch.distributed is initialized. sync_bn: under DDP,
    batch norms that train use the statistics of the global batch (see the module docstring).
    reconstruct: before the first epoch, re-fit the student's layers to the teacher's outputs on up
    to 8 batches (``fxpress.reconstruct``; pruned students gain the most). Runs for float fxpress
    graphs that are not resuming from a checkpoint; its report is part of the distillation report.
    """
    from tqdm.auto import tqdm

    _check_options(loss, temperature, alpha, hint_loss, hint_weight, epochs, max_hints)
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise TypeError("distill takes a student and a teacher torch.nn.Module (eager or captured graphs)")
    if student is teacher:
        raise ValueError("the student is the teacher itself: pass the compressed copy (fxpress.prune / prepare_qat return one)")
    if schedule not in ("cosine", None):
        raise ValueError(f"schedule must be 'cosine' or None, got {schedule!r}")
    _check_warmup(warmup)
    if hints not in (None, False) and not _is_graph(student):
        raise ValueError(
            "feature hints pair graph nodes: the student must be a graph from fxpress (prune, prepare_qat, capture); "
            "an eager student can be distilled with hints=None (logits only)"
        )
    device = torch.device(device) if device is not None else next((p.device for p in student.parameters()), torch.device("cpu"))
    student.to(device)
    teacher_was_training = teacher.training
    teacher.eval()
    arity = _arity(student)
    report = DistillReport(loss if isinstance(loss, str) else getattr(loss, "__name__", "custom"), float(temperature), float(alpha))
    report.world_size = dist_utils.world_size()
    main = dist_utils.is_main_process()
    n_batches = _length(data)
    if dist_utils.is_distributed() and n_batches is not None and not dist_utils.all_equal(min(n_batches, max_steps or n_batches)):
        raise ValueError("every rank must see the same number of batches (use a DistributedSampler with drop_last=True)")

    if epochs > 1 and iter(data) is data:
        raise ValueError("data is a one-shot iterator, but distill reads it once per epoch: give a list of batches or a DataLoader")
    first = next(iter(data), None)
    if first is None:
        raise ValueError("the data yielded no batches; give a non-empty DataLoader or list of batches")
    args0, kwargs0, _ = _split(_to(first, device), student, arity)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    resuming = ckpt is not None and resume and ckpt.exists()
    teacher_graph = None  # captured once, for the reconstruction and the hints
    if reconstruct and not resuming and _is_graph(student) and not kwargs0 and not _is_quantized(student):
        from .reconstruct import reconstruct as _reconstruct

        teacher_graph = _teacher_graph(teacher, args0)
        report.reconstruction = _reconstruct(student, teacher_graph, data, max_batches=8, progress=progress)

    # hints: pair the graphs, build adapters on the first batch
    names: list[str] = []
    t_names: list[str] = []
    adapters: dict[str, nn.Module] = {}
    channel_dims: list[int] = []
    t_select: dict[int, torch.Tensor] = {}  # hint index -> the teacher channels a pruned student kept
    if hints not in (None, False):
        teacher_graph = teacher_graph if teacher_graph is not None else _teacher_graph(teacher, args0)
        pairs, skipped = select_hints(student, teacher_graph, hints, max_hints=max_hints)
        report.hints, report.skipped_hints = pairs, skipped
        names, t_names = [p.student for p in pairs], [p.teacher for p in pairs]
        if pairs:
            was = student.training
            student.eval()
            with torch.no_grad():
                _, s_feats = _run_with_taps(student, args0, names)
                _, t_feats = _run_with_taps(teacher_graph, args0, t_names)
            student.train(was)
            for p, s, t in zip(pairs, s_feats, t_feats):
                dims = _differing_dims(tuple(s.shape), tuple(t.shape)) or []
                channel_dims.append(dims[0] if dims else (1 if s.dim() > 1 else 0))
                if dims and p.kept is not None:
                    t_select[len(channel_dims) - 1] = p.kept.to(device)
                elif dims:
                    ad = ChannelAdapter(dims[0], s.shape[dims[0]], t.shape[dims[0]]).to(device)
                    ad.fit_(s, t)
                    adapters[p.student] = ad
        elif main:
            import warnings

            warnings.warn("distill(hints=...): no hint pair qualified; distilling the outputs only. " + "; ".join(f"{n}: {w}" for n, w in skipped[:5]), stacklevel=2)

    # output shapes must agree
    with torch.no_grad():
        was = student.training
        student.eval()
        s_out = _first_tensor(student(*args0, **kwargs0))
        t_out = _first_tensor(teacher(*args0, **kwargs0))
        student.train(was)
    if s_out.shape[1:] != t_out.shape[1:]:
        raise ValueError(
            f"student and teacher outputs differ in shape: {list(s_out.shape)} vs {list(t_out.shape)}. The student "
            "must keep the teacher's output (e.g. prune with ignore=['classifier'] / the output layer frozen), or "
            "pass a callable loss that compares them"
        )

    step_module = _StudentStep(student, names, adapters)
    params = [p for p in step_module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no trainable parameters (every parameter has requires_grad=False)")
    if optimizer is None:
        opt = torch.optim.Adam(params, lr=lr)
    elif isinstance(optimizer, torch.optim.Optimizer):
        opt = optimizer
        adapter_params = [p for a in adapters.values() for p in a.parameters()]
        if adapter_params:
            opt.add_param_group({"params": adapter_params})
    elif callable(optimizer):
        opt = optimizer(params)
    else:
        raise TypeError(f"optimizer must be None, a torch.optim.Optimizer or a factory f(params), got {type(optimizer).__name__}")
    steps_per_epoch = min(n_batches, max_steps) if n_batches is not None and max_steps else (n_batches or max_steps or 1)
    sched = lr_schedule(opt, epochs * steps_per_epoch, schedule, warmup)

    start_epoch = 0
    if resuming:
        state = torch.load(ckpt, map_location=device, weights_only=False)
        student.load_state_dict(state["student"])
        step_module.adapters.load_state_dict(state["adapters"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None and state.get("scheduler") is not None:
            sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        report.epochs = list(state["history"])
        start_epoch = report.resumed_from = int(state["epoch"])

    model: nn.Module = step_module
    if ddp and dist_utils.is_distributed():
        from torch.nn.parallel import DistributedDataParallel as DDP

        # per-rank statistics (observers, fake-quant state) are reduced by their owners, never overwritten
        own = [f"student.{n}" for n, _ in student.named_buffers() if n.startswith(("observers.", "qat_batch_norms."))]
        DDP._set_params_and_buffers_to_ignore_for_model(step_module, own)
        import inspect

        # buffers are not broadcast before every forward (batch-norm statistics are synchronized in the forward,
        # or, with sync_bn=False, averaged after each epoch); the rank-local ones (observers) are excluded above,
        # so syncing the rest once at init is harmless
        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters else {"broadcast_buffers": False}
        if sync_bn:  # training batch norms: global-batch statistics in the forwards DDP runs (the student is not changed)
            dist_utils.sync_batch_norms_in_forward(step_module)
        model = DDP(step_module, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)

    try:
        for epoch in range(start_epoch, epochs):
            t0 = time.perf_counter()
            student.train()
            sums: dict[str, float] = {}
            seen = 0
            total = steps_per_epoch if n_batches is not None else None
            bar = tqdm(data, total=total, desc=f"distill {epoch + 1}/{epochs}", disable=(None if progress and main else True), leave=False)
            for i, batch in enumerate(bar):
                if max_steps is not None and i >= max_steps:
                    break
                args, kwargs, labels = _split(_to(batch, device), student, arity)
                with torch.no_grad():
                    if t_names:
                        t_raw, t_feats = _run_with_taps(teacher_graph, args, t_names)
                        t_feats = [f.index_select(channel_dims[j], t_select[j]) if j in t_select else f for j, f in enumerate(t_feats)]
                    else:
                        t_raw, t_feats = teacher(*args, **kwargs), []
                t_out = _first_tensor(t_raw)
                s_raw, s_feats = model(*args, **kwargs)
                s_out = _first_tensor(s_raw)
                parts = _loss_parts(loss, s_out, t_out, labels, temperature, alpha)
                total_loss = parts.pop("_total")
                if s_feats:
                    h = torch.stack([_hint_loss(hint_loss, s, t, d) for s, t, d in zip(s_feats, t_feats, channel_dims)]).mean()
                    parts["hint"] = h
                    total_loss = total_loss + hint_weight * h
                opt.zero_grad(set_to_none=True)
                total_loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                seen += 1
                sums["loss"] = sums.get("loss", 0.0) + float(total_loss.detach())
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                if main and (i % 5 == 0):
                    bar.set_postfix({k: f"{v / seen:.3f}" for k, v in sums.items()})
            if seen == 0:
                raise ValueError("the data yielded no batches in this epoch (a one-shot iterator? give a list or a DataLoader)")
            dist_utils.sync_batch_norm_stats(student)
            student.eval()
            record = {"epoch": epoch + 1, "steps": seen, **{k: v / seen for k, v in sums.items()}}
            if eval_fn is not None:
                result = eval_fn(student)
                record["eval"] = result if isinstance(result, dict) else {"eval": result}
            record["time_s"] = time.perf_counter() - t0
            report.epochs.append(record)
            if ckpt is not None:
                if main:
                    _save(ckpt, {
                        "epoch": epoch + 1, "student": student.state_dict(), "adapters": step_module.adapters.state_dict(),
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched is not None else None,
                        "history": report.epochs, "rng": _rng_state(),
                    })
                dist_utils.barrier()
    finally:
        teacher.train(teacher_was_training)
    student.eval()
    if isinstance(student, fx.GraphModule):
        student.meta.setdefault("fxpress", {})["distill_report"] = report
    else:
        student._fxpress_distill_report = report
    return student


def _check_warmup(warmup: Any) -> None:
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not 0 <= warmup < 1:
        raise ValueError(f"warmup is the fraction of the run's steps spent warming the learning rate up, in [0, 1), got {warmup!r}")


def lr_schedule(opt: torch.optim.Optimizer, steps: int, schedule: str | None = "cosine", warmup: float = 0.1):
    """A per-step learning-rate schedule over ``steps`` steps: a linear warm-up from 1 % over the first
    ``warmup`` fraction, then a cosine decay to 0 ("cosine") or a constant (None). None when there is
    nothing to schedule (no warm-up, no decay)."""
    _check_warmup(warmup)
    steps = max(1, int(steps))
    ramp = int(round(warmup * steps))
    if schedule is None and ramp == 0:
        return None

    def factor(step: int) -> float:
        if step < ramp:
            return 0.01 + 0.99 * step / ramp
        if schedule is None:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(step - ramp, steps - ramp) / max(1, steps - ramp)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _loss_parts(loss, s_out, t_out, labels, temperature, alpha) -> dict[str, torch.Tensor]:
    if callable(loss):
        value = loss(s_out, t_out)
        return {"_total": value}
    if loss == "kd":
        soft = kd_loss(s_out, t_out, temperature)
        parts = {"kd": soft}
    else:
        soft = F.mse_loss(s_out.float(), t_out.float())
        parts = {"mse": soft}
    if labels is None:
        parts["_total"] = soft
        return parts
    hard = _hard_loss(s_out, labels)
    parts["hard"] = hard
    parts["_total"] = alpha * soft + (1 - alpha) * hard
    return parts


def _length(data: Iterable) -> int | None:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None
