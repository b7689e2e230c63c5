"""``rir-finetune augment``: an LLM-written answer for every query (Reinforced-IR query augmentation).

    rir-finetune augment --input train.jsonl --output train.answers.jsonl --task scifact \
        --backend llama_cpp --model SmolLM2-135M-Instruct.Q4_1.gguf --batch_size 16 --max_new_tokens 128

The prompt states the task, names the kind of query and asks for a passage (``llm/prompts.py``); chat models get it
through their chat template. Generation goes through an LLM backend (``llm/generation.py``: ``transformers``,
``llama_cpp`` or ``openai``); greedy unless ``temperature > 0``.

Resuming: answers are appended to ``OUT.partial`` as they finish (flushed and synced every ``batch_size``
answers); its first line records the settings that decide the answers (task, prompt, model, backend, lengths,
sampling). A rerun with the same settings keeps them and generates only the missing ones; a rerun with other
settings is refused in one line saying what differs (it would mix old and new answers). ``OUT`` appears only when
every record has its answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rir_finetune import files, lifecycle, precision
from rir_finetune.config import load_config, option
from rir_finetune.errors import UserError
from rir_finetune.files import iter_jsonl
from rir_finetune.lifecycle import ResumableJsonl
from rir_finetune.llm.generation import (
    Backend,
    BackendSettings,
    Completion,
    Counts,
    PromptTooLong,
    Sampling,
    load_backend,
)
from rir_finetune.llm.prompts import AnswerPromptKeys, build_prompt, resolve_template
from rir_finetune.prep.common import report
from rir_finetune.prep.io import Record, read_records

SETTINGS_KEY = "augment_settings"  # the first line of OUT.partial


@dataclass
class AugmentConfig(BackendSettings, AnswerPromptKeys):
    """augment's keys, the answer prompt's (task, task_description, ...) and the LLM backend's (backend, model, ...)."""

    input: str | None = option(None, "JSONL records with a 'query' field")
    output: str | None = option(None, "JSONL to write: the records plus 'answer'")
    batch_size: int = option(16, "sequences decoded together; answers written together", range=">=1")
    max_new_tokens: int = option(300, "answer length limit in tokens (upstream max_tokens)", range=">=1")
    temperature: float = option(0.0, "0 = greedy decoding; > 0 samples", range=">=0")
    top_p: float = option(1.0, "nucleus sampling when temperature > 0", range="(0, 1]")
    seed: int = option(
        42, "sampling seed (per query: the same answer whatever the batch or a resume)", range=">=0"
    )

    def __post_init__(self):
        AnswerPromptKeys.__post_init__(self)
        BackendSettings.__post_init__(self)

    def sampling(self) -> Sampling:
        return Sampling(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed
        )

    def fingerprint(self) -> dict[str, Any]:
        """The settings that decide the answers; a resumed run must have the same ones."""
        model = self.model
        if model and self.backend != "openai" and not self.api_base and Path(model).exists():
            model = str(Path(model).resolve())
        return {
            "task": self.task,
            "prompt": resolve_template(self.prompt_template),
            "task_description": self.task_description,
            "query_type": self.query_type,
            "answer_type": self.answer_type,
            "system_prompt": self.system_prompt,
            "use_chat_template": self.use_chat_template,
            "backend": "openai" if self.api_base else self.backend,
            "model": model,
            "gguf_file": self.gguf_file,
            **({"dtype": d} if (d := self.backend_settings().resolved_dtype()) else {}),
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p if self.temperature > 0 else None,
            "seed": self.seed if self.temperature > 0 else None,
        }


def load_generator(cfg: AugmentConfig) -> Backend:
    """The LLM backend for this command's settings."""
    return load_backend(cfg.backend_settings())


# ----------------------------------------------------------------------------------------------------------------
# The resumable run


@dataclass
class Plan:
    records: list[Record]
    lines: list[int]  # file line of each record
    out: Path
    writer: ResumableJsonl
    settings: dict[str, Any]
    answers: dict[int, str]  # kept from an earlier run
    has_header: bool


def _resume(
    cfg: AugmentConfig, records: list[Record], writer: ResumableJsonl, settings: dict
) -> tuple[dict, bool]:
    """Answers an earlier run with the same settings finished: ``{record index: answer}``."""
    done = writer.done()
    if not done:
        return {}, False
    partial = writer.partial
    head = done[0]
    if not isinstance(head, dict) or SETTINGS_KEY not in head:
        raise UserError(
            f"{partial}:1: an unfinished output without recorded settings (another command or an older version); "
            "delete it to start over"
        )
    changed = lifecycle.changed_settings(head[SETTINGS_KEY], settings, may_change=())
    if changed:
        raise UserError(
            f"{partial}: an unfinished run with other settings ({'; '.join(changed)}); rerun with its settings to "
            f"resume it, or delete {partial.name} to start over"
        )
    answers: dict[int, str] = {}
    for n, entry in enumerate(done[1:], start=2):
        i = entry.get("index") if isinstance(entry, dict) else None
        if (
            not isinstance(i, int)
            or not 0 <= i < len(records)
            or entry.get("query") != records[i]["query"]
            or not isinstance(entry.get("answer"), str)
        ):
            raise UserError(
                f"{partial}:{n}: this unfinished output does not match the input (another input file?); "
                "delete it to start over"
            )
        answers[i] = entry["answer"]
    return answers, True


def plan(cfg: AugmentConfig) -> Plan:
    """Everything checked before a model is loaded: input, output, prompt, and what an earlier run left."""
    if not cfg.input:
        raise UserError("config key 'input' is required (the JSONL records to augment)")
    records = read_records(cfg.input, need_pos=False)
    lines = [line_no for line_no, _ in iter_jsonl(cfg.input)]
    reads = [cfg.input] + ([cfg.model] if cfg.model and Path(cfg.model).exists() else [])
    out = files.check_output_file(cfg.output, key="output", reads=reads)
    settings = cfg.fingerprint()
    writer = ResumableJsonl(out)
    answers, has_header = _resume(cfg, records, writer, settings)
    return Plan(records, lines, out, writer, settings, answers, has_header)


def augment(
    cfg: AugmentConfig,
    generator: Backend,
    after_batch: Callable[[int], None] | None = None,
    planned: Plan | None = None,
) -> dict[str, int]:
    """Add an ``answer`` to every record of ``cfg.input`` and write ``cfg.output``; return the counts.

    ``after_batch(n)`` runs after the n-th group of answers is safely written; tests use it to simulate a kill.
    """
    p = planned or plan(cfg)
    records, writer = p.records, p.writer
    template = resolve_template(cfg.prompt_template)
    kept = len(p.answers)
    answers = dict(p.answers)
    pending = [i for i in range(len(records)) if i not in answers]
    prompts = [
        build_prompt(template, records[i]["query"], cfg.task_description, cfg.query_type, cfg.answer_type)
        for i in pending
    ]
    buffer: list[dict[str, Any]] = []
    written = [0]
    header = [p.has_header]

    def flush() -> None:
        if not buffer:
            return
        if not header[0]:
            p.out.parent.mkdir(parents=True, exist_ok=True)
            writer.append([{SETTINGS_KEY: p.settings}])
            header[0] = True
        writer.append(list(buffer))
        buffer.clear()
        written[0] += 1
        if after_batch is not None:
            after_batch(written[0])

    def on_result(k: int, completions: list[Completion]) -> None:
        i = pending[k]
        c = completions[0]
        answers[i] = c.text.strip()
        entry = {"index": i, "query": records[i]["query"], "answer": answers[i], "tokens": c.tokens,
                 "finish_reason": c.finish_reason}  # fmt: skip
        if "qid" in records[i]:
            entry["qid"] = records[i]["qid"]
        buffer.append(entry)
        if len(buffer) >= cfg.batch_size:
            flush()

    counts = Counts()
    start = time.time()
    try:
        if pending:
            results = generator.generate(prompts, cfg.sampling(), on_result=on_result)
            for r in results:
                counts.add(r)
            counts.seconds = getattr(getattr(generator, "last_counts", None), "seconds", time.time() - start)
    except PromptTooLong as e:
        i = pending[e.index]
        raise UserError(f"{cfg.input}:{p.lines[i]}: {e}") from None
    finally:
        try:
            flush()  # what finished before an error or an interrupt stays for the rerun
        finally:
            writer.close()
    writer.finish([{**r, "answer": answers[i]} for i, r in enumerate(records)])
    lengths = [len(a.split()) for a in answers.values()]
    result = {
        "records": len(records),
        "generated": len(pending),
        "kept": kept,
        "empty": sum(1 for a in answers.values() if not a.strip()),
        "tokens": counts.tokens,
        "cut": counts.cut,
    }
    report(
        "augment",
        [
            f"{result['records']} records: {result['generated']} answers generated, "
            f"{result['kept']} kept from an earlier run ({writer.partial.name})",
            f"backend {cfg.backend_settings().backend if not cfg.api_base else 'openai'} ({generator.name}), "
            f"prompt template {cfg.prompt_template!r}, task {cfg.task!r}",
            *(counts.lines(cfg.max_new_tokens) if pending else []),
            f"answer length in words: mean {sum(lengths) / max(len(lengths), 1):.1f}, "
            f"{result['empty']} empty answers in all",
            f"wrote {p.out} ({time.time() - start:.1f} s)",
        ],
    )
    return result


def run_augment(config_file: str | None, overrides: list[str]) -> dict[str, int]:
    cfg = load_config(AugmentConfig, config_file, overrides)
    resolve_template(cfg.prompt_template)
    precision.check_device(cfg.device)
    planned = plan(cfg)  # bad input, output or a mismatched partial file fail before a model is loaded
    backend = load_generator(cfg)
    return augment(cfg, backend, planned=planned)
