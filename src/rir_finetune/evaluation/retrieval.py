"""Encode -> search -> metrics, for any pair of encode callables (the ``eval`` command's model, or a model that is
being trained). Nothing here touches ``torch.distributed``: call it on one rank and broadcast the result.

Example (a trainer's in-memory model)::

    dataset = load_beir("../shared/data/scifact", "test")
    metrics = evaluate_retrieval(encode_queries, encode_passages, dataset, k_values=[10, 100])
    metrics["ndcg@10"]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from rir_finetune.evaluation.answers import ANSWER_PREFIX, DEFAULT_ALPHA, query_side_reps
from rir_finetune.evaluation.metrics import DEFAULT_K_VALUES, compute_metrics
from rir_finetune.retrieval.data import DEFAULT_CORPUS_TEXT_FORMAT, RetrievalDataset
from rir_finetune.retrieval.search import build_run, exact_search

EncodeFn = Callable[[list[str]], np.ndarray]  # texts -> (n, H) float32 embeddings, in input order
# (query reps (Q, H), k) -> (scores, corpus rows), both (Q, k), best first: a searcher over a stored corpus
SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def retrieve(
    query_reps: np.ndarray,
    corpus_reps: np.ndarray | None,
    query_ids: list[str],
    doc_ids: Sequence[str],
    *,
    top_k: int = 1000,
    ignore_identical_ids: bool = True,
    search_backend: str = "auto",
    search: SearchFn | None = None,
) -> dict[str, dict[str, float]]:
    """Search query_reps (Q, H): ``{query id: {doc id: score}}``, top_k each. Exact search against corpus_reps
    (N, H), or ``search`` (e.g. :meth:`CorpusSearcher.search` over the embedding store; corpus_reps unused)."""
    extra = 1 if ignore_identical_ids else 0  # one hit may be the query itself
    if search is not None:
        scores, indices = search(query_reps, top_k + extra)
    else:
        scores, indices = exact_search(query_reps, corpus_reps, top_k + extra, backend=search_backend)
    return build_run(query_ids, doc_ids, scores, indices, top_k, ignore_identical_ids)


def run_retrieval(
    encode_queries: EncodeFn,
    encode_corpus: EncodeFn,
    dataset: RetrievalDataset,
    *,
    top_k: int = 1000,
    ignore_identical_ids: bool = True,
    search_backend: str = "auto",
    corpus_text_format: str = DEFAULT_CORPUS_TEXT_FORMAT,
    corpus_reps: np.ndarray | None = None,
    mode: str = "query",
    answers: dict[str, str] | None = None,
    alpha: float = DEFAULT_ALPHA,
    answer_prefix: str = ANSWER_PREFIX,
    renormalize: bool = False,
    answers_source: str = "answers",
    search: SearchFn | None = None,
    doc_ids: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Encode the judged queries (sorted by id) and the corpus, search, and return the run.

    ``encode_corpus`` also encodes answers (``mode`` answer or fused): answers are passages. ``corpus_reps``
    (N, H), in ``dataset.corpus`` order, skips encoding the corpus (e.g. from the cache). ``search`` with
    ``doc_ids`` (the id of each row it returns) searches a stored corpus instead: ``dataset.corpus`` is not read.
    """
    query_ids = sorted(dataset.queries)
    q_reps = query_side_reps(
        query_ids,
        [dataset.queries[q] for q in query_ids],
        encode_queries,
        encode_corpus,
        mode=mode,
        answers=answers,
        alpha=alpha,
        answer_prefix=answer_prefix,
        renormalize=renormalize,
        answers_source=answers_source,
    )  # (Q, H)
    if search is None:
        doc_ids, doc_texts = dataset.corpus_texts(corpus_text_format)
        if corpus_reps is None:
            corpus_reps = np.asarray(encode_corpus(doc_texts), dtype=np.float32)  # (N, H)
    assert doc_ids is not None, "search needs doc_ids"
    return retrieve(
        q_reps,
        corpus_reps,
        query_ids,
        doc_ids,
        top_k=top_k,
        ignore_identical_ids=ignore_identical_ids,
        search_backend=search_backend,
        search=search,
    )


def evaluate_retrieval(
    encode_queries: EncodeFn,
    encode_corpus: EncodeFn,
    dataset: RetrievalDataset,
    k_values: list[int] | tuple[int, ...] = DEFAULT_K_VALUES,
    *,
    top_k: int | None = None,
    **kwargs,
) -> dict[str, float]:
    """Flat metrics (``ndcg@10``, ``recall@100``, ``mrr@10``, ...) of the two encoders on ``dataset``.

    ``top_k`` defaults to ``max(k_values)``; other keywords as :func:`run_retrieval` (``mode``, ``answers``,
    ``alpha``, ``ignore_identical_ids``, ``search_backend``, ``corpus_reps``, ...).
    """
    top_k = max(k_values) if top_k is None else top_k
    run = run_retrieval(encode_queries, encode_corpus, dataset, top_k=top_k, **kwargs)
    return compute_metrics(dataset.qrels, run, k_values)
