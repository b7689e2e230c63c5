"""`data from-beir`, `data get` and the shared JSONL helpers of the data-preparation commands."""

from __future__ import annotations

import http.server
import io
import json
import threading
import zipfile
from pathlib import Path
from urllib import error as urlerror

import pytest

from rir_finetune.cli import main
from rir_finetune.errors import UserError
from rir_finetune.files import write_jsonl
from rir_finetune.lifecycle import ResumableJsonl, partial_path
from rir_finetune.prep import beir
from rir_finetune.prep.beir import run_from_beir, run_get
from rir_finetune.prep.io import read_records


def write_beir(folder: Path, corpus: list[dict], queries: list[dict], qrels: dict[str, list[tuple]]) -> Path:
    """A BEIR-layout folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv."""
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    for split, rows in qrels.items():
        lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in rows]
        (folder / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def tiny_beir(tmp_path) -> Path:
    corpus = [
        {"_id": "d1", "title": "Cats", "text": "Cats purr."},
        {"_id": "d2", "title": "", "text": "Dogs bark. "},
        {"_id": "d3", "title": "Fish", "text": ""},
        {"_id": "d4", "title": "Birds", "text": "Birds sing."},
    ]
    queries = [
        {"_id": "q1", "text": "what purrs"},
        {"_id": "q2", "text": "what barks"},
        {"_id": "q3", "text": "x"},
    ]
    qrels = {
        "train": [("q2", "d2", 1), ("q1", "d1", 2), ("q1", "d3", 1), ("q1", "d4", 0), ("q3", "d4", 0)],
        "test": [("q1", "d4", 1)],
    }
    return write_beir(tmp_path / "tiny", corpus, queries, qrels)


def read_out(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------------
# data from-beir


def test_from_beir_records_hold_judged_positives(tiny_beir, tmp_path, capsys):
    out = tmp_path / "train.jsonl"
    counts = run_from_beir(None, [str(tiny_beir), "--split", "train", "--out", str(out)])
    records = read_out(out)
    # qrels order; relevance 0 is not a positive; q3 has none and is skipped; text = (title + " " + text).strip()
    assert records == [
        {"query": "what barks", "pos": ["Dogs bark."], "qid": "q2", "pos_ids": ["d2"]},
        {"query": "what purrs", "pos": ["Cats Cats purr.", "Fish"], "qid": "q1", "pos_ids": ["d1", "d3"]},
    ]
    assert counts == {"records": 2, "positives": 3, "no_positive": 1, "empty_positives": 0}
    assert "2 records (3 positives)" in capsys.readouterr().out
    assert not partial_path(out).exists()
    # a relevant document with neither title nor text is no positive (train and the dev split refuse empty ones)
    with (tiny_beir / "corpus.jsonl").open("a") as f:
        f.write('{"_id": "d5", "title": "", "text": " "}\n')
    with (tiny_beir / "qrels" / "train.tsv").open("a") as f:
        f.write("q2\td5\t1\n")
    counts = run_from_beir(None, [str(tiny_beir), "--split", "train", "--out", str(out)])
    assert read_out(out)[0]["pos_ids"] == ["d2"] and counts["empty_positives"] == 1


def test_from_beir_min_relevance_and_split(tiny_beir, tmp_path):
    out = tmp_path / "o.jsonl"
    run_from_beir(None, [str(tiny_beir), "--out", str(out), "--min_relevance", "2"])
    assert [r["pos_ids"] for r in read_out(out)] == [["d1"]]
    run_from_beir(None, ["--data_dir", str(tiny_beir), "--split", "test", "--out", str(out)])
    assert [r["pos_ids"] for r in read_out(out)] == [["d4"]]

    # no query with a positive at this grade: refused naming the qrels, and the file written before is kept
    with pytest.raises(
        UserError, match=r"qrels/test.tsv: no query of split 'test' has a document of relevance >= 2"
    ):
        run_from_beir(None, [str(tiny_beir), "--split", "test", "--out", str(out), "--min_relevance", "2"])
    assert [r["pos_ids"] for r in read_out(out)] == [["d4"]]


def test_a_split_without_a_relevant_document_is_refused_by_every_reader(tiny_beir, tmp_path):
    """All grades 0: eval would report every metric 0 and from-beir write nothing; both refuse, naming the file."""
    from rir_finetune.retrieval.data import load_beir

    (tiny_beir / "qrels" / "zero.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t0\nq2\td2\t0\n")
    with pytest.raises(UserError, match=r"qrels/zero.tsv: no judgement with relevance >= 1"):
        load_beir(tiny_beir, "zero")
    with pytest.raises(UserError, match=r"qrels/zero.tsv: no judgement with relevance >= 1"):
        run_from_beir(None, [str(tiny_beir), "--split", "zero", "--out", str(tmp_path / "o.jsonl")])
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (["--out", "x.jsonl"], "give the BEIR folder"),
        (["{beir}", "--split", "dev", "--out", "x.jsonl"], "qrels file of split 'dev' not found"),
        (["{beir}", "--out", "{beir}/queries.jsonl"], "the output is the input file"),
        (["{beir}", "--out", "{beir}/corpus.jsonl"], "the output is the input file"),
        (["{beir}", "--out", "{beir}/qrels/test.tsv"], "is a file of the input folder"),
        (["{beir}", "--data_dir", "{beir}", "--out", "x.jsonl"], "given twice"),
        (["{beir}", "extra", "--out", "x.jsonl"], "unexpected argument 'extra'"),
        (["{beir}", "--outt", "x.jsonl"], "did you mean 'out'"),
    ],
)
def test_from_beir_errors(tiny_beir, tokens, message):
    tokens = [t.format(beir=tiny_beir) for t in tokens]
    with pytest.raises(UserError, match=message):
        run_from_beir(None, tokens)


def test_from_beir_scifact_counts(scifact_dir, tmp_path):
    out = tmp_path / "train.jsonl"
    counts = run_from_beir(None, [str(scifact_dir), "--split", "train", "--out", str(out)])
    assert counts["records"] == 809 and counts["positives"] == 919  # data README: 809 queries, 919 qrels
    first = read_out(out)[0]
    corpus = {d["_id"]: d for d in map(json.loads, (scifact_dir / "corpus.jsonl").open())}
    doc = corpus[first["pos_ids"][0]]
    assert first["pos"][0] == (doc["title"] + " " + doc["text"]).strip()


def test_cli_from_beir_error_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "from-beir", str(tmp_path / "missing"), "--out", str(tmp_path / "o.jsonl")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------------------------
# data get


def test_get_without_network_is_a_clean_error(tmp_path, monkeypatch, capsys):
    def offline(url, timeout=None):
        raise urlerror.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(beir.request, "urlopen", offline)
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "get", "scifact", "--out", str(tmp_path / "data")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot download 'scifact'")
    assert "public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/scifact.zip" in err
    assert "without network" in err and "unzip it into" in err
    assert not (tmp_path / "data").exists()  # no partial download, not even the folder, left behind


def _zip_bytes(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return buf.getvalue()


@pytest.fixture
def zip_server():
    """A local HTTP server answering /<name>.zip from a dict, 404 otherwise."""
    served: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = served.get(self.path.lstrip("/"))
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/{{name}}.zip"
    server.shutdown()
    server.server_close()


def test_get_downloads_and_unpacks(tmp_path, zip_server, capsys):
    served, url = zip_server
    served["tiny.zip"] = _zip_bytes(
        {
            "tiny/corpus.jsonl": '{"_id": "d1", "title": "", "text": "x"}\n',
            "tiny/queries.jsonl": '{"_id": "q1", "text": "y"}\n',
            "tiny/qrels/test.tsv": "query-id\tcorpus-id\tscore\nq1\td1\t1\n",
        }
    )
    target = run_get(None, ["tiny", "--out", str(tmp_path / "data"), "--url", url])
    assert target == tmp_path / "data" / "tiny"
    assert (target / "qrels" / "test.tsv").is_file()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["tiny"]  # zip and temp folder removed
    capsys.readouterr()
    run_get(None, ["tiny", "--out", str(tmp_path / "data"), "--url", url])  # a second call downloads nothing
    assert "already there" in capsys.readouterr().out
    with pytest.raises(UserError, match="HTTP 404"):
        run_get(None, ["nosuch", "--out", str(tmp_path / "data"), "--url", url])


def test_get_refuses_unsafe_archives_and_names(tmp_path, zip_server):
    served, url = zip_server
    served["evil.zip"] = _zip_bytes({"../escaped/corpus.jsonl": "{}\n"})
    with pytest.raises(UserError, match="unsafe path"):
        run_get(None, ["evil", "--out", str(tmp_path / "data"), "--url", url])
    assert not (tmp_path / "escaped").exists()
    with pytest.raises(UserError, match="not a dataset name"):
        run_get(None, ["../x", "--out", str(tmp_path / "data")])


# ----------------------------------------------------------------------------------------------------------------
# prep.io


def test_read_records_names_file_and_line(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"query": "q", "pos": ["p"]}\n\n{"query": "q", "pos": [}\n')
    with pytest.raises(UserError, match=r"in.jsonl:3: invalid JSON"):
        read_records(path)
    path.write_text('{"query": "q", "pos": ["p"]}\n{"query": "q", "pos": []}\n')
    with pytest.raises(UserError, match=r"in.jsonl:2: field 'pos' must be a non-empty list"):
        read_records(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(UserError, match=r"in.jsonl:1: expected a JSON object"):
        read_records(path)
    (tmp_path / "q.jsonl").write_text('{"query": "only a query"}\n')
    assert read_records(tmp_path / "q.jsonl", need_pos=False) == [{"query": "only a query"}]


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text("old\n")

    class Boom:
        def __iter__(self):
            yield {"a": 1}
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_jsonl(out, Boom())  # type: ignore[arg-type]
    assert out.read_text() == "old\n" and not partial_path(out).exists()


def test_resumable_drops_a_torn_last_line(tmp_path):
    writer = ResumableJsonl(tmp_path / "o.jsonl")
    writer.append([{"i": 0}, {"i": 1}])
    writer.close()
    with writer.partial.open("a") as f:
        f.write('{"i": 2, "ans')  # killed in the middle of a write
    assert ResumableJsonl(tmp_path / "o.jsonl").done() == [{"i": 0}, {"i": 1}]
    assert writer.partial.read_text().endswith("}\n")


def test_data_split_holds_out_seeded_records_and_writes_a_dev_beir_folder(tmp_path):
    import hashlib

    from rir_finetune.cli import main

    records = [{"query": f"q{i}", "pos": [f"p{i}", f"p{i}"], "pos_ids": [f"d{i}", f"d{i}"], "qid": f"Q{i}", "answer": f"a{i}"}
               for i in range(10)]  # fmt: skip
    src = tmp_path / "train.jsonl"
    write_jsonl(src, records)
    corpus = tmp_path / "beir"
    corpus.mkdir()
    (corpus / "corpus.jsonl").write_text("".join(f'{{"_id": "d{i}", "text": "p{i}"}}\n' for i in range(10)))
    main(["data", "split", str(src), "--dev_queries", "3", "--seed", "7", "--corpus", str(corpus), "--out_dir",
          str(tmp_path / "out")])  # fmt: skip
    # the rule, written again: the 3 qids whose seeded sha256 is lowest
    held = sorted(sorted(range(10), key=lambda i: hashlib.sha256(f"7-dev-Q{i}".encode()).hexdigest())[:3])
    out = tmp_path / "out"
    dev = [json.loads(x) for x in (out / "dev.jsonl").read_text().splitlines()]
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert [d["qid"] for d in dev] == [f"Q{i}" for i in held] and dev[0]["answer"] == f"a{held[0]}"
    assert [t["qid"] for t in train] == [f"Q{i}" for i in range(10) if i not in held]
    qrels = (out / "dev_beir" / "qrels" / "dev.tsv").read_text().splitlines()
    assert qrels == ["query-id\tcorpus-id\tscore", *(f"Q{i}\td{i}\t1" for i in held)]  # a doc judged once
    assert (out / "dev_beir" / "corpus.jsonl").resolve() == (corpus / "corpus.jsonl").resolve()
    from rir_finetune.retrieval.data import load_beir

    assert sorted(load_beir(out / "dev_beir", "dev").queries) == sorted(f"Q{i}" for i in held)

    # the same records reordered, with others around them (a later round's regenerated file): the same held out
    extra = [{**records[0], "qid": f"X{i}", "query": f"x{i}"} for i in range(6)]
    mixed = [r for r in [*extra, *reversed(records)]
             if r["qid"][0] == "Q" or hashlib.sha256(f"7-dev-{r['qid']}".encode()).hexdigest() > max(
                 hashlib.sha256(f"7-dev-Q{i}".encode()).hexdigest() for i in held)]  # fmt: skip
    write_jsonl(tmp_path / "mixed.jsonl", mixed)
    main(["data", "split", str(tmp_path / "mixed.jsonl"), "--dev_queries", "3", "--seed", "7", "--out_dir",
          str(tmp_path / "out2")])  # fmt: skip
    dev2 = [json.loads(x)["qid"] for x in (tmp_path / "out2" / "dev.jsonl").read_text().splitlines()]
    assert sorted(dev2) == sorted(f"Q{i}" for i in held)
    # without qids: keyed by the query and its positives' ids, so also independent of position
    bare = [{k: v for k, v in r.items() if k != "qid"} for r in records]
    for name, order in (("bare", bare), ("bare_reversed", bare[::-1])):
        write_jsonl(tmp_path / f"{name}.jsonl", order)
        main(["data", "split", str(tmp_path / f"{name}.jsonl"), "--dev_queries", "3", "--out_dir",
              str(tmp_path / name)])  # fmt: skip
    held_queries = [
        sorted(json.loads(x)["query"] for x in (tmp_path / name / "dev.jsonl").read_text().splitlines())
        for name in ("bare", "bare_reversed")
    ]
    assert len(held_queries[0]) == 3 and held_queries[0] == held_queries[1]

    # a query with one record per positive is one query: all its records held out, one dev query judged on both
    doubled = [r for r in records for _ in (0, 1)]
    doubled = [
        {**r, "pos": [f"{r['pos'][0]}{k % 2}"], "pos_ids": [f"{r['pos_ids'][0]}{k % 2}"]}
        for k, r in enumerate(doubled)
    ]
    write_jsonl(tmp_path / "doubled.jsonl", doubled)
    (corpus / "corpus.jsonl").write_text(
        "".join(f'{{"_id": "d{i}{k}", "text": "p"}}\n' for i in range(10) for k in (0, 1))
    )
    main(["data", "split", str(tmp_path / "doubled.jsonl"), "--dev_queries", "3", "--seed", "7", "--corpus",
          str(corpus), "--out_dir", str(tmp_path / "out3")])  # fmt: skip
    dev3 = [json.loads(x) for x in (tmp_path / "out3" / "dev.jsonl").read_text().splitlines()]
    train3 = [json.loads(x)["qid"] for x in (tmp_path / "out3" / "train.jsonl").read_text().splitlines()]
    assert [d["qid"] for d in dev3] == [f"Q{i}" for i in held] and len(train3) == 14
    assert not {d["qid"] for d in dev3} & set(train3) and dev3[0]["pos_ids"] == [
        f"d{held[0]}0",
        f"d{held[0]}1",
    ]
    assert sorted(load_beir(tmp_path / "out3" / "dev_beir", "dev").queries) == sorted(f"Q{i}" for i in held)
