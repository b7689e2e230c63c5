"""The whole-array form of the embedding store (:mod:`.store`), for callers that hold their passages in memory.

``cached_corpus_encode(cache_dir, key, described, texts, encode)`` returns the (N, H) float32 array of ``texts``,
read from the store ``<cache_dir>/<key>/`` or encoded and stored there (one shard). ``key`` and ``described`` come
from :func:`cache_key`, which hashes the model's content, the encoder settings, the corpus and the dtype, never a
folder name: retraining into the same folder, or two models with the same folder name, never reuses stale vectors.
``eval`` and ``mine`` use the sharded form directly (:mod:`.sharded`); the stores are the same.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from rir_finetune.retrieval.corpus import InMemoryCorpus
from rir_finetune.retrieval.model_folder import EncoderSettings
from rir_finetune.retrieval.store import (
    MANIFEST,
    EmbeddingStore,
    corpus_hash,
    default_cache_dir,
    fill_shards,
    store_identity,
    store_key,
)

__all__ = ["cache_key", "cached_corpus_encode", "corpus_hash", "default_cache_dir"]


def cache_key(
    model_fingerprint: str, settings: EncoderSettings, corpus_digest: str, dtype: str = "float32"
) -> tuple[str, dict]:
    """The store's key and the identity it hashes (float32 vectors on disk). These stores record row numbers as
    ids (the caller passes only texts), so their identity says so: a sharded store of the same corpus, which
    holds the real ids, never serves them or is served by them."""
    identity = {**store_identity(model_fingerprint, settings, corpus_digest, dtype), "ids": "row numbers"}
    return store_key(identity), identity


def cached_corpus_encode(
    cache_dir: str | Path | None,
    key: str,
    described: dict,
    texts: list[str],
    encode: Callable[[list[str]], np.ndarray],
    store: bool = True,
) -> tuple[np.ndarray, bool]:
    """``(reps, hit)``: the stored (N, H) array for ``key`` or ``encode(texts)`` stored under it. ``cache_dir=None``:
    no cache. ``store=False`` reads hits but writes nothing (a read-only cache, see ``files.check_cache_dir``)."""
    folder = Path(cache_dir) / key if cache_dir is not None else None
    if folder is not None and (folder / MANIFEST).is_file():
        found = EmbeddingStore.open(folder, described, len(texts), len(texts), create=False)
        if not found.pending():
            return np.concatenate([v for _, v in found.iter_vectors()]), True
    if folder is None or not store:
        return np.asarray(encode(texts), dtype=np.float32), False
    made = EmbeddingStore.open(folder, described, len(texts), max(1, len(texts)))
    corpus = InMemoryCorpus([str(i) for i in range(len(texts))], texts)
    fill_shards(made, corpus, made.pending(), encode)
    return np.concatenate([v for _, v in made.iter_vectors()]), False
