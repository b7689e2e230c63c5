"""The filters ``generate`` applies to written queries: length, duplicates, and round-trip consistency (a query must
find its own passage among the whole corpus with a retriever)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from rir_finetune.errors import UserError


def normalize_query(query: str) -> str:
    """The dedupe key: lower case, punctuation and extra whitespace removed."""
    return " ".join(re.sub(r"[^\w\s]", " ", query.lower()).split())


def length_ok(query: str, min_words: int, max_words: int) -> bool:
    n = len(query.split())
    return n >= min_words and (not max_words or n <= max_words)


class ConsistencyFilter:
    """Round-trip consistency: the rank of the source passage among the whole corpus for a generated query."""

    def __init__(self, cfg: Any, doc_ids: list[str], texts: list[str]):
        from rir_finetune.retrieval.cache import (
            cache_key,
            cached_corpus_encode,
            corpus_hash,
            default_cache_dir,
        )
        from rir_finetune.retrieval.encoder import Encoder
        from rir_finetune.retrieval.model_folder import model_fingerprint, read_settings

        if not Path(cfg.consistency_model).is_dir():
            raise UserError(
                f"{cfg.consistency_model}: model folder not found (config key 'consistency_model')"
            )
        settings = read_settings(cfg.consistency_model)
        self.encoder = Encoder(
            settings,
            batch_size=cfg.consistency_batch_size,
            device=cfg.consistency_device,
            show_progress=False,
            dtype=cfg.consistency_dtype,
            pack_sequences=cfg.consistency_pack_sequences,
        )
        key, described = cache_key(
            model_fingerprint(cfg.consistency_model),
            settings,
            corpus_hash(doc_ids, texts),
            self.encoder.dtype,
        )
        cache_dir = (Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()) if cfg.use_cache else None
        self.corpus_reps, hit = cached_corpus_encode(
            cache_dir, key, described, texts, self.encoder.encode_passages
        )  # (N, H)
        print(f"consistency: corpus embeddings {'from the cache' if hit else 'encoded'}", file=sys.stderr)
        self.k = cfg.consistency_top_k
        self.backend = cfg.search_backend

    def __call__(self, queries: list[str], rows: list[int]) -> list[tuple[int | None, float]]:
        """``(rank, score)`` of passage ``rows[i]`` for ``queries[i]``: 1-based rank within top k (else None)."""
        from rir_finetune.retrieval.search import exact_search

        q_reps = self.encoder.encode_queries(queries)  # (Q, H)
        _, top = exact_search(q_reps, self.corpus_reps, self.k, backend=self.backend)  # (Q, k)
        out = []
        for q, row, hits in zip(q_reps, rows, top.tolist(), strict=True):
            rank = hits.index(row) + 1 if row in hits else None
            out.append((rank, float(self.corpus_reps[row] @ q)))
        return out
