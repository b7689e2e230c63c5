"""Corpus embeddings on disk, in shards: the embedding cache of ``eval``, ``mine`` and every stage that encodes a
corpus.

A store is a folder ``<cache_dir>/<key>/``; the key hashes what produced the vectors, never a folder name: the
model's content (:func:`model_fingerprint`), every encoder setting but the query instruction, the corpus (every id
and text, :func:`corpus_hash`), the compute dtype and the store dtype. It holds

- ``manifest.json``: that identity, the passage count and the shard layout (``[start, end)`` rows), written once
  by the run that creates the store;
- per shard ``shard-00000.npy`` (float32 or float16 rows, memory-mappable), ``shard-00000.ids.npy`` (the doc ids,
  UTF-8 bytes) and ``shard-00000.json``, the record that the shard is finished, written after both arrays.

Every file is written atomically, so a run killed in the middle leaves finished shards and nothing half-written:
the next run encodes only the shards without a record (a test hook, ``RIR_FINETUNE_KILL_AFTER_SHARD=i``, SIGKILLs
the process right after shard ``i`` is recorded). The layout depends on ``shard_size`` alone, never on how many
processes encode, so one process and eight write the same vectors. A folder whose manifest names another model,
corpus or setting is refused, not overwritten.

Default location: ``$RIR_FINETUNE_CACHE`` if set, else ``$XDG_CACHE_HOME/rir_finetune/embeddings``, else
``~/.cache/rir_finetune/embeddings``.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from rir_finetune.errors import UserError
from rir_finetune.files import atomic_write, shareable
from rir_finetune.lifecycle import settings_fingerprint
from rir_finetune.retrieval.corpus import digest_update
from rir_finetune.retrieval.model_folder import EncoderSettings

STORE_VERSION = 2  # 1 was one whole-corpus <key>.npy; bump when the encoder's numerics change
STORE_DTYPES = ("float32", "float16")
MANIFEST = "manifest.json"
KILL_AFTER_SHARD = "RIR_FINETUNE_KILL_AFTER_SHARD"
RUN_ID = uuid.uuid4().hex[:12]  # which process wrote a shard: tells a resumed run's shards from earlier ones


def default_cache_dir() -> Path:
    """Where corpus embeddings go unless ``cache_dir`` is configured."""
    if os.environ.get("RIR_FINETUNE_CACHE"):
        return Path(os.environ["RIR_FINETUNE_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "rir_finetune" / "embeddings"


def corpus_hash(doc_ids: list[str], texts: list[str]) -> str:
    """SHA-256 over every (id, text) pair in order (what :meth:`CorpusFile.scan` computes while streaming)."""
    h = hashlib.sha256()
    for doc_id, text in zip(doc_ids, texts, strict=True):
        digest_update(h, doc_id, text)
    return h.hexdigest()


def store_identity(
    model_fingerprint: str,
    settings: EncoderSettings,
    corpus_digest: str,
    dtype: str = "float32",
    store_dtype: str = "float32",
) -> dict[str, Any]:
    """What the vectors depend on. The model's path is not part of it, only its content; queries are never
    stored, so neither is their instruction. ``dtype``: what the encoder computed in (``Encoder.dtype``)."""
    fields = dataclasses.asdict(settings)
    fields.pop("transformer_dir")
    fields.pop("query_instruction")
    return {
        "version": STORE_VERSION,
        "model": model_fingerprint,
        "settings": fields,
        "corpus": corpus_digest,
        "dtype": dtype,
        "store_dtype": store_dtype,
    }


def store_key(identity: dict[str, Any]) -> str:
    return settings_fingerprint(identity, length=32)


def shard_layout(count: int, shard_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` rows of each shard: ``shard_size`` rows each, the last one shorter."""
    return [(s, min(s + shard_size, count)) for s in range(0, count, shard_size)]


class EmbeddingStore:
    """One store folder: its manifest, and its shards as memory-mapped arrays."""

    def __init__(self, folder: Path, manifest: dict[str, Any]):
        self.folder = folder
        self.identity: dict[str, Any] = manifest["identity"]
        self.count: int = manifest["count"]
        self.shards: list[tuple[int, int]] = [tuple(s) for s in manifest["shards"]]
        self.starts = [s for s, _ in self.shards]
        self._vectors: dict[int, np.ndarray] = {}
        self._ids: dict[int, np.ndarray] = {}

    @classmethod
    def open(
        cls, folder: str | Path, identity: dict[str, Any], count: int, shard_size: int, create: bool = True
    ) -> EmbeddingStore:
        """The store in ``folder``, created (``create``) with ``shard_size`` rows per shard if it has no manifest.

        A manifest with another identity or passage count is a one-line error: the folder belongs to other
        vectors. An existing store keeps its own layout, whatever ``shard_size`` says now."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file() and create:
            manifest = {"identity": identity, "count": count, "shards": shard_layout(count, shard_size)}
            _create_once(path, json.dumps(manifest, indent=1) + "\n")
        store = cls.read(folder)
        want = {**identity, "count": count}
        have = {**store.identity, "count": store.count}
        differ = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        if differ:
            raise UserError(
                f"{path}: this embedding store holds other vectors ({', '.join(differ)} differ: another model, "
                "corpus or setting); give another cache_dir or remove the folder"
            )
        return store

    @classmethod
    def read(cls, folder: str | Path) -> EmbeddingStore:
        path = Path(folder) / MANIFEST
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            return cls(Path(folder), manifest)
        except FileNotFoundError:
            raise UserError(f"{path}: not found (not an embedding store)") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: unreadable embedding store manifest ({e}); remove the folder") from None

    # -- shards ------------------------------------------------------------------------------------------------

    def _path(self, i: int, suffix: str) -> Path:
        return self.folder / f"shard-{i:05d}{suffix}"

    def finished(self) -> list[int]:
        """Shards with a record whose arrays are there with the recorded shape (the rest are encoded again)."""
        return [i for i in range(len(self.shards)) if self._readable(i)]

    def pending(self) -> list[int]:
        done = set(self.finished())
        return [i for i in range(len(self.shards)) if i not in done]

    def record(self, i: int) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(i, ".json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _readable(self, i: int) -> bool:
        rec = self.record(i)
        if rec is None:
            return False
        start, end = self.shards[i]
        try:
            vecs = np.load(self._path(i, ".npy"), mmap_mode="r", allow_pickle=False)
            ids = np.load(self._path(i, ".ids.npy"), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            return False
        return (
            vecs.ndim == 2
            and vecs.shape[0] == ids.shape[0] == end - start
            and vecs.dtype == np.dtype(self.identity["store_dtype"])
        )

    def write_shard(
        self, i: int, reps: np.ndarray, ids: list[str], rank: int = 0, seconds: float = 0.0
    ) -> None:
        """Store shard ``i``: vectors (n, H) in the store dtype, ids, then the record that it is finished
        (``seconds``: how long encoding it took, for people reading the folder)."""
        start, end = self.shards[i]
        if reps.shape[0] != end - start or len(ids) != end - start:
            raise ValueError(f"shard {i} holds rows {start}-{end}, got {reps.shape[0]} vectors")
        vecs = np.ascontiguousarray(reps, dtype=self.identity["store_dtype"])
        id_bytes = np.array([d.encode("utf-8") for d in ids], dtype=np.bytes_)
        atomic_write(self._path(i, ".npy"), lambda f: np.save(f, vecs, allow_pickle=False), binary=True)
        atomic_write(
            self._path(i, ".ids.npy"), lambda f: np.save(f, id_bytes, allow_pickle=False), binary=True
        )
        record = {"rows": [start, end], "dim": int(vecs.shape[1]), "run": RUN_ID, "rank": rank,
                  "seconds": round(seconds, 3)}  # fmt: skip
        atomic_write(self._path(i, ".json"), lambda f: f.write(json.dumps(record) + "\n"))
        if os.environ.get(KILL_AFTER_SHARD) == str(i):
            os.kill(os.getpid(), signal.SIGKILL)

    def vectors(self, i: int) -> np.ndarray:
        """Shard ``i``'s (n, H) vectors as stored, memory-mapped."""
        if i not in self._vectors:
            self._vectors[i] = np.load(self._path(i, ".npy"), mmap_mode="r", allow_pickle=False)
        return self._vectors[i]

    def iter_vectors(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, (n, H) float32)`` of each shard in order; one shard in memory at a time."""
        for i, (start, _) in enumerate(self.shards):
            yield start, np.ascontiguousarray(self.vectors(i), dtype=np.float32)

    @property
    def dim(self) -> int:
        return int(self.vectors(0).shape[1])

    def rows(self, rows: np.ndarray | list[int]) -> np.ndarray:
        """(len(rows), H) float32 vectors of global ``rows``, in the order given."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        shard_of = np.searchsorted(self.starts, rows, side="right") - 1
        for i in np.unique(shard_of):
            sel = shard_of == i
            out[sel] = self.vectors(int(i))[rows[sel] - self.starts[i]]
        return out

    def doc_id(self, row: int) -> str:
        i = bisect.bisect_right(self.starts, row) - 1
        if i not in self._ids:
            self._ids[i] = np.load(self._path(i, ".ids.npy"), mmap_mode="r", allow_pickle=False)
        return bytes(self._ids[i][row - self.starts[i]]).decode("utf-8")

    def ids(self) -> StoreIds:
        return StoreIds(self)


class StoreIds:
    """The store's doc ids as a read-only sequence (``ids[row]``), read from the memory-mapped shards on demand."""

    def __init__(self, store: EmbeddingStore):
        self.store = store

    def __len__(self) -> int:
        return self.store.count

    def __getitem__(self, row: int) -> str:
        if not 0 <= row < self.store.count:
            raise IndexError(row)
        return self.store.doc_id(int(row))


def fill_shards(
    store: EmbeddingStore,
    corpus: Any,
    shard_indices: list[int],
    encode: Callable[[list[str]], np.ndarray],
    rank: int = 0,
) -> int:
    """Encode and store ``shard_indices`` (ascending) of ``corpus`` (a :class:`CorpusFile` or
    :class:`InMemoryCorpus`), streaming one shard's texts at a time; returns how many texts were encoded."""
    spans = [store.shards[i] for i in shard_indices]
    done, encoded = 0, 0
    ids: list[str] = []
    texts: list[str] = []
    for row, doc_id, text in corpus.rows(spans):
        ids.append(doc_id)
        texts.append(text)
        if row + 1 == spans[done][1]:
            start = time.perf_counter()
            reps = np.asarray(encode(texts), dtype=np.float32)
            store.write_shard(shard_indices[done], reps, ids, rank, time.perf_counter() - start)
            encoded += len(texts)
            done, ids, texts = done + 1, [], []
    if done < len(spans):
        raise UserError(
            f"{corpus.source}: has fewer rows than when it was scanned ({store.count}); it changed during the run"
        )
    return encoded


def _create_once(path: Path, text: str) -> None:
    """Write ``path`` only if it does not exist, atomically: of two runs creating one store, the first manifest
    wins and the second run reads it (a rename would let the second replace the first's layout)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        shareable(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: a rename, unless the other run was first
            if not path.exists():
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
