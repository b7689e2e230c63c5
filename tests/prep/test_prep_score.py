"""`rir-finetune score`: teacher scores aligned with pos / neg from a tiny cross-encoder or bi-encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rir_finetune.errors import UserError
from rir_finetune.lifecycle import partial_path
from rir_finetune.prep.score import run_score

WORDS = (
    "the a of cell cells gene protein heart brain virus drug risk study trial mice level effect diet".split()
)


def build_tiny_cross_encoder(folder: Path) -> Path:
    """A random 1-layer BERT with one output (a reranker's shape) and a vocab-file tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *[f"w{i}" for i in range(20)]]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=1)  # fmt: skip
    BertForSequenceClassification(cfg).save_pretrained(folder)
    BertTokenizer(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny_ce"))


@pytest.fixture
def records_file(tmp_path) -> Path:
    rows = [
        {"query": "gene effect", "pos": ["gene w1 effect"], "neg": ["heart w2", "diet w3 study"], "qid": "1"},
        {"query": "virus risk", "pos": ["virus risk w4", "the virus"], "neg": ["brain"]},
        {"query": "mice trial", "pos": ["mice trial w5"]},  # no negatives: empty neg_scores
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_out(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cross_encoder_scores_are_raw_logits_aligned_with_pos_and_neg(
    tiny_cross_encoder, records_file, tmp_path, capsys
):
    from sentence_transformers import CrossEncoder

    out = tmp_path / "out.jsonl"
    counts = run_score(None, ["--input", str(records_file), "--output", str(out), "--model", str(tiny_cross_encoder),
                              "--batch_size", "2", "--records_per_chunk", "2"])  # fmt: skip
    records = read_out(out)
    assert counts["records"] == 3 and counts["pairs"] == 7
    assert [(len(r["pos_scores"]), len(r["neg_scores"])) for r in records] == [(1, 2), (2, 1), (1, 0)]
    name = f"{tiny_cross_encoder.parent.name}/{tiny_cross_encoder.name}"
    assert {r["teacher"] for r in records} == {name}
    assert records[0]["qid"] == "1" and records[1]["pos"] == ["virus risk w4", "the virus"]  # fields kept
    import torch

    model = CrossEncoder(str(tiny_cross_encoder), device="cpu")
    r = records[0]
    expected = model.predict(
        [(r["query"], p) for p in r["pos"] + r["neg"]], activation_fn=torch.nn.Identity()
    )
    np.testing.assert_allclose(r["pos_scores"] + r["neg_scores"], expected, rtol=1e-5, atol=1e-6)
    assert f"teacher {name} (cross_encoder" in capsys.readouterr().out
    assert not partial_path(out).exists()


def test_cross_encoder_sigmoid_and_teacher_name(tiny_cross_encoder, records_file, tmp_path):
    raw, squashed = tmp_path / "raw.jsonl", tmp_path / "sig.jsonl"
    base = ["--input", str(records_file), "--model", str(tiny_cross_encoder)]
    run_score(None, [*base, "--output", str(raw)])
    run_score(None, [*base, "--output", str(squashed), "--apply_sigmoid", "true", "--teacher", "my-reranker"])
    for a, b in zip(read_out(raw), read_out(squashed), strict=True):
        np.testing.assert_allclose(b["pos_scores"], 1 / (1 + np.exp(-np.array(a["pos_scores"]))), rtol=1e-5)
        assert b["teacher"] == "my-reranker"


def test_bi_encoder_scores_are_embedding_dot_products(tiny_bert_dir, records_file, tmp_path):
    from rir_finetune.retrieval.encoder import Encoder

    out = tmp_path / "out.jsonl"
    run_score(None, ["--input", str(records_file), "--output", str(out), "--model", str(tiny_bert_dir),
                     "--model_type", "bi_encoder"])  # fmt: skip
    r = read_out(out)[1]
    encoder = Encoder.from_folder(tiny_bert_dir, show_progress=False)
    q = encoder.encode_queries([r["query"]])[0]
    expected = encoder.encode_passages(r["pos"] + r["neg"]) @ q
    np.testing.assert_allclose(r["pos_scores"] + r["neg_scores"], expected, rtol=1e-5, atol=1e-6)
    assert r["teacher"] == f"{tiny_bert_dir.parent.name}/{tiny_bert_dir.name}"


def test_teachers_take_the_dtype_and_pack_sequences_keys(
    tiny_cross_encoder, tiny_bert_dir, records_file, tmp_path
):
    """A cross-encoder under bf16 autocast scores close to fp32 but not bit for bit (it did compute in bf16); a packed
    bi-encoder scores as the padded one."""
    base = ["--input", str(records_file), "--device", "cpu"]  # auto there: fp32, padded
    scores = {}
    for name, extra in (("fp32", []), ("bf16", ["--dtype", "bf16"])):
        run_score(
            None,
            [*base, "--model", str(tiny_cross_encoder), "--output", str(tmp_path / f"{name}.jsonl"), *extra],
        )
        scores[name] = np.array(
            [s for r in read_out(tmp_path / f"{name}.jsonl") for s in r["pos_scores"] + r["neg_scores"]]
        )
    assert 0 < np.abs(scores["fp32"] - scores["bf16"]).max() < 0.05
    for name, extra in (("padded", []), ("packed", ["--pack_sequences", "true"])):
        run_score(None, [*base, "--model", str(tiny_bert_dir), "--model_type", "bi_encoder", "--output",
                         str(tmp_path / f"{name}.jsonl"), *extra])  # fmt: skip
        scores[name] = np.array(
            [s for r in read_out(tmp_path / f"{name}.jsonl") for s in r["pos_scores"] + r["neg_scores"]]
        )
    np.testing.assert_allclose(scores["packed"], scores["padded"], atol=1e-5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model_type", "listwise"], "'model_type': 'listwise' is not one of cross_encoder, bi_encoder"),
        (["--model", "no/such/dir"], "model folder not found"),
        (["--output", "{input}"], "the output is the input file"),
    ],
)
def test_score_config_errors(tiny_cross_encoder, records_file, tmp_path, extra, message):
    tokens = [
        "--input",
        str(records_file),
        "--output",
        str(tmp_path / "o.jsonl"),
        "--model",
        str(tiny_cross_encoder),
    ]
    with pytest.raises(UserError, match=message):
        run_score(None, tokens + [t.format(input=records_file) for t in extra])


def test_score_malformed_record_names_the_line(tiny_cross_encoder, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"query": "q", "pos": ["p"]}\n{"query": "q", "pos": ["p"], "neg": "not a list"}\n')
    with pytest.raises(UserError, match=r"in.jsonl:2: field 'neg' must be a list of strings"):
        run_score(
            None,
            ["--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--model", str(tiny_cross_encoder)],
        )
