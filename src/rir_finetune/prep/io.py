"""JSONL in and out for the data-preparation commands.

Reading names the file and line of the first malformed record. Writing never leaves a file that looks complete
when it is not: :func:`atomic_jsonl` writes ``OUT.partial`` and renames it when done; :class:`ResumableJsonl`
appends to ``OUT.partial`` batch by batch (flushed and synced), so a killed run can pick up where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from rir_finetune import guards
from rir_finetune.errors import UserError, located
from rir_finetune.files import iter_jsonl

Record = dict[str, Any]
PARTIAL_SUFFIX = ".partial"


def partial_path(path: str | os.PathLike) -> Path:
    """Where an unfinished output of ``path`` is written."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def read_jsonl(
    path: str | os.PathLike, validate: Callable[[Record], str | None] | None = None
) -> list[Record]:
    """Read one JSON object per line; blank lines are skipped.

    ``validate(record)`` returns an error message (or None); any error is a UserError naming ``path:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: input file not found")
    records = []
    for line_no, record in iter_jsonl(path):
        problem = validate(record) if validate else None
        if problem:
            raise located(path, line_no, problem)
        records.append(record)
    if not records:
        raise UserError(f"{path}: no records (the file is empty)")
    return records


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def check_training_record(record: Record, need_pos: bool = True) -> str | None:
    """The problem with a training record (SPEC section 1), or None when it is well formed."""
    query = record.get("query")
    if not isinstance(query, str) or not query.strip():
        return "field 'query' must be a non-empty string"
    if need_pos or "pos" in record:
        pos = record.get("pos")
        if not _is_str_list(pos) or not pos:
            return "field 'pos' must be a non-empty list of strings"
    if "neg" in record and record["neg"] is not None and not _is_str_list(record["neg"]):
        return "field 'neg' must be a list of strings"
    if "pos_ids" in record:
        ids = record["pos_ids"]
        if not isinstance(ids, list) or len(ids) != len(record.get("pos") or []):
            return "field 'pos_ids' must be a list aligned with 'pos'"
    if "qid" in record and not isinstance(record["qid"], (str, int)):
        return "field 'qid' must be a string or an integer"
    return None


def read_records(path: str | os.PathLike, need_pos: bool = True) -> list[Record]:
    """Read training records (``query``, ``pos``, optional ``neg``, ``qid``, ``pos_ids``...), validated."""
    return read_jsonl(path, lambda r: check_training_record(r, need_pos=need_pos))


def check_output_path(
    input_path: str | os.PathLike | None,
    output_path: str | os.PathLike | None,
    key: str = "output",
    reads: tuple[str | os.PathLike | None, ...] = (),
) -> Path:
    """The output path, checked before any work (:func:`rir_finetune.guards.check_output_file`): never an input
    (``input_path`` and ``reads``: files, or folders whose existing files are inputs), never a folder, writable.
    Nothing is created; the writers below create the parent folder."""
    return guards.check_output_file(output_path, key=key, reads=(input_path, *reads))


def dump_line(record: Record) -> str:
    """One JSONL line; a NaN or infinite number is a UserError (it is not JSON)."""
    return guards.json_line(record)


@contextlib.contextmanager
def atomic_jsonl(path: str | os.PathLike, tmp: str | os.PathLike | None = None) -> Iterator[TextIO]:
    """Write JSONL lines to ``tmp`` (default ``path.partial``); rename it to ``path`` when the block finishes.

    On an exception the temporary file is removed, so ``path`` is either the previous file or the complete new one.
    """
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else partial_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = tmp.open("w", encoding="utf-8")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise


def write_jsonl(path: str | os.PathLike, records: list[Record], tmp: str | os.PathLike | None = None) -> None:
    """Write all ``records`` to ``path`` atomically (through ``tmp``, default ``path.partial``)."""
    with atomic_jsonl(path, tmp) as f:
        for record in records:
            f.write(dump_line(record))


class ResumableJsonl:
    """Append-only ``OUT.partial`` for long runs: :meth:`done` reads what an earlier run finished.

    A run killed in the middle of a write leaves a last line without its newline; it is cut off on open, so only
    complete records count. :meth:`finish` writes the final ``OUT`` (atomically) and removes the partial file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self._file: TextIO | None = None

    def done(self) -> list[Record]:
        """Complete records already in the partial file, in the order written (truncates a torn last line)."""
        if not self.partial.exists():
            return []
        data = self.partial.read_bytes()
        end = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
        if end < len(data):
            with self.partial.open("r+b") as f:
                f.truncate(end)
        records = []
        for line_no, raw in enumerate(data[:end].splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise located(
                    self.partial,
                    line_no,
                    "not UTF-8 text in an unfinished output; delete the file to start over",
                ) from None
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise located(
                    self.partial,
                    line_no,
                    f"invalid JSON in an unfinished output ({e.msg}); delete the file to start over",
                ) from None
        return records

    def append(self, records: list[Record]) -> None:
        """Append ``records`` and make them durable before returning."""
        if self._file is None:
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.partial.open("a", encoding="utf-8")
        self._file.write("".join(dump_line(r) for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self, records: list[Record]) -> None:
        """Write the complete output (``records`` in their final order) and drop the partial file."""
        self.close()
        # not through OUT.partial: that file is the only copy of the finished work until OUT exists
        write_jsonl(self.path, records, tmp=self.partial.with_name(self.partial.name + ".tmp"))
        self.partial.unlink(missing_ok=True)
