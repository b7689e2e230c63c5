"""`rir-finetune mine`: hard negatives from BM25 or a dense model, never a judged positive, deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rir_finetune.errors import UserError
from rir_finetune.prep.beir import run_from_beir
from rir_finetune.prep.mine import Pool, collect, run_mine

SLICE_QUERIES = 20
SLICE_DOCS = 160


def read_out(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_negatives(records: list[dict], n: int) -> None:
    """Every record has n distinct negatives, none of them a judged positive (by id and by text)."""
    for r in records:
        assert len(r["neg"]) == n and len(set(r["neg"])) == n, r["qid"]
        assert not set(r["neg"]) & set(r["pos"])
        if "neg_ids" in r:
            assert len(r["neg_ids"]) == n and not set(r["neg_ids"]) & set(r["pos_ids"])


@pytest.fixture(scope="module")
def scifact_train(scifact_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scifact") / "train.jsonl"
    run_from_beir(None, [str(scifact_dir), "--split", "train", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def scifact_slice(scifact_dir, tmp_path_factory) -> Path:
    """20 train queries and a 160-document corpus (their positives plus the first documents), BEIR layout."""
    folder = tmp_path_factory.mktemp("scifact_slice")
    rows = (scifact_dir / "qrels" / "train.tsv").read_text().splitlines()[1:]
    qids = list(dict.fromkeys(r.split("\t")[0] for r in rows))[:SLICE_QUERIES]
    keep_rows = [r for r in rows if r.split("\t")[0] in qids]
    pos_ids = {r.split("\t")[1] for r in keep_rows}
    docs = [json.loads(line) for line in (scifact_dir / "corpus.jsonl").open()]
    chosen = [d for d in docs if d["_id"] in pos_ids]
    chosen += [d for d in docs if d["_id"] not in pos_ids][: SLICE_DOCS - len(chosen)]
    queries = [json.loads(line) for line in (scifact_dir / "queries.jsonl").open()]
    (folder / "qrels").mkdir()
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in chosen))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries if q["_id"] in qids))
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(keep_rows) + "\n")
    run_from_beir(None, [str(folder), "--out", str(folder / "train.jsonl")])
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Choosing candidates from one ranking (no model)


def test_collect_skips_positives_false_negatives_and_copies():
    texts = ["p", "a", "b", "q", "c", "c", "d", "e"]
    pool = Pool(texts=texts, ids=[f"d{i}" for i in range(8)], source="test")
    record = {"query": "q", "pos": ["p"], "pos_ids": ["d0"]}
    scores = np.array([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0])  # rank r holds pool row r
    # window ranks 0-4 (END 5 excluded); positive score 9.0 x threshold 0.75 = limit 6.75
    c = collect(record, scores, np.arange(8), pool, {0}, limit=6.75, sample_range=(0, 5), need=3)
    assert c.positives == 1  # rank 0, the judged positive
    assert c.false_negatives == 2  # ranks 1 and 2 score above 6.75
    assert c.copies == 2  # rank 3 is the query's own text, rank 5 repeats rank 4's text
    assert c.window == [(4, 4)]  # the only usable candidate inside the window
    assert c.below == [(6, 6), (7, 7)]  # the fill, best first


def test_collect_window_and_fill():
    pool = Pool(texts=[f"t{i}" for i in range(10)], ids=None, source="test")
    record = {"query": "q", "pos": ["t3"]}
    c = collect(
        record, np.linspace(1, 0, 10), np.arange(10), pool, {3}, limit=None, sample_range=(2, 5), need=4
    )
    assert c.window == [(2, 2), (4, 4)]  # rank 3 is the positive
    assert c.below == [(5, 5), (6, 6)]  # just enough to fill 4, nothing more
    assert c.positives == 1 and c.false_negatives == 0


# ----------------------------------------------------------------------------------------------------------------
# BM25 (fast on the whole SciFact corpus)


def test_bm25_mining_on_scifact(scifact_dir, scifact_train, tmp_path, capsys):
    out = tmp_path / "bm25.jsonl"
    args = [
        "--input",
        str(scifact_train),
        "--model",
        "bm25",
        "--corpus",
        str(scifact_dir),
        "--negatives",
        "7",
    ]
    counts = run_mine(None, [*args, "--output", str(out)])
    records = read_out(out)
    assert len(records) == counts["records"] == 809
    check_negatives(records, 7)
    assert counts["positives"] > 0  # judged positives do appear in the windows, and were skipped
    printed = capsys.readouterr().out
    assert "809 records; negatives per record min 7 / mean 7.00 / max 7" in printed
    assert "likely false negatives" in printed and "judged positives skipped" in printed


def test_bm25_mining_is_seeded_and_deterministic(scifact_slice, tmp_path):
    args = ["--input", str(scifact_slice / "train.jsonl"), "--model", "bm25", "--corpus", str(scifact_slice),
            "--negatives", "5", "--range_for_sampling", "5-60"]  # fmt: skip
    outs = [tmp_path / f"{name}.jsonl" for name in ("a", "b", "seed7")]
    for out, seed in zip(outs, ["42", "42", "7"], strict=True):
        run_mine(None, [*args, "--output", str(out), "--seed", seed])
    check_negatives(read_out(outs[0]), 5)
    assert outs[0].read_text() == outs[1].read_text()
    assert outs[0].read_text() != outs[2].read_text()


def test_bm25_pool_of_the_records_own_passages(tmp_path):
    topics = ["cell", "gene", "heart", "brain", "virus", "liver"]
    records = []
    for i, t in enumerate(topics):
        records.append(
            {
                "query": f"{t} study {i}",
                "pos": [f"{t} study {i} result"],
                "neg": [f"{t} unrelated note {j}" for j in range(3)]
                + [f"{topics[i - 1]} study {i - 1} result"],
            }
        )
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    run_mine(None, ["--input", str(src), "--output", str(out), "--model", "bm25", "--negatives", "3",
                    "--range_for_sampling", "0-10", "--negative_threshold", "none"])  # fmt: skip
    mined = read_out(out)
    pool = {t for r in records for t in r["pos"] + r["neg"]}
    for r, m in zip(records, mined, strict=True):
        assert len(m["neg"]) == 3 and r["pos"][0] not in m["neg"] and set(m["neg"]) <= pool
        assert "neg_ids" not in m  # the records' own passages have no ids


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--range_for_sampling", "50-10"], "START-END with START < END"),
        (["--negatives", "0"], "'negatives': must be a positive integer, got 0"),
        (["--model", "no/such/dir"], "model folder not found"),
        (["--output", "{input}"], "the output is the input file"),
        (["--negativs", "3"], "did you mean 'negatives'"),
    ],
)
def test_mine_config_errors(tmp_path, extra, message):
    src = tmp_path / "in.jsonl"
    src.write_text('{"query": "q", "pos": ["p"]}\n')
    tokens = ["--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--model", "bm25"]
    with pytest.raises(UserError, match=message):
        run_mine(None, tokens + [t.format(input=src) for t in extra])


def test_mine_malformed_input_names_the_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"query": "q", "pos": ["p"]}\n{"query": "q" "pos": ["p"]}\n')
    with pytest.raises(UserError, match=r"in.jsonl:2: invalid JSON"):
        run_mine(None, ["--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--model", "bm25"])


# ----------------------------------------------------------------------------------------------------------------
# Dense (all-MiniLM-L6-v2): a 160-document slice here, the whole corpus in the slow test


def test_dense_mining_on_a_scifact_slice(minilm_dir, scifact_slice, tmp_path, capsys):
    args = ["--input", str(scifact_slice / "train.jsonl"), "--model", str(minilm_dir),
            "--corpus", str(scifact_slice), "--negatives", "15", "--range_for_sampling", "10-100",
            "--max_length", "64", "--cache_dir", str(tmp_path / "cache"),
            "--device", "cpu"]  # fmt: skip  # auto there: fp32, padded
    counts = run_mine(None, [*args, "--output", str(tmp_path / "a.jsonl")])
    assert "corpus embeddings: encoded (160 passages)" in capsys.readouterr().err
    records = read_out(tmp_path / "a.jsonl")
    assert len(records) == counts["records"] == SLICE_QUERIES
    check_negatives(records, 15)
    assert counts["short"] == 0
    # the second run reads the corpus embeddings from the cache and gives the same negatives
    run_mine(None, [*args, "--output", str(tmp_path / "b.jsonl")])
    assert "corpus embeddings: cache hit (160 passages)" in capsys.readouterr().err
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    # packed rows (auto packs on CUDA only) encode the same embeddings: the same negatives
    run_mine(
        None,
        [*args, "--output", str(tmp_path / "c.jsonl"), "--use_cache", "false", "--pack_sequences", "true"],
    )
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "c.jsonl").read_text()
    # bf16 embeddings are not fp32's: never a hit on the fp32 entry
    run_mine(None, [*args, "--output", str(tmp_path / "d.jsonl"), "--dtype", "bf16"])
    assert "corpus embeddings: encoded (160 passages)" in capsys.readouterr().err


@pytest.mark.slow
def test_dense_mining_on_the_whole_scifact_corpus(minilm_dir, scifact_dir, scifact_train, tmp_path, capsys):
    """The shared file train_hn_minilm.ids.jsonl was mined with the same recipe as ranks 10-60, no threshold, seed 42:
    every record must get exactly its negatives (kept here in rank order, there in drawing order)."""
    base = [
        "--input",
        str(scifact_train),
        "--model",
        str(minilm_dir),
        "--corpus",
        str(scifact_dir),
        "--negatives",
        "15",
    ]
    out = tmp_path / "parity.jsonl"
    run_mine(
        None, [*base, "--output", str(out), "--range_for_sampling", "10-60", "--negative_threshold", "none"]
    )
    records = read_out(out)
    assert len(records) == 809
    check_negatives(records, 15)
    reference = {
        str(r["qid"]): r["neg"] for r in map(json.loads, (scifact_dir / "train_hn_minilm.ids.jsonl").open())
    }
    assert all(sorted(r["neg_ids"]) == sorted(reference[r["qid"]]) for r in records)
    # the default recipe (ranks 10-210, threshold 0.95) reads the cached corpus embeddings
    counts = run_mine(None, [*base, "--output", str(tmp_path / "mined.jsonl")])
    assert "cache hit (5183 passages)" in capsys.readouterr().err
    check_negatives(read_out(tmp_path / "mined.jsonl"), 15)
    assert counts["false_negatives"] > 0 and counts["short"] == 0


# ----------------------------------------------------------------------------------------------------------------
# Dense over the sharded embedding store (a tiny random BERT): a streamed corpus, several shards, an ivf index


def test_collect_compares_passages_by_key_without_their_texts():
    """A streamed pool holds text keys, not texts: the skips and the window are those of the in-memory pool."""
    texts = ["p", "a", "b", "q", "c", "c", "d", "e"]
    in_memory = Pool(texts=texts, ids=[f"d{i}" for i in range(8)], source="test")
    streamed = Pool(None, in_memory.ids, "test", keys=in_memory.keys, row_of_text={}, row_of_id={})
    record = {"query": "q", "pos": ["p"], "pos_ids": ["d0"]}
    scores = np.array([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0])  # as in the first test of this file
    a, b = (
        collect(record, scores, np.arange(8), pool, set(), 6.75, (0, 5), 3) for pool in (in_memory, streamed)
    )
    assert a == b  # the positive found by its text, the false negatives, both copies, the window and the fill
    assert (a.positives, a.false_negatives, a.copies, a.window, a.below) == (
        1,
        2,
        2,
        [(4, 4)],
        [(6, 6), (7, 7)],
    )


def synthetic_corpus(folder: Path, n_docs: int = 300, n_records: int = 25) -> Path:
    """A BEIR corpus in the tiny BERT's words, and training records whose positive is one of its passages."""
    import random

    from conftest import WORDS

    rng = random.Random(0)
    folder.mkdir(parents=True)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) for _ in range(n_docs)]
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(docs))
    )
    recs = [
        {"query": " ".join(docs[i].split()[:3]), "pos": [docs[i]], "pos_ids": [f"d{i}"]}
        for i in range(0, 250, 10)
    ]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:n_records]))
    return folder


def test_dense_mining_over_shards_equals_one_shard(tiny_bert_dir, tmp_path, capsys):
    """The same vectors in a 6-shard store and in a 1-shard store (copied over) give the same negatives; a gzip
    corpus file gives the same store (the same texts) and the same negatives."""
    import gzip

    from rir_finetune.retrieval.corpus import CorpusFile
    from rir_finetune.retrieval.store import EmbeddingStore, fill_shards

    data = synthetic_corpus(tmp_path / "data")
    common = ["--input", str(data / "train.jsonl"), "--model", str(tiny_bert_dir), "--negatives", "5",
              "--range_for_sampling", "3-40", "--negative_threshold", "0.999", "--batch_size", "8"]  # fmt: skip
    counts = run_mine(None, [*common, "--corpus", str(data), "--shard_size", "50", "--cache_dir",
                             str(tmp_path / "c6"), "--output", str(tmp_path / "six.jsonl")])  # fmt: skip
    assert counts["texts_encoded"] == 300 and counts["false_negatives"] > 0 and counts["positives"] > 0
    (store_dir,) = [p.parent for p in (tmp_path / "c6").glob("*/manifest.json")]
    six = EmbeddingStore.read(store_dir)
    assert len(six.shards) == 6
    vectors = np.concatenate([v for _, v in six.iter_vectors()])
    one = EmbeddingStore.open(tmp_path / "c1" / store_dir.name, six.identity, six.count, shard_size=six.count)
    fill_shards(one, CorpusFile(data), [0], lambda texts: vectors)
    gz = tmp_path / "corpus.jsonl.gz"
    gz.write_bytes(gzip.compress((data / "corpus.jsonl").read_bytes()))
    capsys.readouterr()
    counts = run_mine(None, [*common, "--corpus", str(gz), "--cache_dir", str(tmp_path / "c1"),
                             "--output", str(tmp_path / "one.jsonl")])  # fmt: skip
    assert "corpus embeddings: cache hit (300 passages)" in capsys.readouterr().err
    assert counts["texts_encoded"] == 0
    assert (tmp_path / "six.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    check_negatives(read_out(tmp_path / "six.jsonl"), 5)


def test_dense_mining_with_an_approximate_index_reports_its_recall(tiny_bert_dir, tmp_path, capsys):
    data = synthetic_corpus(tmp_path / "data")
    run_mine(None, ["--input", str(data / "train.jsonl"), "--model", str(tiny_bert_dir), "--corpus", str(data),
                    "--negatives", "5", "--range_for_sampling", "3-40", "--negative_threshold", "none",
                    "--index", "hnsw", "--cache_dir", str(tmp_path / "c"), "--output", str(tmp_path / "o.jsonl")])  # fmt: skip
    printed = capsys.readouterr().out
    assert "index hnsw (ef_search " in printed and "tuned to 0.99): recall@" in printed
    assert "of exact search on 25 sampled queries" in printed
    check_negatives(read_out(tmp_path / "o.jsonl"), 5)
