"""JSONL in and out for the generator commands: validated reading and an append-only partial file for resuming.

The partial file works like prep's (``prep/io.py`` ``ResumableJsonl``, which this layer may not import): finished
chunks are appended to ``OUT.partial`` and synced; a torn last line (a kill in mid-write) is cut off on reopen.
The final outputs are written atomically, then the partial file is removed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from rir_finetune.errors import UserError, located
from rir_finetune.files import atomic_write, iter_jsonl
from rir_finetune.guards import json_line

Record = dict[str, Any]


def read_checked(path: str | os.PathLike, check: Callable[[Record], str | None], what: str) -> list[Record]:
    """Every record of ``path``; ``check(record)`` returns a problem (named with ``path:line``) or None."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found")
    records = []
    for line_no, record in iter_jsonl(path):
        problem = check(record)
        if problem:
            raise located(path, line_no, problem)
        records.append(record)
    if not records:
        raise UserError(f"{path}: no records (the file is empty)")
    return records


def write_jsonl(path: Path, records: list[Record]) -> None:
    """All ``records`` to ``path``, atomically (a temporary file renamed over it)."""
    lines = [json_line(r, str(path)) for r in records]  # NaN refused before anything is written
    atomic_write(path, lambda f: f.writelines(lines))


class PartialJsonl:
    """``OUT.partial``: what a run finished so far, one JSON object per line, durable after each :meth:`append`."""

    def __init__(self, out: Path):
        self.path = out.with_name(out.name + ".partial")
        self._file: TextIO | None = None

    def done(self) -> list[Record]:
        """The complete lines an earlier run wrote (a torn last line is truncated away)."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with self.path.open("r+b") as f:
                f.truncate(end)
        records = []
        for line_no, line in enumerate(data[:end].decode("utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise located(
                        self.path, line_no, f"invalid JSON ({e.msg}); delete the file to start over"
                    ) from None
        return records

    def append(self, records: list[Record]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write("".join(json_line(r, str(self.path)) for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
