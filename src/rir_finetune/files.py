"""Files: the one text decoder and JSONL reader (training data, evaluation data, data-preparation commands, configs)
and atomic writes.

Every text input is read through :func:`iter_lines` / :func:`read_text`: a byte sequence that is not UTF-8 is a
:class:`UserError` naming ``file:line`` (a leading UTF-8 byte-order mark is accepted).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from rir_finetune.errors import UserError, located


def _open_binary(path: Path) -> IO[bytes]:
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def _decode(raw: bytes, path: Path, line_no: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise located(
            path,
            line_no,
            f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); convert the file",
        ) from None


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, text)`` for every line of ``path`` (newline kept), decoded as UTF-8."""
    path = Path(path)
    with _open_binary(path) as handle:
        for line_no, raw in enumerate(handle, start=1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            yield line_no, _decode(raw, path, line_no)


def read_text(path: str | Path) -> str:
    """The whole of ``path`` as text; a non-UTF-8 byte names its line."""
    return "".join(line for _, line in iter_lines(path))


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for every non-blank line of ``path``.

    A missing or unreadable file, a line that is not UTF-8, a malformed line and a line that is not a JSON object
    are :class:`UserError`\\ s naming ``path`` (and ``path:line``).
    """
    path = Path(path)
    for line_no, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise located(path, line_no, f"invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise located(path, line_no, f"expected a JSON object, got {type(obj).__name__}")
        yield line_no, obj


def atomic_write(path: str | Path, write: Callable[[IO], None], binary: bool = False) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
