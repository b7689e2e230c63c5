"""Does ``torch.compile`` of the encoder pay? Eager against compiled encoding of SciFact passages with MiniLM.

    python benchmarks/compile_encode.py --passages 1024 --out compile.json            # this machine's device
    python benchmarks/compile_encode.py --passages 5183                               # on a GPU (gpu.sh part 5)

Rows: the Encoder as it ships (eager), then the same Encoder with its backbone compiled (``dynamic=True``: the
length-sorted batches have a new length each, a static compile would recompile per batch; ``mode`` from
--mode). Each row encodes the passages twice: the first pass holds the compile time (and the CPU's first-shape
kernel builds), the second is the steady state. The embeddings of the two rows are compared (max abs difference).
Results go to --out as they come (one JSON object per row); a compile that fails is a row with its error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passages", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=64, help="texts per batch on a CPU (CUDA sizes its own)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--pack", default="auto", help="pack_sequences: true | false | auto")
    p.add_argument(
        "--mode", default="default", help="torch.compile mode: default | reduce-overhead | max-autotune"
    )
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    import numpy as np
    import torch
    from common import SHARED, minilm_path

    from rir_finetune.precision import true_false_or_auto
    from rir_finetune.retrieval.encoder import Encoder
    from rir_finetune.retrieval.model_folder import EncoderSettings, read_settings

    path = SHARED / "scifact" / "corpus.jsonl"
    docs = [(d.get("title", "") + " " + d.get("text", "")).strip() for d in map(json.loads, path.open())]
    docs = docs[: args.passages]
    s = read_settings(minilm_path())
    settings = EncoderSettings(s.transformer_dir, s.pooling, s.normalize, args.max_length, "", "")
    pack = true_false_or_auto(None if args.pack == "auto" else args.pack.lower() == "true", "pack")
    if args.out:
        args.out.write_text("")
    reps = {}
    for name in ("eager", "compiled"):
        enc = Encoder(settings, batch_size=args.batch_size, show_progress=False, dtype=args.dtype,
                      pack_sequences=pack)  # fmt: skip
        if name == "compiled":
            enc.model.compile(dynamic=True, mode=args.mode)
        times = []
        try:
            for _ in range(2):
                _sync(enc.device)
                t0 = time.perf_counter()
                reps[name] = enc.encode_passages(docs)
                _sync(enc.device)
                times.append(time.perf_counter() - t0)
        except Exception as e:  # a backbone or attention path that does not compile: that is the finding
            if name == "eager":
                raise
            row = {"row": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            print(json.dumps(row), flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            break
        row = {"row": name, "device": str(enc.device), "dtype": enc.dtype,
               "packed": bool(enc.packing is not None and enc.packing.ok), "passages": len(docs),
               "first_pass_s": round(times[0], 2), "steady_s": round(times[1], 2),
               "passages_per_s": round(len(docs) / times[1], 1), "torch": torch.__version__}  # fmt: skip
        if name == "compiled":
            row["max_abs_diff_vs_eager"] = float(np.abs(reps["compiled"] - reps["eager"]).max())
            row["mode"] = args.mode
        print(json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
        del enc


if __name__ == "__main__":
    main()
