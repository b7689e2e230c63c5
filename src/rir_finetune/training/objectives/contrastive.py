"""InfoNCE: the query-passage (L_qp), query-answer (L_qa) and answer-passage (L_ap) terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rir_finetune.training.objectives.scores import batch_scores, group_scores


def info_nce(x: Tensor, c: Tensor, temperature: float, group_size: int, in_batch: bool = True) -> Tensor:
    """Contrastive loss of each row of ``x`` over candidates ``c``; the target is the first of its own group.

    x: (N, D) anchors (queries or answers).
    c: (N*G, D) candidates, grouped: rows i*G .. i*G+G-1 belong to anchor i, the positive at offset 0.

    With ``in_batch``: L = mean_i -log( exp s(x_i, c_{iG}) / sum_{m < N*G} exp s(x_i, c_m) ), s = <x, c> / tau:
    every other anchor's candidates are negatives too. Without: the softmax runs over the own group only,
    L = mean_i -log( exp s(x_i, c_{iG}) / sum_{j < G} exp s(x_i, c_{iG+j}) ).
    Returns a scalar in fp32.
    """
    n = x.size(0)
    if in_batch:
        scores = batch_scores(x, c, temperature)  # (N, N*G)
        target = torch.arange(n, device=x.device) * group_size  # (N,)
    else:
        scores = group_scores(x, c, group_size, temperature)  # (N, G)
        target = torch.zeros(n, dtype=torch.long, device=x.device)  # (N,)
    return F.cross_entropy(scores, target)
