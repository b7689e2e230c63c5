"""The head-to-head table from a benchmarks/peers/run.sh work folder: throughput, peak memory, SciFact test metrics.

    python benchmarks/peers/summarize.py work/peers [--warmup 2 --steps 40]

Throughput is queries per second over ``steps`` optimizer steps after ``warmup`` steps: 16 * steps divided by the
time between the end of step ``warmup`` and the end of step ``warmup + steps`` (timed_run.py records every step end).
The median single-step time is shown too. Peak memory is the training process's peak resident set (ru_maxrss);
rir-finetune's tokenizing dataloader worker is a separate process and is listed apart. Metrics come from each row's
``eval/metrics.json`` (all written by ``rir-finetune eval`` with the same settings).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROWS = {
    "base": "all-MiniLM-L6-v2, no training",
    "flagembedding": "FlagEmbedding (encoder_only.base), InfoNCE",
    "flagembedding-malloc": "FlagEmbedding, with rir-finetune's malloc setting",
    "sentence-transformers": "sentence-transformers, MultipleNegativesRankingLoss",
    "sentence-transformers-malloc": "sentence-transformers, with rir-finetune's malloc setting",
    "flagembedding-bf16": "FlagEmbedding, `--bf16 True`",
    "sentence-transformers-bf16": "sentence-transformers, `bf16=True`",
    "flagembedding-malloc-bf16": "FlagEmbedding, our malloc setting, `--bf16 True`",
    "sentence-transformers-malloc-bf16": "sentence-transformers, our malloc setting, `bf16=True`",
    "rir-finetune": "rir-finetune, `retrieval` (L_qp)",
    "rir-finetune-plain": "rir-finetune, `retrieval`, `--gradient_cache false`",
    "rir-finetune-fp32": "rir-finetune, `retrieval`, `--bf16 false`",
    "rir-finetune-fp32-plain": "rir-finetune, `retrieval`, `--bf16 false --gradient_cache false`",
    "rir-finetune-answer": "rir-finetune, `retrieval_answer`, SmolLM2 answers, fused eval",
    "rir-finetune-distill": "rir-finetune, `retrieval` + distillation (kl_div, base-model teacher)",
}


def throughput(timings: dict, warmup: int, steps: int, batch: int) -> tuple[float | None, float | None, int]:
    ends = timings.get("step_end", [])
    if len(ends) < warmup + steps + 1 and len(ends) > warmup + 1:
        steps = len(ends) - warmup - 1  # a short (smoke) run: use what there is
    if len(ends) < warmup + steps + 1 or steps < 1:
        return None, None, len(ends)
    window = ends[warmup : warmup + steps + 1]
    durations = [b - a for a, b in zip(window[:-1], window[1:], strict=True)]
    return batch * steps / (window[-1] - window[0]), statistics.median(durations), len(ends)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    results = {}
    lines = [
        f"Seed {args.seed}, {args.threads} threads; throughput over steps {args.warmup + 1}-"
        f"{args.warmup + args.steps} (after {args.warmup} warm-up steps).",
        "",
        "| tool | queries/s | median s/step | peak RSS (GiB) | steps | nDCG@10 | Recall@10 | Recall@100 | versions |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row, label in ROWS.items():
        folder = args.work / row
        if not folder.is_dir():
            continue
        result: dict = {"label": label}
        timings_path = folder / "timings.json"
        if timings_path.is_file():
            timings = json.loads(timings_path.read_text())
            qps, step, n = throughput(timings, args.warmup, args.steps, args.batch)
            result.update(
                queries_per_s=qps,
                median_step_s=step,
                steps=n,
                peak_rss_gib=timings["peak_rss_gib"],
                worker_peak_rss_gib=timings.get("children_peak_rss_gib"),
                train_wall_s=timings["end"] - timings["start"],
                versions=timings.get("versions", {}),
            )
        metrics_path = folder / "eval" / "metrics.json"
        if metrics_path.is_file():
            result["metrics"] = json.loads(metrics_path.read_text())
        results[row] = result

        def fmt(value, digits):
            return "-" if value is None else f"{value:.{digits}f}"

        metrics = result.get("metrics", {})
        versions = ", ".join(f"{k} {v}" for k, v in result.get("versions", {}).items() if k != "torch")
        lines.append(
            f"| {label} | {fmt(result.get('queries_per_s'), 3)} | {fmt(result.get('median_step_s'), 1)} "
            f"| {fmt(result.get('peak_rss_gib'), 2)} | {result.get('steps', '-')} "
            f"| {fmt(metrics.get('ndcg@10'), 4)} | {fmt(metrics.get('recall@10'), 4)} "
            f"| {fmt(metrics.get('recall@100'), 4)} | {versions or '-'} |"
        )
    ours, flag, st = (results.get(k, {}).get("queries_per_s") for k in
                      ("rir-finetune", "flagembedding", "sentence-transformers"))  # fmt: skip
    if ours and flag:
        lines.append(f"\nrir-finetune / FlagEmbedding throughput: {ours / flag:.2f}x")
    if ours and st:
        lines.append(f"rir-finetune / sentence-transformers throughput: {ours / st:.2f}x")
    groups = {  # peers given our malloc setting, by precision
        "fp32": ("flagembedding-malloc", "sentence-transformers-malloc"),
        "bf16": ("flagembedding-malloc-bf16", "sentence-transformers-malloc-bf16"),
    }
    for precision, peers in groups.items():
        measured = {k: results[k] for k in peers if (results.get(k) or {}).get("queries_per_s")}
        if not measured:
            continue
        name, peer = max(measured.items(), key=lambda kv: kv[1]["queries_per_s"])
        for row in ("rir-finetune", "rir-finetune-plain", "rir-finetune-fp32", "rir-finetune-fp32-plain"):
            mine = results.get(row) or {}
            if mine.get("queries_per_s"):
                lines.append(
                    f"{row} / best {precision} peer with the same malloc setting ({name}): "
                    f"{mine['queries_per_s'] / peer['queries_per_s']:.2f}x throughput, peak RSS "
                    f"{mine['peak_rss_gib']:.2f} vs {peer['peak_rss_gib']:.2f} GiB"
                )
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
