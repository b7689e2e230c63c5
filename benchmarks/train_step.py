"""Training-step benchmarks (issues 5 and 19) on all-MiniLM-L6-v2 and SciFact hard-negative records.

    python benchmarks/train_step.py train  [--steps 5 --rounds 1]      # `rir-finetune train` vs bare, same run
    python benchmarks/train_step.py speed  [--steps 5 --warmup 2]      # ours vs bare encoder vs sentence-transformers
    python benchmarks/train_step.py memory [--batches 16 64 256]       # peak RSS with / without gradient caching

`train` (issue 19): each in its own process, one after the other (--rounds times): (1) a bare transformers forward +
  backward of 16 queries x 4 passages (query 64 / passage 256 tokens, the first 16 records, transformers' default
  attention, glibc's default malloc, no optimizer step); (2) the same bare step with rir-finetune's malloc setting
  given through the environment (what the allocator alone buys); (3) `rir-finetune train --config
  configs/scifact_retrieval.yaml --max_steps N` on the SciFact hard-negative file, its own path and defaults
  (optimizer step and data loading included), timed per step by benchmarks/peers/timed_run.py. Median seconds per
  step after the warm-up steps, and each process's peak RSS (ru_maxrss; the tokenising worker apart).

`speed`: one batch of B=16 queries x group 4 (query 64 / passage 256 tokens), the same padded tensors for
  (1) the bare floor: backbone forward on queries and passages, mean pooling, a sum, backward;
  (2) ours: BiEncoder forward + compute_objectives (L_qp, in-batch + hard negatives) + backward;
  (3) ours with gradient caching (chunk 16);
  (4) sentence-transformers MultipleNegativesRankingLoss and (5) CachedMultipleNegativesRankingLoss (mini-batch 8)
      on the same texts (anchor, positive, 3 negatives), forward + backward.
  Median seconds per step over --steps timed steps after --warmup, all in one process, one after the other.
`memory`: each (batch size, caching) pair in its own subprocess (peak RSS is per process): group --group, query
  --query_len / passage --passage_len tokens, one step of ours with the default path (gradient cache with its
  memory budget, rir_sdpa attention) and with the plain step (gradient_cache false).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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


def memory_one(batch: int, cached: bool, g: int = 8, qlen: int = 32, plen: int = 64) -> dict:
    import torch

    from rir_finetune.cpu_memory import keep_freed_memory
    from rir_finetune.training.arguments import ModelArguments, ObjectiveArguments
    from rir_finetune.training.collator import RIRCollator
    from rir_finetune.training.gradcache import cached_step
    from rir_finetune.training.memory_plan import FORCED_CHUNK, FORCED_KEEP_MB
    from rir_finetune.training.model import BiEncoder, load_tokenizer
    from rir_finetune.training.objectives import compute_objectives

    keep_freed_memory()  # as `rir-finetune train` does
    torch.manual_seed(0)
    defaults = ModelArguments()
    recs = scifact_hn_records()
    recs = (recs * (batch // len(recs) + 1))[:batch]
    path = minilm_path()
    tok = load_tokenizer(path)
    data = RIRCollator(tok, qlen, plen, qlen)(_items(recs, batch, g))
    cfg = ObjectiveArguments(training_type="retrieval", temperature=0.02)
    model = BiEncoder.from_pretrained(path, pooling="mean", normalize=True).train()
    base = peak_rss_gib()
    import time

    # the sizes `gradient_cache true` runs with when none are given (the dataclass leaves them to the plan)
    chunk = defaults.gradient_cache_chunk_size or FORCED_CHUNK
    keep_mb = defaults.gradient_cache_memory_mb or FORCED_KEEP_MB
    t0 = time.perf_counter()
    if cached:
        cached_step(
            lambda f: model(features=f), data, chunk,
            lambda r: compute_objectives(r.q_reps, r.p_reps, cfg),
            keep_bytes=keep_mb << 20, params=list(model.parameters()),
        )  # fmt: skip
    else:
        reps = model(**data)
        compute_objectives(reps.q_reps, reps.p_reps, cfg).loss.backward()
    return {"batch": batch, "group": g, "query_len": qlen, "passage_len": plen, "gradient_cache": cached,
            "chunk": chunk if cached else None,
            "keep_mb": keep_mb if cached else None,
            "attn": model.backbone.config._attn_implementation, "peak_rss_gib": round(peak_rss_gib(), 2),
            "rss_before_step_gib": round(base, 2), "step_s": round(time.perf_counter() - t0, 1)}  # fmt: skip


def memory(args) -> list[dict]:
    rows = []
    for cached in (True, False):
        for b in args.batches:
            if not cached and b > args.max_plain_batch:
                rows.append({"batch": b, "group": args.group, "gradient_cache": False, "peak_rss_gib": None,
                             "note": f"not run: over --max_plain_batch {args.max_plain_batch} (would not fit)"})  # fmt: skip
                continue
            cmd = [sys.executable, __file__, "memory-one", str(b), "1" if cached else "0", "--group",
                   str(args.group), "--query_len", str(args.query_len), "--passage_len", str(args.passage_len)]  # fmt: skip
            r = subprocess.run(cmd, capture_output=True, text=True)
            row = (
                json.loads(r.stdout.strip().splitlines()[-1])
                if r.returncode == 0
                else {"batch": b, "gradient_cache": cached, "error": r.stderr.strip().splitlines()[-1:]}
            )
            print(row, flush=True)
            rows.append(row)
    return rows


def bare_one(steps: int, warmup: int, bf16: bool = False) -> dict:
    """A bare transformers forward + backward of the first 16 records (16 x 4, query 64 / passage 256 tokens);
    ``bf16``: under ``torch.autocast`` in bf16, as the Trainer runs with ``--bf16 true``."""
    import contextlib
    import resource
    import time

    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    recs = scifact_hn_records()[:16]
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).train()
    q = tok([r["query"] for r in recs], padding=True, truncation=True, max_length=64, return_tensors="pt")
    p = tok([t for r in recs for t in [r["pos"][0], *r["neg"][:3]]], padding=True, truncation=True,
            max_length=256, return_tensors="pt")  # fmt: skip

    def step():
        model.zero_grad(set_to_none=True)
        total = 0
        for feats in (q, p):
            with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                h = model(**feats).last_hidden_state.float()
            m = feats["attention_mask"].unsqueeze(-1).float()
            total = total + ((h * m).sum(1) / m.sum(1)).sum()
        total.backward()

    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"times": [round(t, 2) for t in times], "median_s": round(median(times), 3),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
            "attn": model.config._attn_implementation,
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}  # fmt: skip


def train_compare(args) -> dict:
    """Bare step (glibc default and with our malloc setting) and `rir-finetune train`'s own path, same run."""
    import tempfile

    from common import REPO, write_records

    from rir_finetune.cpu_memory import env_equivalent

    work = Path(tempfile.mkdtemp(prefix="rir_train_step_"))
    data = write_records(work / "train_hn.jsonl", scifact_hn_records())
    res: dict = {"machine": machine(), "load_before": os.getloadavg(), "rounds": []}
    for r in range(args.rounds):
        row: dict = {}
        bare_rows = (
            ()
            if args.only_ours
            else (
                ("bare", {}, False),
                ("bare, our malloc env", env_equivalent(), False),
                ("bare, bf16 autocast, our malloc env", env_equivalent(), True),
            )
        )
        for name, extra_env, bf16 in bare_rows:
            cmd = [
                sys.executable,
                __file__,
                "bare-one",
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                *(["--bf16"] if bf16 else []),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **extra_env})
            row[name] = (
                json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else out.stderr[-800:]
            )
            print(name, row[name], flush=True)
        timings = work / f"ours_{r}.json"
        cmd = [sys.executable, str(REPO / "benchmarks/peers/timed_run.py"), "--out", str(timings), "--module",
               "rir_finetune", "--", "train", "--config", str(REPO / "configs/scifact_retrieval.yaml"),
               "--model_name_or_path", minilm_path(), "--train_data", str(data), "--output_dir",
               str(work / f"model_{r}"), "--max_steps", str(args.steps + args.warmup), "--save_strategy", "no",
               "--report_to", "none", *shlex.split(args.train_args)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            row["rir-finetune train"] = out.stderr[-2000:]
        else:
            t = json.loads(timings.read_text())
            ends = [t["train_begin"], *t["step_end"]]
            steps = [b - a for a, b in zip(ends[:-1], ends[1:], strict=True)][args.warmup :]
            row["rir-finetune train"] = {"times": [round(x, 2) for x in steps], "median_s": round(median(steps), 3),
                                         "peak_rss_gib": round(t["peak_rss_gib"], 2),
                                         "worker_peak_rss_gib": round(t["children_peak_rss_gib"], 2)}  # fmt: skip
            if not args.only_ours:
                ours = row["rir-finetune train"]["median_s"]
                row["ratio ours / bare"] = round(ours / row["bare"]["median_s"], 3)
                row["ratio ours / bare with our malloc env"] = round(
                    ours / row["bare, our malloc env"]["median_s"], 3
                )
                row["ratio ours / bare bf16 with our malloc env"] = round(
                    ours / row["bare, bf16 autocast, our malloc env"]["median_s"], 3
                )
        print("rir-finetune train", row["rir-finetune train"], flush=True)
        res["rounds"].append(row)
    res["load_after"] = os.getloadavg()
    return res


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
    for q in (m, one):
        q.add_argument("--group", type=int, default=8)
        q.add_argument("--query_len", type=int, default=32)
        q.add_argument("--passage_len", type=int, default=64)
    t = sub.add_parser("train")
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--warmup", type=int, default=1)
    t.add_argument("--rounds", type=int, default=1)
    t.add_argument(
        "--train_args", default="", help='extra `rir-finetune train` options: --train_args="--k v"'
    )
    t.add_argument("--only_ours", action="store_true", help="skip the bare steps")
    b1 = sub.add_parser("bare-one")
    b1.add_argument("--steps", type=int, default=5)
    b1.add_argument("--warmup", type=int, default=1)
    b1.add_argument("--bf16", action="store_true", help="forward under bf16 autocast")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    if args.cmd == "memory-one":
        print(
            json.dumps(
                memory_one(args.batch, bool(args.cached), args.group, args.query_len, args.passage_len)
            )
        )
        return
    if args.cmd == "bare-one":
        print(json.dumps(bare_one(args.steps, args.warmup, args.bf16)))
        return
    res = {"speed": speed, "memory": memory, "train": train_compare}[args.cmd](args)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
