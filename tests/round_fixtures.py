"""The round tests' tiny BEIR slice and round config (tiny BERT retriever, tiny causal LM for the answers)."""

from __future__ import annotations

from pathlib import Path

import yaml

from conftest import WORDS
from eval_fixtures import write_beir

TOPICS = WORDS[10:22]


def tiny_beir(root: Path) -> Path:
    """12 documents, 8 training and 4 test queries, each query judged relevant to its own topic's document."""
    corpus = {f"d{i}": (t, f"{t} w{i} " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(6)))
              for i, t in enumerate(TOPICS)}  # fmt: skip
    queries = {f"q{i}": f"{t} effect w{i}" for i, t in enumerate(TOPICS)}
    write_beir(root, corpus, queries, [(f"q{i}", f"d{i}", 1) for i in range(8)], split="train")
    lines = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{i}\t1" for i in range(8, 12)]
    (root / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return root


def round_config(tmp_path: Path, bert: Path, llm: Path, out: Path) -> Path:
    cfg = {
        "output_dir": str(out),
        "data": str(tiny_beir(tmp_path / "beir")),
        "retriever": str(bert),
        "llm": {"model": str(llm), "max_new_tokens": 4, "batch_size": 4},
        "alphas": [0.5, 0.8],
        "mine": {"negatives": 2, "range_for_sampling": "0-8", "use_cache": False},
        "train": {
            "training_type": "retrieval_answer",
            "sentence_pooling_method": "mean",
            "train_group_size": 2,
            "per_device_train_batch_size": 4,
            "max_steps": 4,
            "save_strategy": "steps",
            "save_steps": 2,
            "learning_rate": 1e-3,
            "query_max_len": 16,
            "passage_max_len": 32,
            "use_cpu": True,
            "logging_steps": 1,
            "disable_tqdm": True,
            "report_to": "none",
        },  # fmt: skip
        "eval": {"use_cache": False, "show_progress": False},
    }
    path = tmp_path / "round.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
