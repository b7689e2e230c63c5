"""Corpus embeddings cached on disk, keyed by what produced them, never by a folder name.

The key hashes the model's content (:func:`model_fingerprint`: weights, configs, tokenizer files), every encoder
setting (pooling, normalisation, max length, passage instruction) and the corpus (ids and the exact texts that were
encoded). Retraining into the same folder, or two models with the same folder name, therefore never reuses stale
vectors. Default location: ``$RIR_FINETUNE_CACHE`` if set, else ``$XDG_CACHE_HOME/rir_finetune/embeddings``, else
``~/.cache/rir_finetune/embeddings``. Each entry is ``<key>.npy`` (float32, one row per document) plus
``<key>.json`` (what went into the key, for people reading the folder). Files are written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rir_finetune.files import atomic_write
from rir_finetune.lifecycle import settings_fingerprint
from rir_finetune.retrieval.model_folder import EncoderSettings

CACHE_VERSION = 1  # bump when the encoder's numerics change


def default_cache_dir() -> Path:
    """Where corpus embeddings go unless ``cache_dir`` is configured."""
    if os.environ.get("RIR_FINETUNE_CACHE"):
        return Path(os.environ["RIR_FINETUNE_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "rir_finetune" / "embeddings"


def corpus_hash(doc_ids: list[str], texts: list[str]) -> str:
    """SHA-256 over every (id, text) pair in order."""
    h = hashlib.sha256()
    for doc_id, text in zip(doc_ids, texts, strict=True):
        h.update(doc_id.encode() + b"\0" + text.encode() + b"\0")
    return h.hexdigest()


def cache_key(
    model_fingerprint: str, settings: EncoderSettings, corpus_digest: str, dtype: str = "float32"
) -> tuple[str, dict]:
    """The cache key and the description it hashes. The model's path is not part of it, only its content.

    ``dtype``: what the encoder computed in (``Encoder.dtype``); fp32 keys are those of earlier versions."""
    fields = dataclasses.asdict(settings)
    fields.pop("transformer_dir")
    fields.pop("query_instruction")  # queries are never cached
    described = {
        "version": CACHE_VERSION,
        "model": model_fingerprint,
        "settings": fields,
        "corpus": corpus_digest,
    }
    if dtype != "float32":
        described["dtype"] = dtype
    key = settings_fingerprint(described, length=32)
    return key, described


def load_cached(cache_dir: str | Path, key: str, n_docs: int) -> np.ndarray | None:
    """The cached (n_docs, H) array, or ``None`` when absent or unreadable (then it is recomputed)."""
    path = Path(cache_dir) / f"{key}.npy"
    if not path.is_file():
        return None
    try:
        reps = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return reps if reps.ndim == 2 and reps.shape[0] == n_docs and reps.dtype == np.float32 else None


def save_cached(cache_dir: str | Path, key: str, reps: np.ndarray, described: dict) -> None:
    """Store ``reps`` (n_docs, H) float32 under ``key``."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)

    array = np.ascontiguousarray(reps, dtype=np.float32)
    atomic_write(cache_dir / f"{key}.npy", lambda f: np.save(f, array, allow_pickle=False), binary=True)
    atomic_write(cache_dir / f"{key}.json", lambda f: f.write(json.dumps(described, indent=2) + "\n"))


def cached_corpus_encode(
    cache_dir: str | Path | None,
    key: str,
    described: dict,
    texts: list[str],
    encode: Callable[[list[str]], np.ndarray],
    store: bool = True,
) -> tuple[np.ndarray, bool]:
    """``(reps, hit)``: the cached array for ``key`` or ``encode(texts)`` stored under it. ``cache_dir=None``: no cache.

    ``store=False`` reads hits but writes nothing (a read-only cache, see ``files.check_cache_dir``)."""
    if cache_dir is not None:
        reps = load_cached(cache_dir, key, len(texts))
        if reps is not None:
            return reps, True
    reps = np.asarray(encode(texts), dtype=np.float32)
    if cache_dir is not None and store:
        save_cached(cache_dir, key, reps, described)
    return reps, False
