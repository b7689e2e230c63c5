"""Training-step benchmarks (issue 5) on all-MiniLM-L6-v2 and SciFact hard-negative records.

    python benchmarks/train_step.py speed  [--steps 5 --warmup 2]      # ours vs bare encoder vs sentence-transformers
    python benchmarks/train_step.py memory [--batches 16 64 256]       # peak RSS with / without gradient caching

`speed`: one batch of B=16 queries x group 4 (query 64 / passage 256 tokens), the same padded tensors for
  (1) the bare floor: backbone forward on queries and passages, mean pooling, a sum, backward;
  (2) ours: BiEncoder forward + compute_objectives (L_qp, in-batch + hard negatives) + backward;
  (3) ours with gradient caching (chunk 16);
  (4) sentence-transformers MultipleNegativesRankingLoss and (5) CachedMultipleNegativesRankingLoss (mini-batch 8)
      on the same texts (anchor, positive, 3 negatives), forward + backward.
  Median seconds per step over --steps timed steps after --warmup, all in one process, one after the other.
`memory`: each (batch size, caching) pair in its own subprocess (peak RSS is per process): group 8, query 32 /
  passage 64 tokens, one step of ours with and without gradient caching (chunk 32).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, minilm_path, peak_rss_gib, scifact_hn_records, timed  # noqa: E402


def _items(records, b, g):
    return [{"query": r["query"], "passages": [r["pos"][0], *r["neg"][: g - 1]], "answer": None,
             "answer_candidates": None, "teacher_scores": None, "no_in_batch_neg": False} for r in records[:b]]  # fmt: skip


def speed(args) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss

    from rir_finetune.training.arguments import ObjectiveArguments
    from rir_finetune.training.collator import RIRCollator
    from rir_finetune.training.gradcache import cached_step
    from rir_finetune.training.model import BiEncoder, load_tokenizer
    from rir_finetune.training.objectives import compute_objectives

    torch.manual_seed(0)
    b, g = args.batch, 4
    recs = scifact_hn_records()
    path = minilm_path()
    tok = load_tokenizer(path)
    batch = RIRCollator(tok, 64, 256, 64)(_items(recs, b, g))
    cfg = ObjectiveArguments(training_type="retrieval", temperature=0.02)
    model = BiEncoder.from_pretrained(path, pooling="mean", normalize=True).train()
    backbone = model.backbone

    def bare():
        model.zero_grad(set_to_none=True)
        total = 0
        for feats in (batch["queries"], batch["passages"]):
            h = backbone(**feats).last_hidden_state
            m = feats["attention_mask"].unsqueeze(-1).float()
            total = total + ((h * m).sum(1) / m.sum(1)).sum()
        total.backward()

    def ours():
        model.zero_grad(set_to_none=True)
        reps = model(**batch)
        compute_objectives(reps.q_reps, reps.p_reps, cfg).loss.backward()

    def ours_cached():
        model.zero_grad(set_to_none=True)
        cached_step(lambda f: model(features=f), batch, 16,
                    lambda r: compute_objectives(r.q_reps, r.p_reps, cfg))  # fmt: skip

    st = SentenceTransformer(path, device="cpu")
    st.max_seq_length = 256
    st.train()
    texts = [[it["query"] for it in _items(recs, b, g)]] + [
        [it["passages"][j] for it in _items(recs, b, g)] for j in range(g)
    ]
    mnrl = MultipleNegativesRankingLoss(st, scale=1 / 0.02)
    cmnrl = CachedMultipleNegativesRankingLoss(st, scale=1 / 0.02, mini_batch_size=8)

    def st_step(loss_fn, query_len):
        def run():
            st.zero_grad(set_to_none=True)
            feats = []
            for j, col in enumerate(texts):
                st.max_seq_length = query_len if j == 0 else 256
                feats.append(st.tokenize(col))
            st.max_seq_length = 256
            loss_fn(feats, None).backward()

        return run

    results = {"machine": machine(), "batch": f"{b} queries x group {g}, query 64 / passage 256 tokens"}
    runs = [("bare encoder forward+backward", bare), ("rir-finetune step", ours),
            ("rir-finetune step, gradient cache (chunk 16)", ours_cached),
            ("sentence-transformers MNRL", st_step(mnrl, 64)),
            ("sentence-transformers CachedMNRL (mini-batch 8)", st_step(cmnrl, 64))]  # fmt: skip
    for name, fn in runs:
        times = timed(fn, args.warmup, args.steps)
        results[name] = {"median_s": round(median(times), 3), "queries_per_s": round(b / median(times), 3),
                         "times": [round(t, 3) for t in times]}  # fmt: skip
        print(name, results[name], flush=True)
    floor = results["bare encoder forward+backward"]["median_s"]
    results["ratio ours / bare"] = round(results["rir-finetune step"]["median_s"] / floor, 3)
    results["ratio ours / ST MNRL"] = round(
        results["rir-finetune step"]["median_s"] / results["sentence-transformers MNRL"]["median_s"], 3
    )
    return results


def memory_one(batch: int, cached: bool) -> dict:
    import torch

    from rir_finetune.training.arguments import ObjectiveArguments
    from rir_finetune.training.collator import RIRCollator
    from rir_finetune.training.gradcache import cached_step
    from rir_finetune.training.model import BiEncoder, load_tokenizer
    from rir_finetune.training.objectives import compute_objectives

    torch.manual_seed(0)
    g = 8
    recs = scifact_hn_records()
    recs = (recs * (batch // len(recs) + 1))[:batch]
    path = minilm_path()
    tok = load_tokenizer(path)
    data = RIRCollator(tok, 32, 64, 32)(_items(recs, batch, g))
    cfg = ObjectiveArguments(training_type="retrieval", temperature=0.02)
    model = BiEncoder.from_pretrained(path, pooling="mean", normalize=True).train()
    base = peak_rss_gib()
    import time

    t0 = time.perf_counter()
    if cached:
        cached_step(
            lambda f: model(features=f), data, 32, lambda r: compute_objectives(r.q_reps, r.p_reps, cfg)
        )
    else:
        reps = model(**data)
        compute_objectives(reps.q_reps, reps.p_reps, cfg).loss.backward()
    return {"batch": batch, "group": g, "gradient_cache": cached, "peak_rss_gib": round(peak_rss_gib(), 2),
            "rss_before_step_gib": round(base, 2), "step_s": round(time.perf_counter() - t0, 1)}  # fmt: skip


def memory(args) -> list[dict]:
    rows = []
    for cached in (True, False):
        for b in args.batches:
            if not cached and b > args.max_plain_batch:
                rows.append({"batch": b, "group": 8, "gradient_cache": False, "peak_rss_gib": None,
                             "note": f"not run: over --max_plain_batch {args.max_plain_batch} (would not fit)"})  # fmt: skip
                continue
            cmd = [sys.executable, __file__, "memory-one", str(b), "1" if cached else "0"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            row = (
                json.loads(r.stdout.strip().splitlines()[-1])
                if r.returncode == 0
                else {"batch": b, "gradient_cache": cached, "error": r.stderr.strip().splitlines()[-1:]}
            )
            print(row, flush=True)
            rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--steps", type=int, default=5)
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--batch", type=int, default=16)
    m = sub.add_parser("memory")
    m.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    m.add_argument("--max_plain_batch", type=int, default=64)
    one = sub.add_parser("memory-one")
    one.add_argument("batch", type=int)
    one.add_argument("cached", type=int)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    if args.cmd == "memory-one":
        print(json.dumps(memory_one(args.batch, bool(args.cached))))
        return
    res = speed(args) if args.cmd == "speed" else memory(args)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
