"""How a round stage runs: its command from the command table with the stage's ``config.yaml``, and, for the stages
that need it, the inputs the round writes first (a subset of records, the test queries) or the results it reads back.

Each function takes ``(stage, config_path, resume)`` and returns what the stage's marker records for the report.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rir_finetune.commands import COMMANDS
from rir_finetune.errors import UserError
from rir_finetune.files import atomic_write, iter_jsonl


def limit_lines(src: Path, dst: Path, keep: Callable[[int, dict[str, Any]], bool]) -> int:
    """Copy the JSONL records of ``src`` that ``keep(n, record)`` accepts into ``dst`` atomically; return the count."""
    kept = [
        json.dumps(rec, ensure_ascii=False) + "\n"
        for n, (_, rec) in enumerate(iter_jsonl(src))
        if keep(n, rec)
    ]
    atomic_write(dst, lambda out: out.writelines(kept))
    return len(kept)


def run_command(command: str, path: Path) -> dict[str, Any]:
    """``command`` with the stage's written keys; its counts go to the report."""
    result = COMMANDS[command].run(str(path), [])
    return {"counts": result} if isinstance(result, dict) else {}


def run_queries(stage: Any, path: Path, resume: bool) -> dict[str, Any]:
    COMMANDS["data from-beir"].run(str(path), [])
    limit = stage.extra.get("limit")
    n = limit_lines(Path(stage.settings["out"]), stage.outputs[0], lambda i, _: limit is None or i < limit)
    return {"records": n}


def run_test_answers(stage: Any, path: Path, resume: bool) -> dict[str, Any]:
    """Answers for the evaluated queries: the split's judged queries (the first ``limit``), then augment."""
    from rir_finetune.prep.beir import FromBeirConfig, from_beir
    from rir_finetune.retrieval.data import load_beir

    everything = stage.folder / "queries_all.jsonl"
    from_beir(FromBeirConfig(data_dir=stage.extra["data"], split=stage.extra["split"], out=str(everything)))
    qids = set(
        load_beir(stage.extra["data"], stage.extra["split"]).limit_queries(stage.extra["limit"]).queries
    )
    limit_lines(everything, Path(stage.settings["input"]), lambda _, r: str(r.get("qid")) in qids)
    return run_command("augment", path)


def run_reward(stage: Any, path: Path, resume: bool) -> dict[str, Any]:
    limit = stage.extra.get("limit")
    if limit:
        limit_lines(Path(stage.extra["source"]), Path(stage.settings["input"]), lambda i, _: i < limit)
    return run_command("reward", path)


def run_train(stage: Any, path: Path, resume: bool) -> dict[str, Any]:
    """``train`` in this process, or through the round's launcher (``torchrun --nproc_per_node 8``)."""
    overrides = {"resume_from_checkpoint": "auto"} if resume and (stage.folder / "model").exists() else {}
    launcher = stage.extra.get("launcher")
    if not launcher:
        COMMANDS["train"].run(str(path), overrides)
        return {}
    cmd = [*shlex.split(launcher), "-m", "rir_finetune", "train", "--config", str(path)]
    cmd += [a for k, v in overrides.items() for a in (f"--{k}", str(v))]
    print(f"round: train: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    code = subprocess.run(cmd).returncode
    if code != 0:
        raise UserError(
            f"stage 'train': `{shlex.join(cmd)}` exited with {code}; rerun the round to resume it"
        )
    return {}


def run_train_generator(stage: Any, path: Path, resume: bool) -> dict[str, Any]:
    pairs = Path(stage.settings["data"])
    if pairs.is_file() and not pairs.read_text(encoding="utf-8").strip():
        raise UserError(
            f"stage {stage.label!r}: reward kept no preference pairs ({pairs} is empty; its counts are in "
            f"{pairs.parent / 'stage.json'}); loosen reward.threshold, sample more (reward.samples_per_query) or "
            "set reward.require_beats_query false"
        )
    out = Path(stage.settings["output_dir"])
    overrides = {"resume_from_checkpoint": "auto"} if resume and out.exists() else {}
    COMMANDS["train-generator"].run(str(path), overrides)
    try:
        state = json.loads((out / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    logs = [h for h in state.get("log_history", []) if "rewards/margins" in h]
    result: dict[str, Any] = {"steps": state.get("global_step")}
    if logs:
        for key in ("rewards/margins", "rewards/accuracies"):
            result[key.split("/")[1]] = [logs[0][key], logs[-1][key]]  # first and last logged step
    return result


def run_eval(stage: Any, path: Path, resume: bool) -> dict[str, Any]:
    """Every model (base, trained) in every mode (query, answer, fused at each alpha); the summary for the report."""
    from rir_finetune.config import load_config
    from rir_finetune.evaluation.run import EvalArguments, evaluate_folder

    summary: dict[str, dict[str, float]] = {}
    for model_name, model_dir in stage.extra["models"].items():
        for label, mode, alpha in stage.extra["modes"]:
            keys = {**stage.settings, "model": model_dir, "mode": mode,
                    "output_dir": str(stage.folder / model_name / label)}  # fmt: skip
            if mode != "query":
                keys["answers"] = stage.extra["answers"]
            if alpha is not None:
                keys["alpha"] = alpha
            print(f"round eval: {model_name} model, {label} mode", file=sys.stderr, flush=True)
            metrics = evaluate_folder(load_config(EvalArguments, None, keys))
            summary[f"{model_name}/{label}"] = {k: float(v) for k, v in metrics.items()}
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(stage.outputs[0], lambda f: f.write(text))
    return {"summary": summary}
