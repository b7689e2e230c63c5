"""A run's life in its output folder, the same for every command: lock, refused-run cleanup, resume, the resolved
config, the settings fingerprint, and the resumable partial output.

- **Lock**: :func:`lock_folder` holds ``OUT/.rir_finetune.lock`` until the process ends; a second run writing into
  the same folder is refused at once.
- **Refused runs**: :func:`refused_run_cleanup` puts a folder back as it was when the run is refused
  (:class:`UserError`) after it started writing: it never leaves a half-made folder that looks like a run.
- **Resume** (``train``, ``train-generator``): :func:`resolve_resume` turns ``resume_from_checkpoint``
  (a path, or ``auto`` / ``latest`` / ``true``) into the newest *complete* ``checkpoint-N``
  (:func:`checkpoint_is_complete`: one rule for every trainer), and refuses to train over a non-empty folder;
  :func:`check_resume_settings` refuses a resume whose defining settings differ from the recorded ones.
- **Resolved config**: :func:`write_resolved_config` writes every key a run used to ``OUT/rir_config.yaml``.
- **Fingerprint**: :func:`settings_fingerprint`, the one hash of a settings mapping (cache keys, partial files,
  round stages).
- **Partial output**: :class:`ResumableJsonl` appends finished records to ``OUT.partial`` (flushed and synced), so
  a killed ``augment``, ``generate`` or ``reward`` continues where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import yaml

from rir_finetune.errors import UserError, located
from rir_finetune.files import json_line, write_jsonl

logger = logging.getLogger("rir_finetune")

LOCK_NAME = ".rir_finetune.lock"
RESOLVED_CONFIG = "rir_config.yaml"
PARTIAL_SUFFIX = ".partial"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_held_locks: dict[str, Any] = {}


# ----------------------------------------------------------------------------------------------------------------
# One writer per folder; a refused run leaves no trace


def lock_folder(folder: str | os.PathLike) -> None:
    """Hold ``folder/.rir_finetune.lock`` until the process ends; a second writer is refused at once."""
    import fcntl

    folder = Path(folder)
    key = str(folder.resolve())
    if key in _held_locks:
        return
    folder.mkdir(parents=True, exist_ok=True)
    handle = (folder / LOCK_NAME).open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise UserError(
            f"{folder}: another run is writing into this folder (lock {LOCK_NAME} held); wait for it or choose "
            "another folder"
        ) from None
    _held_locks[key] = handle


def unlock_folder(folder: str | os.PathLike) -> None:
    handle = _held_locks.pop(str(Path(folder).resolve()), None)
    if handle is not None:
        handle.close()


@contextlib.contextmanager
def refused_run_cleanup(folder: str | os.PathLike, ours: Iterable[str]) -> Iterator[None]:
    """On a :class:`UserError` inside the block, put ``folder`` back as it was before it.

    A folder that did not exist is removed when it holds only the files named in ``ours`` (our bookkeeping:
    resolved config, lock). An existing folder keeps everything; of ``ours`` only files that were not there
    before are removed.
    """
    folder = Path(folder)
    existed = folder.exists()
    before = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    names = set(ours) | {LOCK_NAME}
    try:
        yield
    except UserError:
        if folder.is_dir():
            created = {p.name for p in folder.iterdir()} - before
            if created <= names:
                unlock_folder(folder)
                for name in created:
                    (folder / name).unlink(missing_ok=True)
                if not existed and not any(folder.iterdir()):
                    shutil.rmtree(folder, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------------------------
# Resume


def is_auto(resume: Any) -> bool:
    """``resume_from_checkpoint`` asks for the newest checkpoint in the output folder."""
    return resume is not None and str(resume).strip().lower() in {"auto", "latest", "true"}


def checkpoint_is_complete(folder: str | os.PathLike) -> bool:
    """A Trainer writes ``trainer_state.json`` last: a checkpoint is complete when it parses and weights exist
    (the whole model, or a LoRA adapter at the top or in ``adapter/``)."""
    folder = Path(folder)
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return any(folder.glob("*.safetensors")) or any(folder.glob("adapter/*.safetensors"))


def checkpoints(out: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` folders of ``out``, newest first."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _CHECKPOINT.fullmatch(p.name))
    ]
    return [p for _, p in sorted(found, reverse=True)]


def latest_complete_checkpoint(out: str | os.PathLike) -> str | None:
    """The newest complete ``checkpoint-N`` of ``out`` (a kill while saving leaves an incomplete one: skipped)."""
    for p in checkpoints(out):
        if checkpoint_is_complete(p):
            return str(p)
        logger.warning("skipping incomplete checkpoint %s (interrupted while saving)", p)
    return None


def resolve_resume(
    resume: Any, output_dir: str | os.PathLike, overwrite: bool, ours: Iterable[str] = ()
) -> str | None:
    """The checkpoint a run continues from: a path, the newest complete one for ``auto``, or None.

    A non-empty ``output_dir`` (holding more than ``ours``) is refused unless the run resumes or ``overwrite`` is set.
    """
    out = Path(output_dir)
    auto = is_auto(resume)
    if auto:
        resume = latest_complete_checkpoint(out)
        if resume is None:
            logger.info(
                "resume_from_checkpoint auto: no complete checkpoint in %s, starting from scratch", out
            )
    elif resume is not None and not checkpoint_is_complete(resume):
        raise UserError(f"config key 'resume_from_checkpoint': {resume} is not a complete checkpoint folder")
    if resume is None and not auto and out.is_dir() and not overwrite:
        if {p.name for p in out.iterdir()} - set(ours) - {LOCK_NAME}:
            raise UserError(
                f"config key 'output_dir': {out} is not empty; resume with --resume_from_checkpoint auto, "
                "or pass --overwrite_output_dir true, or choose another folder"
            )
    return resume


def holds_a_run(out: str | os.PathLike, ours: Iterable[str]) -> bool:
    """``out`` is empty, absent, or holds an earlier run of ours (a bookkeeping file or a ``checkpoint-N``)."""
    out = Path(out)
    if not out.is_dir():
        return True
    names = {p.name for p in out.iterdir()}
    return (
        not names or bool(names & (set(ours) | {LOCK_NAME})) or any(_CHECKPOINT.fullmatch(n) for n in names)
    )


def changed_settings(saved: dict[str, Any], new: dict[str, Any], may_change: Iterable[str] = ()) -> list[str]:
    """``key: old -> new`` for every key of ``saved`` that ``new`` sets differently (except ``may_change``)."""
    allowed = set(may_change)
    out = []
    for key in sorted(set(saved) & set(new)):
        if key in allowed:
            continue
        old, cur = saved[key], new[key]
        if json.dumps(old, default=str, sort_keys=True) != json.dumps(cur, default=str, sort_keys=True):
            out.append(f"{key}: {old!r} -> {cur!r}")
    return out


def check_resume_settings(
    saved_config: str | os.PathLike, new: dict[str, Any], defining: Iterable[str]
) -> None:
    """A resumed run continues the checkpoint's run: refused when a ``defining`` key differs from the value recorded
    in ``saved_config`` (the run's resolved config)."""
    path = Path(saved_config)
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return
    new = json.loads(json.dumps(new, default=str))
    changed = changed_settings(saved, new, may_change=set(new) - set(defining))
    if changed:
        raise UserError(
            f"{path}: resuming would continue the checkpoint's run with other settings ({'; '.join(changed[:4])}"
            f"{'; ...' if len(changed) > 4 else ''}); restore them, or train into a new output_dir"
        )


# ----------------------------------------------------------------------------------------------------------------
# The resolved config and the settings fingerprint


def write_resolved_config(
    out: str | os.PathLike, values: dict[str, Any], name: str = RESOLVED_CONFIG
) -> Path:
    """Every key the run uses, to ``out/name`` (atomically); secrets (``token``, ``hub_token``) left out."""
    resolved = {k: v for k, v in values.items() if k not in {"token", "hub_token"}}
    text = yaml.safe_dump(json.loads(json.dumps(resolved, default=str)), sort_keys=False)
    path = Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def settings_fingerprint(settings: Any, length: int = 20) -> str:
    """A hex digest of ``settings`` (any JSON-like value; keys sorted, other objects by ``str``)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


# ----------------------------------------------------------------------------------------------------------------
# Partial output


def partial_path(path: str | os.PathLike) -> Path:
    """Where an unfinished output of ``path`` is written."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


class ResumableJsonl:
    """Append-only ``OUT.partial`` for long runs: :meth:`done` reads what an earlier run finished.

    A run killed in the middle of a write leaves a last line without its newline; it is cut off on open, so only
    complete records count. :meth:`finish` writes the final ``OUT`` (atomically) and removes the partial file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self._file: TextIO | None = None

    def done(self) -> list[dict[str, Any]]:
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

    def append(self, records: list[dict[str, Any]]) -> None:
        """Append ``records`` and make them durable before returning."""
        lines = "".join(
            json_line(r, str(self.partial)) for r in records
        )  # NaN refused before a byte is written
        if self._file is None:
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.partial.open("a", encoding="utf-8")
        try:
            self._file.write(lines)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:  # a full disk: what was synced before stays; a torn last line is cut on resume
            file, self._file = self._file, None
            with contextlib.suppress(OSError):
                file.close()
            raise OSError(e.errno, e.strerror, str(self.partial)) from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        """Drop the partial file (its work was written elsewhere, or is to be redone)."""
        self.close()
        self.partial.unlink(missing_ok=True)

    def finish(self, records: list[dict[str, Any]]) -> None:
        """Write the complete output (``records`` in their final order) and drop the partial file."""
        self.close()
        # not through OUT.partial: that file is the only copy of the finished work until OUT exists
        write_jsonl(self.path, records, tmp=self.partial.with_name(self.partial.name + ".tmp"))
        self.partial.unlink(missing_ok=True)
