"""Training records in and out of the data-preparation commands (SPEC section 1): validated reading.

Writing goes through :mod:`rir_finetune.files` (``write_jsonl`` / ``atomic_jsonl``: a file is either the previous one
or complete) and, for long runs, :class:`rir_finetune.lifecycle.ResumableJsonl`.
"""

from __future__ import annotations

import os
from typing import Any

from rir_finetune.files import read_jsonl

Record = dict[str, Any]


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
        if not all(p.strip() for p in pos):
            return "field 'pos' holds an empty passage"
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
