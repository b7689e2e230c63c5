"""Building a round's stages from the table of stages (:data:`rir_finetune.round.stages.KINDS`): which stages
run in each round, and how each round's stages are wired to the previous round's (its DPO generator writes the
answers, its trained retriever is trained further)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rir_finetune.errors import UserError
from rir_finetune.round.stages import _REMOTE_KEYS, GENERATOR_STAGES, KINDS, PIPELINE
from rir_finetune.round.stamps import model_stamp

if TYPE_CHECKING:  # the round's config names the stages of the table
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

    def store(self) -> dict[str, Any]:
        """The round's ``cache_dir`` for a stage that encodes the corpus (its section may set its own)."""
        return {"cache_dir": self.cfg.cache_dir} if self.cfg.cache_dir else {}

    def llm_stamp(self, settings: dict[str, Any]) -> dict[str, str]:
        """The generator as an outside input (round 1); a later round's comes from a stage it depends on."""
        return {} if self.new_generator is not None else {"llm": model_stamp(settings.get("model"))}

    def make(self, name: str, *args: Any, **kwargs: Any) -> Stage:
        return Stage(name, f"rir-finetune {KINDS[name].command}", *args, **kwargs, round=self.number)


def default_stages(cfg: RoundConfig) -> list[str]:
    """Pipeline stages that run when the config does not list them: those its sections and keys ask for."""
    names = ["generate"] if "generate" in cfg.sections else ["queries"]
    uses_llm = bool(cfg.llm) or "augment" in cfg.sections
    if uses_llm:
        names.append("augment")
        if cfg.dev_queries:
            names.append("dev")
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
    uses_llm = bool(cfg.llm) or any(s in cfg.sections for s in ("augment", "generate", *GENERATOR_STAGES))
    if (
        round_no < cfg.rounds
    ):  # without an LLM, rounds only train the retriever further (remine: on new negatives)
        return list(GENERATOR_STAGES) if uses_llm else []
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
