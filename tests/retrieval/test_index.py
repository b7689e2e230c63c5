"""Searching the store: flat over shards equals one exact search over all vectors (hits, scores and ties); ivf and
hnsw are tuned to the target recall and report it; the keys are checked."""

from __future__ import annotations

import numpy as np
import pytest

from rir_finetune.errors import UserError
from rir_finetune.retrieval.corpus import InMemoryCorpus
from rir_finetune.retrieval.index import CorpusIndexKeys, CorpusSearcher, _recall, default_nlist
from rir_finetune.retrieval.model_folder import EncoderSettings
from rir_finetune.retrieval.search import exact_search
from rir_finetune.retrieval.store import EmbeddingStore, fill_shards, store_identity


def make_store(folder, vectors: np.ndarray, shard_size: int) -> EmbeddingStore:
    """A store whose row i holds vectors[i] (the 'encoder' looks rows up by their text, the row number)."""
    n = len(vectors)
    ident = store_identity("fp", EncoderSettings("m", "mean", True, 8, "", ""), f"random {n}")
    store = EmbeddingStore.open(folder, ident, n, shard_size)
    corpus = InMemoryCorpus([f"d{i}" for i in range(n)], [str(i) for i in range(n)])
    fill_shards(store, corpus, store.pending(), lambda texts: vectors[[int(t) for t in texts]])
    return store


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Normalised points around 50 centres: the shape of text embeddings more than uniform noise is."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, dim))
    return unit(centres[rng.integers(0, 50, n)] + 0.4 * rng.standard_normal((n, dim)))


@pytest.fixture(scope="module")
def corpus_vectors():
    vecs = unit(np.random.default_rng(0).standard_normal((1500, 16)))
    vecs[100:105] = vecs[7]  # exact duplicates: score ties, which must break as one index breaks them
    return vecs


@pytest.mark.parametrize("n_queries", [3, 40])  # faiss computes fewer than 20 queries without BLAS
@pytest.mark.parametrize("shard_size", [1500, 256, 100])
def test_flat_over_shards_equals_one_exact_search(tmp_path, corpus_vectors, shard_size, n_queries):
    queries = unit(np.random.default_rng(1).standard_normal((n_queries, 16)))
    queries[0] = corpus_vectors[7]
    store = make_store(tmp_path, corpus_vectors, shard_size)
    want_s, want_i = exact_search(queries, corpus_vectors, 120, backend="faiss")
    searcher = CorpusSearcher(store, CorpusIndexKeys())
    got_s, got_i = searcher.search(queries, 120)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_s, want_s)
    assert got_i[0][:6].tolist() == [105 - 1 - j for j in range(5)] + [7]  # the tie order of IndexFlatIP
    # the torch back-end: the same hits (its ties and last bits may differ from faiss's)
    t_s, t_i = CorpusSearcher(store, CorpusIndexKeys(), backend="torch").search(queries, 120)
    np.testing.assert_allclose(t_s, want_s, atol=1e-5)
    assert _recall(t_i[1:], want_i[1:]) > 0.99
    assert searcher.summary() == "index flat: exact search" and searcher.report() == {"index": "flat"}


def test_k_larger_than_a_shard_and_than_the_corpus(tmp_path, corpus_vectors):
    store = make_store(tmp_path, corpus_vectors[:50], 20)
    q = corpus_vectors[:4]
    scores, rows = CorpusSearcher(store, CorpusIndexKeys()).search(q, 80)
    assert rows.shape == (4, 50) and sorted(rows[0].tolist()) == list(range(50))
    assert CorpusSearcher(store, CorpusIndexKeys()).search(q[:0], 5)[1].shape == (0, 5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_is_tuned_to_the_target_and_reports_it(tmp_path, kind):
    vecs = clustered(4000, 24, seed=2)
    queries = clustered(300, 24, seed=3)
    store = make_store(tmp_path, vecs, 1000)
    searcher = CorpusSearcher(store, CorpusIndexKeys(index=kind, target_recall=0.95, recall_sample=300))
    _, rows = searcher.search(queries, 50)
    _, exact = CorpusSearcher(store, CorpusIndexKeys()).search(queries, 50)
    k, recall, n = searcher.measured
    assert (k, n) == (50, 300) and recall == pytest.approx(_recall(rows, exact))  # every query was sampled
    assert 0.95 <= recall < 1.0  # tuned to the smallest value reaching the target, not to exhaustive search
    name = "nprobe" if kind == "ivf" else "ef_search"
    report = searcher.report()
    assert report["tuned"] is True and report["recall_k"] == 50 and report[name] == searcher.params[name]
    assert (
        f"tuned to 0.95): recall@50 {recall:.4f} of exact search on 300 sampled queries" in searcher.summary()
    )
    # one step below the tuned value misses the target on the same sample (the smallest passing value)
    lower = CorpusIndexKeys(index=kind, recall_sample=300, **{name: searcher.params[name] - 1})
    below = CorpusSearcher(store, lower)
    below.search(queries, 50)
    assert below.measured[1] < 0.95 and "as given" in below.summary()


def test_ivf_parameters_as_given(tmp_path):
    store = make_store(tmp_path, clustered(2000, 8, seed=4), 2000)
    searcher = CorpusSearcher(store, CorpusIndexKeys(index="ivf", nlist=10, nprobe=10))
    _, rows = searcher.search(clustered(20, 8, seed=5), 30)
    assert searcher.params == {"nlist": 10, "nprobe": 10} and searcher.measured[1] == 1.0  # every list probed
    assert rows.shape == (20, 30)


def test_default_nlist():
    assert default_nlist(5183) == 132  # 4 sqrt(N) = 288 would leave < 39 training points per cluster
    assert default_nlist(1_000_000) == 4000 and default_nlist(10) == 1


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"index": "ivf-pq"}, "'index': must be one of flat, ivf, hnsw"),
        ({"store_dtype": "bfloat16"}, "'store_dtype': must be one of float32, float16"),
    ],
)
def test_key_errors(keys, message):
    with pytest.raises(UserError, match=message):
        CorpusIndexKeys(**keys)
    assert CorpusIndexKeys(store_dtype="fp16").store_dtype == "float16"
