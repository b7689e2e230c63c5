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

import contextlib
import dataclasses
import importlib.util
import io
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rir_finetune import files, lifecycle
from rir_finetune.commands import COMMANDS
from rir_finetune.config import build_one, check_values
from rir_finetune.errors import UserError
from rir_finetune.files import atomic_write
from rir_finetune.retrieval.model_folder import check_model_folder
from rir_finetune.round.config import RoundConfig, load_round_config
from rir_finetune.round.plan import Stage, build_stages, round_note
from rir_finetune.round.stages import KINDS
from rir_finetune.round.stamps import fingerprint, stage_inputs, what_changed

MARKER = "stage.json"
ROUND_MARKER = (
    "round.json"  # the round's folder is the round's: report.md and stage folders are written only there
)


@dataclass
class Step:
    stage: Stage
    fingerprint: str
    action: str  # run | resume | rerun | skip | before-from | after-until
    reason: str
    inputs: dict[str, Any] | None = (
        None  # what the fingerprint hashes (stamps.stage_inputs), kept in the marker
    )


def _marker(stage: Stage) -> dict[str, Any] | None:
    path = stage.folder / MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_marker(step: Step, status: str, **extra: Any) -> None:
    stage = step.stage
    body = {"stage": stage.name, "round": stage.round, "fingerprint": step.fingerprint, "status": status,
            "inputs": step.inputs, **extra}  # fmt: skip
    if KINDS[stage.name].llm:  # the generator of this stage's text (round r >= 2: round r-1's DPO model)
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


# a stage's keys that name something outside the round; False: a hub id (org/name) is allowed too
_INPUT_KEYS = {"corpus": False, "data_dir": False, "data": False, "examples": False, "model": True,
               "model_name_or_path": True, "retriever": True, "consistency_model": True}  # fmt: skip
_MODEL_KEYS = ("model", "model_name_or_path", "retriever", "consistency_model")
_TOP_KEY = {"corpus": "data", "data_dir": "data", "data": "data", "model": "retriever",
            "model_name_or_path": "retriever", "retriever": "retriever"}  # fmt: skip
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _where(cfg: RoundConfig, stage: Stage, key: str) -> str:
    """Where the user set a stage's key: the round file's line, a ``--section.key`` flag, a top-level key it came
    from, or the section's own config file."""
    found = next((w for sec in _sections(stage) if (w := cfg.locate(sec, key))), None)
    if found is None and key in _TOP_KEY:
        found = cfg.locate(_TOP_KEY[key])
    return found or stage.base_where.get(key) or f"stage {stage.label!r} (key {key!r}, set by the round)"


def _sections(stage: Stage) -> tuple[str, ...]:
    """The round file's sections a stage's keys can come from."""
    return (stage.name, *(("augment", "llm") if KINDS[stage.name].llm else ()))


def _shown(cfg: RoundConfig, stage: Stage, key: str) -> str:
    """The key as the user wrote it: the stage's own, or the top-level key it came from (mine's model: retriever)."""
    return key if any(cfg.locate(sec, key) for sec in _sections(stage)) else _TOP_KEY.get(key, key)


def validate(cfg: RoundConfig, stages: list[Stage]) -> list[Path]:
    """Everything a run could fail on, before any stage runs or any folder is cleared (``--dry-run`` too):

    - every stage's keys against its command's config classes (unknown keys, types, ranges);
    - every outside input a stage reads exists (data, models, LLM files; a hub id is let through);
    - the round's folder is none of them, holds none of them, and is the round's own (or new).

    Errors name where the user set the key. Returns the outside inputs."""
    inputs: list[Path] = []
    root = Path(cfg.output_dir)
    for stage in stages:
        kind = KINDS[stage.name]
        check_values(
            COMMANDS[kind.command].config_classes(), stage.settings, lambda k, st=stage: _where(cfg, st, k)
        )
        remote = stage.settings.get("backend") == "openai" or bool(stage.settings.get("api_base"))
        for key, hub_ok in _INPUT_KEYS.items():
            value = stage.settings.get(key)
            if not isinstance(value, str) or not value or value == "bm25" or (key == "model" and remote):
                continue
            path = Path(value)
            if any(files.inside(path, s.folder) for s in stages):  # an earlier stage's output
                continue
            if path.exists():
                inputs.append(path)
                # a folder that cannot load fails here, not stages later (a GGUF folder is the LLM backends' to read)
                gguf = key == "model" and (stage.settings.get("gguf_file") or any(path.glob("*.gguf")))
                if path.is_dir() and key in _MODEL_KEYS and not gguf:
                    try:
                        check_model_folder(path, key=_shown(cfg, stage, key))
                    except UserError as e:
                        raise UserError(f"{_where(cfg, stage, key)}: {e}") from None
            elif not (hub_ok and _HUB_ID.fullmatch(value)):
                raise UserError(
                    f"{_where(cfg, stage, key)}: config key {_shown(cfg, stage, key)!r}: {value} not found "
                    f"(stage {stage.label!r} reads it)"
                )
    files.check_output_dir(root, key="output_dir", reads=inputs)
    if root.is_dir() and any(p.name != lifecycle.LOCK_NAME for p in root.iterdir()) and not _round_made(root):
        raise UserError(
            f"{root}: exists and holds files, but the round did not create it (no {ROUND_MARKER}); choose another "
            "output_dir or empty it"
        )
    return inputs


# keys a stage's runner sets when it runs (eval: once per model and mode), given here for the check only
_RUN_TIME_KEYS = {
    "eval": lambda st: {
        "model": next(iter(st.extra["models"].values())),
        "output_dir": str(st.folder / "base"),
    },
}
_NAMED_KEY = re.compile(r"config keys? '([A-Za-z0-9_.]+)'")


def check_builds(cfg: RoundConfig, stage: Stage) -> None:
    """The config classes of a stage that will run, built as its command builds them, so the checks of their
    ``__post_init__`` (a choice, keys that go together) refuse here what the command would refuse only after the
    stages before it ran. transformers' TrainingArguments is not built: building it picks the device (a CUDA
    context, accelerate's process state, TF32) in the round's own process; the package its ``deepspeed`` key needs
    is checked instead."""
    classes = COMMANDS[KINDS[stage.name].command].config_classes()
    parts = check_values(classes, stage.settings, lambda k: _where(cfg, stage, k))
    filled = _RUN_TIME_KEYS.get(stage.name, lambda _: {})(stage)
    for cls, part in zip(classes, parts, strict=True):
        if any(base.__name__ == "TrainingArguments" for base in cls.__mro__):
            if part.get("deepspeed") and importlib.util.find_spec("deepspeed") is None:
                raise UserError(f"{_where(cfg, stage, 'deepspeed')}: config key 'deepspeed': the deepspeed package "
                                "is not installed here (pip install deepspeed)")  # fmt: skip
            continue
        names = {f.name for f in dataclasses.fields(cls)}
        _check_builds(cfg, stage, cls, {**part, **{k: v for k, v in filled.items() if k in names}})


def _check_builds(cfg: RoundConfig, stage: Stage, cls: type, values: dict[str, Any]) -> None:
    """The stage's command would build ``cls`` from ``values``: its refusal, located where the user set the key."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            build_one(cls, values)
    except UserError as e:
        msg = str(e)
        named = _NAMED_KEY.search(msg)
        key = named.group(1) if named else None
        if key is None:  # a missing package: the key that asks for it (deepspeed) when the message names it
            key = next((k for k in values if values[k] and re.search(rf"\b{re.escape(k)}\b", msg)), None)
        where = _where(cfg, stage, key) if key else f"stage {stage.label!r}"
        raise UserError(f"{where}: {msg}" if not msg.startswith(where) else msg) from None


def _round_made(root: Path) -> bool:
    """The folder is a round's: its marker, or (rounds of earlier versions) a stage marker in a sub-folder."""
    return (root / ROUND_MARKER).is_file() or any(
        (p / MARKER).is_file() for p in root.iterdir() if p.is_dir()
    )


def plan(cfg: RoundConfig, start: str | None = None, until: str | None = None) -> list[Step]:
    """What each stage will do and why, without running anything; every stage's keys are validated first."""
    stages = build_stages(cfg)
    validate(cfg, stages)
    lo = _position(stages, "from", start) if start else 0
    hi = _position(stages, "until", until) if until else len(stages) - 1
    if lo > hi:
        raise UserError(f"--from {start} comes after --until {until}")
    fps: dict[str, str] = {}
    legacy: dict[
        str, str
    ] = {}  # fingerprints of markers written before paths were made relative to the round
    steps: list[Step] = []
    for i, stage in enumerate(stages):
        inputs = stage_inputs(stage, fps, cfg.output_dir)
        fp = fingerprint(stage, fps, cfg.output_dir)
        legacy[stage.key] = fingerprint(stage, legacy)
        fps[stage.key] = fp
        mark = _marker(stage)
        same = mark is not None and mark.get("fingerprint") in {fp, legacy[stage.key]}
        complete = (
            mark is not None and mark.get("status") == "done" and all(p.exists() for p in stage.outputs)
        )
        if complete and same:
            action, reason = "skip", "up to date"
        elif same:
            action, reason = "resume", "interrupted earlier; continues from what it finished"
        elif mark is not None:
            action = "rerun"
            reason = f"{what_changed(mark.get('inputs'), inputs)} since it ran; its folder is cleared"
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
        steps.append(Step(stage, fp, action, reason, inputs))
    for step in steps:  # what will run: nothing has run or been cleared yet
        if step.action in ("run", "resume", "rerun"):
            check_builds(cfg, step.stage)
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
    lifecycle.lock_folder(out_dir)  # one round per folder at a time (held until the process ends)
    if not (out_dir / ROUND_MARKER).is_file():
        body = {"created": time.time(), "config": str(config_file) if config_file else None}
        atomic_write(out_dir / ROUND_MARKER, lambda f: f.write(json.dumps(body, indent=2) + "\n"))
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
        _write_marker(step, "running", started=time.time())
        start_t = time.perf_counter()
        path = _write_settings(stage)
        result = KINDS[stage.name].execute(stage, path, resume=step.action == "resume")
        wall = time.perf_counter() - start_t
        _write_marker(step, "done", wall_s=round(wall, 1), result=result)
        print(f"round: {stage.label}: done in {wall:.1f} s", file=sys.stderr, flush=True)
    from rir_finetune.round.report import write_report

    write_report(cfg, [s.stage for s in steps])
    return steps


def run_round_command(config_file: str | None, tokens: list[str] | dict[str, Any]) -> list[Step]:
    """``rir-finetune round``: the round's own options (``--dry-run``, ``--from STAGE``, ``--until STAGE``) and
    every other ``--key`` / ``--section.key`` override."""
    if isinstance(tokens, dict):
        return run_round(config_file, [a for k, v in tokens.items() for a in (f"--{k}", str(v))])
    rest: list[str] = []
    options: dict[str, Any] = {"dry_run": False, "start": None, "until": None}
    names = {"--from": "start", "--until": "until"}
    it = iter(tokens)
    for tok in it:
        flag, eq, value = tok.partition("=")
        if flag in ("--dry-run", "--dry_run"):
            options["dry_run"] = not eq or value.strip().lower() in {"true", "1", "yes", "y", "on"}
        elif flag in names:
            value = value if eq else next(it, None)
            if not value or value.startswith("--"):
                raise UserError(f"command line: {flag} needs a stage name")
            options[names[flag]] = value
        else:
            rest.append(tok)
    return run_round(config_file, rest, **options)
