"""L_kd: distillation from teacher scores (kl_div, Reinforced-IR's listwise m3_kd_loss, and its weighted form)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kl_div_loss(
    student_group_scores: Tensor, teacher_scores: Tensor, teacher_temperature: float = 1.0
) -> Tensor:
    """Soft cross-entropy between the teacher's and the student's distributions over each query's own group.

    student_group_scores: (N, G) student scores s_ij / tau of query i against its group.
    teacher_scores: (N, G) raw teacher scores t_ij.
    L = mean_i -sum_j softmax(t_i / T)_j * log_softmax(s_i)_j, T = ``teacher_temperature``. Scalar, fp32.
    (Differs from KL(teacher || student) by the teacher's entropy, a constant.)
    """
    teacher_probs = F.softmax(teacher_scores.float() / teacher_temperature, dim=-1)  # (N, G)
    log_student = F.log_softmax(student_group_scores.float(), dim=-1)  # (N, G)
    return -(teacher_probs * log_student).sum(dim=-1).mean()


def teacher_order(teacher_scores: Tensor) -> Tensor:
    """Group positions in the teacher's order: the positive (offset 0) first, then negatives by score, descending.

    teacher_scores: (N, G) -> (N, G) long, row i a permutation of 0..G-1 starting with 0. Ties keep data order.
    """
    n, g = teacher_scores.shape
    neg_order = torch.sort(teacher_scores[:, 1:].float(), dim=-1, descending=True, stable=True).indices + 1
    return torch.cat([torch.zeros(n, 1, dtype=torch.long, device=teacher_scores.device), neg_order], dim=-1)


def listwise_kd_loss(scores: Tensor, order: Tensor, group_size: int, in_batch: bool = True) -> Tensor:
    """Reinforced-IR's ``m3_kd_loss``: the Plackett-Luce likelihood of the teacher's order (magnitudes unused).

    scores: (N, N*G) student scores over every passage of the batch when ``in_batch``, else (N, G) over the own
        group; query i's group occupies columns i*G .. i*G+G-1 (in-batch) or 0 .. G-1 (own group).
    order: (N, G) the teacher's order of group positions (see :func:`teacher_order`), positive first.
    L = (1/G) sum_{j<G} mean_i -log( exp s_{i,o_ij} / sum_{m not in {o_i0..o_i(j-1)}} exp s_{i,m} ):
    step j picks the j-th ranked member among all not-yet-ranked candidates; every other query's passage stays a
    distractor throughout. Scalar, fp32.
    """
    scores = scores.float()
    n = scores.size(0)
    base = (
        torch.arange(n, device=scores.device) * group_size
        if in_batch
        else torch.zeros(n, device=scores.device)
    )
    cols = base.long().unsqueeze(1) + order  # (N, G) column of each ranked member
    ranked = torch.zeros_like(scores, dtype=torch.bool)  # (N, M) members already ranked
    rows = torch.arange(n, device=scores.device)
    loss = scores.new_zeros(())
    for j in range(group_size):
        masked = scores.masked_fill(ranked, float("-inf"))  # (N, M)
        loss = loss + F.cross_entropy(masked, cols[:, j])
        ranked = ranked.clone()
        ranked[rows, cols[:, j]] = True
    return loss / group_size


def weighted_listwise_kd_loss(
    scores: Tensor,
    teacher_scores: Tensor,
    group_size: int,
    in_batch: bool = True,
    teacher_temperature: float = 1.0,
) -> Tensor:
    """The base library's ``m3_kd_loss``: each listwise step weighted by the teacher probability, summed.

    scores: as in :func:`listwise_kd_loss`; teacher_scores: (N, G) raw, group members in data order.
    p = softmax(t / T); L = sum_{j<G} mean_i p_ij * -log( exp s_{i,j} / sum_{m not in {0..j-1} of group i} exp s_{i,m} ).
    Not divided by G. Scalar, fp32.
    """
    scores = scores.float()
    n = scores.size(0)
    probs = F.softmax(teacher_scores.float() / teacher_temperature, dim=-1)  # (N, G)
    base = (
        torch.arange(n, device=scores.device) * group_size
        if in_batch
        else torch.zeros(n, device=scores.device)
    )
    rows = torch.arange(n, device=scores.device)
    ranked = torch.zeros_like(scores, dtype=torch.bool)
    loss = scores.new_zeros(())
    for j in range(group_size):
        col = base.long() + j  # (N,)
        ce = F.cross_entropy(scores.masked_fill(ranked, float("-inf")), col, reduction="none")  # (N,)
        loss = loss + (probs[:, j] * ce).mean()
        ranked = ranked.clone()
        ranked[rows, col] = True
    return loss
