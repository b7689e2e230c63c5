"""Exact inner-product search: faiss ``IndexFlatIP`` in fp32, or torch matmul + top-k in chunks without faiss.

Scores are inner products of the vectors as given (cosine when the encoder normalises). Both back-ends return the
same ranking up to ties.
"""

from __future__ import annotations

import numpy as np
import torch

BACKENDS = ("auto", "faiss", "torch")


def _import_faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def exact_search(
    query_reps: np.ndarray,
    corpus_reps: np.ndarray,
    k: int,
    backend: str = "auto",
    query_chunk: int = 1024,
    corpus_chunk: int = 65_536,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` highest inner products of each query with the corpus.

    query_reps: (Q, H); corpus_reps: (N, H). Returns ``(scores, indices)``, both (Q, min(k, N)), best first;
    indices are rows of ``corpus_reps``. ``backend``: ``faiss``, ``torch`` or ``auto`` (faiss when importable).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown search backend {backend!r}")
    query_reps = np.ascontiguousarray(query_reps, dtype=np.float32)
    corpus_reps = np.ascontiguousarray(corpus_reps, dtype=np.float32)
    k = min(k, corpus_reps.shape[0])
    faiss = _import_faiss() if backend in ("auto", "faiss") else None
    if backend == "faiss" and faiss is None:
        raise ImportError("search backend 'faiss' requested but faiss is not installed")
    if k == 0 or query_reps.shape[0] == 0:
        empty = np.zeros((query_reps.shape[0], k))
        return empty.astype(np.float32), empty.astype(np.int64)
    if faiss is not None:
        index = faiss.IndexFlatIP(corpus_reps.shape[1])
        index.add(corpus_reps)
        scores, indices = index.search(query_reps, k)
        return scores, indices.astype(np.int64)
    return _torch_search(
        torch.from_numpy(query_reps), torch.from_numpy(corpus_reps), k, query_chunk, corpus_chunk
    )


def _torch_search(
    q: torch.Tensor, c: torch.Tensor, k: int, query_chunk: int, corpus_chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    """q: (Q, H), c: (N, H). Running top-k over corpus chunks; returns (Q, k) scores and indices as numpy."""
    all_scores, all_indices = [], []
    for qs in range(0, q.shape[0], query_chunk):
        q_chunk = q[qs : qs + query_chunk]  # (q, H)
        best_s = torch.empty((q_chunk.shape[0], 0))
        best_i = torch.empty((q_chunk.shape[0], 0), dtype=torch.long)
        for cs in range(0, c.shape[0], corpus_chunk):
            scores = q_chunk @ c[cs : cs + corpus_chunk].T  # (q, n)
            top_s, top_i = scores.topk(min(k, scores.shape[1]), dim=1)  # (q, k')
            merged_s = torch.cat([best_s, top_s], dim=1)  # (q, k + k')
            merged_i = torch.cat([best_i, top_i + cs], dim=1)
            best_s, pos = merged_s.topk(min(k, merged_s.shape[1]), dim=1)  # (q, k)
            best_i = merged_i.gather(1, pos)
        all_scores.append(best_s)
        all_indices.append(best_i)
    return torch.cat(all_scores).numpy(), torch.cat(all_indices).numpy()


def build_run(
    query_ids: list[str],
    doc_ids: list[str],
    scores: np.ndarray,
    indices: np.ndarray,
    top_k: int,
    ignore_identical_ids: bool = True,
) -> dict[str, dict[str, float]]:
    """A TREC-style run ``{query id: {doc id: score}}`` with at most ``top_k`` documents per query.

    scores, indices: (Q, k) from :func:`exact_search`. With ``ignore_identical_ids`` (BEIR's default) a document
    whose id equals the query id is dropped, so search for ``top_k + 1`` hits to keep ``top_k``.
    """
    run: dict[str, dict[str, float]] = {}
    for qid, row_s, row_i in zip(query_ids, scores, indices, strict=True):
        hits: dict[str, float] = {}
        for s, i in zip(row_s.tolist(), row_i.tolist(), strict=True):
            if i < 0 or len(hits) >= top_k:  # faiss marks missing hits with -1
                continue
            doc_id = doc_ids[i]
            if ignore_identical_ids and doc_id == qid:
                continue
            hits[doc_id] = float(s)
        run[qid] = hits
    return run
