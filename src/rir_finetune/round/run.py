"""``rir-finetune round``: Reinforced-IR rounds, stage by stage, resumable.

    rir-finetune round --config configs/round_scifact.yaml              # run what is not up to date
    rir-finetune round --config configs/round_scifact.yaml --dry-run    # print the plan only
    rir-finetune round --config configs/round_scifact.yaml --from train --until eval --train.max_steps 10
    rir-finetune round --config configs/round_scifact_2rounds.yaml --from 2.augment

Each stage writes under its folder (``OUTPUT_DIR/<stage>/`` in round 1, ``OUTPUT_DIR/round_<r>/<stage>/`` in round
r >= 2) and, when it finishes, ``stage.json`` with its fingerprint (its keys, its outside inputs, its upstream
stages' fingerprints, across rounds) and wall time. A stage whose marker says done with the same fingerprint, and
whose outputs exist, is skipped; one that was interrupted is resumed (``augment`` keeps its finished answers,
``train`` and ``train_generator`` continue from their newest complete checkpoint, ``reward`` keeps its scored
queries); one whose keys or inputs changed is cleared and run again. ``--from`` / ``--until`` take a stage name (its
first round's) or ``<round>.<stage>``. At the end ``OUTPUT_DIR/report.md`` (+ ``report.png``) compares the base and
the trained retriever in every evaluated mode, round by round, with the generator's pair counts.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rir_finetune.errors import UserError
from rir_finetune.files import atomic_write
from rir_finetune.round.config import RoundConfig, load_round_config
from rir_finetune.round.stages import Stage, build_stages, fingerprint, round_note

MARKER = "stage.json"
LLM_STAGES = (
    "generate",
    "augment",
    "test_answers",
    "reward",
    "train_generator",
)  # stages that use the generator


@dataclass
class Step:
    stage: Stage
    fingerprint: str
    action: str  # run | resume | rerun | skip | before-from | after-until
    reason: str


def _marker(stage: Stage) -> dict[str, Any] | None:
    path = stage.folder / MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_marker(stage: Stage, fp: str, status: str, **extra: Any) -> None:
    body = {"stage": stage.name, "round": stage.round, "fingerprint": fp, "status": status, **extra}
    if stage.name in LLM_STAGES:  # the generator of this stage's text (round r >= 2: round r-1's DPO model)
        body["generator"] = {
            k: stage.settings.get(k) for k in ("backend", "model", "gguf_file") if stage.settings.get(k)
        }
    atomic_write(stage.folder / MARKER, lambda f: f.write(json.dumps(body, indent=2) + "\n"))


def _position(stages: list[Stage], key: str, value: str) -> int:
    """Index of ``value``: a stage's label or key (``2.train``), or a plain name (that stage's first round)."""
    for i, s in enumerate(stages):
        if value in {s.label, s.key} or value == f"{s.round}.{s.name}":
            return i
    for i, s in enumerate(stages):
        if value == s.name:
            return i
    raise UserError(
        f"--{key} {value}: not a stage of this round (stages: {', '.join(s.label for s in stages)})"
    )


def plan(cfg: RoundConfig, start: str | None = None, until: str | None = None) -> list[Step]:
    """What each stage will do and why, without running anything."""
    stages = build_stages(cfg)
    lo = _position(stages, "from", start) if start else 0
    hi = _position(stages, "until", until) if until else len(stages) - 1
    if lo > hi:
        raise UserError(f"--from {start} comes after --until {until}")
    fps: dict[str, str] = {}
    steps: list[Step] = []
    for i, stage in enumerate(stages):
        fp = fingerprint(stage, fps)
        fps[stage.key] = fp
        mark = _marker(stage)
        complete = (
            mark is not None and mark.get("status") == "done" and all(p.exists() for p in stage.outputs)
        )
        if complete and mark.get("fingerprint") == fp:
            action, reason = "skip", "up to date"
        elif mark is not None and mark.get("fingerprint") == fp:
            action, reason = "resume", "interrupted earlier; continues from what it finished"
        elif mark is not None:
            action, reason = "rerun", "its keys or inputs changed since it ran; its folder is cleared"
        elif stage.folder.exists() and any(stage.folder.iterdir()):
            raise UserError(
                f"{stage.folder}: exists and is not empty, but the round did not create it (no {MARKER}); "
                "choose another output_dir or remove it"
            )
        else:
            action, reason = "run", "not run yet"
        if i < lo:
            if action != "skip":
                raise UserError(
                    f"--from {start}: the earlier stage {stage.label!r} is not complete and up to date ({reason}); "
                    f"run it first (drop --from, or use --from {stage.label})"
                )
            action = "before-from"
        elif i > hi:
            action, reason = "after-until", f"after --until {until}"
        steps.append(Step(stage, fp, action, reason))
    return steps


def print_plan(steps: list[Step], out=None, cfg: RoundConfig | None = None) -> None:
    out = out or sys.stdout  # looked up now, not at import (a test's captured stdout)
    rounds = max((s.stage.round for s in steps), default=1)
    print("round plan:" if rounds == 1 else f"round plan: {rounds} rounds", file=out)
    width = max([13, *(len(s.stage.label) for s in steps)])
    shown = 0
    for s in steps:
        if rounds > 1 and s.stage.round != shown:
            shown = s.stage.round
            if cfg is not None:
                print(f" {round_note(cfg, [t.stage for t in steps], shown)}", file=out)
        verb = {"before-from": "skip", "after-until": "stop"}.get(s.action, s.action)
        why = "up to date (before --from)" if s.action == "before-from" else s.reason
        note = f" [{s.stage.note}]" if s.stage.note and s.stage.round > 1 else ""
        print(f"  {s.stage.label:<{width}} {verb:<7} {s.stage.command:<28} {why}{note}", file=out)
    out.flush()


def _write_settings(stage: Stage) -> Path:
    stage.folder.mkdir(parents=True, exist_ok=True)
    path = stage.folder / "config.yaml"
    text = f"# {stage.command} --config {path}\n" + yaml.safe_dump(stage.settings, sort_keys=False)
    atomic_write(path, lambda f: f.write(text))
    return path


def _limit_lines(src: Path, dst: Path, keep) -> int:
    """Copy the JSONL lines of ``src`` that ``keep(n, record)`` accepts into ``dst`` atomically; return the count."""
    kept: list[str] = []
    with src.open(encoding="utf-8") as f:
        for n, line in enumerate(ln for ln in f if ln.strip()):
            if keep(n, json.loads(line)):
                kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write(dst, lambda out: out.writelines(kept))
    return len(kept)


def _run_stage(stage: Stage, resume: bool) -> dict[str, Any]:
    """Run one stage's command(s) with its written settings; return counts for the report."""
    path = _write_settings(stage)
    name = stage.name
    if name == "generate":
        try:
            from rir_finetune.prep.generate import run_generate
        except ImportError:
            raise UserError("stage 'generate': this installation has no `generate` command") from None
        return {"counts": run_generate(str(path), [])}
    if name == "queries":
        from rir_finetune.prep.beir import run_from_beir

        run_from_beir(str(path), [])
        limit = stage.extra.get("limit")
        n = _limit_lines(
            Path(stage.settings["out"]), stage.outputs[0], lambda i, _: limit is None or i < limit
        )
        return {"records": n}
    if name in {"augment", "test_answers"}:
        from rir_finetune.prep.augment import run_augment

        if name == "test_answers":
            from rir_finetune.prep.beir import FromBeirConfig, from_beir
            from rir_finetune.retrieval.data import load_beir

            everything = stage.folder / "queries_all.jsonl"
            from_beir(
                FromBeirConfig(data_dir=stage.extra["data"], split=stage.extra["split"], out=str(everything))
            )
            qids = set(
                load_beir(stage.extra["data"], stage.extra["split"])
                .limit_queries(stage.extra["limit"])
                .queries
            )
            _limit_lines(everything, Path(stage.settings["input"]), lambda _, r: str(r.get("qid")) in qids)
        return {"counts": run_augment(str(path), [])}
    if name == "mine":
        from rir_finetune.prep.mine import run_mine

        return {"counts": run_mine(str(path), [])}
    if name == "score":
        from rir_finetune.prep.score import run_score

        return {"counts": run_score(str(path), [])}
    if name == "train":
        from rir_finetune.training.train import run_train

        overrides = {"resume_from_checkpoint": "auto"} if resume and (stage.folder / "model").exists() else {}
        launcher = stage.extra.get("launcher")
        if not launcher:
            run_train(str(path), overrides)
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
    if name == "eval":
        return {"summary": _run_eval(stage)}
    if name == "reward":
        from rir_finetune.generator.reward import run_reward

        if stage.extra.get("limit"):
            limit = stage.extra["limit"]
            _limit_lines(Path(stage.extra["source"]), Path(stage.settings["input"]), lambda i, _: i < limit)
        return {"counts": run_reward(str(path), [])}
    if name == "train_generator":
        return _run_train_generator(stage, path, resume)
    raise AssertionError(name)  # pragma: no cover


def _run_train_generator(stage: Stage, path: Path, resume: bool) -> dict[str, Any]:
    pairs = Path(stage.settings["data"])
    if pairs.is_file() and not pairs.read_text(encoding="utf-8").strip():
        raise UserError(
            f"stage {stage.label!r}: reward kept no preference pairs ({pairs} is empty; its counts are in "
            f"{pairs.parent / MARKER}); loosen reward.threshold, sample more (reward.samples_per_query) or "
            "set reward.require_beats_query false"
        )
    from rir_finetune.generator.dpo import run_train_generator

    out = Path(stage.settings["output_dir"])
    overrides = {"resume_from_checkpoint": "auto"} if resume and out.exists() else {}
    run_train_generator(str(path), overrides)
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


def _run_eval(stage: Stage) -> dict[str, dict[str, float]]:
    from rir_finetune.config import build_configs
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
            (args,) = build_configs([EvalArguments], None, keys)
            print(f"round eval: {model_name} model, {label} mode", file=sys.stderr, flush=True)
            metrics = evaluate_folder(args)
            summary[f"{model_name}/{label}"] = {k: float(v) for k, v in metrics.items()}
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(stage.outputs[0], lambda f: f.write(text))
    return summary


def run_round(
    config_file: str | None,
    overrides: list[str],
    dry_run: bool = False,
    start: str | None = None,
    until: str | None = None,
) -> list[Step]:
    """Plan the round, print the plan, and (unless ``dry_run``) run every stage that is not up to date."""
    cfg = load_round_config(config_file, overrides)
    steps = plan(cfg, start, until)
    print_plan(steps, cfg=cfg)
    if dry_run:
        return steps
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for step in steps:
        stage = step.stage
        if step.action in {"skip", "before-from", "after-until"}:
            if step.action == "skip":
                print(f"round: {stage.label}: skipped, up to date", file=sys.stderr, flush=True)
            continue
        if step.action == "rerun":
            shutil.rmtree(stage.folder)  # the round made it (it holds our marker)
        print(f"round: {stage.label}: {step.action} ({step.reason})", file=sys.stderr, flush=True)
        stage.folder.mkdir(parents=True, exist_ok=True)
        _write_marker(stage, step.fingerprint, "running", started=time.time())
        start_t = time.perf_counter()
        result = _run_stage(stage, resume=step.action == "resume")
        wall = time.perf_counter() - start_t
        _write_marker(stage, step.fingerprint, "done", wall_s=round(wall, 1), result=result)
        print(f"round: {stage.label}: done in {wall:.1f} s", file=sys.stderr, flush=True)
    from rir_finetune.round.report import write_report

    write_report(cfg, [s.stage for s in steps])
    return steps
