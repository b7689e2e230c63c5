"""A corpus encoded into the embedding store (:mod:`.store`) by one process or several.

    torchrun --nproc_per_node 8 -m rir_finetune mine ...     # or eval: each process encodes its share of the shards

Rank 0 scans the corpus (digest, count: the store's key), opens or creates the store and sends every rank the
shards still to encode; each rank encodes a contiguous run of them on its own device (``device: auto`` is
``cuda:LOCAL_RANK``) and writes them; everyone waits at a barrier; then only rank 0 goes on to search and write
outputs, the others return ``None``. One process does the same with every shard. The process group is gloo: it
carries a few Python objects and a barrier, no tensors, so it needs no device. ``use_cache false`` (or a cache
folder that cannot be written and lacks these vectors) puts the store in a temporary folder removed at the end;
several nodes need a ``cache_dir`` they all see.
"""

from __future__ import annotations

import atexit
import datetime
import os
import shutil
import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rir_finetune import files
from rir_finetune.errors import UserError
from rir_finetune.retrieval.corpus import CorpusScan
from rir_finetune.retrieval.model_folder import EncoderSettings, model_fingerprint
from rir_finetune.retrieval.store import (
    MANIFEST,
    EmbeddingStore,
    default_cache_dir,
    fill_shards,
    store_identity,
    store_key,
)

# ranks wait at the barrier for the slowest one's shards, which may take hours on a large corpus; a rank that
# fails does not leave the others waiting that long: torchrun stops them all
BARRIER_TIMEOUT = datetime.timedelta(hours=24)


_joined = False  # whether this module started the process group (and so may end it)


def process_group() -> tuple[int, int]:
    """``(rank, world size)``; under torchrun (``WORLD_SIZE`` > 1) joins the gloo group first."""
    global _joined
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
        _joined = True
    return dist.get_rank(), dist.get_world_size()


def _broadcast(obj: Any, world: int) -> Any:
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier_and_leave(world: int) -> None:
    if world == 1:
        return
    import torch.distributed as dist

    dist.barrier()
    if _joined:  # a group someone else started (a caller's) stays theirs
        dist.destroy_process_group()


@dataclass
class EncodedCorpus:
    """Rank 0's view once every shard is stored."""

    store: EmbeddingStore
    scan: CorpusScan
    encoder: Any  # rank 0's encoder, for the queries
    key: str
    cache_dir: Path | None  # None: a temporary store, removed by close()
    shards_encoded: int  # by this run, all ranks together (the rest came from earlier runs)
    texts_encoded: int

    @property
    def hit(self) -> bool:
        return self.shards_encoded == 0

    @property
    def note(self) -> str:
        n = self.scan.count
        if self.hit:
            return f"corpus embeddings: cache hit ({n} passages)"
        total = len(self.store.shards)
        if self.shards_encoded == total:
            return f"corpus embeddings: encoded ({n} passages)"
        return (
            f"corpus embeddings: encoded {self.shards_encoded} of {total} shards ({self.texts_encoded} of {n} "
            f"passages), {total - self.shards_encoded} stored by an earlier run"
        )

    def close(self) -> None:
        if self.cache_dir is None:
            shutil.rmtree(self.store.folder, ignore_errors=True)


def encode_corpus(
    corpus: Any,
    make_encoder: Callable[[], Any],
    *,
    model_dir: str | Path,
    settings: EncoderSettings,
    store_dtype: str,
    shard_size: int,
    cache_dir: str | Path | None,
    use_cache: bool = True,
    watch_ids: Collection[str] = (),
    watch_texts: Collection[str] = (),
    check: Callable[[CorpusScan], None] | None = None,
) -> EncodedCorpus | None:
    """Make sure every shard of ``corpus`` (:class:`CorpusFile` or :class:`InMemoryCorpus`) is in the store;
    ``None`` on ranks other than 0.

    ``make_encoder()`` loads the :class:`Encoder` (rank 0: after the scan, so a bad corpus fails before the model
    loads). ``watch_ids`` / ``watch_texts``: rows to find during rank 0's scan; ``check(scan)`` may refuse it."""
    rank, world = process_group()
    plan: Any = None
    encoder: Any = None
    if rank == 0:
        try:
            scan = corpus.scan(watch_ids, watch_texts)
            if check is not None:
                check(scan)
            encoder = make_encoder()
            plan = _plan(
                scan, encoder.dtype, model_dir, settings, store_dtype, shard_size, cache_dir, use_cache
            )
        except UserError as e:  # the other ranks stop with it instead of waiting for a plan
            _broadcast(("error", str(e)), world)
            raise
    kind, sent = _broadcast(
        ("plan", (str(plan["store"].folder), plan["pending"], encoder.dtype)) if rank == 0 else None, world
    )
    if kind == "error":
        raise UserError(f"rank 0 stopped: {sent}")
    folder, pending, dtype = sent
    store = plan["store"] if rank == 0 else EmbeddingStore.read(folder)
    share = [int(i) for i in np.array_split(np.asarray(pending, dtype=np.int64), world)[rank]]
    if share and encoder is None:  # the other ranks load the model only when they have shards to encode
        encoder = make_encoder()
        if encoder.dtype != dtype:
            raise UserError(
                f"rank {rank} computes in {encoder.dtype}, rank 0 in {dtype}: set --dtype explicitly"
            )
    if share:
        fill_shards(store, corpus, share, encoder.encode_passages, rank)
    _barrier_and_leave(world)
    if rank != 0:
        return None
    missing = store.pending()
    if missing:
        raise UserError(f"{store.folder}: shards {missing[:5]} were not stored; run again to encode them")
    texts = sum(store.shards[i][1] - store.shards[i][0] for i in pending)
    return EncodedCorpus(store, plan["scan"], encoder, plan["key"], plan["cache_dir"], len(pending), texts)


def _plan(
    scan: CorpusScan, dtype, model_dir, settings, store_dtype, shard_size, cache_dir, use_cache
) -> dict[str, Any]:
    """Rank 0: find or create the store, list the shards still to encode."""
    identity = store_identity(model_fingerprint(model_dir), settings, scan.digest, dtype, store_dtype)
    key = store_key(identity)
    where, writable = files.check_cache_dir(
        (Path(cache_dir) if cache_dir else default_cache_dir()) if use_cache else None
    )
    folder = where / key if where is not None else None
    if folder is not None and not writable and not (folder / MANIFEST).is_file():
        folder = None
    if folder is not None and not writable:
        store = EmbeddingStore.open(folder, identity, scan.count, shard_size, create=False)
        if store.pending():  # unfinished and not ours to finish: this run's vectors go to a temporary store
            folder = None
    if folder is None:
        where = None
        folder = Path(tempfile.mkdtemp(prefix="rir_finetune_embeddings_"))
        atexit.register(shutil.rmtree, folder, True)  # also when the command stops with an error
    store = EmbeddingStore.open(folder, identity, scan.count, shard_size)
    return {"scan": scan, "key": key, "cache_dir": where, "store": store, "pending": store.pending()}
