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


def inert_terms(
    model_args, data_args, cfg: ObjectiveArguments, batch_size: int, world_size: int = 1
) -> list[str]:
    """One line per configured term that cannot change the model, naming the key(s) and the fix.

    A term is inert when it is computed with a positive weight but is identically 0 (L_norm on normalised
    embeddings; an InfoNCE term whose softmax has a single candidate), or when its weight or temperature was set
    away from the default but the term is never computed (wrong ``training_type``, no distillation).
    batch_size: queries per device and step; world_size: processes.
    """
    found: list[str] = []
    defaults = ObjectiveArguments()
    uses_answers = cfg.training_type != "retrieval"
    kd = bool(data_args.knowledge_distillation)
    if uses_answers and cfg.normalize_answer and cfg.norm_weight > 0 and model_args.normalize_embeddings:
        found.append(
            "config keys 'normalize_answer' and 'normalize_embeddings': L_norm (loss_norm) is identically 0 because "
            "normalize_embeddings is true (every answer embedding has norm 1 by construction); set "
            "normalize_answer false to stop computing it, or normalize_embeddings false to train with L_norm, "
            "but only for a model made for dot products (upstream trains contriever unnormalised)"
        )
    # candidates per anchor of an InfoNCE term: its own group, times the batch's anchors with in-batch negatives
    rows = 1
    if cfg.use_in_batch_negatives:
        rows = batch_size * (world_size if cfg.negatives_cross_device else 1)
    group = data_args.train_group_size
    qp_computed = not kd or cfg.kd_loss_type == "kl_div"
    how = "raise train_group_size above 1 or set use_in_batch_negatives true"
    if rows * group == 1 and qp_computed and cfg.qp_weight > 0:
        found.append(f"config keys 'train_group_size' and 'use_in_batch_negatives': L_qp has one candidate per "
                     f"query, so it is identically 0; {how}")  # fmt: skip
    if uses_answers and cfg.qa_weight > 0:
        a_group = group if data_args.answer_inbatch else 1
        if rows * a_group == 1:
            found.append(
                "config keys 'use_in_batch_negatives' and 'answer_inbatch': L_qa has one candidate per query (its "
                "own answer), so it is identically 0; set use_in_batch_negatives true or answer_inbatch true"
            )
    if cfg.training_type == "retrieval_answer_passage" and cfg.ap_weight > 0 and rows * group == 1:
        found.append(f"config keys 'train_group_size' and 'use_in_batch_negatives': L_ap has one candidate per "
                     f"answer, so it is identically 0; {how}")  # fmt: skip
    # set away from the default, but the term is never computed
    tt = f"training_type is {cfg.training_type}"
    unused = []
    if not uses_answers:
        unused += [
            ("qa_weight", "L_qa", tt),
            ("answer_temperature", "L_qa", tt),
            ("norm_weight", "L_norm", tt),
        ]
    if cfg.training_type != "retrieval_answer_passage":
        unused += [("ap_weight", "L_ap", tt + " (L_ap needs retrieval_answer_passage)")]
    if not kd:
        no_kd = "knowledge_distillation is false, no teacher scores are read"
        unused += [("kd_weight", "L_kd", no_kd), ("teacher_temperature", "L_kd", no_kd)]
    elif cfg.kd_loss_type == "m3_kd_loss":
        unused += [("teacher_temperature", "L_kd", "m3_kd_loss uses the teacher's order, not its scores")]
    if kd and cfg.kd_loss_type != "kl_div":
        unused += [("qp_weight", "L_qp", f"kd_loss_type {cfg.kd_loss_type} replaces L_qp by L_kd")]
    for key, term, why in unused:
        if getattr(cfg, key) != getattr(defaults, key):
            found.append(f"config key {key!r}: set to {getattr(cfg, key)} but {term} is never computed ({why}); "
                         "remove the key or change what it depends on")  # fmt: skip
    return found


def flat_teacher_warning(
    score_groups: list[list[float]], teacher_temperature: float, temperature: float
) -> str | None:
    """A warning when the kl_div teacher targets softmax(scores / teacher_temperature) are nearly uniform.

    score_groups: per record, the teacher scores of its positive and negatives (G_i values). With cosine teachers
    (scores within a few hundredths of each other) and upstream's teacher_temperature 1, every target is almost
    flat, and KL then pulls the student's softmax(s / temperature) toward a flat one (the SciFact ablation in
    benchmarks/README.md lost nDCG@10 this way). Warns when the targets' mean top probability is below 1.5 / G."""
    import math

    ratios = []
    for scores in score_groups:
        if len(scores) < 2:
            continue
        top = max(scores)
        exps = [math.exp((s - top) / teacher_temperature) for s in scores]
        ratios.append(len(scores) / sum(exps))  # top probability x G: 1 = uniform, G = one-hot
    if not ratios or sum(ratios) / len(ratios) >= 1.5:
        return None
    spread = sum(max(g) - min(g) for g in score_groups if len(g) > 1) / len(ratios)
    return (
        f"the teacher's targets are nearly uniform (mean top probability {sum(ratios) / len(ratios):.2f} / G; "
        f"teacher scores span {spread:.3g} per group, teacher_temperature {teacher_temperature:g}): distillation "
        f"will flatten the model's scores; for cosine-similarity teachers set teacher_temperature near "
        f"temperature ({temperature:g})"
    )
