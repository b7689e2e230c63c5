"""The command table: every ``rir-finetune`` command's name, one-line help, config classes and runner.

The CLI builds its commands from this table (``rir-finetune CMD --help`` lists the keys of the command's config
classes), and the round runs its stages through it (each stage names the command it runs; its keys are validated
against that command's config classes before any stage starts). Adding a command is one entry here.

Config classes and runners are named by dotted path and imported only when used, so ``rir-finetune --help`` and
the round's validation do not import torch for commands they do not touch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


def _resolve(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Command:
    name: str  # as typed: "train", "data from-beir"
    summary: str  # one line for `rir-finetune --help`
    configs: str  # "module:ATTR": the config dataclass, or a tuple of them (keys split among them)
    runner: str  # "module:function": function(config_file, tokens_or_mapping) -> the command's result
    usage: str = ""  # the typical call, shown by `CMD --help`
    epilog: str = ""  # shown after the key table

    def config_classes(self) -> list[type]:
        found = _resolve(self.configs)
        return list(found) if isinstance(found, (list, tuple)) else [found]

    def positional(self) -> tuple[str, ...]:
        """Keys that may come as leading bare arguments (``data from-beir DATA_DIR``), in order."""
        return tuple(getattr(self.config_classes()[0], "POSITIONAL", ()))

    def run(self, config_file: str | None, tokens: list[str] | dict[str, Any]) -> Any:
        return _resolve(self.runner)(config_file, tokens)

    def help_text(self) -> str:
        from rir_finetune.config import describe_keys

        head = f"Usage: rir-finetune {self.name} [--config FILE] [--key value ...]"
        args = " ".join(k.upper() for k in self.positional())
        if args:
            head = f"Usage: rir-finetune {self.name} {args} [--config FILE] [--key value ...]"
        parts = [head, "", self.summary]
        if self.usage:
            parts += ["", f"  {self.usage}"]
        parts += [
            "",
            "Every key can be set in the YAML/JSON file given with --config FILE (-c) or as --key value; the command "
            "line wins.",
            "",
            describe_keys(self.config_classes()),
        ]
        if self.epilog:
            parts += ["", self.epilog]
        return "\n".join(parts)


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command(
            "train",
            "Fine-tune a retriever. Keys: FlagEmbedding's names plus every transformers.TrainingArguments field.",
            "rir_finetune.training.arguments:CONFIG_CLASSES",
            "rir_finetune.training.train:run_train",
            "rir-finetune train --config configs/scifact_retrieval.yaml --output_dir runs/x",
        ),
        Command(
            "eval",
            "Score a retriever on BEIR-layout data (nDCG, recall, MRR, MAP) in query, answer or fused mode.",
            "rir_finetune.evaluation.run:EvalArguments",
            "rir_finetune.evaluation.run:run_eval",
            "rir-finetune eval --model DIR --data DATA_DIR --split test --output_dir OUT",
        ),
        Command(
            "compare",
            "Paired comparison of eval runs (seeds grouped): mean difference, bootstrap interval, p-value.",
            "rir_finetune.evaluation.compare:CompareConfig",
            "rir_finetune.evaluation.compare:run_compare",
            "rir-finetune compare base=runs/base/eval trained=runs/s1/eval,runs/s2/eval [--output_dir OUT]",
        ),
        Command(
            "mine",
            "Add hard negatives to training records with a dense retriever or BM25.",
            "rir_finetune.prep.mine:MineConfig",
            "rir_finetune.prep.mine:run_mine",
            "rir-finetune mine --input IN --output OUT --model DIR|bm25 --corpus DATA_DIR --negatives 15",
        ),
        Command(
            "score",
            "Add teacher scores (pos_scores / neg_scores) from a cross-encoder, a bi-encoder or an LLM.",
            "rir_finetune.prep.score:ScoreConfig",
            "rir_finetune.prep.score:run_score",
            "rir-finetune score --input IN --output OUT --model DIR --model_type cross_encoder",
        ),
        Command(
            "augment",
            "Add an LLM-written answer to every record (transformers, llama_cpp or an OpenAI-compatible server).",
            "rir_finetune.prep.augment:AugmentConfig",
            "rir_finetune.prep.augment:run_augment",
            "rir-finetune augment --input IN --output OUT --model LLM --task scifact",
        ),
        Command(
            "generate",
            "Training queries for a corpus without any: an LLM writes queries for sampled passages.",
            "rir_finetune.prep.generate:GenerateConfig",
            "rir_finetune.prep.generate:run_generate",
            "rir-finetune generate CORPUS --output OUT --model LLM --num_passages N",
        ),
        Command(
            "reward",
            "Preference pairs for the generator: K answers per query judged by a retriever.",
            "rir_finetune.generator.reward:RewardConfig",
            "rir_finetune.generator.reward:run_reward",
            "rir-finetune reward --input IN --output pairs.jsonl --retriever DIR --model LLM",
        ),
        Command(
            "train-generator",
            "DPO of the answer generator on reward's pairs (TRL, LoRA).",
            "rir_finetune.generator.dpo:CONFIG_CLASSES",
            "rir_finetune.generator.dpo:run_train_generator",
            "rir-finetune train-generator --model LLM --data pairs.jsonl --output_dir OUT",
        ),
        Command(
            "round",
            "One or more Reinforced-IR rounds, stage by stage, resumable.",
            "rir_finetune.round.config:RoundConfig",
            "rir_finetune.round.run:run_round_command",
            "rir-finetune round --config configs/round_scifact.yaml [--dry-run] [--from STAGE] [--until STAGE] "
            "[--section.key value]",
            "Options: --dry-run prints the plan (what runs, what is skipped, why) after validating everything; "
            "--from STAGE starts there (earlier stages must be up to date); --until STAGE stops after it.\n"
            "Sections: one per stage, named as the plan (--dry-run) names them (queries, augment, mine, train, eval, "
            "...), each holding the keys of the command it runs (rir-finetune CMD --help); --section.key value sets "
            "one from the command line.",
        ),
        Command(
            "data from-beir",
            "Training records (query + judged positives) from BEIR data.",
            "rir_finetune.prep.beir:FromBeirConfig",
            "rir_finetune.prep.beir:run_from_beir",
            "rir-finetune data from-beir DATA_DIR --split train --out train.jsonl",
        ),
        Command(
            "data split",
            "Hold out dev queries from training records, with a BEIR folder eval can score them in.",
            "rir_finetune.prep.split:SplitConfig",
            "rir_finetune.prep.split:run_split",
            "rir-finetune data split train.jsonl --dev_queries 100 --corpus DATA_DIR --out_dir OUT",
        ),
        Command(
            "data get",
            "Download a BEIR dataset by name.",
            "rir_finetune.prep.beir:GetConfig",
            "rir_finetune.prep.beir:run_get",
            "rir-finetune data get NAME --out DIR",
        ),
    )
}
