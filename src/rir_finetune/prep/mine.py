"""``rir-finetune mine``: hard negatives for every training record, from a dense model or BM25.

    rir-finetune mine --input train.jsonl --output train.mined.jsonl \
        --model all-MiniLM-L6-v2/ --corpus data/scifact --negatives 15 --range_for_sampling 10-210

Every query is searched against the candidate pool (a BEIR ``corpus.jsonl`` with ``--corpus``, else every passage
of the records, pos and neg): a dense model through the embedding store and faiss (``--index flat``, exact inner
product, or an approximate ``ivf`` / ``hnsw``, see :mod:`rir_finetune.retrieval.index`), or BM25 (``--model bm25``,
bm25s). A dense ``--corpus`` is streamed: its texts are never all in memory, only their embeddings (on disk,
sharded, resumable; ``torchrun --nproc_per_node N -m rir_finetune mine ...`` encodes it with N processes) and an
8-byte key per passage, with which candidates are compared. Candidates come from the ranks
``range_for_sampling`` = ``START-END`` (0-based, END excluded, as FlagEmbedding's ``hn_mine``). Skipped: every judged
positive of the query (by id when the record has ``pos_ids`` and the pool has ids, and always by text), copies of the
query or of an earlier candidate, and candidates scoring above ``negative_threshold`` x the best positive's score
(likely unjudged positives; Reinforced-IR uses 0.95). ``negatives`` are drawn from what is left, with one
``random.Random(seed)`` in record order, and kept in rank order. When the window holds too few, the next ranks
below it fill the gap. The output replaces ``neg`` (plus ``neg_ids`` when the pool has ids) and drops teacher scores,
which belonged to the old negatives.
"""

from __future__ import annotations

import random
import re
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rir_finetune import files, precision
from rir_finetune.config import load_config, option
from rir_finetune.errors import UserError
from rir_finetune.precision import DEVICE_HELP, ENCODE_DTYPE_HELP, PACK_HELP
from rir_finetune.prep.common import min_mean_max, report
from rir_finetune.prep.io import Record, read_records
from rir_finetune.retrieval import model_folder
from rir_finetune.retrieval.corpus import CORPUS_NAMES, CorpusFile, InMemoryCorpus, text_key
from rir_finetune.retrieval.index import CorpusIndexKeys

BM25 = "bm25"
STALE_FIELDS = ("pos_scores", "neg_scores", "teacher")  # teacher scores of the old negatives


@dataclass
class MineConfig(CorpusIndexKeys):
    input: str | None = option(None, "JSONL records: query, pos (and pos_ids / qid from `data from-beir`)")
    output: str | None = option(None, "JSONL to write: the records with mined 'neg'")
    model: str | None = option(
        None, 'a dense model folder (sentence-transformers or transformers), or "bm25"'
    )
    corpus: str | None = option(
        None,
        "candidate pool: a BEIR folder (corpus.jsonl[.gz]) or a JSONL[.gz] file; None: the records' passages",
    )
    negatives: int = option(15, "negatives per record (upstream negative_number)", range=">=1")
    range_for_sampling: str = option(
        "10-210", "candidate ranks START-END, 0-based, END excluded (upstream hn_mine)"
    )
    negative_threshold: float | None = option(
        0.95, "drop candidates scoring above this x the positive's score; None: off", range=">0"
    )
    seed: int = option(42, "sampling seed; the same input and seed give the same negatives", range=">=0")
    batch_size: int = option(
        32,
        "dense: texts per forward pass on a CPU; on CUDA as many as half the free memory holds",
        range=">=1",
    )
    max_length: int | None = option(
        None, "dense: tokens per text; None: the model folder's limit", range=">=1"
    )
    query_instruction: str | None = option(
        None, 'dense: prepended to queries; None: the folder\'s "query" prompt'
    )
    passage_instruction: str | None = option(
        None, "dense: prepended to passages; None: the folder's passage prompt"
    )
    cache_dir: str | None = option(
        None, "dense: corpus-embedding cache; None: the evaluation default (~/.cache/...)"
    )
    use_cache: bool = option(True, "dense: false encodes the corpus every time and stores nothing")
    search_backend: str = option("auto", "dense: auto (faiss when importable) | faiss | torch")
    device: str = option("auto", f"dense: the encoder's device ({DEVICE_HELP})")
    dtype: str = option("auto", f"dense: {ENCODE_DTYPE_HELP}")
    pack_sequences: bool | str = option("auto", f"dense: {PACK_HELP}")
    sample_range: tuple[int, int] = option(help="parsed range_for_sampling", init=False, repr=False)

    def __post_init__(self):
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", str(self.range_for_sampling))
        if not m or int(m.group(1)) >= int(m.group(2)):
            raise UserError(
                f"config key 'range_for_sampling': {self.range_for_sampling!r} is not START-END with START < END "
                "(0-based ranks, e.g. 10-210)"
            )
        self.sample_range = (int(m.group(1)), int(m.group(2)))
        self.dtype = precision.check_dtype(self.dtype)
        self.pack_sequences = precision.true_false_or_auto(self.pack_sequences, "pack_sequences")
        if self.search_backend not in ("auto", "faiss", "torch"):
            raise UserError(
                f"config key 'search_backend': {self.search_backend!r} is not one of 'auto', 'faiss', 'torch'"
            )
        super().__post_init__()  # the corpus store and index keys


# ----------------------------------------------------------------------------------------------------------------
# The candidate pool and the two rankers


@dataclass
class Pool:
    """The candidate passages, one per row of the index. Passages are compared by :func:`text_key` (equal texts,
    equal keys), so a streamed corpus needs no texts in memory: they are fetched for the chosen negatives only."""

    texts: list[str] | None  # passage texts, or None: a streamed corpus (``fetch``)
    ids: Sequence[str] | None  # doc ids (a corpus) or None (the records' own passages: text is the identity)
    source: str  # for the summary
    keys: np.ndarray | None = None  # (N,) uint64 text keys; computed from texts when not given
    row_of_text: dict[str, int] | None = None  # (positive) text -> first row; from texts when not given
    row_of_id: dict[str, int] | None = None  # (positive) id -> row; from ids when not given
    fetch: Callable[[Collection[int]], dict[int, str]] | None = None  # rows -> texts, for a streamed corpus

    def __post_init__(self):
        if self.texts is not None:
            if self.keys is None:
                self.keys = np.array([text_key(t) for t in self.texts], dtype=np.uint64)
            if self.row_of_text is None:
                self.row_of_text = {}
                for row, text in enumerate(self.texts):
                    self.row_of_text.setdefault(text, row)
        if self.row_of_id is None:
            self.row_of_id = {d: row for row, d in enumerate(self.ids)} if self.ids is not None else {}

    @property
    def n(self) -> int:
        return len(self.keys)

    def texts_of(self, rows: Collection[int]) -> dict[int, str]:
        if self.texts is not None:
            return {row: self.texts[row] for row in rows}
        return self.fetch(rows)


def build_pool(cfg: MineConfig, records: list[Record]) -> Pool:
    """The pool in memory (BM25, and a dense model over the records' passages)."""
    if cfg.corpus:
        corpus = CorpusFile(cfg.corpus)
        corpus.scan()  # every row well-formed, ids unique, before they are held
        rows = list(corpus.rows([(0, sys.maxsize)]))
        return Pool([t for _, _, t in rows], [d for _, d, _ in rows], corpus.source)
    texts = list(dict.fromkeys(t for r in records for t in [*r["pos"], *(r.get("neg") or [])]))
    return Pool(texts, None, "the records' passages (pos + neg)")


# rank(query rows, k) -> (scores, pool rows), both (len(rows), k), best first
RankFn = Callable[[list[int], int], tuple[np.ndarray, np.ndarray]]
# score(query row, pool rows) -> scores of those passages for that query
ScoreFn = Callable[[int, list[int]], list[float]]


class Bm25Ranker:
    """BM25 (bm25s, Lucene variant, English stopwords, no stemming) over the pool."""

    def __init__(self, pool: Pool, queries: list[str]):
        import bm25s
        from bm25s.tokenization import Tokenizer

        self.tokenizer = Tokenizer(stopwords="en")
        corpus_tokens = self.tokenizer.tokenize(pool.texts, return_as="tuple", show_progress=False)
        self.retriever = bm25s.BM25()
        self.retriever.index(corpus_tokens, show_progress=False)
        self.query_ids = self.tokenizer.tokenize(
            queries, update_vocab=False, return_as="ids", show_progress=False
        )
        self.query_tokens = self.tokenizer.tokenize(
            queries, update_vocab=False, return_as="string", show_progress=False
        )
        self.n = len(pool.texts)

    def rank(self, rows: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        indices, scores = self.retriever.retrieve(
            [self.query_ids[r] for r in rows], k=min(k, self.n), show_progress=False, n_threads=1
        )
        return np.asarray(scores), np.asarray(indices)

    def score(self, row: int, doc_rows: list[int]) -> list[float]:
        all_scores = self.retriever.get_scores(self.query_tokens[row])  # (N,)
        return [float(all_scores[d]) for d in doc_rows]


class DenseRanker:
    """A dense encoder over the embedding store (sharded, resumable, shared with ``eval``) and a faiss index.

    Under torchrun every rank encodes its shards; ``pool`` is None on ranks other than 0, which stop there."""

    def __init__(self, cfg: MineConfig, records: list[Record], queries: list[str]):
        from rir_finetune.retrieval.encoder import Encoder
        from rir_finetune.retrieval.index import CorpusSearcher
        from rir_finetune.retrieval.model_folder import read_settings
        from rir_finetune.retrieval.sharded import encode_corpus

        settings = read_settings(
            cfg.model,
            max_length=cfg.max_length,
            query_instruction=cfg.query_instruction,
            passage_instruction=cfg.passage_instruction,
        )
        memory = None if cfg.corpus else build_pool(cfg, records)
        corpus = CorpusFile(cfg.corpus) if cfg.corpus else InMemoryCorpus(
            [str(i) for i in range(len(memory.texts))], memory.texts, memory.source
        )  # fmt: skip
        self.encoded = encode_corpus(
            corpus, lambda: Encoder(settings, batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype,
                                     pack_sequences=cfg.pack_sequences),
            model_dir=cfg.model, settings=settings, store_dtype=cfg.store_dtype, shard_size=cfg.shard_size,
            cache_dir=cfg.cache_dir, use_cache=cfg.use_cache,
            watch_ids={str(d) for r in records for d in r.get("pos_ids") or []},
            watch_texts={t for r in records for t in r["pos"]},
        )  # fmt: skip
        self.pool: Pool | None = None
        if self.encoded is None:
            return
        scan, store = self.encoded.scan, self.encoded.store
        self.pool = memory or Pool(None, store.ids(), corpus.source, scan.text_keys, scan.rows_of_texts,
                                   scan.rows_of_ids, corpus.texts_of)  # fmt: skip
        self.cache_note = self.encoded.note
        print(self.cache_note, file=sys.stderr)
        self.query_reps = self.encoded.encoder.encode_queries(queries)  # (Q, H)
        self.searcher = CorpusSearcher(store, cfg, backend=cfg.search_backend)

    def rank(self, rows: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.searcher.search(self.query_reps[rows], k)

    def score(self, row: int, doc_rows: list[int]) -> list[float]:
        return (self.encoded.store.rows(doc_rows) @ self.query_reps[row]).tolist()


# ----------------------------------------------------------------------------------------------------------------
# Choosing negatives


@dataclass
class Candidates:
    window: list[tuple[int, int]]  # (rank, pool row) of usable candidates inside the sampling window
    below: list[tuple[int, int]]  # usable candidates below the window, best first (to fill a short window)
    false_negatives: int = 0  # skipped: score above negative_threshold x positive score
    positives: int = 0  # skipped: a judged positive of the query
    copies: int = 0  # skipped: the query's own text or a text already taken


def judged_rows(record: Record, pool: Pool) -> set[int]:
    """Pool rows of the record's judged positives: by id when both sides have ids, and by text."""
    rows = {pool.row_of_text[t] for t in record["pos"] if t in pool.row_of_text}
    if pool.ids is not None:
        rows |= {pool.row_of_id[str(d)] for d in record.get("pos_ids") or [] if str(d) in pool.row_of_id}
    return rows


def collect(
    record: Record,
    scores: np.ndarray,
    rows: np.ndarray,
    pool: Pool,
    positive_rows: set[int],
    limit: float | None,
    sample_range: tuple[int, int],
    need: int,
) -> Candidates:
    """Walk one query's ranking (scores, rows: (k,)) and sort candidates into window / below / skipped."""
    start, end = sample_range
    positive_keys = {text_key(t) for t in record["pos"]}
    out = Candidates([], [])
    taken: set[int] = {text_key(record["query"])}
    rows = rows[: np.argmax(rows < 0)] if (rows < 0).any() else rows  # faiss pads missing hits with -1
    keys = pool.keys[rows].tolist()
    for rank, (score, row, key) in enumerate(zip(scores.tolist(), rows.tolist(), keys, strict=False)):
        if rank >= end and len(out.window) + len(out.below) >= need:
            break
        if rank < start:
            continue
        if row in positive_rows or key in positive_keys:
            out.positives += 1
        elif key in taken:
            out.copies += 1
        elif limit is not None and score > limit:
            out.false_negatives += 1
        else:
            taken.add(key)
            (out.window if rank < end else out.below).append((rank, row))
    return out


def mine(cfg: MineConfig) -> dict[str, float]:
    """Mine negatives for every record of ``cfg.input`` and write ``cfg.output``; return the counts."""
    for key in ("input", "model"):
        if not getattr(cfg, key):
            raise UserError(
                f"config key {key!r} is required: rir-finetune mine --input IN --output OUT --model DIR|bm25"
            )
    corpus_files = (*(Path(cfg.corpus) / n for n in CORPUS_NAMES), Path(cfg.corpus)) if cfg.corpus else ()
    dense = cfg.model != BM25
    # before any work: the output is none of the inputs (records, corpus folder, model folder)
    out = files.check_output_file(
        cfg.output, key="output", reads=(cfg.input, *corpus_files, cfg.model if dense else None)
    )
    if dense and not Path(cfg.model).is_dir():
        raise UserError(f"{cfg.model}: model folder not found (give a dense model folder, or --model bm25)")
    if dense:
        model_folder.check_model_folder(cfg.model, key="model")
        precision.check_device(cfg.device)
    records = read_records(cfg.input)
    start_time = time.time()
    queries = [r["query"] for r in records]
    if dense:
        ranker = DenseRanker(cfg, records, queries)
        if ranker.pool is None:  # another rank of torchrun: its shards are stored; rank 0 mines and writes
            return {}
        pool = ranker.pool
    else:
        pool = build_pool(cfg, records)
        ranker = Bm25Ranker(pool, queries)
    n = pool.n

    positive_rows = [judged_rows(r, pool) for r in records]
    limits: list[float | None] = []
    no_positive_score = 0
    for i, rows in enumerate(positive_rows):
        pos_score = max(ranker.score(i, sorted(rows)), default=None) if rows else None
        if cfg.negative_threshold is None or pos_score is None or pos_score <= 0:
            no_positive_score += cfg.negative_threshold is not None
            limits.append(None)
        else:
            limits.append(cfg.negative_threshold * pos_score)

    # search deep enough for the window, the positives inside it and a fill; search deeper for the few that need it
    need = cfg.negatives
    max_pos = max(len(r) for r in positive_rows)
    k = min(n, cfg.sample_range[1] + max_pos + 2 * need)
    found: dict[int, Candidates] = {}
    pending = list(range(len(records)))
    with tqdm(total=len(records), desc="mine", unit="query") as bar:
        while pending:
            retry = []
            for lo in range(0, len(pending), 1024):
                chunk = pending[lo : lo + 1024]
                scores, rows = ranker.rank(chunk, k)  # (len(chunk), k)
                for j, i in enumerate(chunk):
                    c = collect(
                        records[i],
                        scores[j],
                        rows[j],
                        pool,
                        positive_rows[i],
                        limits[i],
                        cfg.sample_range,
                        need,
                    )
                    if len(c.window) + len(c.below) < need and k < n:
                        retry.append(i)
                    else:
                        found[i] = c
                        bar.update(1)
            pending, k = retry, min(n, 4 * k)

    rng = random.Random(cfg.seed)
    counts = {"false_negatives": 0, "positives": 0, "copies": 0, "filled": 0, "short": 0}
    chosen_rows: list[list[int]] = []
    for i in range(len(records)):
        c = found[i]
        if len(c.window) >= need:
            chosen = sorted(rng.sample(c.window, need))  # rank order
        else:
            chosen = c.window + c.below[: need - len(c.window)]
            counts["filled"] += bool(c.below)
            counts["short"] += len(chosen) < need
        for key in ("false_negatives", "positives", "copies"):
            counts[key] += getattr(c, key)
        chosen_rows.append([row for _, row in chosen])
    per_record = [len(rows) for rows in chosen_rows]
    texts = pool.texts_of({row for rows in chosen_rows for row in rows})  # one pass over a streamed corpus
    results = []
    for record, rows in zip(records, chosen_rows, strict=True):
        result = {k: v for k, v in record.items() if k not in STALE_FIELDS and k != "neg_ids"}
        result["neg"] = [texts[row] for row in rows]
        if pool.ids is not None:
            result["neg_ids"] = [pool.ids[row] for row in rows]
        results.append(files.json_line(result, str(out)))
    if not any(per_record):  # a result without a single negative cannot be right: nothing is written
        raise _NoNegatives(counts, len(records))
    with files.atomic_jsonl(out) as f:
        f.writelines(results)
    if dense:
        ranker.encoded.close()  # a temporary store (use_cache false) goes; a cached one stays
    stale = sum(any(k in r for k in STALE_FIELDS) for r in records)
    seconds = time.time() - start_time
    threshold = f"score > {cfg.negative_threshold} x positive" if cfg.negative_threshold else "threshold off"
    lines = [
        f"{len(records)} records; negatives per record {min_mean_max(per_record)} (asked {need})",
        f"pool: {n} passages from {pool.source}; {'BM25' if cfg.model == BM25 else cfg.model}; "
        f"ranks {cfg.sample_range[0]}-{cfg.sample_range[1]}",
        f"{counts['false_negatives']} candidates dropped as likely false negatives ({threshold})",
        f"{counts['positives']} judged positives skipped; {counts['copies']} copies of the query or of a taken passage",
        f"{counts['filled']} records filled from below the window; {counts['short']} records short of {need}",
    ]
    if no_positive_score and cfg.negative_threshold is not None:
        lines.append(
            f"{no_positive_score} records without a positive score in the pool: threshold not applied"
        )
    if stale:
        lines.append(
            f"{stale} records had teacher scores for their old negatives: removed (run `score` again)"
        )
    if dense:
        lines.append(ranker.searcher.summary())
    lines.append(f"wrote {out} ({seconds:.1f} s)")
    report("mine", lines)
    if counts["short"]:
        print(
            f"warning: mine: {counts['short']} of {len(records)} records got fewer than {need} negatives "
            f"(the fewest: {min(per_record)}); training fills their groups with random passages",
            file=sys.stderr,
        )
    return {"records": len(records), "seconds": seconds, **counts,
            "min_negatives": min(per_record), "max_negatives": max(per_record),
            "mean_negatives": sum(per_record) / len(per_record),
            **({"texts_encoded": ranker.encoded.texts_encoded} if dense else {})}  # fmt: skip


class _NoNegatives(UserError):
    def __init__(self, counts: dict[str, int], n: int):
        super().__init__(
            f"mine: no negative kept for any of the {n} records ({counts['positives']} judged positives, "
            f"{counts['copies']} copies, {counts['false_negatives']} above negative_threshold skipped); "
            "nothing written. Widen --range_for_sampling, use --negative_threshold none, or a larger --corpus"
        )


def run_mine(config_file: str | None, overrides: list[str]) -> dict[str, float]:
    from rir_finetune.cpu_memory import keep_freed_memory

    keep_freed_memory()
    return mine(load_config(MineConfig, config_file, overrides))
