"""GPU figures for benchmarks/gpu.sh (issue 19): step speed with MFU, peak memory, and a saved no-dropout model.

    python benchmarks/gpu_check.py step   --out step.json     # MiniLM + a BERT-base-shaped model (random init)
    python benchmarks/gpu_check.py memory --out memory.json   # peak CUDA memory, gradient cache on / off
    python benchmarks/gpu_check.py tiny-model DIR             # a no-dropout BERT for the NCCL equality check

`step`: 16 queries x 4 passages (query 64 / passage 256 tokens, SciFact texts when ../shared/data is there, else
  random ids of the same shape) and a 4x larger batch, bf16 autocast, SDPA attention (``rir_sdpa`` hands CUDA to
  ``scaled_dot_product_attention``). Rows: the bare transformers forward + backward; ours (BiEncoder +
  objectives + backward, plain); ours with the gradient cache (default chunk and memory budget). Median of --steps
  after --warmup, CUDA-synchronised. MFU = model FLOPs of a plain step (3 x forward: 2 x non-embedding parameters
  per token plus attention 4 x L x hidden per token and layer, over padded tokens) / time / peak, the peak from
  --peak_tflops (default: 989 for H100/H200 bf16 dense, 312 for A100; else required). The gradient cache's second
  forward is not counted as useful FLOPs.
`memory`: one step each, torch.cuda.max_memory_allocated, batches 16 / 64 / 256 queries x 4 at query 64 / passage
  256 tokens, gradient cache on (default budget) and off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def _peak(args) -> float:
    import torch

    if args.peak_tflops:
        return args.peak_tflops
    name = torch.cuda.get_device_name()
    for key, value in PEAKS.items():
        if key in name:
            return value
    raise SystemExit(f"unknown GPU {name!r}: pass --peak_tflops (bf16 dense)")


def _models():
    from common import minilm_path
    from transformers import BertConfig, BertModel

    yield "all-MiniLM-L6-v2", minilm_path()
    cfg = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    folder = Path("/tmp/rir_bert_base_random")
    if not (folder / "config.json").is_file():
        BertModel(cfg).save_pretrained(folder)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)  # same vocabulary size (30522)
    yield "BERT-base shape (random init)", str(folder)


def _batch(tok, b: int, g: int):
    from rir_finetune.training.collator import RIRCollator

    try:
        from common import scifact_hn_records

        recs = scifact_hn_records()
    except OSError:
        recs = [{"query": "word " * 20, "pos": ["word " * 300], "neg": ["word " * 300] * 3}] * b
    recs = (recs * (b // len(recs) + 1))[:b]
    items = [{"query": r["query"], "passages": [r["pos"][0], *r["neg"][: g - 1]], "answer": None,
              "answer_candidates": None, "teacher_scores": None, "no_in_batch_neg": False} for r in recs]  # fmt: skip
    return RIRCollator(tok, 64, 256, 64)(items)


def _to(batch, device):
    return {
        k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v)
        for k, v in batch.items()
    }


def _flops(config, batch) -> float:
    """Model FLOPs of one training step (3 x forward) over the padded tokens of queries and passages."""
    h, n, i = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    per_token_layer = 2 * (4 * h * h + 2 * h * i)  # q, k, v, o and the two FFN matrices
    total = 0.0
    for part in ("queries", "passages"):
        rows, length = batch[part]["input_ids"].shape
        total += rows * length * n * (per_token_layer + 4 * length * h)
    return 3 * total


def _steps(fn, warmup: int, steps: int) -> list[float]:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def _step_fns(model, batch, cfg, defaults):
    import torch

    from rir_finetune.training.gradcache import cached_step
    from rir_finetune.training.objectives import compute_objectives

    backbone = model.backbone

    def bare():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            total = 0
            for feats in (batch["queries"], batch["passages"]):
                hs = backbone(**feats).last_hidden_state
                m = feats["attention_mask"].unsqueeze(-1).to(hs.dtype)
                total = total + ((hs * m).sum(1) / m.sum(1)).float().sum()
        total.backward()

    def ours():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            reps = model(**batch)
            loss = compute_objectives(reps.q_reps, reps.p_reps, cfg).loss
        loss.backward()

    def ours_cached():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            cached_step(lambda f: model(features=f), batch, defaults.gradient_cache_chunk_size,
                        lambda r: compute_objectives(r.q_reps, r.p_reps, cfg),
                        keep_bytes=defaults.gradient_cache_memory_mb << 20,
                        params=list(model.parameters()))  # fmt: skip

    return bare, ours, ours_cached


def step(args) -> dict:
    import torch

    from rir_finetune.training.arguments import ModelArguments, ObjectiveArguments
    from rir_finetune.training.model import BiEncoder, load_tokenizer

    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.device("cuda")
    peak = _peak(args) * 1e12
    defaults = ModelArguments()
    cfg = ObjectiveArguments(training_type="retrieval", temperature=0.02)
    out: dict = {"device": torch.cuda.get_device_name(), "peak_tflops": peak / 1e12, "torch": torch.__version__,
                 "rows": []}  # fmt: skip
    for label, path in _models():
        tok = load_tokenizer(path)
        model = BiEncoder.from_pretrained(path, pooling="mean", normalize=True).to(dev).train()
        backbone = model.backbone
        for b in (16, 64):
            batch = _to(_batch(tok, b, 4), dev)
            flops = _flops(backbone.config, batch)

            bare, ours, ours_cached = _step_fns(model, batch, cfg, defaults)

            for name, fn in (("bare forward+backward", bare), ("ours, plain step", ours),
                             ("ours, gradient cache (default budget)", ours_cached)):  # fmt: skip
                times = _steps(fn, args.warmup, args.steps)
                med = statistics.median(times)
                row = {"model": label, "queries": b, "group": 4, "step": name, "median_s": round(med, 4),
                       "queries_per_s": round(b / med, 1), "mfu": round(flops / med / peak, 4),
                       "attn": backbone.config._attn_implementation}  # fmt: skip
                print(row, flush=True)
                out["rows"].append(row)
        del model
        torch.cuda.empty_cache()
    return out


def memory(args) -> dict:
    import torch
    from common import minilm_path

    from rir_finetune.training.arguments import ModelArguments, ObjectiveArguments
    from rir_finetune.training.gradcache import cached_step
    from rir_finetune.training.model import BiEncoder, load_tokenizer
    from rir_finetune.training.objectives import compute_objectives

    dev = torch.device("cuda")
    defaults = ModelArguments()
    cfg = ObjectiveArguments(training_type="retrieval", temperature=0.02)
    path = minilm_path()
    tok = load_tokenizer(path)
    model = BiEncoder.from_pretrained(path, pooling="mean", normalize=True).to(dev).train()
    rows = []
    for cached in (True, False):
        for b in (16, 64, 256):
            batch = _to(_batch(tok, b, 4), dev)
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if cached:
                    cached_step(lambda f: model(features=f), batch, defaults.gradient_cache_chunk_size,
                                lambda r: compute_objectives(r.q_reps, r.p_reps, cfg),
                                keep_bytes=defaults.gradient_cache_memory_mb << 20,
                                params=list(model.parameters()))  # fmt: skip
                else:
                    reps = model(**batch)
                    compute_objectives(reps.q_reps, reps.p_reps, cfg).loss.backward()
            torch.cuda.synchronize()
            row = {"queries": b, "group": 4, "gradient_cache": cached,
                   "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                   "before_step_gib": round(base / 2**30, 3)}  # fmt: skip
            print(row, flush=True)
            rows.append(row)
    return {"device": torch.cuda.get_device_name(), "model": "all-MiniLM-L6-v2", "rows": rows}


def tiny_model(folder: Path) -> None:
    """A 4-layer BERT (hidden 256) without dropout, so 1 and 2 processes see the same function."""
    from common import minilm_path
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    BertModel(cfg).save_pretrained(folder)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)


def compare(a: Path, b: Path, base: Path) -> dict:
    """Max weight difference between two saved models, and how far the step moved them."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    w0 = load_file(str(base / "model.safetensors"))
    diff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    moved = max((wa[k].float() - w0[k].float()).abs().max().item() for k in wa if k in w0)
    return {"max_abs_weight_diff": diff, "max_weight_change": moved, "equal": diff <= 1e-5 and moved > 1e-4}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("step", "memory"):
        s = sub.add_parser(name)
        s.add_argument("--out", type=Path)
        s.add_argument("--steps", type=int, default=10)
        s.add_argument("--warmup", type=int, default=3)
        s.add_argument("--peak_tflops", type=float, default=None)
    t = sub.add_parser("tiny-model")
    t.add_argument("folder", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    c.add_argument("base", type=Path)
    c.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.cmd == "tiny-model":
        tiny_model(args.folder)
        return
    res = (
        {"step": step, "memory": memory}[args.cmd](args)
        if args.cmd != "compare"
        else compare(args.a, args.b, args.base)
    )
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.cmd == "compare" and not res["equal"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
