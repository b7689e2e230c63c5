"""Result files, each written atomically (temporary file in the same folder, then rename).

- ``metrics.json``: flat ``{"ndcg@10": 0.6451, ...}``;
- ``per_query.json``: ``{query id: {"ndcg@10": ..., ...}}`` for every judged query, the same metrics; their mean
  is ``metrics.json`` (``rir-finetune compare`` pairs runs query by query on it);
- ``metrics.md``: a Markdown table, one row per metric, one column per cut-off;
- ``run.trec``: ``qid Q0 docid rank score run_name``, one line per retrieved document.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

from rir_finetune.evaluation.metrics import METRICS, trec_order
from rir_finetune.files import atomic_write


def write_metrics_json(path: str | Path, metrics: dict[str, float]) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(metrics, indent=2) + "\n"))


def write_per_query_json(path: str | Path, per_query: dict[str, dict[str, float]]) -> None:
    """One query per line, so the file stays readable and diffable for thousands of queries."""
    rows = [f"{json.dumps(qid)}: {json.dumps(values)}" for qid, values in per_query.items()]
    atomic_write(path, lambda f: f.write("{\n" + ",\n".join(rows) + "\n}\n"))


def metrics_table(metrics: dict[str, float], title: str = "") -> str:
    """Markdown: rows nDCG, MAP, Recall, Precision, MRR; columns @k for every k present."""
    ks = sorted({int(name.split("@")[1]) for name in metrics if "@" in name})
    labels = {"ndcg": "nDCG", "map": "MAP", "recall": "Recall", "precision": "Precision", "mrr": "MRR"}
    lines = [f"# {title}", ""] if title else []
    lines.append("| metric | " + " | ".join(f"@{k}" for k in ks) + " |")
    lines.append("|---|" + "---:|" * len(ks))
    for metric in METRICS:
        cells = [f"{metrics[f'{metric}@{k}']:.4f}" if f"{metric}@{k}" in metrics else "" for k in ks]
        if any(cells):
            lines.append(f"| {labels[metric]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_metrics_md(path: str | Path, metrics: dict[str, float], title: str = "") -> None:
    atomic_write(path, lambda f: f.write(metrics_table(metrics, title)))


def write_trec_run(
    path: str | Path, run: dict[str, dict[str, float]], run_name: str = "rir-finetune"
) -> None:
    """One line per hit, ranks from 1 in trec_eval's order (score descending, ties by doc id descending)."""

    def write(f: IO) -> None:
        for qid in sorted(run):
            for rank, (doc_id, score) in enumerate(trec_order(run[qid]), start=1):
                f.write(f"{qid} Q0 {doc_id} {rank} {score:.9g} {run_name}\n")

    atomic_write(path, write)
