"""Every loss term against hand-computed values (arithmetic in the comments) and a plain-Python reference."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rir_finetune.training.arguments import ObjectiveArguments
from rir_finetune.training.objectives import (
    answer_norm_loss,
    compute_objectives,
    info_nce,
    kl_div_loss,
    listwise_kd_loss,
    weighted_listwise_kd_loss,
)
from rir_finetune.training.objectives.distill import teacher_order

E = math.e
T = torch.tensor

# B=2 queries, G=2 passages each; q0 = [1,0], q1 = [0,1]
Q = T([[1.0, 0.0], [0.0, 1.0]])
P = T([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [1.0, 1.0]])


def test_info_nce_in_batch_hand_value():
    # q0 scores over all 4 passages: [1, 0, 0, 1], target 0 -> -log(e / (2e + 2)) = log(2e + 2) - 1
    # q1 scores: [0, 0, 1, 1], target 2 -> the same value
    expected = math.log(2 * E + 2) - 1  # = 1.006400
    assert info_nce(Q, P, temperature=1.0, group_size=2).item() == pytest.approx(expected, abs=1e-6)


def test_info_nce_own_group_hand_value():
    # q0 over its group [1, 0] -> log(1 + e^-1) = 0.313262; q1 over [1, 1] -> log 2 = 0.693147
    expected = (math.log(1 + math.exp(-1)) + math.log(2)) / 2  # = 0.503204
    assert info_nce(Q, P, 1.0, 2, in_batch=False).item() == pytest.approx(expected, abs=1e-6)


def test_info_nce_temperature_scales_scores():
    # tau = 0.5 doubles every score: q0 over [2, 0, 0, 2] -> log(2e^2 + 2) - 2
    expected = math.log(2 * E**2 + 2) - 2
    assert info_nce(Q, P, 0.5, 2).item() == pytest.approx(expected, abs=1e-6)


def test_query_answer_term_is_info_nce_over_answers():
    # one answer per query (G = 1): q0 vs answers [a0=[2,0], a1=[0,0]] -> scores [2, 0] -> log(1 + e^-2)
    a = T([[2.0, 0.0], [0.0, 0.0]])
    # q1 = [0,1] vs answers: scores [0, 0], target 1 -> log 2
    expected = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    assert info_nce(Q, a, 1.0, 1).item() == pytest.approx(expected, abs=1e-6)


def test_answer_norm_hand_value():
    # norms 5 and 0.5 -> ((5-1)^2 + (0.5-1)^2) / 2 = (16 + 0.25) / 2
    a = T([[3.0, 4.0], [0.0, 0.5]])
    assert answer_norm_loss(a).item() == pytest.approx(8.125)


def test_kl_div_hand_values():
    s = T([[1.0, 0.0]])
    t = T([[2.0, 0.0]])
    # teacher probs softmax([2,0]) = [0.880797, 0.119203]; log_softmax([1,0]) = [-0.313262, -1.313262]
    expected = 0.880797 * 0.313262 + 0.119203 * 1.313262  # = 0.432467
    assert kl_div_loss(s, t).item() == pytest.approx(expected, abs=1e-5)
    # teacher temperature 2: softmax([1,0]) = [0.731059, 0.268941]
    expected_t2 = 0.731059 * 0.313262 + 0.268941 * 1.313262  # = 0.582203
    assert kl_div_loss(s, t, teacher_temperature=2.0).item() == pytest.approx(expected_t2, abs=1e-5)


def test_teacher_order_keeps_positive_first():
    t = T([[0.0, 0.1, 0.9, 0.5], [9.0, 3.0, 1.0, 2.0]])
    assert teacher_order(t).tolist() == [[0, 2, 3, 1], [0, 1, 3, 2]]


def test_m3_own_group_single_query_hand_value():
    # G = 3, scores [2, 1, 0]; teacher ranks negative 2 above negative 1 -> order [0, 2, 1]
    s = T([[2.0, 1.0, 0.0]])
    order = teacher_order(T([[5.0, 0.1, 0.9]]))
    step0 = math.log(E**2 + E + 1) - 2  # pick 0 among {0,1,2}: 0.407606
    step1 = math.log(E + 1) - 0  # pick 2 among {1,2}: 1.313262
    step2 = 0.0  # pick 1 among {1}
    expected = (step0 + step1 + step2) / 3  # = 0.573623
    assert listwise_kd_loss(s, order, group_size=3, in_batch=False).item() == pytest.approx(
        expected, abs=1e-6
    )


def test_m3_in_batch_two_queries_hand_value():
    # B = 2, G = 2, scores over all 4 passages; q0's group = cols 0,1, q1's group = cols 2,3
    s = T([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    order = T([[0, 1], [0, 1]])
    step0 = math.log(E + 3) - 1  # q0: col 0 among all four; q1: col 2 among all four (same)
    step1 = math.log(3)  # q0: col 1 among {1,2,3}; q1: col 3 among {0,1,3}, all scores 0
    expected = (step0 + step1) / 2  # = 0.921140
    assert listwise_kd_loss(s, order, 2, in_batch=True).item() == pytest.approx(expected, abs=1e-6)


def test_m3_own_group_b_gt_1_uses_local_labels():
    # upstream defect 4: global labels on a local (B, G) matrix. Here B = 2, G = 2, own group only.
    s = T([[1.0, 0.0], [0.0, 2.0]])
    order = T([[0, 1], [0, 1]])
    # q0: step0 log(1 + e^-1), step1 0; q1: step0 -log(e^0 / (1 + e^2)) = log(1 + e^2), step1 0
    expected = ((math.log(1 + math.exp(-1)) + math.log(1 + E**2)) / 2 + 0.0) / 2
    assert listwise_kd_loss(s, order, 2, in_batch=False).item() == pytest.approx(expected, abs=1e-6)


def _reference_m3(scores, teacher, g, in_batch):
    """Plain-Python reading of SPEC section 3 (m3_kd_loss)."""
    n = len(scores)
    total = 0.0
    orders = []
    for i in range(n):
        negs = sorted(range(1, g), key=lambda j: -teacher[i][j])
        orders.append([0] + negs)
    for j in range(g):
        step = 0.0
        for i in range(n):
            base = i * g if in_batch else 0
            ranked = {base + orders[i][k] for k in range(j)}
            target = base + orders[i][j]
            denom = sum(math.exp(scores[i][m]) for m in range(len(scores[i])) if m not in ranked)
            step += -(scores[i][target] - math.log(denom))
        total += step / n
    return total / g


@pytest.mark.parametrize("in_batch", [True, False])
def test_m3_matches_reference_random(in_batch):
    rng = random.Random(3)
    n, g = 3, 4
    m = n * g if in_batch else g
    s = [[rng.uniform(-2, 2) for _ in range(m)] for _ in range(n)]
    t = [[rng.uniform(0, 1) for _ in range(g)] for _ in range(n)]
    got = listwise_kd_loss(T(s), teacher_order(T(t)), g, in_batch).item()
    assert got == pytest.approx(_reference_m3(s, t, g, in_batch), abs=1e-5)


def test_weighted_m3_hand_value():
    # G = 2, own group, scores [1, 0], teacher [0, 0] -> probs [0.5, 0.5]
    # step0: 0.5 * log(1 + e^-1); step1: 0.5 * 0 (only member left). Summed, not divided by G.
    got = weighted_listwise_kd_loss(T([[1.0, 0.0]]), T([[0.0, 0.0]]), 2, in_batch=False).item()
    assert got == pytest.approx(0.5 * math.log(1 + math.exp(-1)), abs=1e-6)


# ---- composition ------------------------------------------------------------------------------------------------

A = T([[1.0, 0.0], [0.5, 0.5]])
TEACHER = T([[3.0, 1.0], [2.0, 0.0]])


def _cfg(**kw):
    return ObjectiveArguments(**{"temperature": 1.0, "answer_temperature": 1.0, **kw})


@pytest.mark.parametrize(
    "training_type, kd, expected_terms",
    [
        ("retrieval", None, {"loss_qp"}),
        ("retrieval", "kl_div", {"loss_qp", "loss_kd"}),
        ("retrieval", "m3_kd_loss", {"loss_kd"}),
        ("retrieval_answer", None, {"loss_qp", "loss_qa", "loss_norm"}),
        ("retrieval_answer", "m3_kd_loss", {"loss_kd", "loss_qa", "loss_norm"}),
        ("retrieval_answer_passage", None, {"loss_qp", "loss_qa", "loss_norm", "loss_ap"}),
        ("retrieval_answer_passage", "kl_div", {"loss_qp", "loss_qa", "loss_norm", "loss_ap", "loss_kd"}),
    ],
)
def test_terms_per_training_type(training_type, kd, expected_terms):
    cfg = _cfg(training_type=training_type, kd_loss_type=kd or "kl_div")
    out = compute_objectives(Q, P, cfg, a_reps=A, teacher_scores=TEACHER if kd else None)
    assert set(out.terms) == expected_terms


def test_weighted_sum_uses_configured_weights():
    cfg = _cfg(
        training_type="retrieval_answer_passage", qp_weight=2.0, qa_weight=0.5, ap_weight=0.3, norm_weight=4.0
    )
    out = compute_objectives(Q, P, cfg, a_reps=A)
    t = out.terms
    expected = 2.0 * t["loss_qp"] + 0.5 * t["loss_qa"] + 0.3 * t["loss_ap"] + 4.0 * t["loss_norm"]
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    # the terms themselves are the plain functions
    assert t["loss_qp"].item() == pytest.approx(info_nce(Q, P, 1.0, 2).item())
    assert t["loss_qa"].item() == pytest.approx(info_nce(Q, A, 1.0, 1).item())
    assert t["loss_ap"].item() == pytest.approx(info_nce(A, P, 1.0, 2).item())
    # answer norms 1 and sqrt(0.5): ((1-1)^2 + (0.7071-1)^2) / 2
    assert t["loss_norm"].item() == pytest.approx((1 - math.sqrt(0.5)) ** 2 / 2, abs=1e-6)


def test_default_weights_are_upstream():
    cfg = ObjectiveArguments()
    assert (cfg.temperature, cfg.answer_temperature, cfg.ap_weight, cfg.norm_weight) == (
        0.02,
        0.05,
        0.25,
        1.0,
    )
    assert cfg.training_type == "retrieval_answer"


def test_kl_div_term_uses_own_group_student_scores():
    cfg = _cfg(training_type="retrieval", teacher_temperature=2.0)
    out = compute_objectives(Q, P, cfg, teacher_scores=TEACHER)
    # own-group scores: q0 -> [1, 0], q1 -> [1, 1]
    expected = kl_div_loss(T([[1.0, 0.0], [1.0, 1.0]]), TEACHER, 2.0)
    assert out.terms["loss_kd"].item() == pytest.approx(expected.item(), abs=1e-6)


def test_no_in_batch_negatives_changes_qp_to_own_group():
    cfg = _cfg(training_type="retrieval")
    out = compute_objectives(Q, P, cfg, in_batch=False)
    assert out.terms["loss_qp"].item() == pytest.approx(
        (math.log(1 + math.exp(-1)) + math.log(2)) / 2, abs=1e-6
    )


def test_scores_are_fp32_under_half_inputs():
    # 1/0.02 = 50x unnormalised dot products overflow fp16 (max 65504); we compute in fp32
    q = torch.full((2, 64), 8.0, dtype=torch.float16)
    p = torch.full((4, 64), 8.0, dtype=torch.float16)
    loss = info_nce(q, p, 0.02, 2)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_answers_required_for_answer_types():
    with pytest.raises(ValueError, match="needs answer embeddings"):
        compute_objectives(Q, P, _cfg(training_type="retrieval_answer"))
