"""The round's stages: what each one reads, the command keys it runs with, and where it writes.

Every stage runs one rir-finetune command (or a few, for ``eval``) with that command's keys: the keys of its
section, with the round filling in the wiring (inputs, outputs, the base retriever, the shared LLM keys) unless the
section sets them itself. The resolved keys are written to ``OUTPUT_DIR/<stage>/config.yaml`` before the command
runs, so a stage can be rerun by hand with ``rir-finetune <command> --config OUTPUT_DIR/<stage>/config.yaml``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rir_finetune.errors import UserError
from rir_finetune.round.config import PIPELINE, RoundConfig, stage_config_file


@dataclass
class Stage:
    name: str
    command: str  # what a user would run by hand
    folder: Path
    outputs: list[Path]  # all present (and the marker says done) = complete
    settings: dict[str, Any]  # the command's resolved keys (written to config.yaml)
    depends: list[str]  # stages whose outputs it reads
    externals: dict[str, str] = field(default_factory=dict)  # outside inputs -> their fingerprints
    run: Callable[[Stage], dict[str, Any]] | None = None  # executes the stage; returns counts for the report
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific wiring the runner needs


# ----------------------------------------------------------------------------------------------------------------
# Fingerprints of outside inputs


def file_stamp(path: str | os.PathLike) -> str:
    """Size and modification time of a file, or of every file under a folder (cheap; for data and LLM files)."""
    root = Path(path)
    if not root.exists():
        return "missing"
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root) if p != root else p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def model_stamp(path: str | None) -> str:
    if not path:
        return "none"
    if path == "bm25":
        return "bm25"
    p = Path(path)
    if p.is_dir():
        from rir_finetune.retrieval.model_folder import model_fingerprint

        return model_fingerprint(p)[:16]
    return file_stamp(p)


def data_stamp(data_dir: str, splits: list[str]) -> str:
    root = Path(data_dir)
    parts = [file_stamp(root / "corpus.jsonl"), file_stamp(root / "queries.jsonl")]
    parts += [file_stamp(root / "qrels" / f"{s}.tsv") for s in splits]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# Building the stages from the round config


def _need(cfg: RoundConfig, key: str, why: str) -> str:
    value = getattr(cfg, key)
    if not value:
        raise UserError(f"config key {key!r}: required ({why})")
    return value


def _llm_keys(cfg: RoundConfig, section: dict[str, Any]) -> dict[str, Any]:
    """Shared LLM keys under the section's own (the section wins)."""
    return {**cfg.llm, **section}


def default_stages(cfg: RoundConfig) -> list[str]:
    """Stages that run when the config does not list them: those its sections and keys ask for."""
    names = ["generate"] if "generate" in cfg.sections else ["queries"]
    uses_llm = bool(cfg.llm) or "augment" in cfg.sections
    if uses_llm:
        names.append("augment")
    names.append("mine")
    if "score" in cfg.sections:
        names.append("score")
    names.append("train")
    if uses_llm:
        names.append("test_answers")
    names.append("eval")
    return names


def build_stages(cfg: RoundConfig) -> list[Stage]:
    """The round's stages in pipeline order, each with its resolved settings and wiring."""
    names = cfg.stages if cfg.stages is not None else default_stages(cfg)
    names = [n for n in PIPELINE if n in names]
    unknown = [n for n in cfg.sections if n not in PIPELINE and n not in {"reward", "train_generator"}]
    if unknown:
        raise UserError(f"config section {unknown[0]!r} is not a stage")
    out_dir = Path(cfg.output_dir)
    stages: list[Stage] = []
    records: tuple[str, Path] | None = None  # (stage, file) holding the current training records

    def folder(name: str) -> Path:
        return out_dir / name

    for name in names:
        sec = cfg.section(name)
        f = folder(name)
        if name == "generate":
            settings = {**_llm_keys(cfg, sec), "output": str(f / "train.jsonl"), "seed": cfg.seed}
            settings.setdefault("corpus", _need(cfg, "data", "the corpus to write queries for"))
            stage = Stage(name, "rir-finetune generate", f, [f / "train.jsonl"], settings, [],
                          {"corpus": file_stamp(settings["corpus"]), "llm": model_stamp(settings.get("model"))})  # fmt: skip
        elif name == "queries":
            data = _need(cfg, "data", "the BEIR folder whose training queries are used")
            settings = {"data_dir": data, "split": cfg.train_split, **sec, "out": str(f / "all.jsonl")}
            stage = Stage(name, "rir-finetune data from-beir", f, [f / "train.jsonl"], settings, [],
                          {"data": data_stamp(data, [settings["split"]])},
                          extra={"limit": cfg.max_train_queries})  # fmt: skip
        elif name == "augment":
            if records is None:
                raise UserError(
                    "stage 'augment' needs training records: add the 'queries' or 'generate' stage"
                )
            settings = {**_llm_keys(cfg, sec), "input": str(records[1]), "output": str(f / "train.jsonl")}
            settings.setdefault("seed", cfg.seed)
            stage = Stage(name, "rir-finetune augment", f, [f / "train.jsonl"], settings, [records[0]],
                          {"llm": model_stamp(settings.get("model"))})  # fmt: skip
        elif name == "mine":
            if records is None:
                raise UserError("stage 'mine' needs training records: add the 'queries' or 'generate' stage")
            settings = {"model": cfg.retriever, "corpus": cfg.data, "seed": cfg.seed, **sec}
            settings.update(input=str(records[1]), output=str(f / "train.jsonl"))
            if not settings.get("model"):
                raise UserError("stage 'mine': set 'retriever' or mine.model (a model folder, or bm25)")
            stage = Stage(name, "rir-finetune mine", f, [f / "train.jsonl"], settings, [records[0]],
                          {"model": model_stamp(settings["model"]),
                           "corpus": data_stamp(settings["corpus"], []) if settings.get("corpus") else "none"})  # fmt: skip
        elif name == "score":
            if records is None:
                raise UserError("stage 'score' needs training records")
            settings = {
                "model": cfg.retriever,
                **sec,
                "input": str(records[1]),
                "output": str(f / "train.jsonl"),
            }
            if settings.get("model_type") == "llm":
                settings = {**cfg.llm, **settings} if not sec.get("model") else settings
            stage = Stage(name, "rir-finetune score", f, [f / "train.jsonl"], settings, [records[0]],
                          {"model": model_stamp(settings.get("model"))})  # fmt: skip
        elif name == "train":
            if records is None:
                raise UserError("stage 'train' needs training records")
            base = stage_config_file(sec.pop("config")) if "config" in sec else {}
            settings = {**base, "model_name_or_path": cfg.retriever, "seed": cfg.seed, **sec}
            settings.update(train_data=str(records[1]), output_dir=str(f / "model"))
            if not settings.get("model_name_or_path"):
                raise UserError("stage 'train': set 'retriever' or train.model_name_or_path")
            command = (
                f"{cfg.train_launcher} -m rir_finetune train" if cfg.train_launcher else "rir-finetune train"
            )
            stage = Stage(name, command, f, [f / "model" / "modules.json"], settings, [records[0]],
                          {"model": model_stamp(settings["model_name_or_path"])},
                          extra={"launcher": cfg.train_launcher})  # fmt: skip
        elif name == "test_answers":
            data = _need(cfg, "data", "the BEIR folder whose test queries get answers")
            settings = {**_llm_keys(cfg, cfg.section("augment")), **sec}
            settings.setdefault("seed", cfg.seed)
            settings.update(input=str(f / "queries.jsonl"), output=str(f / "answers.jsonl"))
            stage = Stage(name, "rir-finetune augment", f, [f / "answers.jsonl"], settings, [],
                          {"data": data_stamp(data, [cfg.eval_split]), "llm": model_stamp(settings.get("model"))},
                          extra={"data": data, "split": cfg.eval_split, "limit": cfg.max_eval_queries})  # fmt: skip
        elif name == "eval":
            data = _need(cfg, "data", "the BEIR folder to evaluate on")
            trained = next((s for s in stages if s.name == "train"), None)
            answers = next((s for s in stages if s.name == "test_answers"), None)
            models = {"base": cfg.retriever} if cfg.retriever else {}
            if trained is not None:
                models["trained"] = str(trained.folder / "model")
            if not models:
                raise UserError("stage 'eval': nothing to evaluate (set 'retriever' or run 'train')")
            modes: list[tuple[str, str, float | None]] = [("query", "query", None)]
            if answers is not None:
                modes.append(("answer", "answer", None))
                modes += [(f"fused_{a:g}", "fused", a) for a in cfg.alphas if a < 1.0]
            settings = {"split": cfg.eval_split, "max_queries": cfg.max_eval_queries, **sec, "data": data}
            outputs = [f / "summary.json"]
            depends = [s.name for s in (trained, answers) if s is not None]
            externals = {"data": data_stamp(data, [settings["split"]])}
            if "base" in models:
                externals["base"] = model_stamp(models["base"])
            stage = Stage(name, "rir-finetune eval", f, outputs, settings, depends, externals,
                          extra={"models": models, "modes": modes,
                                 "answers": str(answers.outputs[0]) if answers else None})  # fmt: skip
        else:  # pragma: no cover - PIPELINE and the branches above list the same names
            raise AssertionError(name)
        stages.append(stage)
        if name in {"generate", "queries", "augment", "mine", "score"}:
            records = (name, stage.outputs[0])
    return stages


def fingerprint(stage: Stage, upstream: dict[str, str]) -> str:
    """Changes when the stage's keys, an outside input or an upstream stage's fingerprint changes."""
    body = {
        "stage": stage.name,
        "settings": stage.settings,
        "extra": stage.extra,
        "externals": stage.externals,
        "upstream": {d: upstream.get(d, "") for d in stage.depends},
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:20]
