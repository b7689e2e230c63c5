"""Compose the named terms of SPEC section 3 into one loss; the only place that gathers across devices."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from rir_finetune.training import distributed
from rir_finetune.training.arguments import ObjectiveArguments
from rir_finetune.training.objectives.contrastive import info_nce
from rir_finetune.training.objectives.distill import (
    kl_div_loss,
    listwise_kd_loss,
    teacher_order,
    weighted_listwise_kd_loss,
)
from rir_finetune.training.objectives.norm import answer_norm_loss
from rir_finetune.training.objectives.scores import batch_scores, group_scores


@dataclass
class ObjectiveOutput:
    loss: Tensor  # scalar: the weighted sum of the terms
    terms: dict[str, Tensor] = field(default_factory=dict)  # unweighted named terms: loss_qp, loss_qa, ...


def compute_objectives(
    q_reps: Tensor,
    p_reps: Tensor,
    cfg: ObjectiveArguments,
    a_reps: Tensor | None = None,
    a_cand_reps: Tensor | None = None,
    teacher_scores: Tensor | None = None,
    in_batch: bool = True,
) -> ObjectiveOutput:
    """The Reinforced-IR loss of one batch.

    q_reps: (B, D) queries; p_reps: (B*G, D) passages, positive first in each group of G.
    a_reps: (B, D) answers, needed unless ``cfg.training_type == 'retrieval'``.
    a_cand_reps: (B*Ga, D) answer candidates for L_qa (the answer then passages retrieved by it,
        upstream ``answer_inbatch``); defaults to ``a_reps`` (Ga = 1).
    teacher_scores: (B, G) raw teacher scores aligned with the groups, or None (no distillation).
    in_batch: use other queries' passages/answers as negatives (and, with ``cfg.negatives_cross_device``,
        those of every rank: all terms are then computed over the gathered W*B queries).
    """
    b = q_reps.size(0)
    group_size = p_reps.size(0) // b
    uses_answers = cfg.training_type != "retrieval"
    if uses_answers and a_reps is None:
        raise ValueError(f"training_type {cfg.training_type!r} needs answer embeddings")
    if a_cand_reps is None:
        a_cand_reps = a_reps
    answer_group = a_cand_reps.size(0) // b if a_cand_reps is not None else 1

    if in_batch and cfg.negatives_cross_device and distributed.is_distributed():
        distributed.check_same_across_ranks(
            queries=b,
            group_size=group_size,
            answer_group=answer_group,
            has_teacher=teacher_scores is not None,
        )
        q_reps, p_reps = distributed.gather_with_grad(q_reps), distributed.gather_with_grad(p_reps)
        if uses_answers:
            a_reps = distributed.gather_with_grad(a_reps)
            a_cand_reps = a_reps if answer_group == 1 else distributed.gather_with_grad(a_cand_reps)
        if teacher_scores is not None:
            teacher_scores = distributed.gather_no_grad(teacher_scores)

    terms: dict[str, Tensor] = {}
    weights = {"loss_qp": cfg.qp_weight, "loss_qa": cfg.qa_weight, "loss_ap": cfg.ap_weight,
               "loss_norm": cfg.norm_weight, "loss_kd": cfg.kd_weight}  # fmt: skip

    if teacher_scores is None or cfg.kd_loss_type == "kl_div":
        terms["loss_qp"] = info_nce(q_reps, p_reps, cfg.temperature, group_size, in_batch)
    if teacher_scores is not None:
        if cfg.kd_loss_type == "kl_div":
            student = group_scores(q_reps, p_reps, group_size, cfg.temperature)  # (N, G)
            terms["loss_kd"] = kl_div_loss(student, teacher_scores, cfg.teacher_temperature)
        else:
            scores = (
                batch_scores(q_reps, p_reps, cfg.temperature)  # (N, N*G)
                if in_batch
                else group_scores(q_reps, p_reps, group_size, cfg.temperature)  # (N, G)
            )
            if cfg.kd_loss_type == "m3_kd_loss":
                terms["loss_kd"] = listwise_kd_loss(
                    scores, teacher_order(teacher_scores), group_size, in_batch
                )
            else:
                terms["loss_kd"] = weighted_listwise_kd_loss(
                    scores, teacher_scores, group_size, in_batch, cfg.teacher_temperature
                )
    if uses_answers:
        terms["loss_qa"] = info_nce(q_reps, a_cand_reps, cfg.answer_temperature, answer_group, in_batch)
        if cfg.normalize_answer:
            terms["loss_norm"] = answer_norm_loss(a_reps)
        if cfg.training_type == "retrieval_answer_passage":
            terms["loss_ap"] = info_nce(a_reps, p_reps, cfg.temperature, group_size, in_batch)

    loss = sum(weights[k] * v for k, v in terms.items())
    return ObjectiveOutput(loss=loss, terms=terms)
