"""Fingerprints: what a round stage's result depends on, so that a rerun skips a stage exactly when nothing it
reads has changed. Outside inputs (data, models, LLM files) are stamped by content, never by path or file times."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from rir_finetune.lifecycle import settings_fingerprint

_CONTENT: dict[tuple[str, int, int, int], str] = {}  # (path, inode, size, mtime) -> digest, for one process


def _content_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, computed once per process for a given (path, inode, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _CONTENT:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        _CONTENT[key] = h.hexdigest()
    return _CONTENT[key]


def file_stamp(path: str | os.PathLike) -> str:
    """The content of a file, or of every file under a folder (relative names and bytes), for data and LLM files.

    Content, not size and modification time: a copied, re-synced or re-extracted data folder (new mtimes, same
    bytes) must not make the round redo hours of LLM work, and an edit that keeps the size must be seen.
    """
    root = Path(path)
    if not root.exists():
        return "missing"
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(root) if p != root else p.name}:{_content_digest(p)}\n".encode())
    return h.hexdigest()[:16]


def model_stamp(path: str | None) -> str:
    if not path:
        return "none"
    if path == "bm25":
        return "bm25"
    p = Path(path)
    if p.is_dir():
        from rir_finetune.retrieval.model_folder import model_fingerprint

        return model_fingerprint(p)[:16]
    return file_stamp(p)


def data_stamp(data_dir: str, splits: list[str]) -> str:
    root = Path(data_dir)
    parts = [file_stamp(root / "corpus.jsonl"), file_stamp(root / "queries.jsonl")]
    parts += [file_stamp(root / "qrels" / f"{s}.tsv") for s in splits]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


RESULT_NEUTRAL = ("cache_dir",)  # keys that say where a stage keeps things, not what it computes


def stage_inputs(stage: Any, upstream: dict[str, str], root: str | None) -> dict[str, Any]:
    """What a stage's result depends on: its keys and wiring, its outside inputs' stamps, its upstream stages'
    fingerprints. Paths inside the round's folder ``root`` are written relative to it (``$OUT/...``), so a round
    folder that is copied or moved keeps every fingerprint."""
    body = {
        "stage": stage.name,
        # where embeddings are cached changes no result: moving the cache reruns nothing
        "settings": {k: v for k, v in stage.settings.items() if k not in RESULT_NEUTRAL},
        "extra": stage.extra,
        "externals": stage.externals,
        "upstream": {d: upstream.get(d, "") for d in stage.depends},
    }
    text = json.dumps(body, sort_keys=True, default=str)
    if root:
        text = text.replace(json.dumps(str(root))[1:-1], "$OUT")
    return json.loads(text)


def fingerprint(stage: Any, upstream: dict[str, str], root: str | None = None) -> str:
    """Changes when the stage's keys, an outside input or an upstream stage's fingerprint changes."""
    return settings_fingerprint(stage_inputs(stage, upstream, root), length=20)


def what_changed(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """The first few differences between two :func:`stage_inputs`, in words (the plan's reason for a rerun)."""
    if not isinstance(old, dict):
        return "its keys or inputs changed"
    changes = []
    for part, say in (("settings", "key {k!r}: {a!r} -> {b!r}"), ("extra", "wiring {k!r}: {a!r} -> {b!r}"),
                      ("externals", "input {k!r} changed"), ("upstream", "upstream stage {k!r} changed")):  # fmt: skip
        a_part, b_part = old.get(part) or {}, new.get(part) or {}
        for k in sorted(set(a_part) | set(b_part)):
            a, b = a_part.get(k, "unset"), b_part.get(k, "unset")
            if a != b:
                changes.append(say.format(k=k, a=a, b=b))
    if not changes:
        return "its keys or inputs changed"
    return "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
