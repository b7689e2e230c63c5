"""Corpora of millions on a CPU: peak memory of ``mine``, encoding speed, and search speed per index type.

    .venv/bin/python benchmarks/corpus_scale.py --sizes 100000 300000 1000000 --out work/corpus_scale/results.json
    .venv/bin/python benchmarks/corpus_scale.py --sizes 10000 --out work/corpus_scale/smoke.json   # under a minute

Per size N, on a synthetic corpus (N passages of 8-60 words from a 100-word vocabulary, seeded) and a tiny random
BERT (hidden 32, 2 layers: the encoder's cost is not what is measured, the corpus's size is):

- ``mine``: ``rir-finetune mine`` in a fresh process (1,000 training records whose positive is in the corpus,
  15 negatives from ranks 10-210, ``--index flat``, an empty cache, so the corpus is streamed, encoded into the
  store and searched): wall seconds, peak RSS (the child's ``ru_maxrss``), the embeddings' size (N x 32 x 4
  bytes) and the store's size on disk. Peak RSS must grow with the embeddings only: compare its growth between
  sizes with the embeddings' growth.
- ``encode``: passages/s of encoding, from the seconds each shard's record holds (it must stay flat in N).
- ``search``: for ``flat``, ``ivf`` and ``hnsw`` over that store, 2,000 queries at k = 100: the index's build
  seconds, the tuning (on 500 of the queries, to recall@100 0.99 of exact search) and queries/s after it.

Every result is appended to ``--out`` as soon as it is measured; a rerun skips what the file already holds. The
corpora, the model and the stores stay under ``--work`` (default: the folder of ``--out``), so a killed run
resumes: ``mine`` then encodes only the shards that were not finished (its wall time is marked ``resumed``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = [f"w{i}" for i in range(100)]
RECORDS = 1000
QUERIES = 2000
K = 100


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"machine": machine(), "results": []}


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def save(path: Path, state: dict) -> None:
    from rir_finetune.files import atomic_write

    atomic_write(path, lambda f: f.write(json.dumps(state, indent=1) + "\n"))


def done(state: dict, size: int, kind: str) -> bool:
    return any(r["size"] == size and r["kind"] == kind for r in state["results"])


def tiny_model(folder: Path) -> Path:
    """A random 2-layer BERT (hidden 32) whose word-level vocabulary is the corpus's words."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *VOCAB]) + "\n"
    )
    tok = BertTokenizer(vocab=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(VOCAB) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=128)  # fmt: skip
    BertModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def synthetic_corpus(folder: Path, n: int) -> Path:
    """``corpus.jsonl`` written line by line (never held in memory) and ``train.jsonl`` (RECORDS records)."""
    if (folder / "train.jsonl").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(n)
    positives = set(rng.sample(range(n), min(RECORDS, n)))
    records = []
    with (folder / "corpus.jsonl").open("w") as f:
        for i in range(n):
            text = " ".join(rng.choice(VOCAB) for _ in range(rng.randint(8, 60)))
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n")
            if i in positives:
                records.append({"query": " ".join(text.split()[:4]), "pos": [text], "pos_ids": [f"d{i}"]})
    with (folder / "train.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return folder


def measure_mine(data: Path, model: Path, cache: Path, out: Path) -> dict:
    """``mine`` in a fresh process under a small wrapper, whose RUSAGE_CHILDREN is that process alone."""
    cmd = [sys.executable, "-m", "rir_finetune", "mine", "--input", str(data / "train.jsonl"), "--model", str(model),
           "--corpus", str(data), "--output", str(out), "--negatives", "15", "--negative_threshold", "none",
           "--cache_dir", str(cache), "--index", "flat"]  # fmt: skip
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); r = subprocess.run(sys.argv[1:]); "
               "print(r.returncode, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    code, seconds, rss_kb = r.stdout.split()[-3:]
    if code != "0":
        raise SystemExit(f"mine failed ({code}):\n{r.stderr[-3000:]}")
    return {"seconds": round(float(seconds), 1), "peak_rss_mb": round(int(rss_kb) / 1024, 1),
            "resumed": "stored by an earlier run" in r.stderr}  # fmt: skip


def store_of(cache: Path):
    from rir_finetune.retrieval.store import EmbeddingStore

    (folder,) = [p.parent for p in cache.glob("*/manifest.json")]
    return EmbeddingStore.read(folder)


def measure_search(store, model: Path, data: Path, kind: str) -> dict:

    from rir_finetune.retrieval.encoder import Encoder
    from rir_finetune.retrieval.index import CorpusIndexKeys, CorpusSearcher

    rng = random.Random(1)
    texts = [" ".join(rng.choice(VOCAB) for _ in range(5)) for _ in range(QUERIES)]
    queries = Encoder.from_folder(model, show_progress=False).encode_queries(texts)
    start = time.perf_counter()
    searcher = CorpusSearcher(store, CorpusIndexKeys(index=kind, recall_sample=500))
    built = time.perf_counter()
    searcher.search(queries[:500], K)  # an approximate index tunes and measures itself on its first queries
    tuned = time.perf_counter()
    searcher.search(queries, K)
    searched = time.perf_counter()
    return {"build_s": round(built - start, 2), "tune_s": round(tuned - built, 2),
            "queries_per_s": round(QUERIES / (searched - tuned), 1), **searcher.report(),
            "dim": store.dim, "k": K}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--out", type=Path, default=ROOT / "work" / "corpus_scale" / "results.json")
    parser.add_argument(
        "--work", type=Path, default=None, help="corpora, model and stores (default: --out's folder)"
    )
    parser.add_argument("--indexes", nargs="+", default=["flat", "ivf", "hnsw"])
    args = parser.parse_args()
    work = args.work or args.out.parent
    state = load(args.out)
    model = tiny_model(work / "tiny_bert")
    for n in args.sizes:
        data = synthetic_corpus(work / f"corpus_{n}", n)
        cache = work / f"cache_{n}"
        if not done(state, n, "mine"):
            result = measure_mine(data, model, cache, work / f"mined_{n}.jsonl")
            embeddings_mb = n * 32 * 4 / 2**20
            disk_mb = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 2**20
            state["results"].append({"size": n, "kind": "mine", **result, "embeddings_mb": round(embeddings_mb, 1),
                                     "store_disk_mb": round(disk_mb, 1)})  # fmt: skip
            store = store_of(cache)
            records = [store.record(i) for i in range(len(store.shards))]
            seconds = sum(r["seconds"] for r in records)
            state["results"].append({"size": n, "kind": "encode", "shards": len(records), "seconds": round(seconds, 1),
                                     "passages_per_s": round(n / seconds, 1)})  # fmt: skip
            save(args.out, state)
            print(json.dumps(state["results"][-2:]), flush=True)
        for kind in args.indexes:
            if not done(state, n, f"search_{kind}"):
                state["results"].append({"size": n, "kind": f"search_{kind}",
                                         **measure_search(store_of(cache), model, data, kind)})  # fmt: skip
                save(args.out, state)
                print(json.dumps(state["results"][-1]), flush=True)


if __name__ == "__main__":
    main()
