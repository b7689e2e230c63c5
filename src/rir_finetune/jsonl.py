"""Reading JSONL: the one reader behind training data, evaluation data and the data-preparation commands."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rir_finetune.errors import UserError, located


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for every non-blank line of ``path``.

    A missing or unreadable file, a malformed line and a line that is not a JSON object are :class:`UserError`\\ s
    naming ``path`` (and ``path:line``).
    """
    path = Path(path)
    try:
        handle = path.open(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    with handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise located(path, line_no, f"invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise located(path, line_no, f"expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj
