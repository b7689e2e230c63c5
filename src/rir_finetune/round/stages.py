"""The round's stages: what each one reads, the command keys it runs with, and where it writes.

Every stage runs one rir-finetune command (or a few, for ``eval``) with that command's keys: the keys of its
section, with the round filling in the wiring (inputs, outputs, the base retriever, the shared LLM keys) unless the
section sets them itself. The resolved keys are written to ``<stage folder>/config.yaml`` before the command runs,
so a stage can be rerun by hand with ``rir-finetune <command> --config <stage folder>/config.yaml``.

With ``rounds: N`` the stages repeat: round 1 writes under ``OUTPUT_DIR/<stage>/`` (the one-round layout), round
r >= 2 under ``OUTPUT_DIR/round_<r>/<stage>/``. Every round but the last ends with ``reward`` and
``train_generator``; round r >= 2 writes its answers (``augment``, ``test_answers``, ``generate``) with round r-1's
DPO generator (a transformers folder) and trains its retriever from round r-1's trained one. Training records from
``queries`` are the same in every round, so only round 1 has that stage and later rounds read its output.
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
from rir_finetune.round.config import GENERATOR_STAGES, PIPELINE, RoundConfig, stage_config_file


@dataclass
class Stage:
    name: str  # the stage kind (queries, augment, ..., reward, train_generator)
    command: str  # what a user would run by hand
    folder: Path
    outputs: list[Path]  # all present (and the marker says done) = complete
    settings: dict[str, Any]  # the command's resolved keys (written to config.yaml)
    depends: list[str]  # keys of the stages whose outputs it reads
    externals: dict[str, str] = field(default_factory=dict)  # outside inputs -> their fingerprints
    run: Callable[[Stage], dict[str, Any]] | None = None  # executes the stage; returns counts for the report
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific wiring the runner needs
    round: int = 1  # which round (1-based)
    key: str = ""  # unique id: the name in round 1, "<r>.<name>" later (fingerprints chain on it)
    label: str = ""  # what the plan and the log call it: the name with one round, "<r>.<name>" with several
    note: str = ""  # shown after the plan line (not part of the fingerprint)

    def __post_init__(self):
        self.key = self.key or (self.name if self.round == 1 else f"{self.round}.{self.name}")
        self.label = self.label or self.key


# ----------------------------------------------------------------------------------------------------------------
# Fingerprints of outside inputs


_CONTENT: dict[tuple[str, int, int, int], str] = {}  # (path, inode, size, mtime) -> digest, for one process


def _content_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, computed once per process for a given (path, inode, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _CONTENT:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        _CONTENT[key] = h.hexdigest()
    return _CONTENT[key]


def file_stamp(path: str | os.PathLike) -> str:
    """The content of a file, or of every file under a folder (relative names and bytes), for data and LLM files.

    Content, not size and modification time: a copied, re-synced or re-extracted data folder (new mtimes, same
    bytes) must not make the round redo hours of LLM work, and an edit that keeps the size must be seen.
    """
    root = Path(path)
    if not root.exists():
        return "missing"
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(root) if p != root else p.name}:{_content_digest(p)}\n".encode())
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

# llm keys that reward takes from the shared llm keys and the augment section, so that it samples with the prompts
# and backend that augment uses (sampling keys are reward's own: upstream samples at 0.9 / 0.9 whatever augment does)
REWARD_LLM_KEYS = ("backend", "model", "gguf_file", "device", "dtype", "n_ctx", "n_threads", "api_base", "batch_size",
                   "use_chat_template", "system_prompt", "max_new_tokens", "task", "task_description",
                   "query_type", "answer_type", "prompt_template")  # fmt: skip
# llm keys that train_generator takes (the model it trains, and how prompts were shown to it)
GENERATOR_LLM_KEYS = ("model", "gguf_file", "use_chat_template", "system_prompt")
# keys that name the round-1 generator's location or service; a later round's generator is a local folder
_REMOTE_KEYS = ("gguf_file", "api_base", "api_key_env", "api_timeout", "api_max_retries", "api_concurrency",
                "api_extra_body")  # fmt: skip


def _need(cfg: RoundConfig, key: str, why: str) -> str:
    value = getattr(cfg, key)
    if not value:
        raise UserError(f"config key {key!r}: required ({why})")
    return value


def _llm_keys(cfg: RoundConfig, section: dict[str, Any]) -> dict[str, Any]:
    """Shared LLM keys under the section's own (the section wins)."""
    return {**cfg.llm, **section}


def default_stages(cfg: RoundConfig) -> list[str]:
    """Pipeline stages that run when the config does not list them: those its sections and keys ask for."""
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


def generator_stages(cfg: RoundConfig, round_no: int) -> list[str]:
    """``reward`` / ``train_generator`` in round ``round_no``: always before the last round (the next round's answers
    come from them); in the last round only when asked (``final_generator: true``; ``stages`` naming them; or,
    with ``rounds: 1`` and no ``stages`` list, a ``reward`` or ``train_generator`` section)."""
    if round_no < cfg.rounds:
        return list(GENERATOR_STAGES)
    if cfg.final_generator is not None:
        return list(GENERATOR_STAGES) if cfg.final_generator else []
    if cfg.stages is not None:
        return [n for n in GENERATOR_STAGES if n in cfg.stages]
    if cfg.rounds == 1:
        if "train_generator" in cfg.sections:
            return list(GENERATOR_STAGES)
        if "reward" in cfg.sections:
            return ["reward"]
    return []


@dataclass
class _Previous:
    """What round r takes from round r-1."""

    generator: Stage | None  # round r-1's train_generator
    retriever: Stage | None  # round r-1's train
    queries: Stage | None  # round 1's queries (shared by every round)


def _round_llm(cfg: RoundConfig, section: dict[str, Any], prev: _Previous | None) -> dict[str, Any]:
    """The LLM keys of an answer-writing stage: the shared keys under the section's, and from round 2 on the previous
    round's DPO generator (a transformers folder) whatever backend and model the config named."""
    keys = _llm_keys(cfg, section)
    if prev is not None and prev.generator is not None:
        for k in _REMOTE_KEYS:
            keys.pop(k, None)
        keys.update(backend="transformers", model=str(prev.generator.outputs[0].parent))
    return keys


def _llm_stamp(settings: dict[str, Any], prev: _Previous | None) -> dict[str, str]:
    """The generator as an outside input (round 1), or nothing: a later round's comes from a stage it depends on."""
    if prev is not None and prev.generator is not None:
        return {}
    return {"llm": model_stamp(settings.get("model"))}


def _generator_note(prev: _Previous | None) -> str:
    if prev is None or prev.generator is None:
        return ""
    return f"answers by round {prev.generator.round}'s DPO generator, backend transformers"


def _build_round(cfg: RoundConfig, round_no: int, prev: _Previous | None) -> list[Stage]:
    """One round's stages in order, each with its resolved settings and wiring."""
    names = cfg.stages if cfg.stages is not None else default_stages(cfg)
    names = [n for n in PIPELINE if n in names]
    if prev is not None:
        names = [n for n in names if n != "queries"]  # the same records every round: round 1's
    names += generator_stages(cfg, round_no)
    out_dir = Path(cfg.output_dir) if round_no == 1 else Path(cfg.output_dir) / f"round_{round_no}"
    stages: list[Stage] = []
    records: tuple[str, Path] | None = None  # (stage key, file) holding the current training records
    origin: tuple[str, Path] | None = None  # the round's first records: query + positive, before any stage
    if prev is not None and prev.queries is not None and "generate" not in names:
        records = origin = (prev.queries.key, prev.queries.outputs[0])
    gen_dep = [prev.generator.key] if prev is not None and prev.generator is not None else []
    note = _generator_note(prev)

    def make(name: str, *args, **kwargs) -> Stage:
        return Stage(name, *args, **kwargs, round=round_no)

    def get(name: str) -> Stage | None:
        return next((s for s in stages if s.name == name), None)

    for name in names:
        sec = cfg.section(name)
        f = out_dir / name
        if name == "generate":
            settings = {**_round_llm(cfg, sec, prev), "output": str(f / "train.jsonl"), "seed": cfg.seed}
            settings.setdefault("corpus", _need(cfg, "data", "the corpus to write queries for"))
            stage = make(name, "rir-finetune generate", f, [f / "train.jsonl"], settings, list(gen_dep),
                         {"corpus": file_stamp(settings["corpus"]), **_llm_stamp(settings, prev)}, note=note)  # fmt: skip
        elif name == "queries":
            data = _need(cfg, "data", "the BEIR folder whose training queries are used")
            settings = {"data_dir": data, "split": cfg.train_split, **sec, "out": str(f / "all.jsonl")}
            stage = make(name, "rir-finetune data from-beir", f, [f / "train.jsonl"], settings, [],
                         {"data": data_stamp(data, [settings["split"]])},
                         extra={"limit": cfg.max_train_queries})  # fmt: skip
        elif name == "augment":
            if records is None:
                raise UserError(
                    "stage 'augment' needs training records: add the 'queries' or 'generate' stage"
                )
            settings = {
                **_round_llm(cfg, sec, prev),
                "input": str(records[1]),
                "output": str(f / "train.jsonl"),
            }
            settings.setdefault("seed", cfg.seed)
            stage = make(name, "rir-finetune augment", f, [f / "train.jsonl"], settings, [records[0], *gen_dep],
                         _llm_stamp(settings, prev), note=note)  # fmt: skip
        elif name == "mine":
            if records is None:
                raise UserError("stage 'mine' needs training records: add the 'queries' or 'generate' stage")
            settings = {"model": cfg.retriever, "corpus": cfg.data, "seed": cfg.seed, **sec}
            settings.update(input=str(records[1]), output=str(f / "train.jsonl"))
            if not settings.get("model"):
                raise UserError("stage 'mine': set 'retriever' or mine.model (a model folder, or bm25)")
            stage = make(name, "rir-finetune mine", f, [f / "train.jsonl"], settings, [records[0]],
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
            stage = make(name, "rir-finetune score", f, [f / "train.jsonl"], settings, [records[0]],
                         {"model": model_stamp(settings.get("model"))})  # fmt: skip
        elif name == "train":
            if records is None:
                raise UserError("stage 'train' needs training records")
            base = stage_config_file(sec.pop("config")) if "config" in sec else {}
            settings = {**base, "model_name_or_path": cfg.retriever, "seed": cfg.seed, **sec}
            settings.update(train_data=str(records[1]), output_dir=str(f / "model"))
            depends, externals, train_note = [records[0]], {}, ""
            if prev is not None and prev.retriever is not None:  # self-boosting: from the last retriever
                settings["model_name_or_path"] = str(prev.retriever.folder / "model")
                depends.append(prev.retriever.key)
                train_note = f"starts from round {prev.retriever.round}'s trained retriever"
            if not settings.get("model_name_or_path"):
                raise UserError("stage 'train': set 'retriever' or train.model_name_or_path")
            if not train_note:
                externals = {"model": model_stamp(settings["model_name_or_path"])}
            command = (
                f"{cfg.train_launcher} -m rir_finetune train" if cfg.train_launcher else "rir-finetune train"
            )
            stage = make(name, command, f, [f / "model" / "modules.json"], settings, depends, externals,
                         extra={"launcher": cfg.train_launcher}, note=train_note)  # fmt: skip
        elif name == "test_answers":
            data = _need(cfg, "data", "the BEIR folder whose test queries get answers")
            settings = {**_round_llm(cfg, {**cfg.section("augment"), **sec}, prev)}
            settings.setdefault("seed", cfg.seed)
            settings.update(input=str(f / "queries.jsonl"), output=str(f / "answers.jsonl"))
            stage = make(name, "rir-finetune augment", f, [f / "answers.jsonl"], settings, list(gen_dep),
                         {"data": data_stamp(data, [cfg.eval_split]), **_llm_stamp(settings, prev)},
                         extra={"data": data, "split": cfg.eval_split, "limit": cfg.max_eval_queries},
                         note=note)  # fmt: skip
        elif name == "eval":
            data = _need(cfg, "data", "the BEIR folder to evaluate on")
            trained = get("train")
            answers = get("test_answers")
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
            depends = [s.key for s in (trained, answers) if s is not None]
            externals = {"data": data_stamp(data, [settings["split"]])}
            if "base" in models:
                externals["base"] = model_stamp(models["base"])
            stage = make(name, "rir-finetune eval", f, outputs, settings, depends, externals,
                         extra={"models": models, "modes": modes,
                                "answers": str(answers.outputs[0]) if answers else None})  # fmt: skip
        elif name == "reward":
            if origin is None:
                raise UserError(
                    "stage 'reward' needs training records: add the 'queries' or 'generate' stage"
                )
            inherited = {
                k: v for k, v in _llm_keys(cfg, cfg.section("augment")).items() if k in REWARD_LLM_KEYS
            }
            settings = {**inherited, "seed": cfg.seed, **sec}
            if prev is not None and prev.generator is not None:
                for k in _REMOTE_KEYS:
                    settings.pop(k, None)
                settings.update(backend="transformers", model=str(prev.generator.outputs[0].parent))
            if not settings.get("model"):
                raise UserError(
                    "stage 'reward': no generator to sample from: set llm.model (or reward.model)"
                )
            trained = get("train")
            depends, externals = [origin[0], *gen_dep], _llm_stamp(settings, prev)
            if "retriever" in sec or trained is None:  # the judge: the round's trained retriever by default
                settings.setdefault("retriever", cfg.retriever)
                if not settings.get("retriever"):
                    raise UserError(
                        "stage 'reward': set 'retriever' or reward.retriever (the judge), or run 'train'"
                    )
                externals["retriever"] = model_stamp(settings["retriever"])
            else:
                settings["retriever"] = str(trained.folder / "model")
                depends.append(trained.key)
            limit = cfg.max_reward_queries
            source = origin[1]
            settings.update(input=str(f / "records.jsonl") if limit else str(source),
                            output=str(f / "pairs.jsonl"))  # fmt: skip
            settings.setdefault("samples_output", str(f / "samples.jsonl"))
            stage = make(name, "rir-finetune reward", f, [f / "pairs.jsonl"], settings, depends, externals,
                         extra={"source": str(source), "limit": limit} if limit else {}, note=note)  # fmt: skip
        elif name == "train_generator":
            rewarded = get("reward")
            if rewarded is None:
                raise UserError("stage 'train_generator' needs the 'reward' stage (its preference pairs)")
            base = stage_config_file(sec.pop("config")) if "config" in sec else {}
            llm = _llm_keys(cfg, cfg.section("augment"))
            inherited = {k: v for k, v in llm.items() if k in GENERATOR_LLM_KEYS}
            remote = llm.get("backend") == "openai" or bool(llm.get("api_base"))
            if remote:  # an API model's name is not a folder to train
                inherited.pop("model", None)
            settings = {**base, **inherited, "seed": cfg.seed, **sec}
            if prev is not None and prev.generator is not None:
                settings.pop("gguf_file", None)
                settings["model"] = str(prev.generator.outputs[0].parent)
            if not settings.get("model"):
                raise UserError(
                    "stage 'train_generator': set train_generator.model (a local causal LM folder or .gguf file"
                    + (" of the model the API serves)" if remote else ")")
                )
            settings.update(data=str(rewarded.outputs[0]), output_dir=str(f / "model"))
            stage = make(name, "rir-finetune train-generator", f, [f / "model" / "config.json"], settings,
                         [rewarded.key, *gen_dep], _llm_stamp(settings, prev), note=note)  # fmt: skip
        else:  # pragma: no cover - the names above are PIPELINE's and GENERATOR_STAGES'
            raise AssertionError(name)
        if cfg.rounds > 1:
            stage.label = f"{round_no}.{name}"
        stages.append(stage)
        if name in {"generate", "queries", "augment", "mine", "score"}:
            records = (stage.key, stage.outputs[0])
        if name in {"generate", "queries"}:
            origin = records
    return stages


def build_stages(cfg: RoundConfig) -> list[Stage]:
    """Every round's stages in the order they run, each with its resolved settings and wiring."""
    unknown = [n for n in cfg.sections if n not in PIPELINE and n not in GENERATOR_STAGES]
    if unknown:
        raise UserError(f"config section {unknown[0]!r} is not a stage")
    stages: list[Stage] = []
    prev: _Previous | None = None
    queries: Stage | None = None
    for r in range(1, cfg.rounds + 1):
        this = _build_round(cfg, r, prev)
        stages += this
        by_name = {s.name: s for s in this}
        queries = queries or by_name.get("queries")
        if r < cfg.rounds:
            prev = _Previous(
                by_name.get("train_generator"),
                by_name.get("train") or (prev.retriever if prev else None),
                queries,
            )
    return stages


def round_note(cfg: RoundConfig, stages: list[Stage], round_no: int) -> str:
    """One line per round for the plan: where its answers come from and where its retriever starts."""
    mine = [s for s in stages if s.round == round_no]
    llm = next((s for s in mine if s.name in {"augment", "test_answers", "generate", "reward"}), None)
    train = next((s for s in mine if s.name == "train"), None)
    if llm is not None:
        backend = llm.settings.get("backend", "transformers")
        model = llm.settings.get("model")
        if round_no == 1:
            answers = f"answers by {model} (backend {backend})"
        else:
            was = _llm_keys(cfg, cfg.section("augment")).get("backend", "transformers")
            answers = f"answers by round {round_no - 1}'s DPO generator {model} (backend transformers"
            answers += f", not the llm section's {was})" if was != "transformers" else ")"
    else:
        answers = "no answers"
    start = (
        f"train starts from {train.settings['model_name_or_path']}" if train is not None else "no training"
    )
    gen = [s.name for s in mine if s.name in GENERATOR_STAGES]
    tail = ", then " + " + ".join(gen) if gen else ", no generator training"
    return f"round {round_no}/{cfg.rounds}: {answers}; {start}{tail}"


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
