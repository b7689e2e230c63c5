"""Token lengths rounded up to ``pad_to_multiple_of`` (issue 19): the collator and every gradient-cache chunk pad to
the longest text rounded up to the multiple, never beyond the part's maximum length, and the embeddings do not
change (padding is masked)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from rir_finetune.training.arguments import DataArguments
from rir_finetune.training.collator import RIRCollator, pad_columns
from rir_finetune.training.model import BiEncoder, split_features, trim_padding


def _item(query: str, passages: list[str]) -> dict:
    return {"query": query, "passages": passages, "answer": None, "answer_candidates": None,
            "teacher_scores": None, "no_in_batch_neg": False}  # fmt: skip


def test_default_multiple_is_16():
    assert DataArguments(train_data=["x.jsonl"]).pad_to_multiple_of == 16


@pytest.mark.parametrize(
    ("words", "multiple", "cap", "width"),
    [
        (3, 16, 64, 16),  # 5 tokens ([CLS] 3 words [SEP]) -> 16
        (15, 16, 64, 32),  # 17 tokens -> 32
        (14, 16, 64, 16),  # exactly 16 -> 16
        (
            30,
            16,
            24,
            24,
        ),  # truncated to 24, which is not a multiple of 16: stays 24 (transformers would refuse)
        (10, 16, 20, 16),  # 12 tokens -> 16 <= 20
        (17, 16, 20, 20),  # 19 tokens -> 32, capped at 20
        (3, None, 64, 5),  # no multiple: the longest text
        (3, 1, 64, 5),
    ],
)
def test_collator_pads_to_the_multiple_within_the_cap(tiny_bert_dir, words, multiple, cap, width):
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    collate = RIRCollator(tok, query_max_len=cap, passage_max_len=cap, pad_to_multiple_of=multiple)
    batch = collate([_item(" ".join(["cell"] * words), ["gene", "the blood"])])
    q = batch["queries"]
    assert q["input_ids"].shape == (1, width)
    n = min(words + 2, cap)
    assert q["attention_mask"][0].tolist() == [1] * n + [0] * (width - n)
    assert q["input_ids"][0, n:].eq(tok.pad_token_id).all()
    assert q["token_type_ids"][0, n:].eq(0).all()
    p = batch["passages"]
    assert p["input_ids"].size(1) == min(cap, 16 if multiple and multiple > 1 else 4)


def test_pad_columns_left_padding(tiny_bert_dir):
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    tok.padding_side = "left"
    enc = dict(tok(["cell gene", "the"], padding=True, return_tensors="pt"))  # (2, 4)
    out = pad_columns(enc, tok, 8, 100)
    assert out["input_ids"].shape == (2, 8)
    assert out["attention_mask"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1]]
    assert torch.equal(out["input_ids"][:, 4:], enc["input_ids"])


def test_trim_padding_and_chunks_keep_the_multiple():
    mask = torch.zeros(4, 48, dtype=torch.long)
    for row, n in enumerate([5, 20, 3, 40]):
        mask[row, :n] = 1
    feats = {"input_ids": mask * 7, "attention_mask": mask}
    assert trim_padding(feats)["input_ids"].shape == (4, 40)
    assert trim_padding(feats, 16)["input_ids"].shape == (4, 48)  # 40 -> 48 (= L: untouched)
    assert [c["input_ids"].size(1) for c in split_features(feats, 2)] == [20, 40]
    assert [c["input_ids"].size(1) for c in split_features(feats, 2, 16)] == [32, 48]
    assert [c["attention_mask"].size(1) for c in split_features(feats, 1, 16)] == [16, 32, 16, 48]


def test_padding_to_a_multiple_leaves_the_embeddings_unchanged(tiny_bert_dir):
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    texts = ["cell gene protein", "the blood of mice with high insulin levels", "virus"]
    for pooling in ("mean", "cls", "last_token"):
        model = BiEncoder.from_pretrained(str(tiny_bert_dir), pooling=pooling, normalize=True).eval()
        exact = RIRCollator(tok, passage_max_len=64, pad_to_multiple_of=None)._tok(texts, 64)
        padded = RIRCollator(tok, passage_max_len=64, pad_to_multiple_of=16)._tok(texts, 64)
        assert exact["input_ids"].size(1) == 10 and padded["input_ids"].size(1) == 16
        with torch.no_grad():
            torch.testing.assert_close(model.encode(padded), model.encode(exact), atol=1e-6, rtol=1e-5)
