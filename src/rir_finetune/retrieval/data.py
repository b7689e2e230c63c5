"""Evaluation data: a corpus, the judged queries of one split and their relevance judgements (qrels).

Two layouts are read, both with one JSON object per line:

- BEIR: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``),
  ``qrels/<split>.tsv`` (header ``query-id  corpus-id  score``; TREC's four columns also work).
- FlagEmbedding's custom layout: ``corpus.jsonl`` (``id``, ``title``, ``text``), ``<split>_queries.jsonl``
  (``id``, ``text``), ``<split>_qrels.jsonl`` (``qid``, ``docid``, ``relevance``).

Every problem is a :class:`UserError` naming the file (and line): a missing file, bytes that are not UTF-8, malformed
JSON, a qrel naming an unknown document or query, a relevance that is not an integer grade, one (query, document)
judged twice with different grades, a duplicate id, an empty corpus. The same judgement repeated is counted once,
with a warning giving the count.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rir_finetune.errors import UserError, located
from rir_finetune.files import iter_jsonl, iter_lines
from rir_finetune.retrieval.corpus import (
    CORPUS_NAMES,
    DEFAULT_CORPUS_TEXT_FORMAT,
    CorpusFile,
    field_of,
    text_field,
)

# upstream Reinforced-IR encodes an answer as a passage after this prefix (its 'new_query'), in training, evaluation
# and the generator's reward alike
ANSWER_PREFIX = "Generate the topic about this passage: "


def with_answer_prefix(answer: str, prefix: str) -> str:
    """``prefix + answer``, unless ``answer`` already starts with ``prefix``: upstream's files hold the prefixed
    strings ("Generate the topic about this passage: ..."), and they must be encoded unchanged, not prefixed twice.
    Training, ``eval`` and ``reward`` all use this rule."""
    return answer if prefix and answer.startswith(prefix) else prefix + answer


@dataclass
class RetrievalDataset:
    """What a retrieval evaluation needs; ``queries`` holds only the judged queries of the split."""

    corpus: dict[str, dict[str, str]]  # doc id -> {"title": ..., "text": ...}
    queries: dict[str, str]  # query id -> query text (every query id of qrels, nothing else)
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: graded relevance}
    name: str = ""
    split: str = "test"
    # read without the corpus (load_beir(read_corpus=False)): where it is, and which qrels line judges each document,
    # for :meth:`check_judged_documents` once a scan of the corpus has found them
    corpus_file: Path | None = None
    qrels_file: Path | None = None
    judged_lines: dict[str, int] = field(default_factory=dict)

    def corpus_texts(self, text_format: str = DEFAULT_CORPUS_TEXT_FORMAT) -> tuple[list[str], list[str]]:
        """Doc ids and their texts, ``text_format.format(title=..., text=...).strip()``, in corpus order."""
        ids = list(self.corpus)
        texts = [text_format.format(title=d["title"], text=d["text"]).strip() for d in self.corpus.values()]
        return ids, texts

    def limit_queries(self, max_queries: int | None) -> RetrievalDataset:
        """The first ``max_queries`` judged queries (sorted by id), same corpus; ``None`` keeps all."""
        if max_queries is None or max_queries >= len(self.queries):
            return self
        keep = sorted(self.queries)[:max_queries]
        return RetrievalDataset(
            self.corpus,
            {q: self.queries[q] for q in keep},
            {q: self.qrels[q] for q in keep},
            self.name,
            self.split,
            self.corpus_file,
            self.qrels_file,
            self.judged_lines,
        )

    def check_judged_documents(self, found: Collection[str]) -> None:
        """Every judged document is among ``found`` (the corpus ids a scan watched for), else the first qrels line
        naming a missing one is the error."""
        missing = [(line, d) for d, line in self.judged_lines.items() if d not in found]
        if missing:
            line, doc_id = min(missing)
            raise located(self.qrels_file, line, f"document {doc_id!r} is not in {self.corpus_file}")


_field = field_of


def _read_id_texts(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for lineno, obj in iter_jsonl(path):
        key = text_field(obj, ("_id", "id"), path, lineno)
        if key in out:
            raise located(path, lineno, f"duplicate id {key!r}")
        out[key] = text_field(obj, ("text",), path, lineno)
    return out


def _read_corpus(path: Path) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for lineno, doc_id, title, text in CorpusFile(path).documents():
        if doc_id in out:
            raise located(path, lineno, f"duplicate id {doc_id!r}")
        out[doc_id] = {"title": title, "text": text}
    return out


def _relevance(value: Any, path: Path, lineno: int) -> int:
    """An integer relevance grade; ``1.0`` is 1, ``0.5`` is refused (pytrec_eval grades are integers)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise located(path, lineno, f"relevance {value!r} is not a number") from None
    if not f.is_integer():
        raise located(path, lineno, f"relevance {value!r} is not an integer grade (0, 1, 2, ...)")
    return int(f)


def _read_qrels_tsv(path: Path) -> Iterator[tuple[int, str, str, int]]:
    for lineno, line in iter_lines(path):
        cols = line.rstrip("\r\n").split("\t") if "\t" in line else line.split()
        if not cols or not line.strip():
            continue
        if len(cols) not in (3, 4):
            raise located(path, lineno, f"expected 3 columns (query-id, corpus-id, score), got {len(cols)}")
        qid, docid, score = (cols[0], cols[1], cols[2]) if len(cols) == 3 else (cols[0], cols[2], cols[3])
        if lineno == 1 and not _is_number(score):  # header line
            continue
        yield lineno, qid.strip(), docid.strip(), _relevance(score.strip(), path, lineno)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_qrels_jsonl(path: Path) -> Iterator[tuple[int, str, str, int]]:
    for lineno, obj in iter_jsonl(path):
        qid = str(_field(obj, ("qid", "query-id", "query_id"), path, lineno))
        docid = str(_field(obj, ("docid", "corpus-id", "doc_id"), path, lineno))
        rel = _relevance(_field(obj, ("relevance", "score"), path, lineno), path, lineno)
        yield lineno, qid, docid, rel


def layout_files(data_dir: Path, split: str) -> tuple[Path, Path, Path]:
    """``(corpus, queries, qrels)`` paths of ``data_dir`` in BEIR or FlagEmbedding's custom layout (the corpus
    may be gzip-compressed, ``corpus.jsonl.gz``)."""
    corpus = next(
        (data_dir / n for n in CORPUS_NAMES if (data_dir / n).is_file()), data_dir / CORPUS_NAMES[0]
    )
    custom_queries, custom_qrels = data_dir / f"{split}_queries.jsonl", data_dir / f"{split}_qrels.jsonl"
    if custom_queries.is_file() and not (data_dir / "queries.jsonl").is_file():
        return corpus, custom_queries, custom_qrels
    return corpus, data_dir / "queries.jsonl", data_dir / "qrels" / f"{split}.tsv"


def load_beir(data_dir: str | Path, split: str = "test", read_corpus: bool = True) -> RetrievalDataset:
    """Load and check ``data_dir`` (BEIR or FlagEmbedding custom layout) for ``split``.

    ``read_corpus=False`` leaves ``corpus`` empty (a corpus too large for memory is streamed instead): the judged
    documents are then checked by :meth:`RetrievalDataset.check_judged_documents` after a scan."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: data folder not found")
    corpus_path, queries_path, qrels_path = layout_files(data_dir, split)
    for path in (corpus_path, queries_path):
        if not path.is_file():
            raise located(
                path, None, "file not found (expected BEIR layout or FlagEmbedding's custom layout)"
            )
    if not qrels_path.is_file():
        raise located(qrels_path, None, f"qrels file of split {split!r} not found")
    corpus = _read_corpus(corpus_path) if read_corpus else {}
    if read_corpus and not corpus:
        raise located(corpus_path, None, "the corpus is empty")
    all_queries = _read_id_texts(queries_path)
    rows = _read_qrels_jsonl(qrels_path) if qrels_path.suffix == ".jsonl" else _read_qrels_tsv(qrels_path)
    qrels: dict[str, dict[str, int]] = {}
    first_line: dict[tuple[str, str], int] = {}
    judged_lines: dict[str, int] = {}
    repeated = 0
    for lineno, qid, docid, rel in rows:
        if read_corpus and docid not in corpus:
            raise located(qrels_path, lineno, f"document {docid!r} is not in {corpus_path}")
        judged_lines.setdefault(docid, lineno)
        if qid not in all_queries:
            raise located(qrels_path, lineno, f"query {qid!r} is not in {queries_path}")
        if (qid, docid) in first_line:  # the same judgement twice: harmless; two different grades: which one?
            if qrels[qid][docid] != rel:
                raise located(
                    qrels_path,
                    lineno,
                    f"query {qid!r} and document {docid!r} judged twice with different grades "
                    f"({qrels[qid][docid]} at line {first_line[qid, docid]}, {rel} here)",
                )
            repeated += 1
            continue
        first_line[qid, docid] = lineno
        qrels.setdefault(qid, {})[docid] = rel
    if repeated:
        print(
            f"warning: {qrels_path}: {repeated} repeated judgements (same grade) counted once",
            file=sys.stderr,
        )
    if not qrels:
        raise located(qrels_path, None, "no relevance judgements")
    if not any(rel > 0 for judged in qrels.values() for rel in judged.values()):  # every metric would be 0
        raise located(qrels_path, None, "no judgement with relevance >= 1: no query has a relevant document")
    queries = {qid: all_queries[qid] for qid in qrels}
    empty = next((qid for qid, text in queries.items() if not text.strip()), None)
    if empty is not None:  # it would be encoded as the special tokens alone and scored as a query
        raise located(queries_path, None, f"judged query {empty!r} has an empty text")
    return RetrievalDataset(
        corpus,
        queries,
        qrels,
        data_dir.name,
        split,
        corpus_path,
        qrels_path,
        {} if read_corpus else judged_lines,
    )
