"""Train/eval mode of a captured graph: ``gm.train()`` and ``gm.eval()`` that really switch it.

torch.export records the mode as arguments of the ops themselves and the module it returns
refuses ``.train()``/``.eval()``. fxpress flips those arguments instead, so a compressed model can
be fine-tuned and evaluated like the eager one:

    aten.batch_norm(x, w, b, mean, var, training=False, ...)   <->  training=True  (running stats update)
    aten.dropout(x, p, train=False)                              <->  train=True
    aten._native_batch_norm_legit_no_training(x, w, b, mean, var, momentum, eps)[0]
                                                                  ->  aten.batch_norm(..., training=True, ...)

Ops whose mode cannot be switched (a batch norm already folded into its convolution) stay as they
are; ``set_training`` returns how many ops it switched so callers can say so.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

aten = torch.ops.aten

# op -> index of its training flag
_FLAG_ARG = {
    aten.batch_norm.default: 5,
    aten.dropout.default: 2,
    aten.feature_dropout.default: 2,
    aten.alpha_dropout.default: 2,
    aten.feature_alpha_dropout.default: 2,
}


def set_training(gm: fx.GraphModule, mode: bool = True) -> int:
    """Switch every batch-norm and dropout op of ``gm`` to training (``mode=True``) or inference;
    return the number of ops switched."""
    mode = bool(mode)
    switched = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten._native_batch_norm_legit_no_training.default and mode:
            switched += _to_batch_norm(gm, node)
            continue
        index = _FLAG_ARG.get(node.target)
        if index is None:
            continue
        args = list(node.args)
        if len(args) > index and args[index] != mode:
            args[index] = mode
            node.args = tuple(args)
            switched += 1
    if switched:
        gm.recompile()
    torch.nn.Module.train(gm, mode)
    return switched


def _to_batch_norm(gm: fx.GraphModule, node: fx.Node) -> int:
    """Replace ``getitem(_native_batch_norm_legit_no_training(...), 0)`` by a training batch_norm."""
    users = list(node.users)
    if not users or any(u.target is not operator.getitem or u.args[1] != 0 for u in users):
        return 0
    x, w, b, mean, var, momentum, eps = node.args
    with gm.graph.inserting_before(node):
        bn = gm.graph.call_function(aten.batch_norm.default, (x, w, b, mean, var, True, momentum, eps, False))
    bn.meta = {k: v for k, v in users[0].meta.items()}
    for u in users:
        u.replace_all_uses_with(bn)
        gm.graph.erase_node(u)
    gm.graph.erase_node(node)
    return 1


class _Trainable:
    """Mixed into a captured GraphModule's class: ``train``/``eval`` switch the ops' mode flags."""

    def train(self, mode: bool = True):
        set_training(self, mode)
        return self

    def eval(self):
        return self.train(False)


_TRAINABLE_BASES: dict[type, type] = {}


def enable_train_eval(gm: fx.GraphModule) -> fx.GraphModule:
    """Give ``gm`` working ``.train()``/``.eval()`` (kept by ``copy.deepcopy``); returns ``gm``.

    Every GraphModule has its own class named ``GraphModuleImpl`` (it holds the generated forward),
    and ``copy.deepcopy`` makes the copy's class from the first base not so named. So the mixin goes
    into a shared base class, under a fresh per-instance ``GraphModuleImpl``, and copies inherit it.
    """
    for name in ("train", "eval"):  # torch.export's module() installs refusing instance methods
        gm.__dict__.pop(name, None)
    if isinstance(gm, _Trainable):
        return gm
    base = next(c for c in type(gm).__mro__ if c.__qualname__.split(".")[-1] != "GraphModuleImpl")
    if base not in _TRAINABLE_BASES:
        _TRAINABLE_BASES[base] = type(f"Trainable{base.__name__.lstrip('_')}", (_Trainable, base), {})
    gm.__class__ = type("GraphModuleImpl", (_TRAINABLE_BASES[base],), {})
    gm.recompile()  # the generated forward/__call__ live on the per-instance class
    return gm
