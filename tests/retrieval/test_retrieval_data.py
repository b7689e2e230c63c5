"""Loading evaluation data (BEIR and FlagEmbedding's custom layout) and its one-line errors."""

import json

import pytest

from eval_fixtures import KEYWORD_CORPUS, KEYWORD_QRELS, KEYWORD_QUERIES, data_dir, write_beir
from rir_finetune.errors import UserError
from rir_finetune.retrieval.data import load_beir


@pytest.fixture
def beir_dir(tmp_path):
    queries = {**KEYWORD_QUERIES, "q_unjudged": "apple"}
    return write_beir(tmp_path / "kw", KEYWORD_CORPUS, queries, KEYWORD_QRELS)


def test_beir_layout(beir_dir):
    ds = load_beir(beir_dir, "test")
    assert ds.qrels == {"q1": {"d1": 1}, "q2": {"d3": 1}, "q3": {"d2": 2, "d3": 1}}
    assert ds.queries == KEYWORD_QUERIES  # only judged queries
    ids, texts = ds.corpus_texts()
    assert ids == ["d1", "d2", "d3", "d4"]
    assert texts[0] == "apple banana banana"  # empty title: stripped, no leading space
    assert texts[1] == "apple apple apple banana cherry cherry"  # title + " " + text
    assert ds.corpus_texts("{text}")[1][1] == "apple banana cherry cherry"
    assert ds.name == "kw" and ds.split == "test"
    assert list(ds.limit_queries(2).queries) == ["q1", "q2"]


def test_flagembedding_custom_layout(tmp_path):
    (tmp_path / "corpus.jsonl").write_text(
        "\n".join(json.dumps({"id": i, "title": "", "text": t}) for i, t in [("a", "x y"), ("b", "z")]) + "\n"
    )
    (tmp_path / "dev_queries.jsonl").write_text(json.dumps({"id": "1", "text": "x"}) + "\n")
    (tmp_path / "dev_qrels.jsonl").write_text(json.dumps({"qid": "1", "docid": "b", "relevance": 1}) + "\n")
    ds = load_beir(tmp_path, "dev")
    assert ds.queries == {"1": "x"} and ds.qrels == {"1": {"b": 1}}
    assert ds.corpus == {"a": {"title": "", "text": "x y"}, "b": {"title": "", "text": "z"}}


def _error(path, split="test") -> str:
    with pytest.raises(UserError) as e:
        load_beir(path, split)
    return str(e.value)


def test_missing_qrels_names_the_file(beir_dir):
    assert _error(beir_dir, "dev") == f"{beir_dir / 'qrels' / 'dev.tsv'}: qrels file of split 'dev' not found"


def test_unknown_document_names_file_and_line(beir_dir):
    with (beir_dir / "qrels" / "test.tsv").open("a") as f:
        f.write("q1\tnope\t1\n")
    # header is line 1, the 4 judgements lines 2-5, the bad one line 6
    assert (
        _error(beir_dir)
        == f"{beir_dir / 'qrels' / 'test.tsv'}:6: document 'nope' is not in {beir_dir / 'corpus.jsonl'}"
    )


def test_unknown_query_names_file_and_line(beir_dir):
    with (beir_dir / "qrels" / "test.tsv").open("a") as f:
        f.write("q9\td1\t1\n")
    assert _error(beir_dir).startswith(f"{beir_dir / 'qrels' / 'test.tsv'}:6: query 'q9' is not in ")


def test_empty_corpus(beir_dir):
    (beir_dir / "corpus.jsonl").write_text("\n")
    assert _error(beir_dir) == f"{beir_dir / 'corpus.jsonl'}: the corpus is empty"


def test_malformed_json_line(beir_dir):
    with (beir_dir / "corpus.jsonl").open("a") as f:
        f.write('{"_id": "d5", "text": \n')
    assert _error(beir_dir).startswith(f"{beir_dir / 'corpus.jsonl'}:5: invalid JSON: ")


def test_duplicate_and_missing_fields(beir_dir):
    with (beir_dir / "queries.jsonl").open("a") as f:
        f.write(json.dumps({"_id": "q1", "text": "again"}) + "\n")
    assert _error(beir_dir) == f"{beir_dir / 'queries.jsonl'}:5: duplicate id 'q1'"
    (beir_dir / "queries.jsonl").write_text(json.dumps({"text": "no id"}) + "\n")
    assert _error(beir_dir) == f"{beir_dir / 'queries.jsonl'}:1: missing field '_id' or 'id'"


def test_missing_data_folder(tmp_path):
    assert _error(tmp_path / "nowhere") == f"{tmp_path / 'nowhere'}: data folder not found"


def test_scifact_test_split_counts():
    ds = load_beir(data_dir("scifact"), "test")
    assert len(ds.corpus) == 5183 and len(ds.queries) == 300  # shared/data/README.md
    assert sum(len(d) for d in ds.qrels.values()) == 339


def test_texts_that_are_not_strings_and_empty_judged_queries_are_refused(beir_dir):
    """A list as a text would be encoded as its Python repr; an empty judged query as the special tokens alone."""
    corpus = beir_dir / "corpus.jsonl"
    lines = corpus.read_text().splitlines()
    corpus.write_text(
        "\n".join([*lines[:1], json.dumps({"_id": "dx", "title": "", "text": ["a", "b"]}), *lines[1:]]) + "\n"
    )
    assert _error(beir_dir) == f"{corpus}:2: field 'text' must be a string, got list"
    corpus.write_text(
        "\n".join([*lines[:1], json.dumps({"_id": "dx", "title": {"a": 1}, "text": "a"}), *lines[1:]]) + "\n"
    )
    assert _error(beir_dir) == f"{corpus}:2: field 'title' must be a string, got dict"
    corpus.write_text(
        "\n".join([*lines[:1], json.dumps({"_id": 7, "title": 1999, "text": 2.5}), *lines[1:]]) + "\n"
    )
    assert load_beir(beir_dir, "test").corpus["7"] == {"title": "1999", "text": "2.5"}  # numbers are text
    corpus.write_text("\n".join(lines) + "\n")
    queries = beir_dir / "queries.jsonl"
    queries.write_text(
        queries.read_text().replace('"q_unjudged", "text": "apple"', '"q_unjudged", "text": ""')
    )
    assert load_beir(beir_dir, "test").queries == KEYWORD_QUERIES  # an unjudged empty query is never encoded
    queries.write_text(queries.read_text().replace('"q1", "text": "', '"q1", "text": " ", "was": "'))
    assert _error(beir_dir) == f"{queries}: judged query 'q1' has an empty text"
