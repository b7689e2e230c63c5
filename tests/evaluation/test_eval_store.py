"""`eval` over the embedding store and faiss: --index flat gives the metrics of one exact search over the whole
corpus to the last digit; an approximate index keeps them close and says what it traded; a gzip corpus streams."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rir_finetune.cli import main
from rir_finetune.evaluation import compute_metrics, load_beir, run_retrieval
from rir_finetune.retrieval.encoder import Encoder

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
WORDS = "apple banana cherry the a is of".split()  # eval_fixtures' tiny vocabulary


def write_beir(root: Path, n_docs: int, n_queries: int, seed: int = 0) -> Path:
    """``n_docs`` passages of tiny-vocabulary words, queries judged against one passage each."""
    rng = np.random.default_rng(seed)
    (root / "qrels").mkdir(parents=True)
    docs = [" ".join(rng.choice(WORDS, rng.integers(3, 25))) for _ in range(n_docs)]
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n" for i, t in enumerate(docs))
    )
    judged = rng.choice(n_docs, n_queries, replace=False)
    (root / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{j}", "text": docs[d][:20]}) + "\n" for j, d in enumerate(judged))
    )
    rows = [f"q{j}\td{d}\t1" for j, d in enumerate(judged)]
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
    return root


def eval_cli(model, data, out, *extra) -> dict:
    main(["eval", "--model", str(model), "--data", str(data), "--output_dir", str(out), "--show_progress", "false",
          *map(str, extra)])  # fmt: skip
    return json.loads((out / "metrics.json").read_text())


def read_trec(path: Path) -> dict[str, list[str]]:
    run: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        qid, _, doc, *_ = line.split()
        run.setdefault(qid, []).append(doc)
    return run


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from eval_fixtures import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("store_models") / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_beir(tmp_path_factory.mktemp("store_data") / "beir", n_docs=260, n_queries=30)


def test_flat_over_shards_equals_one_exact_search_of_the_whole_corpus(model_dir, data, tmp_path):
    """The reference encodes the corpus shard by shard too (so both hold the same vectors) and searches it the way
    eval did before the store: one exact search over the whole array. Run and metrics must match to the last
    digit."""
    k_values = [1, 5, 10, 100]
    got = eval_cli(model_dir, data, tmp_path / "o", "--shard_size", "64", "--cache_dir", tmp_path / "c",
                   "--k_values", *k_values)  # fmt: skip
    encoder = Encoder.from_folder(model_dir, show_progress=False)
    dataset = load_beir(data, "test")
    _, texts = dataset.corpus_texts()
    vectors = np.concatenate([encoder.encode_passages(texts[s : s + 64]) for s in range(0, len(texts), 64)])
    reference = run_retrieval(encoder.encode_queries, encoder.encode_passages, dataset, top_k=100,
                              corpus_reps=vectors)  # fmt: skip
    assert got == compute_metrics(dataset.qrels, reference, k_values)
    trec = read_trec(tmp_path / "o" / "run.trec")
    assert trec == {q: [d for d, _ in sorted(h.items(), key=lambda x: (x[1], x[0]), reverse=True)]
                    for q, h in reference.items()}  # fmt: skip
    assert len(json.loads((next((tmp_path / "c").iterdir()) / "manifest.json").read_text())["shards"]) == 5


def test_gzip_corpus_gives_the_same_results(model_dir, data, tmp_path):
    gz = tmp_path / "gz"
    (gz / "qrels").mkdir(parents=True)
    for name in ("queries.jsonl", "qrels/test.tsv"):
        (gz / name).write_text((data / name).read_text())
    (gz / "corpus.jsonl.gz").write_bytes(gzip.compress((data / "corpus.jsonl").read_bytes()))
    common = ("--cache_dir", tmp_path / "c", "--k_values", 1, 10)
    assert eval_cli(model_dir, gz, tmp_path / "a", *common) == eval_cli(
        model_dir, data, tmp_path / "b", *common
    )
    record = json.loads((tmp_path / "b" / "eval_config.json").read_text())
    assert record["cache"]["hit"] is True and record["documents"] == 260  # the same texts: the same store


def test_approximate_index_reports_its_recall(model_dir, data, tmp_path, capsys):
    common = ("--cache_dir", tmp_path / "c", "--k_values", 1, 10)
    exact = eval_cli(model_dir, data, tmp_path / "flat", *common)
    capsys.readouterr()
    approx = eval_cli(model_dir, data, tmp_path / "ivf", *common, "--index", "ivf", "--target_recall", "1")
    err = capsys.readouterr().err
    search = json.loads((tmp_path / "ivf" / "eval_config.json").read_text())["search"]
    assert search["index"] == "ivf" and search["nlist"] == 6 and search["tuned"] is True
    assert search["recall_k"] == 11 and search["recall_vs_exact"] == 1.0 and search["recall_queries"] == 30
    assert f"index ivf (nlist 6, nprobe {search['nprobe']}, tuned to 1.0): recall@11 1.0000" in err
    assert approx == exact  # recall 1 of exact search on every query: the same metrics


def test_index_key_errors(model_dir, data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        eval_cli(model_dir, data, tmp_path / "o", "--index", "ivf", "--search_backend", "torch")
    assert "torch searches exactly only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_cli(model_dir, data, tmp_path / "o", "--shard_size", "0")
    assert "'shard_size'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# SciFact with all-MiniLM-L6-v2 (slow: each encoding of the corpus takes minutes on a CPU)


@pytest.fixture(scope="module")
def scifact_flat(tmp_path_factory):
    from eval_fixtures import data_dir, minilm_dir

    model, data = minilm_dir(), data_dir("scifact")
    root = tmp_path_factory.mktemp("scifact_store")
    metrics = eval_cli(model, data, root / "flat", "--cache_dir", root / "cache")
    return model, data, root, metrics


@pytest.mark.slow
def test_scifact_flat_equals_the_exact_search_to_the_last_digit(scifact_flat):
    model, data, root, metrics = scifact_flat
    encoder = Encoder.from_folder(model, show_progress=False)
    dataset = load_beir(data, "test")
    reference = compute_metrics(dataset.qrels, run_retrieval(encoder.encode_queries, encoder.encode_passages,
                                                             dataset, top_k=1000), [1, 3, 5, 10, 100, 1000])  # fmt: skip
    assert metrics == reference
    assert metrics["ndcg@10"] == pytest.approx(0.6451, abs=0.003)


@pytest.mark.slow
def test_scifact_ivf_keeps_recall_and_ndcg(scifact_flat):
    """IVF with its defaults (nlist 132, nprobe tuned on the 300 queries) against exact search, both reading the
    stored vectors; with ignore_identical_ids false each run is the index's top 100 itself."""
    model, data, root, _ = scifact_flat
    common = ("--cache_dir", root / "cache", "--k_values", 10, 100, "--ignore_identical_ids", "false")
    exact_metrics = eval_cli(model, data, root / "flat100", *common)
    approx_metrics = eval_cli(model, data, root / "ivf", *common, "--index", "ivf")
    exact, found = read_trec(root / "flat100" / "run.trec"), read_trec(root / "ivf" / "run.trec")
    overlap = np.mean([len(set(found[q]) & set(exact[q])) / 100 for q in exact])
    assert overlap >= 0.99  # recall@100 of exact search
    search = json.loads((root / "ivf" / "eval_config.json").read_text())["search"]
    assert search["recall_vs_exact"] == pytest.approx(overlap) and search["recall_queries"] == 300
    assert search["nlist"] == 132
    assert approx_metrics["recall@100"] >= 0.99 * exact_metrics["recall@100"]
    assert abs(approx_metrics["ndcg@10"] - exact_metrics["ndcg@10"]) <= 0.002


@pytest.mark.slow
@pytest.mark.multiprocess
def test_scifact_two_processes_equal_one(scifact_flat):
    model, data, root, _ = scifact_flat
    common = [
        "eval",
        "--model",
        str(model),
        "--data",
        str(data),
        "--shard_size",
        "2600",
        "--show_progress",
        "false",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rir_finetune", *common, "--output_dir", str(root / "two"), "--cache_dir", str(root / "c2")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-3000:]
    main([*common, "--output_dir", str(root / "one"), "--cache_dir", str(root / "c1")])
    for name in ("metrics.json", "run.trec"):
        assert (root / "one" / name).read_text() == (root / "two" / name).read_text()


def test_use_cache_false_encodes_into_a_temporary_store_and_removes_it(
    model_dir, data, tmp_path, monkeypatch, capsys
):
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("RIR_FINETUNE_CACHE", str(tmp_path / "default_cache"))
    common = ("--k_values", 1, 10, "--shard_size", 100)
    cached = eval_cli(model_dir, data, tmp_path / "a", "--cache_dir", tmp_path / "c", *common)
    assert eval_cli(model_dir, data, tmp_path / "b", "--use_cache", "false", *common) == cached
    assert "corpus embeddings: encoded (260 passages)" in capsys.readouterr().err
    record = json.loads((tmp_path / "b" / "eval_config.json").read_text())["cache"]
    assert record["dir"] is None and record["hit"] is False
    assert list(scratch.iterdir()) == [] and not (tmp_path / "default_cache").exists()


def test_a_store_folder_holding_other_vectors_is_refused_in_one_line(model_dir, data, tmp_path, capsys):
    eval_cli(model_dir, data, tmp_path / "a", "--cache_dir", tmp_path / "c", "--k_values", 1)
    (manifest,) = (tmp_path / "c").glob("*/manifest.json")
    content = json.loads(manifest.read_text())
    content["identity"]["model"] = "another model"
    manifest.write_text(json.dumps(content))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        eval_cli(model_dir, data, tmp_path / "b", "--cache_dir", tmp_path / "c", "--k_values", 1)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert e.value.code == 2 and len(err) == 1  # (transformers' loading bar may come before it)
    assert err[0] == (
        f"error: {manifest}: this embedding store holds other vectors (model differ: another model, corpus or "
        "setting); give another cache_dir or remove the folder"
    )
    assert not (tmp_path / "b").exists()
