"""Searching the stored corpus (:mod:`.store`): exactly, or through an approximate faiss index.

- ``flat``: exact inner product, shard by shard (one shard in memory at a time), the per-shard top-k merged by
  faiss's own heap, which breaks ties as one index over the whole corpus does: the same hits and scores as
  :func:`.search.exact_search` over all vectors at once.
- ``ivf``: IVF-Flat, trained on a seeded sample of the corpus; ``nlist`` clusters (default 4 sqrt(N), at most
  N / 39, faiss's least training points per cluster) and ``nprobe`` of them searched per query.
- ``hnsw``: an HNSW graph (M = 32) searched with ``ef_search`` candidates per query (at least k).

``nprobe`` / ``ef_search`` unset are tuned on the first queries searched: raised (doubled, then bisected) to the
smallest value whose recall@k of exact search, on a seeded sample of ``recall_sample`` of those queries, reaches
``target_recall``. No fixed share of the clusters holds at every corpus size: on SciFact (5,183 passages, 132
clusters) recall@100 reaches 0.99 only at three quarters of them, a share that would scan most of a corpus of
millions for no gain (benchmarks/README.md). The recall reached is in the command's summary, so users see what
they traded.

Every vector of an approximate index is in memory (the index holds them), added shard by shard. With a faiss built
for GPUs (``faiss.get_num_gpus() > 0``) flat and ivf run on the GPUs; HNSW has no GPU form in faiss. Queries are
searched in batches of ``QUERY_BATCH``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from rir_finetune.config import option
from rir_finetune.errors import UserError
from rir_finetune.retrieval.search import exact_search
from rir_finetune.retrieval.store import STORE_DTYPES, EmbeddingStore

INDEX_KINDS = ("flat", "ivf", "hnsw")
QUERY_BATCH = 4096  # queries per call of an approximate index: bounds its per-call buffers
HNSW_M = 32  # graph degree: faiss's usual choice for embeddings of a few hundred dimensions
HNSW_EF_CONSTRUCTION = 200  # build-time candidates: the graph's quality, paid once
TRAIN_POINTS_PER_LIST = 64  # k-means sample per IVF cluster: above faiss's warning (39), bounded in memory
GPU_MAX_K = 2048  # faiss's GPU k-selection handles at most this many hits per query
SEED = 0


@dataclass
class CorpusIndexKeys:
    """How the corpus is stored and searched; every command that encodes a corpus has these keys."""

    index: str = option(
        "flat", "corpus search: flat (exact) | ivf (IVF-Flat) | hnsw; ivf and hnsw approximate"
    )
    nlist: int | None = option(
        None, "ivf: clusters; None: 4 x sqrt(passages), at most passages / 39", range=">=1"
    )
    nprobe: int | None = option(
        None, "ivf: clusters searched per query; None: tuned to target_recall", range=">=1"
    )
    ef_search: int | None = option(
        None, "hnsw: candidates per query; None: tuned to target_recall", range=">=1"
    )
    target_recall: float = option(
        0.99, "ivf / hnsw: recall@k of exact search that tuning nprobe / ef_search aims for", range="(0, 1]"
    )
    recall_sample: int = option(
        500,
        "ivf / hnsw: queries (seeded sample) on which recall of exact search is tuned and reported",
        range=">=1",
    )
    store_dtype: str = option("float32", "corpus embeddings on disk: float32 | float16 (half the space)")
    shard_size: int = option(
        20_000,
        "passages per embedding-store shard: the unit of resuming and of work between processes",
        range=">=1",
    )

    def __post_init__(self):
        self.store_dtype = {"fp32": "float32", "fp16": "float16"}.get(self.store_dtype, self.store_dtype)
        checks = [
            ("index", self.index in INDEX_KINDS, f"must be one of {', '.join(INDEX_KINDS)}"),
            ("store_dtype", self.store_dtype in STORE_DTYPES, f"must be one of {', '.join(STORE_DTYPES)}"),
            (
                "search_backend",
                self.index == "flat" or getattr(self, "search_backend", "auto") != "torch",
                f"torch searches exactly only; index {self.index!r} needs faiss (search_backend auto or faiss)",
            ),
        ]
        for key, ok, msg in checks:
            if not ok:
                raise UserError(f"config key {key!r}: {msg}, got {getattr(self, key)!r}")


def default_nlist(n: int) -> int:
    return max(1, min(round(4 * math.sqrt(n)), n // 39))


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


class CorpusSearcher:
    """Search ``store`` as ``keys`` say (``index``, ``nlist``, ``nprobe``, ``ef_search``, tuning); ``backend``
    (flat only): auto | faiss | torch, as :func:`.search.exact_search`."""

    def __init__(self, store: EmbeddingStore, keys: CorpusIndexKeys, backend: str = "auto"):
        self.store, self.kind, self.backend = store, keys.index, backend
        self.faiss = _faiss() if backend in ("auto", "faiss") else None
        if self.faiss is None and (backend == "faiss" or self.kind != "flat"):
            raise UserError(f"config key 'index': {self.kind} search needs faiss (pip install faiss-cpu)")
        self.gpus = self.faiss.get_num_gpus() if self.faiss is not None else 0
        self.target, self.sample = keys.target_recall, keys.recall_sample
        self.params: dict[str, int] = {}
        self.tuned = False  # nprobe / ef_search set by tuning (else given)
        self.measured: tuple[int, float, int] | None = None  # (k, recall@k, sampled queries)
        self.index: Any = None
        if self.kind == "ivf":
            self.params["nlist"] = min(keys.nlist or default_nlist(store.count), store.count)
            if keys.nprobe:
                self.params["nprobe"] = min(keys.nprobe, self.params["nlist"])
        elif self.kind == "hnsw" and keys.ef_search:
            self.params["ef_search"] = keys.ef_search
        if self.kind != "flat":
            self.index = self._build()

    # -- exact ---------------------------------------------------------------------------------------------------

    def exact(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, min(k, N)) scores and rows, best first, over every shard."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self.store.count)
        if len(queries) == 0:
            return np.zeros((0, k), dtype=np.float32), np.zeros((0, k), dtype=np.int64)
        if self.faiss is None:
            return self._exact_torch(queries, k)
        heap = self.faiss.ResultHeap(len(queries), k, keep_max=True)
        for start, vecs in self.store.iter_vectors():
            scores, rows = self._knn(queries, vecs, min(k, len(vecs)))
            heap.add_result(scores, rows + start)
        heap.finalize()
        return heap.D, heap.I

    def _knn(self, queries: np.ndarray, vecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        f = self.faiss
        if self.gpus and k <= GPU_MAX_K:
            if not hasattr(self, "_gpu_res"):
                self._gpu_res = f.StandardGpuResources()
            return f.knn_gpu(self._gpu_res, queries, vecs, k, metric=f.METRIC_INNER_PRODUCT)
        return f.knn(queries, vecs, k, metric=f.METRIC_INNER_PRODUCT)

    def _exact_torch(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        best_s = np.zeros((len(queries), 0), dtype=np.float32)
        best_r = np.zeros((len(queries), 0), dtype=np.int64)
        for start, vecs in self.store.iter_vectors():
            scores, rows = exact_search(
                queries, np.array(vecs), k, backend="torch"
            )  # torch wants writable memory
            best_s, best_r = np.hstack([best_s, scores]), np.hstack([best_r, rows + start])
            order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]  # ties: the earlier row first
            best_s, best_r = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_r, order, 1)
        return best_s, best_r

    # -- approximate ---------------------------------------------------------------------------------------------

    def _build(self) -> Any:
        f, n, dim = self.faiss, self.store.count, self.store.dim
        if self.kind == "ivf":
            index = f.index_factory(dim, f"IVF{self.params['nlist']},Flat", f.METRIC_INNER_PRODUCT)
            if self.gpus:
                index = f.index_cpu_to_all_gpus(index)
            size = min(n, TRAIN_POINTS_PER_LIST * self.params["nlist"])
            index.train(self.store.rows(np.sort(np.random.default_rng(SEED).choice(n, size, replace=False))))
        else:
            index = f.index_factory(dim, f"HNSW{HNSW_M},Flat", f.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        for _, vecs in self.store.iter_vectors():  # rows get ids 0..N-1 in order
            index.add(vecs)
        return index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, min(k, N)) scores and rows, best first, by the configured index (rows of -1: fewer hits found).
        An approximate index is tuned (unless its parameter was given) and measured on the first call."""
        if self.kind == "flat":
            return self.exact(queries, k)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self.store.count)
        if self.measured is None and len(queries):
            self._tune_and_measure(queries, k)
        return self._approximate(queries, k)

    def _approximate(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        gpu = self.gpus and self.kind == "ivf"
        space = self.faiss.GpuParameterSpace() if gpu else self.faiss.ParameterSpace()
        if self.kind == "ivf":
            space.set_index_parameter(self.index, "nprobe", self.params["nprobe"])
        else:
            space.set_index_parameter(self.index, "efSearch", max(self.params["ef_search"], k))
        scores = np.empty((len(queries), k), dtype=np.float32)
        rows = np.empty((len(queries), k), dtype=np.int64)
        for b in range(0, len(queries), QUERY_BATCH):
            batch = queries[b : b + QUERY_BATCH]
            scores[b : b + QUERY_BATCH], rows[b : b + QUERY_BATCH] = self.index.search(batch, k)
        return scores, rows

    def _tune_and_measure(self, queries: np.ndarray, k: int) -> None:
        """On a seeded sample of ``queries``: the parameter (when not given) to its smallest value whose recall@k
        reaches the target (doubling, then bisecting), then the recall it reaches."""
        chosen = np.sort(
            np.random.default_rng(SEED).choice(len(queries), min(self.sample, len(queries)), False)
        )
        sample = queries[chosen]
        _, exact = self.exact(sample, k)
        name = "nprobe" if self.kind == "ivf" else "ef_search"

        def recall_at(value: int) -> float:
            self.params[name] = value
            _, approx = self._approximate(sample, k)
            return _recall(approx, exact)

        if name not in self.params:
            self.tuned = True
            low, high = (1, self.params["nlist"]) if self.kind == "ivf" else (k, max(k, self.store.count))
            value, failed = low, low - 1
            while recall_at(value) < self.target and value < high:
                failed, value = value, min(high, 2 * value)
            while value - failed > 1:  # the smallest passing value lies in (failed, value]
                mid = (failed + value) // 2
                failed, value = (mid, value) if recall_at(mid) < self.target else (failed, mid)
            self.params[name] = value
        self.measured = (k, recall_at(self.params[name]), len(chosen))

    # -- what was traded ---------------------------------------------------------------------------------------

    def summary(self) -> str:
        """One line for the command's summary: the index and, for an approximate one, the recall it reached."""
        if self.measured is None:
            return (
                "index flat: exact search" if self.kind == "flat" else f"index {self.kind}: no query searched"
            )
        k, recall, n = self.measured
        params = ", ".join(f"{key} {v}" for key, v in self.params.items())
        how = f"tuned to {self.target}" if self.tuned else "as given"
        return f"index {self.kind} ({params}, {how}): recall@{k} {recall:.4f} of exact search on {n} sampled queries"

    def report(self) -> dict[str, Any]:
        """The same, for a result file."""
        out: dict[str, Any] = {"index": self.kind, **self.params}
        if self.measured is not None:
            k, recall, n = self.measured
            out.update(tuned=self.tuned, recall_k=k, recall_vs_exact=round(recall, 6), recall_queries=n)
        return out


def _recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each query's exact top k (rows of ``exact``) found in its approximate top k."""
    return float(
        np.mean([len(set(a.tolist()) & set(e.tolist())) / len(e) for a, e in zip(approx, exact, strict=True)])
    )
