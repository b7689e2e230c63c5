"""The embedding store: manifest, shards written atomically then recorded, resuming, refusal of foreign vectors,
and the whole-array cache on top of it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rir_finetune.errors import UserError
from rir_finetune.retrieval.cache import cache_key, cached_corpus_encode
from rir_finetune.retrieval.corpus import InMemoryCorpus
from rir_finetune.retrieval.model_folder import EncoderSettings
from rir_finetune.retrieval.store import (
    EmbeddingStore,
    fill_shards,
    shard_layout,
    store_identity,
    store_key,
)

SETTINGS = EncoderSettings("m", "mean", True, 32, "query: ", "")
IDS = [f"d{i}" for i in range(10)]
TEXTS = [f"text {i}" for i in range(10)]


def fake_encode(texts: list[str]) -> np.ndarray:
    """Each text to (its number, 1, -number): rows are recognisable after any shuffle of shards."""
    nums = np.array([float(t.split()[1]) for t in texts])
    return np.stack([nums, np.ones_like(nums), -nums], axis=1).astype(np.float32)


def identity(**kw):
    return store_identity("fp", SETTINGS, kw.pop("corpus", "digest"), **kw)


def test_layout_depends_on_shard_size_only():
    assert shard_layout(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_layout(3, 20_000) == [(0, 3)]


def test_identity_and_key():
    a = identity()
    assert "query_instruction" not in a["settings"] and "transformer_dir" not in a["settings"]
    assert store_key(a) == store_key(identity())
    for other in (identity(corpus="x"), identity(dtype="bfloat16"), identity(store_dtype="float16")):
        assert store_key(other) != store_key(a)


def test_fill_resume_and_read(tmp_path):
    store = EmbeddingStore.open(tmp_path / "s", identity(), 10, shard_size=4)
    corpus = InMemoryCorpus(IDS, TEXTS)
    assert store.pending() == [0, 1, 2]
    assert fill_shards(store, corpus, [1], fake_encode) == 4
    assert store.finished() == [1] and store.pending() == [0, 2]
    again = EmbeddingStore.open(tmp_path / "s", identity(), 10, shard_size=3)  # the store keeps its layout
    assert again.shards == [(0, 4), (4, 8), (8, 10)]
    assert fill_shards(again, corpus, again.pending(), fake_encode) == 6
    np.testing.assert_array_equal(again.rows([9, 0, 5]), fake_encode([TEXTS[9], TEXTS[0], TEXTS[5]]))
    ids = again.ids()
    assert len(ids) == 10 and [ids[i] for i in (0, 4, 9)] == ["d0", "d4", "d9"]
    stacked = np.concatenate([v for _, v in again.iter_vectors()])
    np.testing.assert_array_equal(stacked, fake_encode(TEXTS))
    records = [again.record(i) for i in range(3)]
    assert [r["rows"] for r in records] == [[0, 4], [4, 8], [8, 10]] and records[0]["dim"] == 3
    assert sorted(p.name for p in (tmp_path / "s").iterdir())[:4] == [
        "manifest.json",
        "shard-00000.ids.npy",
        "shard-00000.json",
        "shard-00000.npy",
    ]


def test_a_shard_without_its_record_or_with_a_damaged_array_is_encoded_again(tmp_path):
    store = EmbeddingStore.open(tmp_path, identity(), 10, shard_size=5)
    fill_shards(store, InMemoryCorpus(IDS, TEXTS), [0, 1], fake_encode)
    (tmp_path / "shard-00001.json").unlink()  # killed between the arrays and the record
    (tmp_path / "shard-00000.npy").write_bytes(b"not numpy")
    assert store.pending() == [0, 1]


def test_float16_store(tmp_path):
    store = EmbeddingStore.open(tmp_path, identity(store_dtype="float16"), 10, shard_size=10)
    fill_shards(store, InMemoryCorpus(IDS, TEXTS), [0], lambda t: fake_encode(t) / 3)
    assert store.vectors(0).dtype == np.float16
    rows = store.rows(list(range(10)))
    assert rows.dtype == np.float32
    np.testing.assert_allclose(rows, fake_encode(TEXTS) / 3, rtol=1e-3)


def test_foreign_manifest_is_refused_in_one_line(tmp_path):
    EmbeddingStore.open(tmp_path, identity(), 10, shard_size=5)
    with pytest.raises(UserError) as e:
        EmbeddingStore.open(tmp_path, identity(corpus="another"), 10, shard_size=5)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "manifest.json") in msg and "corpus differ" in msg
    with pytest.raises(UserError, match="count differ"):
        EmbeddingStore.open(tmp_path, identity(), 11, shard_size=5)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(UserError, match="unreadable embedding store manifest"):
        EmbeddingStore.read(tmp_path)


def test_fill_refuses_a_corpus_that_shrank(tmp_path):
    store = EmbeddingStore.open(tmp_path, identity(), 10, shard_size=5)
    with pytest.raises(UserError, match="fewer rows than when it was scanned"):
        fill_shards(store, InMemoryCorpus(IDS[:7], TEXTS[:7]), [0, 1], fake_encode)
    assert store.finished() == [0]


def test_whole_array_cache_is_a_one_shard_store(tmp_path):
    key, described = cache_key("fp", SETTINGS, "digest")
    assert described["ids"] == "row numbers"  # never the key of a sharded store, which holds real ids
    assert key != store_key(identity())
    calls = []

    def encode(texts):
        calls.append(len(texts))
        return fake_encode(texts)

    reps, hit = cached_corpus_encode(tmp_path, key, described, TEXTS, encode)
    assert not hit and calls == [10]
    again, hit = cached_corpus_encode(tmp_path, key, described, TEXTS, encode)
    assert hit and calls == [10]
    np.testing.assert_array_equal(reps, again)
    assert json.loads((tmp_path / key / "manifest.json").read_text())["shards"] == [[0, 10]]
    # store=False (a read-only cache): encodes, writes nothing; None: no cache at all
    _, hit = cached_corpus_encode(tmp_path / "ro", key, described, TEXTS, encode, store=False)
    assert not hit and not (tmp_path / "ro").exists()
    _, hit = cached_corpus_encode(None, key, described, TEXTS, encode)
    assert not hit and calls == [10, 10, 10]
