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

To add a stage: write its builder (and, if the command alone does not run it, a runner) in this file and add one
:class:`StageKind` to :data:`KINDS`, in pipeline order. The round's sections, plan, key validation and markers
follow from that entry (:mod:`.plan` builds the stages of every round from the table).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rir_finetune.commands import COMMANDS
from rir_finetune.config import ConfigFile
from rir_finetune.errors import UserError
from rir_finetune.files import atomic_write, iter_jsonl
from rir_finetune.llm.common import BackendSettings
from rir_finetune.llm.prompts import AnswerPromptKeys
from rir_finetune.round.stamps import data_stamp, file_stamp, model_stamp

if TYPE_CHECKING:  # the plan builds rounds from this table
    from rir_finetune.round.plan import Round, Stage

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
_REMOTE_KEYS = ("gguf_file", "gguf_requantize", "api_base", "api_key_env", "api_timeout", "api_max_retries", "api_concurrency",
                "api_extra_body")  # fmt: skip


def _base(sec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The keys of a section's own ``config:`` file (flattened, as the command reads it), and their file:line."""
    if "config" not in sec:
        return {}, {}
    return ConfigFile(sec.pop("config")).flat()


# ----------------------------------------------------------------------------------------------------------------
# Builders: a section's keys -> the stage (settings, inputs, outputs, dependencies)


def _generate(r: Round, sec: dict[str, Any], f: Path) -> Stage:
    settings = {**r.store(), **r.llm(sec), "output": str(f / "train.jsonl"), "seed": r.cfg.seed}
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


def _dev(r: Round, sec: dict[str, Any], f: Path) -> Stage:
    records = r.need_records("dev")
    settings = {"dev_queries": r.cfg.dev_queries, "seed": r.cfg.seed, **sec, "input": str(records[1]),
                "corpus": r.need("data", "the corpus the dev queries are judged in"), "out_dir": str(f)}  # fmt: skip
    return r.make("dev", f, [f / "train.jsonl", f / "dev.jsonl", f / "dev_beir" / "qrels" / "dev.tsv"], settings,
                  [records[0]], {"corpus": file_stamp(Path(settings["corpus"]) / "corpus.jsonl")})  # fmt: skip


def _mine(r: Round, sec: dict[str, Any], f: Path) -> Stage:
    records = r.need_records("mine")
    settings = {"model": r.cfg.retriever, "corpus": r.cfg.data, "seed": r.cfg.seed, **r.store(), **sec}
    settings.update(input=str(records[1]), output=str(f / "train.jsonl"))
    last = r.prev.retriever if r.prev is not None else None
    remined = r.cfg.remine and last is not None and "model" not in sec
    if remined:  # ANCE-style: the negatives the retriever just trained now ranks highest
        settings["model"] = str(last.folder / "model")
    if not settings.get("model"):
        raise UserError("stage 'mine': set 'retriever' or mine.model (a model folder, or bm25)")
    corpus = data_stamp(settings["corpus"], []) if settings.get("corpus") else "none"
    externals = {"corpus": corpus} if remined else {"model": model_stamp(settings["model"]), "corpus": corpus}
    return r.make("mine", f, [f / "train.jsonl"], settings, [records[0], *([last.key] if remined else [])],
                  externals, note=f"mines with round {last.round}'s trained retriever" if remined else "")  # fmt: skip


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
    settings = {
        "split": r.cfg.eval_split,
        "max_queries": r.cfg.max_eval_queries,
        **r.store(),
        **sec,
        "data": data,
    }
    externals = {"data": data_stamp(data, [settings["split"]])}
    if "base" in models:
        externals["base"] = model_stamp(models["base"])
    dev = r.get("dev") if answers is not None else None
    extra = {"models": models, "modes": modes, "answers": str(answers.outputs[0]) if answers else None}
    if dev is not None:  # the fused weight is chosen on held-out training queries, never on the test split
        extra["dev"] = {"data": str(dev.folder / "dev_beir"), "answers": str(dev.outputs[1])}
    return r.make("eval", f, [f / "summary.json"], settings,
                  [s.key for s in (trained, answers, dev) if s is not None], externals, extra=extra)  # fmt: skip


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
    dev = r.get("dev")  # the generator learns from training queries only: the dev ones choose alpha, unseen
    extra = {"source": str(source), "limit": limit} if limit or dev else {}
    if dev is not None:
        extra["train_records"] = str(dev.outputs[0])
        depends.append(dev.key)
    settings.update(input=str(f / "records.jsonl") if extra else str(source), output=str(f / "pairs.jsonl"))
    settings.setdefault("samples_output", str(f / "samples.jsonl"))
    return r.make("reward", f, [f / "pairs.jsonl"], settings, depends, externals, extra=extra, note=r.note)


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
# Runners: (stage, its config.yaml, resume) -> what its marker records for the report


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
    """The records to sample for: the dev stage's training records only (none it held out), the first ``limit``."""
    from rir_finetune.prep.split import record_key

    if stage.extra:
        limit, kept = stage.extra.get("limit"), None
        if stage.extra.get("train_records"):
            kept = {record_key(rec) for _, rec in iter_jsonl(stage.extra["train_records"])}
        selected = [
            rec for _, rec in iter_jsonl(stage.extra["source"]) if kept is None or record_key(rec) in kept
        ]
        selected = selected[:limit] if limit else selected
        atomic_write(Path(stage.settings["input"]),
                     lambda out: out.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in selected))  # fmt: skip
    return run_command("reward", path)


def run_train(stage: Any, path: Path, resume: bool) -> dict[str, Any]:
    """``train`` in this process, or through the round's launcher (``torchrun --nproc_per_node 8``)."""
    model = stage.folder / "model"
    if resume and (model / "README.md").is_file() and (model / "rir_config.yaml").is_file():
        # killed (or the launcher failed) after train wrote its model card, the last thing it writes: done
        print(
            f"round: train: {model} is a finished run (model card written); not trained again",
            file=sys.stderr,
        )
        return {}
    overrides = {"resume_from_checkpoint": "auto"} if resume and model.exists() else {}
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
        if stage.extra.get("dev"):
            summary[f"{model_name}/fused_dev"] = _fused_at_dev_alpha(stage, model_dir, model_name, summary)
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(stage.outputs[0], lambda f: f.write(text))
    return {"summary": summary}


def _fused_at_dev_alpha(stage: Stage, model_dir: str, model_name: str, summary: dict) -> dict[str, float]:
    """The fused weight with the best dev nDCG@10 (alpha 1: the query alone; ties go to the larger alpha), and the
    test metrics at it; the dev sweep is written to ``dev/<model>/alphas.json``."""
    from rir_finetune.config import load_config
    from rir_finetune.evaluation.run import EvalArguments, evaluate_folder

    dev = stage.extra["dev"]
    alphas = sorted({1.0, *(a for _, mode, a in stage.extra["modes"] if mode == "fused")})
    on_dev: dict[float, float] = {}
    for alpha in alphas:
        keys = {**stage.settings, "model": model_dir, "data": dev["data"], "split": "dev", "max_queries": None,
                "mode": "fused", "alpha": alpha, "answers": dev["answers"],
                "output_dir": str(stage.folder / "dev" / model_name / f"fused_{alpha:g}")}  # fmt: skip
        print(f"round eval: {model_name} model, dev queries, alpha {alpha:g}", file=sys.stderr, flush=True)
        on_dev[alpha] = float(evaluate_folder(load_config(EvalArguments, None, keys))["ndcg@10"])
    best = max(alphas, key=lambda a: (on_dev[a], a))
    text = json.dumps({f"{a:g}": v for a, v in on_dev.items()}, indent=2) + "\n"
    atomic_write(stage.folder / "dev" / model_name / "alphas.json", lambda f: f.write(text))
    label = "query" if best == 1.0 else f"fused_{best:g}"
    link = (
        stage.folder / model_name / "fused_dev"
    )  # the chosen test run, for `compare` and the report's paired rows
    link.unlink(missing_ok=True)
    link.symlink_to(label)
    return {**summary[f"{model_name}/{label}"], "alpha": best, "dev_ndcg@10": on_dev[best]}


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
        return self.run(stage, path, resume) if self.run else run_command(self.command, path)


KINDS: dict[str, StageKind] = {
    k.name: k
    for k in (
        StageKind("generate", "generate", _generate, records=True, origin=True, llm=True),
        StageKind("queries", "data from-beir", _queries, run_queries, records=True, origin=True),
        StageKind("augment", "augment", _augment, records=True, llm=True),
        StageKind("dev", "data split", _dev, records=True),
        StageKind("mine", "mine", _mine, records=True),
        StageKind("score", "score", _score, records=True),
        StageKind("train", "train", _train, run_train),
        StageKind("test_answers", "augment", _test_answers, run_test_answers, llm=True),
        StageKind("eval", "eval", _eval, run_eval),
        StageKind("reward", "reward", _reward, run_reward, llm=True, generator=True),
        StageKind(
            "train_generator",
            "train-generator",
            _train_generator,
            run_train_generator,
            llm=True,
            generator=True,
        ),  # fmt: skip
    )
}
PIPELINE = tuple(n for n, k in KINDS.items() if not k.generator)  # stage order within a round
GENERATOR_STAGES = tuple(n for n, k in KINDS.items() if k.generator)
SECTIONS = tuple(KINDS)
