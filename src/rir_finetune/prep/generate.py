"""``rir-finetune generate``: training queries for a corpus that has none (Reinforced-IR's data generation).

    rir-finetune generate data/cisi --output cisi.generated.jsonl --num_passages 2000 --queries_per_passage 1 \
        --backend llama_cpp --model SmolLM2-135M-Instruct.Q4_1.gguf --task cisi \
        --consistency_model all-MiniLM-L6-v2/ --consistency_top_k 3

Passages are sampled from the corpus (``num_passages`` with ``seed``; all when unset). For each passage and each
of ``queries_per_passage`` the LLM gets its own prompt (``llm/query_prompts.py``): the task, the kind of query and
passage, a drawn length and style, a few (passage, query) examples (the task's, or the user's own from
``examples``). Each pair then passes through the filters, each optional and counted in the summary, cheapest first:
empty reply, length bounds in words, duplicates (case and punctuation ignored, across the whole run), the LLM's own
0/1 quality check (upstream), and round-trip consistency (a retriever must rank the source passage within the top
``consistency_top_k`` of the whole corpus for the query; Promptagator).

A kept pair is a training record ``{"query", "pos": [passage], "pos_ids": [doc id], "qid", "generated": {...}}``
whose ``generated`` field holds its provenance: passage id, query number, the prompt variant, every filter score.
``mine``, ``augment``, ``score`` and ``train`` read it as it is. Every candidate, kept or dropped, is appended batch
by batch to ``OUT.partial`` (after a header line holding the settings), so a killed run restarts where it stopped
and yields the same records; a rerun with other settings is refused until the partial file is deleted.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from tqdm import tqdm

from rir_finetune import files, lifecycle, precision
from rir_finetune.config import load_config, option
from rir_finetune.errors import UserError, located
from rir_finetune.lifecycle import ResumableJsonl
from rir_finetune.llm.generation import BackendSettings, Sampling, load_backend
from rir_finetune.llm.query_prompts import (
    Example,
    QueryTask,
    clean_query,
    draw_variant,
    parse_judgement,
    quality_check_prompt,
    query_generation_prompt,
    resolve_task,
)
from rir_finetune.precision import DEVICE_HELP, ENCODE_DTYPE_HELP, PACK_HELP
from rir_finetune.prep.beir import read_corpus, sample_passages
from rir_finetune.prep.common import report
from rir_finetune.prep.io import Record
from rir_finetune.prep.query_filters import ConsistencyFilter, length_ok, normalize_query

HEADER = "generate_settings"  # key of the partial file's first line
# why a candidate was dropped, in filter order
DROP_REASONS = ("empty", "length", "example", "duplicate", "quality", "consistency")


@dataclass
class GenerateConfig(BackendSettings):
    """This command's keys plus every LLM-backend key (``llm.generation.BackendSettings``: backend, model, ...)."""

    POSITIONAL: ClassVar[tuple[str, ...]] = ("corpus",)  # `generate CORPUS`

    corpus: str | None = option(
        None, "BEIR folder (corpus.jsonl) or a JSONL file of {_id, text, title}; first argument"
    )
    output: str | None = option(None, "JSONL training records to write")
    num_passages: int | None = option(
        None, "passages sampled from the corpus with `seed`; None: every passage", range=">=1"
    )
    queries_per_passage: int = option(
        1, "queries asked for each passage (each with its own drawn prompt)", range=">=1"
    )
    seed: int = option(
        42,
        "passage sample, prompt variants and LLM sampling; the same seed gives the same records",
        range=">=0",
    )
    # prompts
    task: str = option("generic", "preset: a BEIR name (scifact, nfcorpus, ...), cisi or generic")
    task_description: str | None = option(None, "the retrieval task sentence; None: the preset's")
    query_type: str | None = option(None, "question, claim, title ...; None: the preset's")
    passage_type: str | None = option(None, "document, abstract, user reply ...; None: the preset's")
    mission: str | None = option(
        None, '"Generate a {query_type} that the {passage_type} can answer."; None: preset\'s'
    )
    examples: str | None = option(
        None, "JSONL of your own example queries ('query', optional 'passage'); None: preset's"
    )
    num_examples: int = option(
        0, "few-shot examples per prompt (upstream: 3); 0: none (small LLMs copy them)", range=">=0"
    )
    max_passage_chars: int = option(
        2000, "passages are cut to this many characters in prompts (upstream: 8000)", range=">=1"
    )
    # generation (the backend's own keys come from BackendSettings; batch_size is also the write unit here)
    max_new_tokens: int = option(64, "query length limit in tokens", range=">=1")
    temperature: float = option(0.2, "upstream's sampling temperature; 0 = greedy", range=">=0")
    top_p: float = option(1.0, "nucleus sampling when temperature > 0", range="(0, 1]")
    progress: bool = option(
        False, "the backend's own bar for every batch (this command shows one for the whole run)"
    )
    # filters
    min_query_words: int = option(3, "drop shorter queries; 0: no lower bound", range=">=0")
    max_query_words: int = option(64, "drop longer queries; 0: no upper bound", range=">=0")
    dedupe: bool = option(
        True, "drop a query already written for an earlier passage (case and punctuation ignored)"
    )
    quality_check: bool = option(True, "ask the LLM for 0/1 on every pair and keep the 1s (upstream)")
    consistency_model: str | None = option(
        None, "retriever folder for round-trip consistency; None: filter off"
    )
    consistency_top_k: int = option(
        3, "keep a pair when its passage ranks within this many for its query", range=">=1"
    )
    consistency_batch_size: int = option(
        64, "retriever: texts per forward pass on a CPU; on CUDA as many as fit", range=">=1"
    )
    consistency_device: str = option("auto", f"retriever: its device ({DEVICE_HELP})")
    consistency_dtype: str = option("auto", f"retriever: {ENCODE_DTYPE_HELP}")
    consistency_pack_sequences: bool | str = option("auto", f"retriever: {PACK_HELP}")
    cache_dir: str | None = option(None, "corpus-embedding cache; None: the evaluation default")
    use_cache: bool = option(True, "false: encode the corpus every time, store nothing")
    search_backend: str = option("auto", "auto (faiss when importable) | faiss | torch")

    def __post_init__(self):
        if self.max_query_words and self.min_query_words > self.max_query_words:
            raise UserError("config keys 'min_query_words' > 'max_query_words': no query could pass")
        self.consistency_dtype = precision.check_dtype(self.consistency_dtype, "consistency_dtype")
        self.consistency_pack_sequences = precision.true_false_or_auto(
            self.consistency_pack_sequences, "consistency_pack_sequences"
        )
        super().__post_init__()
        self.query_task: QueryTask = resolve_task(
            self.task, self.task_description, self.query_type, self.passage_type, self.mission
        )

    def backend_settings(self) -> BackendSettings:
        """The LLM backend's own settings (the keys this config inherits)."""
        return BackendSettings(**{f.name: getattr(self, f.name) for f in fields(BackendSettings)})

    def fingerprint(self) -> dict[str, Any]:
        """Settings that decide which candidates are written; a resumed run must have the same."""
        llm = ("backend", "model", "gguf_file", "use_chat_template", "system_prompt")
        skip = {f.name for f in fields(BackendSettings)} - set(llm)
        skip |= {"output", "progress", "consistency_batch_size", "consistency_device", "consistency_dtype",
                 "consistency_pack_sequences", "cache_dir", "use_cache", "search_backend"}  # fmt: skip
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        for key in (
            "corpus",
            "examples",
            "consistency_model",
            "model",
        ):  # a path is the same file from anywhere
            if out[key] and not (key == "model" and (self.backend == "openai" or self.api_base)):
                out[key] = str(Path(out[key]).resolve()) if Path(out[key]).exists() else out[key]
        if self.resolved_dtype():  # bf16 and fp32 write different queries; "auto" is resolved on this machine
            out["dtype"] = self.resolved_dtype()
        # bf16 ranks may differ; fp32 (a CPU's auto) is left out, so earlier runs' fingerprints still match
        if self.consistency_model:
            judge = precision.resolve_encode_dtype(
                self.consistency_dtype,
                precision.resolve_device(self.consistency_device, "consistency_device"),
            )
            if judge != "float32":
                out["consistency_dtype"] = judge
        return out


# ----------------------------------------------------------------------------------------------------------------
# Input: the corpus, the passage sample, the example queries


def read_examples(path: str | Path) -> list[Example]:
    """The user's example queries: JSONL lines with ``query`` and optionally ``passage`` (or ``text``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: examples file not found (config key 'examples')")
    out = []
    for line_no, obj in files.iter_jsonl(path):
        query, passage = obj.get("query"), obj.get("passage", obj.get("text"))
        if not isinstance(query, str) or not query.strip():
            raise located(path, line_no, "field 'query' must be a non-empty string")
        if passage is not None and not isinstance(passage, str):
            raise located(path, line_no, "field 'passage' must be a string")
        out.append(Example(query.strip(), passage.strip() if passage else None))
    if not out:
        raise UserError(f"{path}: no example queries (the file is empty)")
    return out


def check_input(cfg: GenerateConfig) -> tuple[list[str], list[str], Path, list[Example]]:
    """Doc ids, passage texts, the output path and the example pool, after checking every input."""
    if not cfg.corpus:
        raise UserError(
            "config key 'corpus' is required: rir-finetune generate CORPUS --output OUT --model M"
        )
    doc_ids, texts, corpus_file = read_corpus(cfg.corpus)
    if not any(t.strip() for t in texts):
        raise UserError(f"{corpus_file}: every passage is empty (no text to write queries for)")
    # never a corpus file, a file of the corpus folder or the examples (files.check_output_file)
    out = files.check_output_file(cfg.output, key="output", reads=(corpus_file, cfg.corpus, cfg.examples))
    pool = read_examples(cfg.examples) if cfg.examples else list(cfg.query_task.examples)
    return doc_ids, texts, out, pool


# ----------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class Unit:
    """One query to generate: the ``n``-th for corpus row ``row``."""

    row: int
    n: int


def _first_text(completions) -> str:
    return completions[0].text if completions else ""


class Generation:
    """Generates and filters one batch of units at a time; keeps the dedupe memory across batches."""

    def __init__(self, cfg, backend, doc_ids, texts, pool, consistency):
        self.cfg, self.backend, self.doc_ids, self.texts = cfg, backend, doc_ids, texts
        self.pool, self.consistency = pool, consistency
        self.seen: set[str] = set()
        self.example_queries = {normalize_query(e.query) for e in pool} if cfg.num_examples else set()

    def passage(self, row: int) -> str:
        return self.texts[row][: self.cfg.max_passage_chars]

    def prompt(self, unit: Unit) -> tuple[str, dict]:
        cfg = self.cfg
        rng = random.Random(f"{cfg.seed}:{self.doc_ids[unit.row]}:{unit.n}")  # str seeds are stable
        variant = draw_variant(cfg.query_task, rng, len(self.pool), cfg.num_examples)
        prompt = query_generation_prompt(cfg.query_task, self.passage(unit.row), variant, self.pool)
        return prompt, {"task": cfg.task, **variant.as_dict()}

    def remember(self, candidate: Record) -> None:
        """Add a candidate (from this run or an earlier one) to the dedupe memory when it got past dedupe."""
        if candidate["generated"]["dropped"] not in ("empty", "length", "example", "duplicate"):
            self.seen.add(normalize_query(candidate["query"]))

    def run(self, units: list[Unit], first: bool) -> list[Record]:
        cfg, task = self.cfg, self.cfg.query_task
        prompts, variants = zip(*(self.prompt(u) for u in units), strict=True)
        sampling = Sampling(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            n=1,
            seed=cfg.seed,
        )
        replies = [_first_text(c) for c in self.backend.generate(list(prompts), sampling)]
        if first and not any(r.strip() for r in replies):
            raise UserError(
                f"the LLM ({self.backend.name}) returned an empty reply to all {len(replies)} prompts of the first "
                "batch; nothing written (check the model, its chat template and max_new_tokens)"
            )
        out: list[Record] = []
        for unit, variant, reply in zip(units, variants, replies, strict=True):
            query = clean_query(reply)
            doc_id = self.doc_ids[unit.row]
            gen = {"passage_id": doc_id, "n": unit.n, "prompt": variant, "reply": reply, "quality": None,
                   "consistency_rank": None, "consistency_score": None, "dropped": None}  # fmt: skip
            if not query:
                gen["dropped"] = "empty"
            elif not length_ok(query, cfg.min_query_words, cfg.max_query_words):
                gen["dropped"] = "length"
            elif normalize_query(query) in self.example_queries:
                gen["dropped"] = "example"  # a copy of a few-shot example, not a query about this passage
            elif cfg.dedupe and normalize_query(query) in self.seen:
                gen["dropped"] = "duplicate"
            record = {"query": query, "pos": [self.texts[unit.row]], "pos_ids": [doc_id],
                      "qid": f"gen:{doc_id}:{unit.n}", "generated": gen}  # fmt: skip
            if cfg.dedupe and gen["dropped"] is None:
                self.seen.add(normalize_query(query))
            out.append(record)
        alive = [(r, u) for r, u in zip(out, units, strict=True) if r["generated"]["dropped"] is None]
        if cfg.quality_check and alive:
            judge = [quality_check_prompt(task, r["query"], self.passage(u.row)) for r, u in alive]
            verdicts = self.backend.generate(
                judge, Sampling(max_new_tokens=4, temperature=0.0, n=1, seed=cfg.seed)
            )
            for (r, _), c in zip(alive, verdicts, strict=True):
                r["generated"]["quality"] = parse_judgement(_first_text(c))
                if r["generated"]["quality"] != 1:
                    r["generated"]["dropped"] = "quality"
            alive = [(r, u) for r, u in alive if r["generated"]["dropped"] is None]
        if self.consistency is not None and alive:
            ranks = self.consistency([r["query"] for r, _ in alive], [u.row for _, u in alive])
            for (r, _), (rank, score) in zip(alive, ranks, strict=True):
                r["generated"]["consistency_rank"], r["generated"]["consistency_score"] = (
                    rank,
                    round(score, 6),
                )
                if rank is None:
                    r["generated"]["dropped"] = "consistency"
        return out


def _check_header(done: list[Record], cfg: GenerateConfig, partial: Path) -> list[Record]:
    """The candidates of an earlier run, after checking that it ran with the same settings."""
    if not done:
        return []
    header = done[0].get(HEADER)
    if not isinstance(header, dict):
        raise located(
            partial, 1, "not an unfinished `generate` output (no settings line); delete it to start over"
        )
    changed = lifecycle.changed_settings(header, cfg.fingerprint(), may_change=())
    if changed:
        raise UserError(
            f"{partial}: an unfinished run with other settings ({'; '.join(changed)}); rerun with its settings to "
            f"resume it, or delete {partial.name} to start over"
        )
    return done[1:]


def generate(
    cfg: GenerateConfig,
    backend,
    consistency: Callable[[list[str], list[int]], list[tuple[int | None, float]]] | None = None,
    after_batch: Callable[[int], None] | None = None,
    inputs: tuple[list[str], list[str], Path, list[Example]] | None = None,
) -> dict[str, int]:
    """Generate, filter and write training records for ``cfg.corpus``; return the counts.

    ``backend`` is an LLM backend (``llm.generation``); ``consistency`` the round-trip filter (None: off).
    ``after_batch(n)`` runs after the n-th batch of this run is safely written; tests use it to simulate a kill.
    ``inputs``: :func:`check_input`'s result when the caller has it (the corpus is read once).
    """
    start = time.time()
    doc_ids, texts, out, pool = inputs if inputs is not None else check_input(cfg)
    rows = sample_passages(texts, cfg.num_passages, cfg.seed)
    units = [Unit(row, n) for row in rows for n in range(cfg.queries_per_passage)]
    writer = ResumableJsonl(out)
    done = writer.done()
    earlier = _check_header(done, cfg, writer.partial)
    has_header = bool(done)
    state = Generation(cfg, backend, doc_ids, texts, pool, consistency)
    by_key = {}
    for c in earlier:
        by_key[(c["generated"]["passage_id"], c["generated"]["n"])] = c
        state.remember(c)
    wanted = {(doc_ids[u.row], u.n) for u in units}
    if not set(by_key) <= wanted:
        raise UserError(
            f"{writer.partial}: holds queries for passages this run does not sample; delete it to start over"
        )
    step = cfg.batch_size * cfg.queries_per_passage
    batches = [units[lo : lo + step] for lo in range(0, len(units), step)]
    n_done = 0
    try:
        with tqdm(total=len(units), initial=len(by_key), desc="generate", unit="query") as bar:
            for batch in batches:
                todo = [u for u in batch if (doc_ids[u.row], u.n) not in by_key]
                if not todo:
                    continue
                candidates = state.run(todo, first=not by_key)
                # the settings line goes with the first batch: a partial file never holds a header alone
                writer.append(([] if has_header else [{HEADER: cfg.fingerprint()}]) + candidates)
                has_header = True
                by_key.update({(c["generated"]["passage_id"], c["generated"]["n"]): c for c in candidates})
                bar.update(len(todo))
                n_done += 1
                if after_batch is not None:
                    after_batch(n_done)
    finally:
        writer.close()
    candidates = [by_key[(doc_ids[u.row], u.n)] for u in units]
    dropped = {reason: 0 for reason in DROP_REASONS}
    for c in candidates:
        if c["generated"]["dropped"]:
            dropped[c["generated"]["dropped"]] += 1
    kept = [_record(c) for c in candidates if not c["generated"]["dropped"]]
    counts = {"passages": len(rows), "corpus": len(texts), "candidates": len(units),
              "generated": len(units) - len(earlier), "resumed": len(earlier), "kept": len(kept),
              "unparsable": sum(1 for c in candidates if c["generated"]["dropped"] == "quality"
                                and c["generated"]["quality"] is None),
              **{f"dropped_{k}": v for k, v in dropped.items()}}  # fmt: skip
    _report(cfg, backend, counts, out if kept else None, time.time() - start)
    if not kept:
        raise UserError(
            f"no query passed the filters ({_filter_line(cfg, counts)}); {out} not written "
            f"(the candidates are in {writer.partial}: delete it and loosen the filters, or check the LLM)"
        )
    writer.finish(kept)
    return counts


def _record(candidate: Record) -> Record:
    """A kept candidate as a training record: the provenance without the internal fields."""
    gen = {k: v for k, v in candidate["generated"].items() if k not in ("dropped", "reply")}
    return {**candidate, "generated": gen}


def _filter_line(cfg: GenerateConfig, counts: dict[str, int]) -> str:
    bounds = f"{cfg.min_query_words}-{cfg.max_query_words or 'any'} words"
    parts = [f"empty {counts['dropped_empty']}", f"length ({bounds}) {counts['dropped_length']}"]
    if cfg.num_examples:
        parts.append(f"copy of an example {counts['dropped_example']}")
    parts.append(f"duplicate {counts['dropped_duplicate']}" if cfg.dedupe else "duplicate off")
    parts.append(
        f"quality check {counts['dropped_quality']} ({counts['unparsable']} without a 0/1)"
        if cfg.quality_check else "quality check off"
    )  # fmt: skip
    parts.append(
        f"consistency (top {cfg.consistency_top_k}) {counts['dropped_consistency']}"
        if cfg.consistency_model else "consistency off"
    )  # fmt: skip
    return "dropped: " + ", ".join(parts)


def _report(cfg, backend, counts, out, seconds) -> None:
    share = counts["kept"] / max(counts["candidates"], 1)
    report(
        "generate",
        [
            f"{counts['passages']} of {counts['corpus']} passages (seed {cfg.seed}) x {cfg.queries_per_passage} "
            f"= {counts['candidates']} queries asked: {counts['generated']} generated now, "
            f"{counts['resumed']} kept from an earlier run",
            f"LLM {backend.name}, task {cfg.task!r}, {cfg.num_examples} examples per prompt",
            _filter_line(cfg, counts),
            f"kept {counts['kept']} of {counts['candidates']} ({share:.1%})",
            f"wrote {out} ({seconds:.1f} s)" if out else f"nothing written ({seconds:.1f} s)",
        ],
    )


def run_generate(config_file: str | None, overrides: list[str]) -> dict[str, int]:
    """``rir-finetune generate``: check the input, load the LLM (and the retriever), generate."""
    cfg = load_config(GenerateConfig, config_file, overrides)
    inputs = check_input(cfg)  # fail on bad input before loading any model
    doc_ids, texts, _, _ = inputs
    if not cfg.model:
        raise UserError(
            "config key 'model' is required (the LLM: a model folder, a .gguf file or an API model)"
        )
    consistency = ConsistencyFilter(cfg, doc_ids, texts) if cfg.consistency_model else None
    return generate(cfg, load_backend(cfg.backend_settings()), consistency, inputs=inputs)
