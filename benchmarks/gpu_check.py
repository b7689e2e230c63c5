"""GPU figures for benchmarks/gpu.sh: the training step with MFU, encoding and generation speed, the round's walls.

    python benchmarks/gpu_check.py step     --out step.json       # MiniLM + a BERT-base-shaped model (random init)
    python benchmarks/gpu_check.py encode   --out encode.json     # SciFact's corpus, packed and padded
    python benchmarks/gpu_check.py generate --out gen.json --model /tmp/smol_random   # tokens/s at the auto batch
    python benchmarks/gpu_check.py walls ROUND_DIR --out round.json                   # per-stage wall of a round
    python benchmarks/gpu_check.py tiny-model DIR | tiny-lm DIR | mini-beir SRC DST   # small inputs for smoke runs
    python benchmarks/gpu_check.py compare A B BASE                                   # two saved models' weights

`step`: Q queries x 4 passages (Q in --sizes, default 16 64 256; query 64 / passage 256 tokens, SciFact texts when
  ../shared/data is there, else words of the same shape), bf16 autocast. Rows: the bare transformers forward +
  backward on the padded batch (mean pooling, sdpa); ours plain as it trains (pack_sequences auto: packed on CUDA);
  ours plain padded (pack_sequences false); ours with the gradient cache forced on (chunk and kept graphs as
  ``gradient_cache: true`` plans them from the device's budget, training/memory_plan.py). Median of --steps after
  --warmup, synchronised; peak memory per row; what ``gradient_cache: auto`` would choose. MFU = model FLOPs of the
  batch's real tokens (3 x forward: 2 x non-embedding matrix parameters per token, plus 4 x len x hidden per token
  and layer for attention) / time / peak (--peak_tflops; default 989 for H100/H200 bf16 dense, 312 for A100). The
  padded rows compute more than that (their padding) and the cache's second forward is not counted as useful.
`--smoke`: the same code on whatever device there is, at toy sizes (benchmarks/gpu.sh SMOKE=1), to know it runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _peak(args, device) -> float:
    import torch

    if args.peak_tflops:
        return args.peak_tflops
    if device.type != "cuda":
        return 1.0  # a CPU smoke run: MFU is not meaningful, the column stays
    name = torch.cuda.get_device_name()
    for key, value in PEAKS.items():
        if key in name:
            return value
    raise SystemExit(f"unknown GPU {name!r}: pass --peak_tflops (bf16 dense)")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _models(smoke: bool):
    from common import minilm_path
    from transformers import AutoTokenizer, BertConfig, BertModel

    yield "all-MiniLM-L6-v2", minilm_path()
    shape = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512) if smoke else \
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)  # fmt: skip
    folder = Path(f"/tmp/rir_bert_base_random{'_smoke' if smoke else ''}")
    if not (folder / "config.json").is_file():
        BertModel(BertConfig(**shape), add_pooling_layer=False).save_pretrained(folder)
        AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)  # same vocabulary size (30522)
    yield "BERT-base shape (random init)" + (" [smoke: 2 x 128]" if smoke else ""), str(folder)


def _records(n: int) -> list[dict]:
    try:
        from common import scifact_hn_records

        recs = scifact_hn_records()
    except OSError:
        recs = [{"query": "word " * 20, "pos": ["word " * 300], "neg": ["word " * 300] * 3}]
    return (recs * (n // len(recs) + 1))[:n]


def _batch(tok, b: int, g: int, device):
    from rir_finetune.training.collator import RIRCollator

    items = [{"query": r["query"], "passages": [r["pos"][0], *r["neg"][: g - 1]], "answer": None,
              "answer_candidates": None, "teacher_scores": None, "no_in_batch_neg": False}
             for r in _records(b)]  # fmt: skip
    batch = RIRCollator(tok, 64, 256, 64, pad_to_multiple_of=16)(items)
    return {
        k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v)
        for k, v in batch.items()
    }


def _flops(config, batch) -> tuple[float, float]:
    """(model FLOPs of one step over the real tokens, the real share of the padded tokens)."""
    h, n, i = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    per_token_layer = 2 * (4 * h * h + 2 * h * i)  # q, k, v, o and the two FFN matrices
    total, real, padded = 0.0, 0, 0
    for part in ("queries", "passages"):
        lengths = batch[part]["attention_mask"].sum(1).tolist()
        total += sum(n * (length * per_token_layer + 4 * length * length * h) for length in lengths)
        real += sum(lengths)
        padded += batch[part]["attention_mask"].numel()
    return 3 * total, real / padded


def _steps(fn, warmup: int, steps: int, device) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _plan(model, batch, device, forced):
    from rir_finetune.training import memory_plan as mp

    shape = mp.ModelShape.of(model.backbone.config, sum(p.numel() for p in model.parameters()))
    parts = [
        mp.Part(batch[k]["input_ids"].size(0), batch[k]["input_ids"].size(1)) for k in ("queries", "passages")
    ]
    attention = "kernel" if device.type == "cuda" else "keep_mask"
    activations, per_text = mp.activation_estimate(shape, parts, 2, attention)
    budget, _ = mp.device_budget(device)
    return mp.decide(activations, per_text, budget - shape.params * mp.STATE_BYTES_PER_PARAM,
                     mp.PEAK_FACTOR[device.type], max(p.texts for p in parts), forced)  # fmt: skip


def _step_fns(model, batch, cfg, plan, device):
    import torch

    from rir_finetune.training.gradcache import cached_step
    from rir_finetune.training.objectives import compute_objectives

    backbone = model.backbone
    amp = dict(device_type=device.type, dtype=torch.bfloat16)

    def bare():
        model.zero_grad(set_to_none=True)
        with torch.autocast(**amp):
            total = 0
            for feats in (batch["queries"], batch["passages"]):
                hs = backbone(**feats).last_hidden_state
                m = feats["attention_mask"].unsqueeze(-1).to(hs.dtype)
                total = total + ((hs * m).sum(1) / m.sum(1)).float().sum()
        total.backward()

    def ours(pack):
        def fn():
            model.pack_sequences = pack
            model.zero_grad(set_to_none=True)
            with torch.autocast(**amp):
                reps = model(**batch)
                loss = compute_objectives(reps.q_reps, reps.p_reps, cfg).loss
            loss.backward()

        return fn

    def ours_cached():
        model.pack_sequences = "auto"
        model.zero_grad(set_to_none=True)
        with torch.autocast(**amp):
            cached_step(lambda f: model(features=f), batch, plan.chunk_size,
                        lambda r: compute_objectives(r.q_reps, r.p_reps, cfg), keep_bytes=plan.keep_bytes,
                        params=list(model.parameters()), pad_to_multiple_of=16)  # fmt: skip

    pack = "auto" if device.type == "cuda" else True  # a CPU smoke run packs too: that path must run
    return {"bare transformers forward+backward (padded, sdpa)": bare, "ours, plain (pack_sequences auto)": ours(pack),
            "ours, plain, padded (pack_sequences false)": ours(False),
            "ours, gradient cache forced on": ours_cached}  # fmt: skip


def step(args) -> dict:
    import torch

    from rir_finetune.training.arguments import ObjectiveArguments
    from rir_finetune.training.model import BiEncoder, load_tokenizer

    device = _device()
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = _peak(args, device) * 1e12
    cfg = ObjectiveArguments(training_type="retrieval", temperature=0.02)
    out: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "peak_tflops": peak / 1e12, "torch": torch.__version__, "rows": []}  # fmt: skip
    for label, path in _models(args.smoke):
        tok = load_tokenizer(path)
        model = BiEncoder.from_pretrained(path, pooling="mean", normalize=True).to(device).train()
        for b in args.sizes:
            batch = _batch(tok, b, 4, device)
            flops, real_share = _flops(model.backbone.config, batch)
            auto = _plan(model, batch, device, None)
            fns = _step_fns(model, batch, cfg, _plan(model, batch, device, True), device)
            for name, fn in fns.items():
                row = {"model": label, "queries": b, "group": 4, "step": name, "real_token_share": round(real_share, 3),
                       "auto_chooses": "cache" if auto.gradient_cache else "plain"}  # fmt: skip
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                try:
                    med = statistics.median(_steps(fn, args.warmup, args.steps, device))
                    row.update(
                        median_s=round(med, 4),
                        queries_per_s=round(b / med, 1),
                        mfu=round(flops / med / peak, 4),
                    )
                except torch.OutOfMemoryError:
                    row["oom"] = True
                model.zero_grad(set_to_none=True)
                gc.collect()
                if device.type == "cuda":
                    row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                print(row, flush=True)
                out["rows"].append(row)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def encode(args) -> dict:
    from common import SHARED, minilm_path

    from rir_finetune.retrieval.encoder import Encoder
    from rir_finetune.retrieval.model_folder import read_settings

    path = SHARED / "scifact" / "corpus.jsonl"
    docs = [(d.get("title", "") + " " + d.get("text", "")).strip() for d in map(json.loads, path.open())]
    docs = docs[: 64 if args.smoke else None]
    rows = []
    for pack in (True if args.smoke else "auto", False):  # a CPU smoke run packs too: that path must run
        enc = Encoder(read_settings(minilm_path()), batch_size=256, show_progress=False, dtype="auto",
                      pack_sequences=pack)  # fmt: skip
        enc.encode_passages(docs[:256])  # warm-up
        _sync(enc.device)
        t0 = time.perf_counter()
        enc.encode_passages(docs)
        _sync(enc.device)
        s = time.perf_counter() - t0
        row = {"passages": len(docs), "dtype": enc.dtype, "pack_sequences": pack,
               "packed": bool(enc.packing and enc.packing.ok), "seconds": round(s, 2),
               "passages_per_s": round(len(docs) / s, 1)}  # fmt: skip
        print(row, flush=True)
        rows.append(row)
    return {"model": "all-MiniLM-L6-v2", "max_length": 256, "rows": rows}


def generate(args) -> dict:
    from rir_finetune.llm.common import BackendSettings, Sampling
    from rir_finetune.llm.hf_backend import TransformersBackend

    queries = [r["query"] for r in _records(8 if args.smoke else 809)]
    prompts = [
        f"Please write a scientific paper passage to support/refute the claim.\nClaim: {q}\nPassage:"
        for q in queries
    ]
    backend = TransformersBackend(BackendSettings(model=args.model, device="auto", dtype="auto", progress=False,
                                                  batch_size=64))  # fmt: skip
    new = 8 if args.smoke else 128
    t0 = time.perf_counter()
    backend.generate(prompts, Sampling(max_new_tokens=new))
    s = time.perf_counter() - t0
    c = backend.last_counts
    row = {"model": args.model, "device": str(backend.device), "dtype": backend.dtype, "prompts": len(prompts),
           "max_new_tokens": new, "tokens": c.tokens, "seconds": round(s, 2), "tokens_per_s": round(c.tokens / s, 1),
           "first_batch_rows": backend._rows(max(len(backend.prompt_ids(p)) for p in prompts), new, 1, 64, len(prompts))}  # fmt: skip
    print(row, flush=True)
    return row


def walls(folder: Path) -> dict:
    """Each stage's wall time from its marker (``stage.json``), and the report's headline if it was written."""
    out = {}
    for marker in sorted(folder.glob("**/stage.json")):
        mark = json.loads(marker.read_text())
        out[str(marker.parent.relative_to(folder))] = mark.get("wall_s", mark.get("status"))
    total = sum(v for v in out.values() if isinstance(v, (int, float)))
    return {"stages": out, "total_s": round(total, 1), "report": (folder / "report.md").is_file()}


def tiny_model(folder: Path) -> None:
    """A 4-layer BERT (hidden 256) without dropout, so 1 and 2 processes see the same function."""
    from common import minilm_path
    from transformers import AutoTokenizer, BertConfig, BertModel

    cfg = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    BertModel(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)


def tiny_lm(folder: Path) -> None:
    """SmolLM2's tokenizer and chat template on a 2-layer random Llama (the CPU smoke run's generator)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = Path(".gpu/smolcfg")
    cfg = AutoConfig.from_pretrained(src)
    cfg.update(dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16))  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(src).save_pretrained(folder)


def mini_beir(src: Path, dst: Path, queries: dict | None = None, docs: int = 400) -> None:
    """A BEIR folder with the first train and test queries (``queries``: how many of each), their judged documents and
    the first ``docs`` others: the round's stages at toy size (the dev split takes 8 of the 40 train queries)."""
    import csv

    (dst / "qrels").mkdir(parents=True, exist_ok=True)
    keep_q, keep_d = set(), set()
    for split, count in (queries or {"train": 40, "test": 16}).items():
        rows = list(csv.reader((src / "qrels" / f"{split}.tsv").open(), delimiter="\t"))
        qids = list(dict.fromkeys(r[0] for r in rows[1:]))[:count]
        kept = [r for r in rows[1:] if r[0] in qids]
        keep_q |= set(qids)
        keep_d |= {r[1] for r in kept}
        with (dst / "qrels" / f"{split}.tsv").open("w", newline="") as f:
            csv.writer(f, delimiter="\t").writerows([rows[0], *kept])
    with (src / "corpus.jsonl").open() as f, (dst / "corpus.jsonl").open("w") as g:
        for i, line in enumerate(f):
            if i < docs or json.loads(line)["_id"] in keep_d:
                g.write(line)
    with (src / "queries.jsonl").open() as f, (dst / "queries.jsonl").open("w") as g:
        g.writelines(line for line in f if json.loads(line)["_id"] in keep_q)


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
    for name in ("step", "encode", "generate"):
        s = sub.add_parser(name)
        s.add_argument("--out", type=Path)
        s.add_argument("--smoke", action="store_true", help="toy sizes on any device: does it run")
        s.add_argument("--steps", type=int, default=5)
        s.add_argument("--warmup", type=int, default=2)
        s.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256])
        s.add_argument("--peak_tflops", type=float, default=None)
        s.add_argument("--model", default="/tmp/smol_random")
    w = sub.add_parser("walls")
    w.add_argument("folder", type=Path)
    w.add_argument("--out", type=Path)
    for name in ("tiny-model", "tiny-lm"):
        sub.add_parser(name).add_argument("folder", type=Path)
    m = sub.add_parser("mini-beir")
    m.add_argument("src", type=Path)
    m.add_argument("dst", type=Path)
    c = sub.add_parser("compare")
    for name in ("a", "b", "base"):
        c.add_argument(name, type=Path)
    c.add_argument("--out", type=Path)
    args = p.parse_args()
    import logging

    logging.basicConfig(format="%(name)s: %(message)s", level=logging.INFO)  # the backend's batch-size line
    if args.cmd in ("tiny-model", "tiny-lm", "mini-beir"):
        {"tiny-model": lambda: tiny_model(args.folder), "tiny-lm": lambda: tiny_lm(args.folder),
         "mini-beir": lambda: mini_beir(args.src, args.dst)}[args.cmd]()  # fmt: skip
        return
    if args.cmd in ("step", "encode", "generate") and args.smoke:
        args.sizes, args.steps, args.warmup = [2], 1, 0
    res = {"step": step, "encode": encode, "generate": generate, "walls": lambda a: walls(a.folder),
           "compare": lambda a: compare(a.a, a.b, a.base)}[args.cmd](args)  # fmt: skip
    text = json.dumps(res, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    if args.cmd == "compare":
        print(text)
        if not res["equal"]:
            sys.exit(1)


if __name__ == "__main__":
    main()
