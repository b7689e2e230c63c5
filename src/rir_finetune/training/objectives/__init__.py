"""Training objectives: pure functions of embeddings (no model, no I/O), composed in :mod:`.compose`."""

from rir_finetune.training.objectives.compose import ObjectiveOutput, compute_objectives
from rir_finetune.training.objectives.contrastive import info_nce
from rir_finetune.training.objectives.distill import kl_div_loss, listwise_kd_loss, weighted_listwise_kd_loss
from rir_finetune.training.objectives.norm import answer_norm_loss

__all__ = [
    "ObjectiveOutput",
    "answer_norm_loss",
    "compute_objectives",
    "info_nce",
    "kl_div_loss",
    "listwise_kd_loss",
    "weighted_listwise_kd_loss",
]
