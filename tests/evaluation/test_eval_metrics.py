"""Metrics on constructed runs, against values computed by hand (trec_eval definitions, log2 discounts)."""

import math

import pytest

from rir_finetune.evaluation.metrics import compute_metrics, per_query_metrics

QRELS = {
    "q1": {"d1": 1, "d3": 2, "d2": 0},  # graded: d3 counts twice as much as d1; d2 judged non-relevant
    "q2": {"d5": 1},
    "q3": {"d9": 1},  # judged, but the run retrieves nothing for it: every metric 0, still in the average
}
RUN = {
    "q1": {"d2": 0.9, "d1": 0.8, "d3": 0.7, "d4": 0.6},  # relevant at ranks 2 (rel 1) and 3 (rel 2)
    "q2": {"d6": 0.9, "d7": 0.8, "d8": 0.7, "d5": 0.6},  # relevant at rank 4
    "unjudged": {"d1": 1.0},  # not in the qrels: ignored
}


def test_per_query_values_by_hand():
    m = per_query_metrics(QRELS, RUN, [1, 3, 5])
    # q1: DCG@3 = 0/log2(2) + 1/log2(3) + 2/log2(4) = 0.630930 + 1 = 1.630930
    #     IDCG@3 = 2/log2(2) + 1/log2(3) = 2.630930; nDCG@3 = 0.619906 (d4 at rank 4 adds 0 for @5)
    assert m["q1"]["ndcg@3"] == pytest.approx((1 / math.log2(3) + 1) / (2 + 1 / math.log2(3)), abs=1e-6)
    assert m["q1"]["ndcg@3"] == pytest.approx(0.619906, abs=1e-6)
    assert m["q1"]["ndcg@1"] == 0.0
    assert m["q1"]["recall@1"] == 0.0 and m["q1"]["recall@3"] == 1.0
    assert m["q1"]["precision@3"] == pytest.approx(2 / 3)
    assert m["q1"]["precision@5"] == pytest.approx(2 / 5)  # P@k divides by k even with 4 hits
    assert m["q1"]["mrr@1"] == 0.0 and m["q1"]["mrr@3"] == 0.5
    # AP: precision at each relevant hit, summed, / number of relevant documents
    assert m["q1"]["map@3"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    # q2: the only relevant document at rank 4: nDCG@5 = (1/log2(5)) / 1 = 0.430677, MRR@5 = 1/4, MAP@5 = 1/4
    assert m["q2"]["ndcg@3"] == 0.0 and m["q2"]["mrr@3"] == 0.0 and m["q2"]["recall@3"] == 0.0
    assert m["q2"]["ndcg@5"] == pytest.approx(1 / math.log2(5), abs=1e-9)
    assert m["q2"]["mrr@5"] == 0.25 and m["q2"]["map@5"] == 0.25 and m["q2"]["recall@5"] == 1.0
    assert set(m["q3"].values()) == {0.0}
    assert set(m) == {"q1", "q2", "q3"}


def test_averages_count_judged_queries_without_hits_as_zero():
    m = compute_metrics(QRELS, RUN, [3, 5])
    # means over the 3 judged queries (q3 contributes 0 everywhere)
    assert m["ndcg@3"] == pytest.approx(0.619906 / 3, abs=1e-6)  # 0.206635
    assert m["ndcg@5"] == pytest.approx((0.619906 + 0.430677) / 3, abs=1e-6)  # 0.350194
    assert m["recall@3"] == pytest.approx(1 / 3) and m["recall@5"] == pytest.approx(2 / 3)
    assert m["mrr@3"] == pytest.approx(0.5 / 3) and m["mrr@5"] == pytest.approx((0.5 + 0.25) / 3)
    assert m["precision@5"] == pytest.approx((2 / 5 + 1 / 5) / 3)
    assert m["map@5"] == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1 / 4) / 3)
    assert list(m) == [
        f"{name}@{k}" for name in ("ndcg", "map", "recall", "precision", "mrr") for k in (3, 5)
    ]


def test_mrr_cut_breaks_ties_like_trec_eval():
    # equal scores: trec_eval orders by doc id descending, so "b" ranks above "a" for every metric, MRR included
    m = per_query_metrics({"q": {"a": 1}}, {"q": {"a": 0.5, "b": 0.5}}, [1, 2])["q"]
    assert m["ndcg@1"] == 0.0 and m["mrr@1"] == 0.0
    assert m["mrr@2"] == 0.5 and m["recall@2"] == 1.0
