"""Retrieval metrics by pytrec_eval (trec_eval's definitions), averaged over every judged query.

Per query and cut-off k, with trec_eval's ranking (score descending; ties by doc id, descending):

- ``ndcg@k``: trec_eval ``ndcg_cut_k`` (graded gains, log2 discount);
- ``map@k``: ``map_cut_k`` (average precision over the top k, divided by the number of relevant documents);
- ``recall@k``: ``recall_k``; ``precision@k``: ``P_k`` (relevant in top k / k);
- ``mrr@k``: trec_eval ``recip_rank`` of the run cut to its top k, i.e. 1 / rank of the first relevant document
  within the top k, else 0 (trec_eval has no cut-off for recip_rank, so the run is cut first, in the same order).

A document is relevant when its judgement is >= 1. Every average is over all queries of the qrels: a judged query
with no retrieved documents counts 0 (trec_eval alone would leave it out). Run entries for unjudged queries are
ignored.
"""

from __future__ import annotations

import pytrec_eval

DEFAULT_K_VALUES = (1, 3, 5, 10, 100, 1000)
METRICS = ("ndcg", "map", "recall", "precision", "mrr")
_TREC_NAMES = {"ndcg": "ndcg_cut", "map": "map_cut", "recall": "recall", "precision": "P"}


def trec_order(hits: dict[str, float]) -> list[tuple[str, float]]:
    """``(doc id, score)`` pairs in trec_eval's ranking order: score descending, then doc id descending."""
    return sorted(hits.items(), key=lambda item: (item[1], item[0]), reverse=True)


def per_query_metrics(
    qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]], k_values: list[int] | tuple[int, ...]
) -> dict[str, dict[str, float]]:
    """``{query id: {"ndcg@10": ..., ...}}`` for every judged query (0 for metrics of queries with no hits)."""
    k_values = sorted(set(k_values))
    ks = ",".join(map(str, k_values))
    qrels = {qid: {d: int(r) for d, r in docs.items()} for qid, docs in qrels.items()}
    judged_run = {qid: hits for qid, hits in run.items() if qid in qrels and hits}
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {f"{name}.{ks}" for name in _TREC_NAMES.values()})
    trec = evaluator.evaluate(judged_run)
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"})
    ranked = {qid: trec_order(hits) for qid, hits in judged_run.items()}
    mrr = {k: rr.evaluate({qid: dict(pairs[:k]) for qid, pairs in ranked.items()}) for k in k_values}
    out: dict[str, dict[str, float]] = {}
    for qid in qrels:
        values: dict[str, float] = {}
        for metric in METRICS:
            for k in k_values:
                if metric == "mrr":
                    value = mrr[k].get(qid, {}).get("recip_rank", 0.0)
                else:
                    value = trec.get(qid, {}).get(f"{_TREC_NAMES[metric]}_{k}", 0.0)
                values[f"{metric}@{k}"] = float(value)
        out[qid] = values
    return out


def compute_metrics(
    qrels: dict[str, dict[str, int]],
    run: dict[str, dict[str, float]],
    k_values: list[int] | tuple[int, ...] = DEFAULT_K_VALUES,
) -> dict[str, float]:
    """Flat ``{"ndcg@10": mean, "recall@100": mean, "mrr@10": mean, ...}`` over all judged queries."""
    if not qrels:
        raise ValueError("no judged queries")
    return mean_metrics(per_query_metrics(qrels, run, k_values))


def mean_metrics(per_query: dict[str, dict[str, float]]) -> dict[str, float]:
    """The mean of every metric over the queries of :func:`per_query_metrics` (what ``metrics.json`` reports)."""
    if not per_query:
        raise ValueError("no judged queries")
    names = next(iter(per_query.values())).keys()
    return {name: sum(v[name] for v in per_query.values()) / len(per_query) for name in names}
