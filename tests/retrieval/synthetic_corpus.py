"""A SciFact-sized synthetic BEIR folder in the tiny BERT's vocabulary (tests of the store, the index, sharding)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

from conftest import WORDS

VOCAB = WORDS + [f"w{i}" for i in range(40)]


def write_synthetic_beir(
    root: Path, n_docs: int = 5183, n_queries: int = 300, n_train: int = 200, seed: int = 0, gz: bool = False
) -> Path:
    """``n_docs`` passages of 8-60 words; test and train queries, each built from words of its one judged passage
    (so a model can find it); ``train.jsonl`` records (query, pos, pos_ids) for ``mine``. Same seed, same files."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    docs = []
    for i in range(n_docs):
        words = [rng.choice(VOCAB) for _ in range(rng.randint(8, 60))]
        docs.append({"_id": f"doc{i}", "title": " ".join(words[:2]), "text": " ".join(words[2:])})
    lines = "".join(json.dumps(d) + "\n" for d in docs)
    if gz:
        with gzip.open(root / "corpus.jsonl.gz", "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        (root / "corpus.jsonl").write_text(lines)
    judged = rng.sample(range(n_docs), n_queries + n_train)
    queries, qrels = [], {"test": [], "train": []}
    records = []
    for j, d in enumerate(judged):
        doc = docs[d]
        words = (doc["title"] + " " + doc["text"]).split()
        qid = f"q{j}"
        queries.append({"_id": qid, "text": " ".join(rng.sample(words, min(5, len(words))))})
        split = "test" if j < n_queries else "train"
        qrels[split].append(f"{qid}\t{doc['_id']}\t1")
        if split == "train":
            passage = (doc["title"] + " " + doc["text"]).strip()
            records.append(
                {"query": queries[-1]["text"], "pos": [passage], "qid": qid, "pos_ids": [doc["_id"]]}
            )
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels").mkdir(exist_ok=True)
    for split, rows in qrels.items():
        (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root
