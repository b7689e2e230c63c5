"""Files: the one text decoder and JSONL reader, atomic writes, and the checks of an output path before any work.

Every text input is read through :func:`iter_lines` / :func:`read_text` / :func:`iter_jsonl` / :func:`read_jsonl`:
a byte sequence that is not UTF-8 is a :class:`UserError` naming ``file:line`` (a leading UTF-8 byte-order mark is
accepted). Every JSONL line is written through :func:`json_line` (NaN and infinity are refused: they are not JSON).

Outputs are checked before any work, naming every input the command reads::

    out = files.check_output_file(cfg.output, key="output", reads=[cfg.input, cfg.corpus])
    folder = files.check_output_dir(cfg.output_dir, key="output_dir", reads=[cfg.model, cfg.data])

Refused: an output that is one of the inputs (or inside an input folder and already there), a folder path that is a
file, a file path that is a folder, a location that cannot be written. Nothing is created by a check; the writers
(:func:`atomic_write`, :func:`atomic_jsonl`) create the parent folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, TextIO

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


def read_jsonl(
    path: str | Path, check: Callable[[dict[str, Any]], str | None] | None = None, what: str = "input"
) -> list[dict[str, Any]]:
    """Every record of ``path``, validated: ``check(record)`` returns a problem (named with ``path:line``) or None.

    A missing file and a file without records are :class:`UserError`\\ s: a command never runs on nothing.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found")
    records = []
    for line_no, record in iter_jsonl(path):
        problem = check(record) if check else None
        if problem:
            raise located(path, line_no, problem)
        records.append(record)
    if not records:
        raise UserError(f"{path}: no records (the file is empty)")
    return records


def json_line(record: dict[str, Any], where: str = "output") -> str:
    """One JSONL line; NaN and infinity are refused (they are not JSON)."""
    try:
        return json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"
    except ValueError:
        raise UserError(
            f"{where}: a record holds NaN or infinity (the model gives non-finite numbers)"
        ) from None


@contextlib.contextmanager
def atomic_jsonl(path: str | os.PathLike, tmp: str | os.PathLike | None = None) -> Iterator[TextIO]:
    """Write JSONL lines to ``tmp`` (default ``path.partial``); rename it to ``path`` when the block finishes.

    On an exception the temporary file is removed, so ``path`` is either the previous file or the complete new one.
    """
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    f = tmp.open("w", encoding="utf-8")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # closing flushes again, and a full disk refuses that too
            f.close()
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not e.filename:  # a failed write names no file: name the output
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def write_jsonl(
    path: str | os.PathLike, records: Iterable[dict[str, Any]], tmp: str | os.PathLike | None = None
) -> None:
    """All ``records`` to ``path`` atomically (through ``tmp``, default ``path.partial``)."""
    with atomic_jsonl(path, tmp) as f:
        for record in records:
            f.write(json_line(record, str(path)))


def shareable(path: str | Path) -> None:
    """Give a file we wrote the mode any tool would (0666 less the process umask): temporary files and folders
    are created 0600 / 0700, and a rename keeps that, so results would otherwise be private to their writer."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def atomic_write(path: str | Path, write: Callable[[IO], None], binary: bool = False) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
        shareable(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------------------------------------------
# Output paths, checked before any work; nothing is created by a check


def _paths(reads: Iterable[str | os.PathLike | None]) -> list[Path]:
    return [Path(p) for p in reads if p]


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def inside(child: Path, folder: Path) -> bool:
    try:
        return child.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def check_writable(path: Path, key: str) -> None:
    """The nearest existing ancestor of ``path`` must be a folder we can write into."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe != path and not probe.is_dir():
        raise UserError(f"config key {key!r}: {path}: {probe} is a file, not a folder")
    if probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"config key {key!r}: {path}: the folder {probe} is not writable")


def check_output_file(
    path: str | os.PathLike | None, *, key: str, reads: Iterable[str | os.PathLike | None] = ()
) -> Path:
    """The output file ``path``, refused (UserError naming ``key``) when writing it could destroy an input.

    Refused: no path; ``path`` is a folder; ``path`` is one of ``reads`` (files or folders the command reads);
    ``path`` already exists inside a folder in ``reads`` (a model or data folder's own file); the location cannot
    be written (read-only folder, a parent that is a file).
    """
    if not path:
        raise UserError(f"config key {key!r} is required (the file to write)")
    out = Path(path)
    if out.is_dir():
        raise UserError(f"config key {key!r}: {out} is a folder; give a file path")
    for src in _paths(reads):
        if _same(out, src) or (src.is_file() and out.name == src.name and _same(out.parent, src.parent)):
            raise UserError(
                f"config key {key!r}: {out}: the output is the input file {src}; write to another path"
            )
        if src.is_dir() and out.exists() and inside(out, src):
            raise UserError(
                f"config key {key!r}: {out} is a file of the input folder {src}; write to another path"
            )
    check_writable(out, key)
    if out.exists() and not os.access(out, os.W_OK):
        raise UserError(f"config key {key!r}: {out} is not writable")
    return out


def check_output_dir(
    path: str | os.PathLike | None,
    *,
    key: str,
    reads: Iterable[str | os.PathLike | None] = (),
    may_hold_inputs: bool = False,
) -> Path:
    """The output folder ``path``, refused when it is a file, one of the input folders (or, unless
    ``may_hold_inputs``, an existing folder holding one: a command that writes sub-folders could reach it), or
    cannot be written."""
    if not path:
        raise UserError(f"config key {key!r}: required (the folder to write)")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"config key {key!r}: {out} is a file, not a folder")
    for src in _paths(reads):
        holds = not may_hold_inputs and src.exists() and src.is_dir() and out.exists() and inside(src, out)
        if _same(out, src) or holds:
            raise UserError(
                f"config key {key!r}: {out} is (or holds) the input {src}; writing there would change it; "
                "choose another folder"
            )
    check_writable(out, key)
    return out


def check_cache_dir(path: str | os.PathLike | None, *, key: str = "cache_dir") -> tuple[Path | None, bool]:
    """``(cache folder, store)`` checked before any work: a folder that cannot be written still serves hits
    (``store`` False, one warning); a location that cannot become a folder is refused. ``None``: no cache."""
    if path is None:
        return None, False
    path = Path(path)
    try:
        check_writable(path, key)
    except UserError as e:
        if path.is_dir():
            print(f"warning: {e}; corpus embeddings are read from it but not stored", file=sys.stderr)
            return path, False
        raise
    return path, True
