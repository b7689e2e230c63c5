"""Streaming corpus reading: plain and gzip JSONL give the same rows, digest and keys; rows are streamed by span;
every bad row is one located error."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from rir_finetune.errors import UserError
from rir_finetune.retrieval.corpus import CorpusFile, InMemoryCorpus, text_key
from rir_finetune.retrieval.data import load_beir
from rir_finetune.retrieval.store import corpus_hash

DOCS = [
    {"_id": "a", "title": "T", "text": "first passage"},
    {"_id": "b", "text": "second"},
    {"id": 7, "title": None, "text": "third"},
    {"_id": "d", "title": "", "text": "first passage"},  # a repeated text under another id
]


def write(path, docs, gz=False, blank_after=1):
    lines = [json.dumps(d) for d in docs]
    lines.insert(blank_after, "   ")  # blank lines are not rows
    text = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


@pytest.fixture(params=[False, True], ids=["plain", "gz"])
def corpus(tmp_path, request):
    return CorpusFile(
        write(tmp_path / ("c.jsonl.gz" if request.param else "c.jsonl"), DOCS, gz=request.param)
    )


def test_rows_texts_and_scan(corpus):
    rows = list(corpus.rows([(0, 99)]))
    texts = ["T first passage", "second", "third", "first passage"]
    assert rows == [(0, "a", texts[0]), (1, "b", texts[1]), (2, "7", texts[2]), (3, "d", texts[3])]
    scan = corpus.scan(watch_ids={"7", "zz"}, watch_texts={"first passage", "second"})
    assert scan.count == 4
    assert scan.digest == corpus_hash(["a", "b", "7", "d"], texts)  # the store key's rule, streamed
    assert scan.text_keys.tolist() == [text_key(t) for t in texts]
    assert scan.rows_of_ids == {"7": 2} and scan.rows_of_texts == {"second": 1, "first passage": 3}
    assert InMemoryCorpus(["a", "b", "7", "d"], texts).scan().digest == scan.digest


def test_rows_by_span_and_texts_of(corpus):
    assert [r for r, _, _ in corpus.rows([(1, 2), (3, 4)])] == [1, 3]
    assert corpus.texts_of([3, 0]) == {0: "T first passage", 3: "first passage"}
    assert list(corpus.rows([])) == []


def test_text_format(tmp_path):
    c = CorpusFile(write(tmp_path / "c.jsonl", DOCS), text_format="{text}")
    assert c.texts_of([0]) == {0: "first passage"}


def test_folder_prefers_plain_then_gz(tmp_path):
    write(tmp_path / "corpus.jsonl.gz", DOCS[:2], gz=True)
    assert CorpusFile(tmp_path).path.name == "corpus.jsonl.gz"
    write(tmp_path / "corpus.jsonl", DOCS[:1])
    assert CorpusFile(tmp_path).path.name == "corpus.jsonl"


@pytest.mark.parametrize("gz", [False, True])
def test_errors_name_file_and_line(tmp_path, gz):
    name = "c.jsonl.gz" if gz else "c.jsonl"
    path = write(tmp_path / name, [*DOCS[:2], {"_id": "a", "text": "again"}], gz=gz)
    with pytest.raises(UserError, match=rf"{name}:4: duplicate id 'a'"):
        CorpusFile(path).scan()
    path = write(tmp_path / name, [DOCS[0], {"_id": "x"}], gz=gz)
    with pytest.raises(UserError, match=rf"{name}:3: missing field 'text'"):
        CorpusFile(path).scan()
    path.write_bytes(gzip.compress(b"\n\n") if gz else b"\n\n")
    with pytest.raises(UserError, match=rf"{name}: the corpus is empty"):
        CorpusFile(path).scan()
    raw = b'{"_id": "a", "text": "ok"}\n{bad\n'
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(UserError, match=rf"{name}:2: invalid JSON"):
        CorpusFile(path).scan()
    raw = b'{"_id": "a", "text": "\xff"}\n'
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(UserError, match=rf"{name}:1: not UTF-8 text"):
        CorpusFile(path).scan()
    with pytest.raises(UserError, match="corpus file not found"):
        CorpusFile(tmp_path / "nope.jsonl")


def test_damaged_gzip_is_one_line(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"_id": "a", "text": "x"}\n' * 100)[:-20])
    with pytest.raises(UserError, match="cannot read the gzip file"):
        CorpusFile(path).scan()


def test_load_beir_without_the_corpus_checks_judged_documents_after_a_scan(tmp_path):
    (tmp_path / "qrels").mkdir()
    write(tmp_path / "corpus.jsonl.gz", DOCS, gz=True)
    (tmp_path / "queries.jsonl").write_text('{"_id": "q", "text": "first"}\n')
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq\ta\t1\nq\tghost\t1\n")
    ds = load_beir(tmp_path, "test", read_corpus=False)
    assert ds.corpus == {} and ds.corpus_file == tmp_path / "corpus.jsonl.gz"
    scan = CorpusFile(ds.corpus_file).scan(watch_ids=ds.judged_lines)
    with pytest.raises(UserError, match=r"test.tsv:3: document 'ghost' is not in .*corpus.jsonl.gz"):
        ds.limit_queries(1).check_judged_documents(scan.rows_of_ids)
    # the whole-corpus reader reads the gzip file too
    with pytest.raises(UserError, match=r"test.tsv:3: document 'ghost'"):
        load_beir(tmp_path, "test")


def test_text_keys_tell_texts_apart():
    keys = np.array([text_key(f"passage {i}") for i in range(10_000)], dtype=np.uint64)
    assert len(np.unique(keys)) == 10_000 and text_key("x") == text_key("x")
