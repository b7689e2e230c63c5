"""The round's stages, one entry each in :data:`KINDS`: the command it runs, how its keys and wiring are built, what
the round writes before it runs, and how it is run.

Every stage runs one rir-finetune command from the command table (or a few, for ``eval``) with that command's keys:
the keys of its section, with the round filling in the wiring (inputs, outputs, the base retriever, the shared LLM
keys) unless the section sets them itself. The resolved keys are written to ``<stage folder>/config.yaml`` before
the command runs, so a stage can be rerun by hand with ``rir-finetune <command> --config <stage folder>/config.yaml``.

With ``rounds: N`` the stages repeat: round 1 writes under ``OUTPUT_DIR/<stage>/`` (the one-round layout), round
r >= 2 under ``OUTPUT_DIR/round_<r>/<stage>/``. Every round but the last ends with ``reward`` and
``train_generator``; round r >= 2 writes its answers (``augment``, ``test_answers``, ``generate``) with round r-1's
DPO generator (a transformers folder) and trains its retriever from round r-1's trained one. Training records from
``queries`` are the same in every round, so only round 1 has that stage and later rounds read its output.

To add a stage: write its builder (and, if the command alone does not do it, a runner) below and add one
:class:`StageKind` to :data:`KINDS`, in pipeline order.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rir_finetune.config import ConfigFile
from rir_finetune.errors import UserError
from rir_finetune.llm.common import BackendSettings
from rir_finetune.llm.prompts import AnswerPromptKeys
from rir_finetune.round import runners
from rir_finetune.round.stamps import data_stamp, file_stamp, model_stamp

if TYPE_CHECKING:  # the round's config names the stages of this table
    from rir_finetune.round.config import RoundConfig


@dataclass
class Stage:
    name: str  # the stage kind (queries, augment, ..., reward, train_generator)
    command: str  # what a user would run by hand
    folder: Path
    outputs: list[Path]  # all present (and the marker says done) = complete
    settings: dict[str, Any]  # the command's resolved keys (written to config.yaml)
    depends: list[str]  # keys of the stages whose outputs it reads
    externals: dict[str, str] = field(default_factory=dict)  # outside inputs -> their fingerprints
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific wiring the runner needs
    round: int = 1  # which round (1-based)
    key: str = ""  # unique id: the name in round 1, "<r>.<name>" later (fingerprints chain on it)
    label: str = ""  # what the plan and the log call it: the name with one round, "<r>.<name>" with several
    note: str = ""  # shown after the plan line (not part of the fingerprint)
    base_where: dict[str, str] = field(
        default_factory=dict
    )  # keys from the section's `config:` file -> file:line

    def __post_init__(self):
        self.key = self.key or (self.name if self.round == 1 else f"{self.round}.{self.name}")
        self.label = self.label or self.key


# keys that reward takes from the shared llm keys and the augment section, so that it samples with the prompts
# and backend that augment uses (sampling keys are reward's own: upstream samples at 0.9 / 0.9 whatever augment does)
REWARD_LLM_KEYS = (
    *(f.name for f in fields(BackendSettings)),
    *(f.name for f in fields(AnswerPromptKeys)),
    "max_new_tokens",
)
# llm keys that train_generator takes (the model it trains, and how prompts were shown to it)
GENERATOR_LLM_KEYS = ("model", "gguf_file", "use_chat_template", "system_prompt")
# keys that name the round-1 generator's location or service; a later round's generator is a local folder
_REMOTE_KEYS = ("gguf_file", "api_base", "api_key_env", "api_timeout", "api_max_retries", "api_concurrency",
                "api_extra_body")  # fmt: skip


@dataclass
class Previous:
    """What round r takes from round r-1."""

    generator: Stage | None  # round r-1's train_generator
    retriever: Stage | None  # round r-1's train
    queries: Stage | None  # round 1's queries (shared by every round)


@dataclass
class Round:
    """One round being built: the config, what came before, and the stages so far."""

    cfg: RoundConfig
    number: int
    prev: Previous | None
    out_dir: Path
    stages: list[Stage] = field(default_factory=list)
    records: tuple[str, Path] | None = None  # (stage key, file) holding the current training records
    origin: tuple[str, Path] | None = None  # the round's first records: query + positive, before any stage

    def need(self, key: str, why: str) -> str:
        value = getattr(self.cfg, key)
        if not value:
            raise UserError(f"config key {key!r}: required ({why})")
        return value

    def get(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    def need_records(self, name: str) -> tuple[str, Path]:
        if self.records is None:
            raise UserError(f"stage {name!r} needs training records: add the 'queries' or 'generate' stage")
        return self.records

    @property
    def new_generator(self) -> Stage | None:
        """Round r-1's DPO generator, which writes this round's text (None in round 1)."""
        return self.prev.generator if self.prev is not None else None

    @property
    def gen_dep(self) -> list[str]:
        return [self.new_generator.key] if self.new_generator is not None else []

    @property
    def note(self) -> str:
        g = self.new_generator
        return f"answers by round {g.round}'s DPO generator, backend transformers" if g is not None else ""

    def llm(self, section: dict[str, Any]) -> dict[str, Any]:
        """The LLM keys of an answer-writing stage: the shared keys under the section's, and from round 2 on the
        previous round's DPO generator (a transformers folder) whatever backend and model the config named."""
        keys = {**self.cfg.llm, **section}
        if self.new_generator is not None:
            for k in _REMOTE_KEYS:
                keys.pop(k, None)
            keys.update(backend="transformers", model=str(self.new_generator.outputs[0].parent))
        return keys

    def llm_stamp(self, settings: dict[str, Any]) -> dict[str, str]:
        """The generator as an outside input (round 1); a later round's comes from a stage it depends on."""
        return {} if self.new_generator is not None else {"llm": model_stamp(settings.get("model"))}

    def make(self, name: str, *args: Any, **kwargs: Any) -> Stage:
        return Stage(name, f"rir-finetune {KINDS[name].command}", *args, **kwargs, round=self.number)


def _base(sec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The keys of a section's own ``config:`` file (flattened, as the command reads it), and their file:line."""
    if "config" not in sec:
        return {}, {}
    return ConfigFile(sec.pop("config")).flat()


# ----------------------------------------------------------------------------------------------------------------
# Builders: a section's keys -> the stage (settings, inputs, outputs, dependencies)


def _generate(r: Round, sec: dict[str, Any], f: Path) -> Stage:
    settings = {**r.llm(sec), "output": str(f / "train.jsonl"), "seed": r.cfg.seed}
    settings.setdefault("corpus", r.need("data", "the corpus to write queries for"))
    return r.make("generate", f, [f / "train.jsonl"], settings, r.gen_dep,
                  {"corpus": file_stamp(settings["corpus"]), **r.llm_stamp(settings)}, note=r.note)  # fmt: skip


def _queries(r: Round, sec: dict[str, Any], f: Path) -> Stage:
    data = r.need("data", "the BEIR folder whose training queries are used")
    settings = {"data_dir": data, "split": r.cfg.train_split, **sec, "out": str(f / "all.jsonl")}
    return r.make("queries", f, [f / "train.jsonl"], settings, [], {"data": data_stamp(data, [settings["split"]])},
                  extra={"limit": r.cfg.max_train_queries})  # fmt: skip


def _augment(r: Round, sec: dict[str, Any], f: Path) -> Stage:
    records = r.need_records("augment")
    settings = {**r.llm(sec), "input": str(records[1]), "output": str(f / "train.jsonl")}
    settings.setdefault("seed", r.cfg.seed)
    return r.make("augment", f, [f / "train.jsonl"], settings, [records[0], *r.gen_dep], r.llm_stamp(settings),
                  note=r.note)  # fmt: skip


def _mine(r: Round, sec: dict[str, Any], f: Path) -> Stage:
    records = r.need_records("mine")
    settings = {"model": r.cfg.retriever, "corpus": r.cfg.data, "seed": r.cfg.seed, **sec}
    settings.update(input=str(records[1]), output=str(f / "train.jsonl"))
    if not settings.get("model"):
        raise UserError("stage 'mine': set 'retriever' or mine.model (a model folder, or bm25)")
    corpus = data_stamp(settings["corpus"], []) if settings.get("corpus") else "none"
    return r.make("mine", f, [f / "train.jsonl"], settings, [records[0]],
                  {"model": model_stamp(settings["model"]), "corpus": corpus})  # fmt: skip


def _score(r: Round, sec: dict[str, Any], f: Path) -> Stage:
    records = r.need_records("score")
    settings = {"model": r.cfg.retriever, **sec, "input": str(records[1]), "output": str(f / "train.jsonl")}
    if settings.get("model_type") == "llm" and not sec.get("model"):
        settings = {**r.cfg.llm, **settings}
    return r.make("score", f, [f / "train.jsonl"], settings, [records[0]],
                  {"model": model_stamp(settings.get("model"))})  # fmt: skip


def _train(r: Round, sec: dict[str, Any], f: Path) -> Stage:
    records = r.need_records("train")
    base, base_where = _base(sec)
    settings = {**base, "model_name_or_path": r.cfg.retriever, "seed": r.cfg.seed, **sec}
    settings.update(train_data=str(records[1]), output_dir=str(f / "model"))
    depends, externals, note = [records[0]], {}, ""
    last = r.prev.retriever if r.prev is not None else None
    if last is not None:  # self-boosting: from the last round's retriever
        settings["model_name_or_path"] = str(last.folder / "model")
        depends.append(last.key)
        note = f"starts from round {last.round}'s trained retriever"
    if not settings.get("model_name_or_path"):
        raise UserError("stage 'train': set 'retriever' or train.model_name_or_path")
    if last is None:
        externals = {"model": model_stamp(settings["model_name_or_path"])}
    launcher = r.cfg.train_launcher
    stage = r.make("train", f, [f / "model" / "modules.json"], settings, depends, externals,
                   extra={"launcher": launcher}, note=note, base_where=base_where)  # fmt: skip
    if launcher:
        stage.command = f"{launcher} -m rir_finetune train"
    return stage


def _test_answers(r: Round, sec: dict[str, Any], f: Path) -> Stage:
    data = r.need("data", "the BEIR folder whose test queries get answers")
    settings = r.llm({**r.cfg.section("augment"), **sec})
    settings.setdefault("seed", r.cfg.seed)
    settings.update(input=str(f / "queries.jsonl"), output=str(f / "answers.jsonl"))
    return r.make("test_answers", f, [f / "answers.jsonl"], settings, r.gen_dep,
                  {"data": data_stamp(data, [r.cfg.eval_split]), **r.llm_stamp(settings)},
                  extra={"data": data, "split": r.cfg.eval_split, "limit": r.cfg.max_eval_queries},
                  note=r.note)  # fmt: skip


def _eval(r: Round, sec: dict[str, Any], f: Path) -> Stage:
    data = r.need("data", "the BEIR folder to evaluate on")
    trained, answers = r.get("train"), r.get("test_answers")
    models = {"base": r.cfg.retriever} if r.cfg.retriever else {}
    if trained is not None:
        models["trained"] = str(trained.folder / "model")
    if not models:
        raise UserError("stage 'eval': nothing to evaluate (set 'retriever' or run 'train')")
    modes: list[tuple[str, str, float | None]] = [("query", "query", None)]
    if answers is not None:
        modes.append(("answer", "answer", None))
        modes += [(f"fused_{a:g}", "fused", a) for a in r.cfg.alphas if a < 1.0]
    settings = {"split": r.cfg.eval_split, "max_queries": r.cfg.max_eval_queries, **sec, "data": data}
    externals = {"data": data_stamp(data, [settings["split"]])}
    if "base" in models:
        externals["base"] = model_stamp(models["base"])
    return r.make("eval", f, [f / "summary.json"], settings, [s.key for s in (trained, answers) if s is not None],
                  externals, extra={"models": models, "modes": modes,
                                    "answers": str(answers.outputs[0]) if answers else None})  # fmt: skip


def _reward(r: Round, sec: dict[str, Any], f: Path) -> Stage:
    if r.origin is None:
        raise UserError("stage 'reward' needs training records: add the 'queries' or 'generate' stage")
    inherited = {k: v for k, v in {**r.cfg.llm, **r.cfg.section("augment")}.items() if k in REWARD_LLM_KEYS}
    settings = {**inherited, "seed": r.cfg.seed, **sec}
    if r.new_generator is not None:
        for k in _REMOTE_KEYS:
            settings.pop(k, None)
        settings.update(backend="transformers", model=str(r.new_generator.outputs[0].parent))
    if not settings.get("model"):
        raise UserError("stage 'reward': no generator to sample from: set llm.model (or reward.model)")
    trained = r.get("train")
    depends, externals = [r.origin[0], *r.gen_dep], r.llm_stamp(settings)
    if "retriever" in sec or trained is None:  # the judge: the round's trained retriever by default
        settings.setdefault("retriever", r.cfg.retriever)
        if not settings.get("retriever"):
            raise UserError("stage 'reward': set 'retriever' or reward.retriever (the judge), or run 'train'")
        externals["retriever"] = model_stamp(settings["retriever"])
    else:
        settings["retriever"] = str(trained.folder / "model")
        depends.append(trained.key)
    limit, source = r.cfg.max_reward_queries, r.origin[1]
    settings.update(input=str(f / "records.jsonl") if limit else str(source), output=str(f / "pairs.jsonl"))
    settings.setdefault("samples_output", str(f / "samples.jsonl"))
    return r.make("reward", f, [f / "pairs.jsonl"], settings, depends, externals,
                  extra={"source": str(source), "limit": limit} if limit else {}, note=r.note)  # fmt: skip


def _train_generator(r: Round, sec: dict[str, Any], f: Path) -> Stage:
    rewarded = r.get("reward")
    if rewarded is None:
        raise UserError("stage 'train_generator' needs the 'reward' stage (its preference pairs)")
    base, base_where = _base(sec)
    llm = {**r.cfg.llm, **r.cfg.section("augment")}
    inherited = {k: v for k, v in llm.items() if k in GENERATOR_LLM_KEYS}
    remote = llm.get("backend") == "openai" or bool(llm.get("api_base"))
    if remote:  # an API model's name is not a folder to train
        inherited.pop("model", None)
    settings = {**base, **inherited, "seed": r.cfg.seed, **sec}
    if r.new_generator is not None:
        settings.pop("gguf_file", None)
        settings["model"] = str(r.new_generator.outputs[0].parent)
    if not settings.get("model"):
        raise UserError(
            "stage 'train_generator': set train_generator.model (a local causal LM folder or .gguf file"
            + (" of the model the API serves)" if remote else ")")
        )
    settings.update(data=str(rewarded.outputs[0]), output_dir=str(f / "model"))
    return r.make("train_generator", f, [f / "model" / "config.json"], settings, [rewarded.key, *r.gen_dep],
                  r.llm_stamp(settings), note=r.note, base_where=base_where)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# The table of stages


@dataclass(frozen=True)
class StageKind:
    name: str  # the section name and the stage's folder
    command: str  # the command it runs (rir_finetune.commands.COMMANDS)
    build: Callable[[Round, dict[str, Any], Path], Stage]
    run: Callable[[Stage, Path, bool], dict[str, Any]] | None = (
        None  # (stage, config.yaml, resume); None: the command
    )
    records: bool = False  # its output is the training records of the stages after it
    origin: bool = False  # its output is the round's first records (query + positive)
    llm: bool = False  # writes text with the generator (the marker records which)
    generator: bool = False  # after the pipeline: the generator learns from the round's retriever

    def execute(self, stage: Stage, path: Path, resume: bool) -> dict[str, Any]:
        """Run ``stage`` with its keys written to ``path``; returns what its marker records for the report."""
        return self.run(stage, path, resume) if self.run else runners.run_command(self.command, path)


KINDS: dict[str, StageKind] = {
    k.name: k
    for k in (
        StageKind("generate", "generate", _generate, records=True, origin=True, llm=True),
        StageKind("queries", "data from-beir", _queries, runners.run_queries, records=True, origin=True),
        StageKind("augment", "augment", _augment, records=True, llm=True),
        StageKind("mine", "mine", _mine, records=True),
        StageKind("score", "score", _score, records=True),
        StageKind("train", "train", _train, runners.run_train),
        StageKind("test_answers", "augment", _test_answers, runners.run_test_answers, llm=True),
        StageKind("eval", "eval", _eval, runners.run_eval),
        StageKind("reward", "reward", _reward, runners.run_reward, llm=True, generator=True),
        StageKind(
            "train_generator",
            "train-generator",
            _train_generator,
            runners.run_train_generator,
            llm=True,
            generator=True,
        ),  # fmt: skip
    )
}
PIPELINE = tuple(n for n, k in KINDS.items() if not k.generator)  # stage order within a round
GENERATOR_STAGES = tuple(n for n, k in KINDS.items() if k.generator)
SECTIONS = tuple(KINDS)


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


def _build_round(cfg: RoundConfig, number: int, prev: Previous | None) -> list[Stage]:
    """One round's stages in order, each with its resolved settings and wiring."""
    names = cfg.stages if cfg.stages is not None else default_stages(cfg)
    names = [n for n in PIPELINE if n in names]
    if prev is not None:
        names = [n for n in names if n != "queries"]  # the same records every round: round 1's
    names += generator_stages(cfg, number)
    r = Round(cfg, number, prev, Path(cfg.output_dir) / (f"round_{number}" if number > 1 else ""))
    if prev is not None and prev.queries is not None and "generate" not in names:
        r.records = r.origin = (prev.queries.key, prev.queries.outputs[0])
    for name in names:
        kind = KINDS[name]
        stage = kind.build(r, copy.deepcopy(cfg.sections.get(name, {})), r.out_dir / name)
        if cfg.rounds > 1:
            stage.label = f"{number}.{name}"
        r.stages.append(stage)
        if kind.records:
            r.records = (stage.key, stage.outputs[0])
        if kind.origin:
            r.origin = r.records
    return r.stages


def build_stages(cfg: RoundConfig) -> list[Stage]:
    """Every round's stages in the order they run, each with its resolved settings and wiring."""
    unknown = [n for n in cfg.sections if n not in KINDS]
    if unknown:
        raise UserError(f"config section {unknown[0]!r} is not a stage")
    stages: list[Stage] = []
    prev: Previous | None = None
    queries: Stage | None = None
    for number in range(1, cfg.rounds + 1):
        this = _build_round(cfg, number, prev)
        stages += this
        by_name = {s.name: s for s in this}
        queries = queries or by_name.get("queries")
        if number < cfg.rounds:
            retriever = by_name.get("train") or (prev.retriever if prev else None)
            prev = Previous(by_name.get("train_generator"), retriever, queries)
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
            was = {**cfg.llm, **cfg.section("augment")}.get("backend", "transformers")
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
