"""benchmarks/ablation.py's table from the results kept in git (every query's nDCG@10 per run): the numbers are
``compare``'s on the same per-query values, seed means and differences computed by hand."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

from rir_finetune.evaluation.compare import CompareConfig, compare, fmt_diff

REPO = Path(__file__).resolve().parents[2]
QIDS = [f"q{i}" for i in range(8)]
VALUES = {  # (row, seed) -> nDCG@10 of q0..q7
    ("base (no training)", 0): [0.0, 0.5, 0.5, 1.0, 0.0, 0.2, 0.3, 0.4],
    ("retrieval (L_qp)", 42): [0.5, 0.5, 1.0, 1.0, 0.0, 0.3, 0.6, 0.4],
    ("retrieval (L_qp)", 43): [0.7, 0.5, 0.8, 1.0, 0.2, 0.3, 0.6, 0.2],
    ("+ answers (L_qa; L_norm off)", 42): [0.6, 0.5, 1.0, 0.9, 0.1, 0.4, 0.6, 0.5],
    ("+ answers (L_qa; L_norm off)", 43): [0.8, 0.6, 0.8, 1.0, 0.2, 0.3, 0.7, 0.3],
}


def load_ablation():
    spec = importlib.util.spec_from_file_location("ablation", REPO / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def write_results(path: Path) -> None:
    lines = []
    for (row, seed), values in VALUES.items():
        per_query = dict(zip(QIDS, values, strict=True))
        mean = sum(values) / len(values)
        record = {"row": row, "seed": seed, "query": {"ndcg@10": mean, "eval": "gone"},
                  "fused_0.8": {"ndcg@10": mean, "eval": "gone"},
                  "per_query_ndcg@10": {"query": per_query, "fused_0.8": per_query}}  # fmt: skip
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")


def test_table_from_the_kept_results_equals_compare_by_hand(tmp_path):
    ablation = load_ablation()
    results = tmp_path / "results.jsonl"
    write_results(results)
    text = ablation.table(results)
    rows = {
        tuple(c.strip() for c in line.split("|")[1:3]): line
        for line in text.splitlines()
        if line.startswith("| ")
    }

    ret = [statistics.mean(VALUES[("retrieval (L_qp)", s)]) for s in (42, 43)]
    ans = [statistics.mean(VALUES[("+ answers (L_qa; L_norm off)", s)]) for s in (42, 43)]
    line = rows[("retrieval (L_qp)", "query")]
    assert f"| 2 of 5 (42, 43) | {statistics.mean(ret):.4f} ± {statistics.stdev(ret):.4f} |" in line
    assert f"{ret[0]:.4f} (42), {ret[1]:.4f} (43)" in line and "| reference |" in line

    # the difference by hand: per query, the mean over seeds of answers less that of retrieval
    diff = [(a42 + a43) / 2 - (r42 + r43) / 2 for a42, a43, r42, r43 in zip(
        VALUES[("+ answers (L_qa; L_norm off)", 42)], VALUES[("+ answers (L_qa; L_norm off)", 43)],
        VALUES[("retrieval (L_qp)", 42)], VALUES[("retrieval (L_qp)", 43)], strict=True)]  # fmt: skip
    line = rows[("+ answers (L_qa; L_norm off)", "query")]
    assert f"| {statistics.mean(ans):.4f} ± {statistics.stdev(ans):.4f} |" in line
    assert f"| {sum(diff) / 8:+.4f} |" in line

    # the interval and p-value: compare's on eval folders holding the same values
    folders = {}
    for i, ((row, _seed), values) in enumerate(VALUES.items()):
        folder = tmp_path / "folders" / str(i)
        folder.mkdir(parents=True)
        (folder / "per_query.json").write_text(
            json.dumps({q: {"ndcg@10": v} for q, v in zip(QIDS, values, strict=True)})
        )
        folders.setdefault(row, []).append(str(folder))
    spec = [
        f"r={','.join(folders['retrieval (L_qp)'])}",
        f"a={','.join(folders['+ answers (L_qa; L_norm off)'])}",
    ]
    (c,) = compare(CompareConfig(runs=spec, metrics=["ndcg@10"]))["comparisons"]
    mean, interval, p = fmt_diff(c)
    assert f"| {mean} | {interval} | {p} | {c['verdict']} |" in line
    base = rows[("base (no training)", "query")]
    assert "| - | 0.3625 | - |" in base  # one run, no seeds: its own mean
    assert "8 SciFact test queries paired" in text
