"""Recovery training after compression: knowledge distillation and quantization-aware training,
in one process or many (torch.distributed, launched with torchrun).

* ``distill(student, teacher, data, ...)``: logits KD, feature hints at the rewritten subgraphs'
  boundaries (``hints="auto"``), progress, evaluation callback, resumable checkpoints, DDP.
* ``reconstruct(student, teacher, data)``: re-fit the compressed student's layers to the teacher's
  outputs by least squares, before any training (``distill`` runs it first).
* ``prepare_qat(model, example_inputs, config, ...)``: fake quantization (straight-through
  estimator; learnable LSQ scales optional) with PTQ's config vocabulary; ``fxpress.convert`` turns
  the trained graph into the same int8 Q/DQ graph PTQ gives; ``quantize_qat`` does all three in one call.
* ``distributed``: observer and batch-norm statistics reduced across ranks; batch norms that train
  synchronized over the global batch (``SyncBatchNorms``, on any backend); rank-0-only writes.
"""

from .distill import DistillReport, HintPair, distill, distill_report, select_hints
from .distributed import SyncBatchNorms, init_from_env, is_main_process, sync_batch_norm_stats, sync_observers
from .qat import freeze_bn, freeze_observers, is_qat, prepare_qat, quantize_qat
from .reconstruct import ReconstructReport, reconstruct

__all__ = [
    "DistillReport",
    "HintPair",
    "distill",
    "distill_report",
    "select_hints",
    "reconstruct",
    "ReconstructReport",
    "prepare_qat",
    "quantize_qat",
    "freeze_bn",
    "freeze_observers",
    "is_qat",
    "init_from_env",
    "is_main_process",
    "sync_observers",
    "sync_batch_norm_stats",
    "SyncBatchNorms",
]
