"""Encode -> search -> metrics with a keyword encoder (exact expected values), answer modes, search back-ends."""

import json
import sys

import numpy as np
import pytest

from eval_fixtures import KEYWORD_CORPUS, KEYWORD_QRELS, KEYWORD_QUERIES, KEYWORDS, KeywordEncoder, write_beir
from rir_finetune.errors import UserError
from rir_finetune.evaluation import evaluate_retrieval, load_beir, run_retrieval
from rir_finetune.evaluation.answers import fuse, load_answers
from rir_finetune.retrieval.search import build_run, exact_search


@pytest.fixture
def dataset(tmp_path):
    return load_beir(write_beir(tmp_path / "kw", KEYWORD_CORPUS, KEYWORD_QUERIES, KEYWORD_QRELS), "test")


def test_keyword_encoder_exact_metrics(dataset):
    enc = KeywordEncoder(KEYWORDS)
    m = evaluate_retrieval(enc, enc, dataset, k_values=[1, 3])
    # scores = keyword counts (see eval_fixtures): q1 "apple" ranks d2(3) d4(2) d1(1) d3(0): relevant d1 at rank 3
    #   q2 "banana" ranks d3(3) d1(2) d2(1) d4(0): relevant d3 at rank 1
    #   q3 "cherry" ranks d4(3) d2(2) d3(1) d1(0): d2 (rel 2) at rank 2, d3 (rel 1) at rank 3
    # nDCG@3: q1 = (1/log2 4) / 1 = 0.5; q2 = 1; q3 = (2/log2 3 + 1/log2 4) / (2 + 1/log2 3) = 1.761860 / 2.630930
    assert m["ndcg@3"] == pytest.approx((0.5 + 1 + 1.761860 / 2.630930) / 3, abs=1e-6)  # 0.723225
    assert m["ndcg@1"] == pytest.approx(1 / 3)  # only q2 has a relevant first hit
    assert m["recall@1"] == pytest.approx(1 / 3) and m["recall@3"] == 1.0
    assert m["mrr@3"] == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)  # 0.611111
    assert m["precision@3"] == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)  # 0.444444
    assert m["map@3"] == pytest.approx((1 / 3 + 1 + (1 / 2 + 2 / 3) / 2) / 3)
    assert enc.calls[0] == ["apple", "banana", "cherry"]  # queries sorted by id, then the corpus
    assert enc.calls[1][1] == "apple apple apple banana cherry cherry"


ANSWERS = {"q1": "apple apple banana", "q2": "cherry", "q3": "banana"}


def test_fused_alpha_one_is_query_only_and_alpha_zero_is_answer_only(dataset):
    enc = KeywordEncoder(KEYWORDS)
    kw = dict(top_k=4, answers=ANSWERS)
    query_run = run_retrieval(enc, enc, dataset, mode="query", **kw)
    answer_run = run_retrieval(enc, enc, dataset, mode="answer", **kw)
    assert query_run != answer_run  # the answers really change the ranking
    assert run_retrieval(enc, enc, dataset, mode="fused", alpha=1.0, **kw) == query_run
    assert run_retrieval(enc, enc, dataset, mode="fused", alpha=0.0, **kw) == answer_run
    # q2's answer "cherry" ranks d4 (3 cherries) first
    assert max(answer_run["q2"], key=answer_run["q2"].get) == "d4"


def test_answers_are_encoded_as_passages_with_prefix(dataset):
    queries, passages = KeywordEncoder(KEYWORDS), KeywordEncoder(KEYWORDS)
    run_retrieval(queries, passages, dataset, mode="fused", answers=ANSWERS, answer_prefix="A: ")
    assert queries.calls == [["apple", "banana", "cherry"]]
    assert passages.calls[0] == ["A: apple apple banana", "A: cherry", "A: banana"]


def test_fuse_and_renormalize():
    q, a = np.array([[1.0, 0.0]], dtype=np.float32), np.array([[0.0, 2.0]], dtype=np.float32)
    np.testing.assert_allclose(fuse(q, a, 0.8), [[0.8, 0.4]])  # 0.8 * q + 0.2 * a
    np.testing.assert_allclose(
        fuse(q, a, 0.8, renormalize=True), [[0.8, 0.4] / np.hypot(0.8, 0.4)], rtol=1e-6
    )


def test_missing_answers_are_an_error(dataset, tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text(
        json.dumps({"qid": "q1", "answer": "apple"}) + "\n" + json.dumps({"_id": "q2", "text": "x"}) + "\n"
    )
    answers = load_answers(path)
    assert answers == {"q1": "apple", "q2": "x"}
    enc = KeywordEncoder(KEYWORDS)
    with pytest.raises(UserError, match=r"answers.jsonl: no answer for 1 of 3 queries \('q3'\)"):
        run_retrieval(enc, enc, dataset, mode="fused", answers=answers, answers_source=str(path))
    path.write_text('{"query_id": "q1"}\n')
    with pytest.raises(UserError, match=r"answers.jsonl:1: missing answer text"):
        load_answers(path)


def test_faiss_and_torch_give_the_same_ranking(monkeypatch):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    q, c = rng.standard_normal((7, 16)).astype(np.float32), rng.standard_normal((300, 16)).astype(np.float32)
    fs, fi = exact_search(q, c, 50, backend="faiss")
    # several chunks each way
    ts, ti = exact_search(q, c, 50, backend="torch", query_chunk=3, corpus_chunk=64)
    np.testing.assert_array_equal(fi, ti)
    np.testing.assert_allclose(fs, ts, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ti[:, 0], (q @ c.T).argmax(axis=1))
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now fails: auto falls back to torch
    as_, ai = exact_search(q, c, 50, backend="auto")
    np.testing.assert_array_equal(ai, ti)
    with pytest.raises(ImportError):
        exact_search(q, c, 5, backend="faiss")


def test_ignore_identical_ids_drops_the_query_itself():
    scores = np.array([[0.9, 0.8, 0.7]], dtype=np.float32)
    indices = np.array([[1, 0, 2]])
    doc_ids = ["a", "q", "b"]
    assert build_run(["q"], doc_ids, scores, indices, top_k=2) == {
        "q": {"a": pytest.approx(0.8), "b": pytest.approx(0.7)}
    }
    kept = build_run(["q"], doc_ids, scores, indices, top_k=2, ignore_identical_ids=False)
    assert list(kept["q"]) == ["q", "a"]
