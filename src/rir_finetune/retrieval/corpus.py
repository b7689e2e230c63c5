"""Corpora read as streams: a BEIR ``corpus.jsonl`` (or any JSONL of ``_id``/``id``, ``title``, ``text``), plain or
gzip-compressed, never held in memory as a whole.

A row is a non-blank line, numbered from 0 in file order; its text is ``text_format.format(title=..., text=...)
.strip()`` (the evaluation's rule). :meth:`CorpusFile.scan` reads every row once and keeps what grows with the
corpus only as fixed-size numbers: the corpus digest (SHA-256 over every id and text, the embedding store's key),
an 8-byte key per text (so ``mine`` compares passages without holding them), and the rows of a few watched ids and
texts (judged positives). :meth:`CorpusFile.rows` streams the texts of some row ranges (the shards being encoded),
skipping the rest without parsing it; :meth:`CorpusFile.texts_of` fetches a few rows' texts in one pass.
:class:`InMemoryCorpus` is the same interface over lists (a pool of passages already in memory).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from array import array
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rir_finetune import files
from rir_finetune.errors import UserError, located

DEFAULT_CORPUS_TEXT_FORMAT = "{title} {text}"
CORPUS_NAMES = ("corpus.jsonl", "corpus.jsonl.gz")


def field_of(obj: dict[str, Any], names: tuple[str, ...], path: Path, lineno: int) -> Any:
    """The first of ``names`` present (and not null) in ``obj``; missing is an error naming ``path:lineno``."""
    for name in names:
        if name in obj and obj[name] is not None:
            return obj[name]
    raise located(path, lineno, f"missing field {' or '.join(repr(n) for n in names)}")


def text_field(obj: dict[str, Any], names: tuple[str, ...], path: Path, lineno: int) -> str:
    """:func:`field_of` as text: a string or a number (an id, a year as a title); a list, a mapping or a boolean is
    refused (its Python repr would be encoded as the text)."""
    value = field_of(obj, names, path, lineno)
    if isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return str(value)
    name = next(n for n in names if obj.get(n) is not None)
    raise located(path, lineno, f"field {name!r} must be a string, got {type(value).__name__}")


def corpus_file_of(path: str | Path) -> Path:
    """A corpus file: ``path`` itself, or ``corpus.jsonl`` (else ``corpus.jsonl.gz``) inside a folder."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in CORPUS_NAMES if (path / name).is_file()]
        if not found:
            raise UserError(f"{path / CORPUS_NAMES[0]}: not found (a BEIR corpus folder holds corpus.jsonl)")
        return found[0]
    if not path.is_file():
        raise UserError(f"{path}: corpus file not found")
    return path


def text_key(text: str) -> int:
    """8 bytes of BLAKE2b: equal texts, equal keys; two different passages share one with chance 2^-64."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def digest_update(h: Any, doc_id: str, text: str) -> None:
    """The corpus digest's rule, one (id, text) pair at a time."""
    h.update(doc_id.encode() + b"\0" + text.encode() + b"\0")


@dataclass
class CorpusScan:
    """What one pass over a corpus leaves: sizes and digests, never the texts."""

    count: int
    digest: str  # SHA-256 over every (id, text) in order
    text_keys: np.ndarray  # (count,) uint64, text_key of each row
    rows_of_ids: dict[str, int] = field(default_factory=dict)  # watched id -> its row
    rows_of_texts: dict[str, int] = field(default_factory=dict)  # watched text -> its first row


class CorpusFile:
    """A JSONL corpus on disk (``.gz`` decompressed on the fly), read row by row."""

    def __init__(self, path: str | Path, text_format: str = DEFAULT_CORPUS_TEXT_FORMAT):
        self.path = corpus_file_of(path)
        self.text_format = text_format

    @property
    def source(self) -> str:
        return str(self.path)

    def _lines(self) -> Iterator[tuple[int, str]]:
        """(line number, decoded line) of every line, a gzip file decompressed; UTF-8 errors name the line."""
        if not self.path.name.endswith(".gz"):
            yield from files.iter_lines(self.path)
            return
        try:
            with gzip.open(self.path, "rb") as handle:
                for line_no, raw in enumerate(handle, start=1):
                    if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                        raw = raw[3:]
                    try:
                        yield line_no, raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise located(
                            self.path,
                            line_no,
                            f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); convert the file",
                        ) from None
        except (OSError, EOFError) as e:  # a damaged or truncated archive
            raise UserError(f"{self.path}: cannot read the gzip file ({e})") from None

    def _parse(self, line_no: int, line: str) -> tuple[str, str, str]:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise located(self.path, line_no, f"invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise located(self.path, line_no, f"expected a JSON object, got {type(obj).__name__}")
        doc_id = text_field(obj, ("_id", "id"), self.path, line_no)
        text = text_field(obj, ("text",), self.path, line_no)
        title = text_field(obj, ("title",), self.path, line_no) if obj.get("title") is not None else ""
        return doc_id, title, text

    def documents(self) -> Iterator[tuple[int, str, str, str]]:
        """``(line number, id, title, text)`` of every row, in file order."""
        for line_no, line in self._lines():
            if line.strip():
                yield (line_no, *self._parse(line_no, line))

    def rows(self, spans: list[tuple[int, int]]) -> Iterator[tuple[int, str, str]]:
        """``(row, id, formatted text)`` of the rows inside ``spans`` (sorted ``[start, end)`` ranges); the rows
        before, between and after are counted but not parsed."""
        if not spans:
            return
        row, s = -1, 0
        for line_no, line in self._lines():
            if not line.strip():
                continue
            row += 1
            while s < len(spans) and row >= spans[s][1]:
                s += 1
            if s == len(spans):
                return
            if row >= spans[s][0]:
                doc_id, title, text = self._parse(line_no, line)
                yield row, doc_id, self.text_format.format(title=title, text=text).strip()

    def texts_of(self, rows: Collection[int]) -> dict[int, str]:
        """The formatted texts of ``rows``, in one pass that stops after the last of them."""
        wanted = sorted(set(rows))
        return {row: text for row, _, text in self.rows(_spans_of(wanted))}

    def scan(self, watch_ids: Collection[str] = (), watch_texts: Collection[str] = ()) -> CorpusScan:
        """One pass: count, digest, text keys, the rows of ``watch_ids`` / ``watch_texts``; a duplicate id and an
        empty corpus are errors naming the file (and line)."""
        digest, keys, id_keys = hashlib.sha256(), array("Q"), array("Q")
        by_id: dict[str, int] = {}
        by_text: dict[str, int] = {}
        watch_ids, watch_texts = set(watch_ids), set(watch_texts)
        for row, (_, doc_id, title, text) in enumerate(self.documents()):
            text = self.text_format.format(title=title, text=text).strip()
            digest_update(digest, doc_id, text)
            keys.append(text_key(text))
            id_keys.append(text_key(doc_id))
            if doc_id in watch_ids:
                by_id.setdefault(doc_id, row)
            if text in watch_texts:
                by_text.setdefault(text, row)
        if not keys:
            raise located(self.path, None, "the corpus is empty")
        self._check_unique_ids(np.frombuffer(id_keys, dtype=np.uint64))
        return CorpusScan(len(keys), digest.hexdigest(), np.frombuffer(keys, dtype=np.uint64), by_id, by_text)

    def _check_unique_ids(self, id_keys: np.ndarray) -> None:
        """Ids are compared by key (8 bytes each, not the strings); a repeated key is confirmed by a second pass."""
        ordered = np.sort(id_keys)
        repeated = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
        if not repeated:
            return
        seen: set[str] = set()
        for line_no, doc_id, _, _ in self.documents():
            if text_key(doc_id) in repeated:
                if doc_id in seen:
                    raise located(self.path, line_no, f"duplicate id {doc_id!r}")
                seen.add(doc_id)


class InMemoryCorpus:
    """Ids and texts already in memory (a pool of the records' own passages), with :class:`CorpusFile`'s interface."""

    def __init__(self, ids: list[str], texts: list[str], source: str = "memory"):
        self.ids, self.texts, self.source = ids, texts, source

    def rows(self, spans: list[tuple[int, int]]) -> Iterator[tuple[int, str, str]]:
        for start, end in spans:
            for row in range(start, min(end, len(self.texts))):
                yield row, self.ids[row], self.texts[row]

    def texts_of(self, rows: Collection[int]) -> dict[int, str]:
        return {row: self.texts[row] for row in rows}

    def scan(self, watch_ids: Collection[str] = (), watch_texts: Collection[str] = ()) -> CorpusScan:
        digest = hashlib.sha256()
        for doc_id, text in zip(self.ids, self.texts, strict=True):
            digest_update(digest, doc_id, text)
        keys = np.array([text_key(t) for t in self.texts], dtype=np.uint64)
        watch_ids, watch_texts = set(watch_ids), set(watch_texts)
        by_id = {d: row for row, d in enumerate(self.ids) if d in watch_ids}
        by_text: dict[str, int] = {}
        for row, text in enumerate(self.texts):
            if text in watch_texts:
                by_text.setdefault(text, row)
        return CorpusScan(len(self.texts), digest.hexdigest(), keys, by_id, by_text)


def _spans_of(sorted_rows: list[int]) -> list[tuple[int, int]]:
    """Sorted rows -> the fewest ``[start, end)`` ranges covering exactly them."""
    spans: list[tuple[int, int]] = []
    for row in sorted_rows:
        if spans and spans[-1][1] == row:
            spans[-1] = (spans[-1][0], row + 1)
        else:
            spans.append((row, row + 1))
    return spans
