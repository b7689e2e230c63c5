"""``rir-finetune eval`` end to end on a tiny random BERT: output files, the corpus cache, one-line errors."""

import json
import shutil

import pytest

from eval_fixtures import KEYWORD_CORPUS, KEYWORD_QRELS, KEYWORD_QUERIES, make_tiny_bert, write_beir
from rir_finetune.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("cli_models") / "model")


@pytest.fixture
def data(tmp_path):
    return write_beir(tmp_path / "kw", KEYWORD_CORPUS, KEYWORD_QUERIES, KEYWORD_QRELS)


def run_cli(*args: object) -> None:
    main(["eval", *map(str, args), "--show_progress", "false"])


def cli_error(capsys, *args: object) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(*args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0][len("error: ") :]


def test_outputs(model_dir, data, tmp_path):
    out = tmp_path / "out"
    run_cli(
        "--model",
        model_dir,
        "--data",
        data,
        "--output_dir",
        out,
        "--k_values",
        "1",
        "3",
        "--cache_dir",
        tmp_path / "c",
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == [
        f"{m}@{k}" for m in ("ndcg", "map", "recall", "precision", "mrr") for k in (1, 3)
    ]
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert (out / "metrics.md").read_text().splitlines()[2] == "| metric | @1 | @3 |"
    run = [line.split() for line in (out / "run.trec").read_text().splitlines()]
    assert len(run) == 3 * 3  # 3 queries x top_k = max(k_values) = 3
    assert [r[:2] + [r[3]] for r in run[:3]] == [["q1", "Q0", "1"], ["q1", "Q0", "2"], ["q1", "Q0", "3"]]
    assert sorted(p.name for p in out.iterdir()) == [
        "eval_config.json",
        "metrics.json",
        "metrics.md",
        "per_query.json",
        "run.trec",
    ]


def _cache_record(out):
    return json.loads((out / "eval_config.json").read_text())["cache"]


def test_cache_is_keyed_by_content_not_folder_name(model_dir, data, tmp_path):
    model = tmp_path / "m" / "model"
    shutil.copytree(model_dir, model)
    common = ("--data", data, "--cache_dir", tmp_path / "cache", "--k_values", "1", "3")
    run_cli("--model", model, "--output_dir", tmp_path / "o1", *common)
    run_cli("--model", model, "--output_dir", tmp_path / "o2", *common)
    first, second = _cache_record(tmp_path / "o1"), _cache_record(tmp_path / "o2")
    assert (first["hit"], second["hit"]) == (False, True) and first["key"] == second["key"]
    assert (tmp_path / "o1" / "metrics.json").read_text() == (tmp_path / "o2" / "metrics.json").read_text()
    make_tiny_bert(model, seed=1)  # new weights, same folder name
    run_cli("--model", model, "--output_dir", tmp_path / "o3", *common)
    third = _cache_record(tmp_path / "o3")
    assert third["hit"] is False and third["key"] != first["key"]
    shutil.copytree(model, tmp_path / "elsewhere")  # same content under another name: reused
    run_cli("--model", tmp_path / "elsewhere", "--output_dir", tmp_path / "o4", *common)
    assert _cache_record(tmp_path / "o4") == {**third, "hit": True}
    # a changed encoder setting is a new key
    run_cli("--model", model, "--output_dir", tmp_path / "o5", *common, "--max_length", "4")
    assert _cache_record(tmp_path / "o5")["hit"] is False
    assert len(list((tmp_path / "cache").glob("*/manifest.json"))) == 3  # one store per key
    # bf16 embeddings are not fp32's: their own key, never a hit on the fp32 entry
    run_cli("--model", model, "--output_dir", tmp_path / "o6", *common, "--dtype", "bf16")
    assert _cache_record(tmp_path / "o6")["hit"] is False
    run_cli("--model", model, "--output_dir", tmp_path / "o7", *common, "--dtype", "bfloat16")
    assert _cache_record(tmp_path / "o7") == {**_cache_record(tmp_path / "o6"), "hit": True}
    assert json.loads((tmp_path / "o7" / "eval_config.json").read_text())["arguments"]["dtype"] == "bfloat16"


def test_missing_model_folder(capsys, data, tmp_path):
    msg = cli_error(capsys, "--model", tmp_path / "no_model", "--data", data, "--output_dir", tmp_path / "o")
    assert msg == f"{tmp_path / 'no_model'}: model folder not found"


def test_data_errors(capsys, model_dir, data, tmp_path):
    common = ("--model", model_dir, "--data", data, "--output_dir", tmp_path / "o")
    assert (
        cli_error(capsys, *common, "--split", "dev")
        == f"{data / 'qrels' / 'dev.tsv'}: qrels file of split 'dev' not found"
    )
    with (data / "qrels" / "test.tsv").open("a") as f:
        f.write("q2\tghost\t1\n")
    assert (
        cli_error(capsys, *common)
        == f"{data / 'qrels' / 'test.tsv'}:6: document 'ghost' is not in {data / 'corpus.jsonl'}"
    )
    with (data / "corpus.jsonl").open("a") as f:
        f.write("{not json}\n")
    assert cli_error(capsys, *common).startswith(f"{data / 'corpus.jsonl'}:5: invalid JSON: ")
    (data / "corpus.jsonl").write_text("")
    assert cli_error(capsys, *common) == f"{data / 'corpus.jsonl'}: the corpus is empty"


def test_answer_errors(capsys, model_dir, data, tmp_path):
    common = ("--model", model_dir, "--data", data, "--output_dir", tmp_path / "o")
    assert (
        cli_error(capsys, *common, "--mode", "fused")
        == "config key 'answers': mode 'fused' needs --answers FILE"
    )
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"_id": "q1", "answer": "apple"}) + "\n")
    msg = cli_error(capsys, *common, "--mode", "answer", "--answers", answers)
    assert msg == f"{answers}: no answer for 2 of 3 queries ('q2', 'q3')"
    assert cli_error(capsys, *common, "--mode", "fusd").startswith(
        "config key 'mode': must be one of query, answer, fused"
    )


def test_fused_mode_through_the_command(model_dir, data, tmp_path):
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"qid": q, "answer": "banana"}) + "\n" for q in KEYWORD_QUERIES))
    common = ("--model", model_dir, "--data", data, "--answers", answers, "--cache_dir", tmp_path / "c")
    run_cli(*common, "--output_dir", tmp_path / "q", "--mode", "query")
    run_cli(*common, "--output_dir", tmp_path / "f", "--mode", "fused", "--alpha", "1")
    assert (tmp_path / "q" / "run.trec").read_text() == (tmp_path / "f" / "run.trec").read_text()


def test_identical_ids_warning_and_switch(capsys, model_dir, tmp_path):
    # doc "q1" shares q1's id and is judged relevant: ids from unrelated namespaces (CISI is such a dataset)
    corpus = {**KEYWORD_CORPUS, "q1": ("", "apple")}
    data = write_beir(tmp_path / "clash", corpus, KEYWORD_QUERIES, [*KEYWORD_QRELS, ("q1", "q1", 1)])
    common = ("--model", model_dir, "--data", data, "--cache_dir", tmp_path / "c")
    capsys.readouterr()
    run_cli(*common, "--output_dir", tmp_path / "drop")
    assert "warning: 1 queries have a relevant document with their own id (q1)" in capsys.readouterr().err
    assert "q1 Q0 q1 " not in (tmp_path / "drop" / "run.trec").read_text()
    run_cli(*common, "--output_dir", tmp_path / "keep", "--ignore_identical_ids", "false")
    assert "warning" not in capsys.readouterr().err
    assert "q1 Q0 q1 " in (tmp_path / "keep" / "run.trec").read_text()


def test_packed_sequences_on_a_cpu_give_the_padded_runs_metrics(model_dir, data, tmp_path):
    """--pack_sequences true (auto packs on CUDA only) reaches the encoder: the packed forward, the same metrics."""
    common = ("--model", model_dir, "--data", data, "--use_cache", "false", "--k_values", "1", "3")
    run_cli(*common, "--output_dir", tmp_path / "padded")
    run_cli(*common, "--output_dir", tmp_path / "packed", "--pack_sequences", "true")
    computed = [
        json.loads((tmp_path / d / "eval_config.json").read_text())["computed"] for d in ("padded", "packed")
    ]
    assert [c["packed"] for c in computed] == [False, True]
    padded, packed = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("padded", "packed"))
    assert packed == pytest.approx(padded, abs=1e-9)
