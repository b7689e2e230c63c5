"""``rir-finetune augment``: an LLM-written answer for every query (Reinforced-IR query augmentation).

    rir-finetune augment --input train.jsonl --output train.answers.jsonl \
        --model DIR [--gguf_file FILE.gguf] --task scifact --batch_size 8 --max_new_tokens 300

The prompt states the task, names the kind of query and asks for a passage (``prompts.py``); chat models get it
through their chat template. Generation is batched with left padding and greedy unless ``temperature > 0``.
Finished batches are appended to ``OUT.partial`` (flushed and synced); a restarted run keeps them and generates only
the missing answers (records matched by ``qid`` when every record has a distinct one, else by line number).
``--api_base URL`` sends the prompts to an OpenAI-compatible ``/chat/completions`` endpoint instead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from tqdm import tqdm

from rir_finetune.errors import UserError
from rir_finetune.llm import generation
from rir_finetune.llm.generation import GenerationSettings, Generator
from rir_finetune.llm.prompts import TASKS, build_prompt, resolve_template
from rir_finetune.prep.common import load_config, report
from rir_finetune.prep.io import Record, ResumableJsonl, check_output_path, read_records


@dataclass
class AugmentConfig:
    input: str | None = None  # JSONL records with a 'query' field
    output: str | None = None  # JSONL to write: the records plus 'answer'
    model: str | None = (
        None  # local causal LM folder (or a .gguf file); with api_base: the model name to request
    )
    gguf_file: str | None = None  # GGUF file inside the 'model' folder (transformers dequantises it)
    task: str = "generic"  # preset of task_description and query_type: a BEIR name (scifact, nfcorpus, ...)
    task_description: str | None = None  # first line of the prompt; None: the task preset's
    query_type: str | None = None  # what the query is (Question, Claim, Title...); None: the task preset's
    answer_type: str = "Passage"  # what to write
    prompt_template: str = "hyde"  # a template name, or a template with {query} (+ the three fields above)
    system_prompt: str | None = None  # optional system message for chat models
    use_chat_template: bool = True  # use the tokenizer's chat template when it has one
    max_new_tokens: int = 300  # answer length limit in tokens (upstream max_tokens)
    temperature: float = 0.0  # 0 = greedy decoding; > 0 samples
    top_p: float = 1.0  # nucleus sampling when temperature > 0
    batch_size: int = 8  # prompts generated together (and written together)
    seed: int = 42  # sampling seed (only matters when temperature > 0)
    device: str | None = None  # cpu, cuda, cuda:1 ...; None: cuda when available
    api_base: str | None = (
        None  # OpenAI-compatible endpoint, e.g. http://localhost:8000/v1; None: local model
    )
    api_key: str | None = field(
        default_factory=lambda: os.getenv("OPENAI_API_KEY")
    )  # bearer token for api_base
    api_timeout: float = 300.0  # seconds per request

    def __post_init__(self):
        if self.task not in TASKS:
            raise UserError(f"config key 'task': {self.task!r} is not one of {', '.join(TASKS)}")
        task_description, query_type = TASKS[self.task]
        self.task_description = (
            self.task_description if self.task_description is not None else task_description
        )
        self.query_type = self.query_type if self.query_type is not None else query_type
        for key in ("max_new_tokens", "batch_size"):
            if getattr(self, key) <= 0:
                raise UserError(f"config key {key!r}: must be a positive integer")
        if self.temperature < 0:
            raise UserError("config key 'temperature': must be >= 0")

    def generation_settings(self) -> GenerationSettings:
        """The generation backend's own settings, taken from this command's keys of the same names."""
        return GenerationSettings(**{f.name: getattr(self, f.name) for f in fields(GenerationSettings)})


def load_generator(cfg: AugmentConfig) -> Generator:
    """The generation backend for this command's settings."""
    return generation.load_generator(cfg.generation_settings())


# ----------------------------------------------------------------------------------------------------------------
# The resumable run


def _resume(records: list[Record], done: list[Record], partial: Path) -> dict[int, str]:
    """Answers an earlier run finished: ``{record index: answer}``.

    Records are matched by ``qid`` when every input record has a distinct one, else by line number; the query text
    must agree, so a partial file from another input is an error rather than silently wrong answers.
    """
    qids = [r.get("qid") for r in records]
    by_qid = all(q is not None for q in qids) and len(set(map(str, qids))) == len(qids)
    index = {str(q): i for i, q in enumerate(qids)} if by_qid else {}
    answers: dict[int, str] = {}
    for n, rec in enumerate(done):
        i = index.get(str(rec.get("qid"))) if by_qid else n
        if i is None or i >= len(records) or rec.get("query") != records[i]["query"] or "answer" not in rec:
            raise UserError(
                f"{partial}:{n + 1}: this unfinished output does not match the input (another input file?); "
                "delete it to start over"
            )
        answers[i] = rec["answer"]
    return answers


def augment(
    cfg: AugmentConfig,
    generator: Generator,
    after_batch: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Add an ``answer`` to every record of ``cfg.input`` and write ``cfg.output``; return the counts.

    ``after_batch(n)`` runs after the n-th batch (1-based) is safely written; tests use it to simulate a kill.
    """
    if not cfg.input:
        raise UserError("config key 'input' is required (the JSONL records to augment)")
    records = read_records(cfg.input, need_pos=False)
    out = check_output_path(cfg.input, cfg.output)
    template = resolve_template(cfg.prompt_template)
    writer = ResumableJsonl(out)
    answers = _resume(records, writer.done(), writer.partial)
    kept = len(answers)
    pending = [i for i in range(len(records)) if i not in answers]
    start = time.time()
    try:
        with tqdm(total=len(records), initial=kept, desc="augment", unit="query") as bar:
            for n, lo in enumerate(range(0, len(pending), cfg.batch_size), start=1):
                batch = pending[lo : lo + cfg.batch_size]
                prompts = [
                    build_prompt(
                        template, records[i]["query"], cfg.task_description, cfg.query_type, cfg.answer_type
                    )
                    for i in batch
                ]
                outputs = generator.generate(prompts)
                writer.append([{**records[i], "answer": a} for i, a in zip(batch, outputs, strict=True)])
                answers.update(zip(batch, outputs, strict=True))
                bar.update(len(batch))
                if after_batch is not None:
                    after_batch(n)
    finally:
        writer.close()
    writer.finish([{**r, "answer": answers[i]} for i, r in enumerate(records)])
    counts = {
        "records": len(records),
        "generated": len(pending),
        "kept": kept,
        "empty": sum(1 for a in answers.values() if not a.strip()),
    }
    lengths = [len(a.split()) for a in answers.values()]
    report(
        "augment",
        [
            f"{counts['records']} records: {counts['generated']} answers generated, "
            f"{counts['kept']} kept from an earlier run ({writer.partial.name})",
            f"generator {generator.name}, prompt template {cfg.prompt_template!r}, task {cfg.task!r}",
            f"answer length in words: mean {sum(lengths) / max(len(lengths), 1):.1f}, "
            f"{counts['empty']} empty answers",
            f"wrote {out} ({time.time() - start:.1f} s)",
        ],
    )
    return counts


def run_augment(config_file: str | None, overrides: list[str]) -> dict[str, int]:
    cfg = load_config(AugmentConfig, config_file, overrides)
    if not cfg.input:
        raise UserError("config key 'input' is required (the JSONL records to augment)")
    read_records(cfg.input, need_pos=False)  # fail on bad input before loading a model
    check_output_path(cfg.input, cfg.output)
    resolve_template(cfg.prompt_template)
    return augment(cfg, load_generator(cfg))
