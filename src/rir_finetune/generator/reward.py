"""``rir-finetune reward``: preference pairs for the generator, judged by a retriever (Reinforced-IR's RLRF).

    rir-finetune reward --input train.jsonl --output pairs.jsonl --retriever RETRIEVER_DIR \
        --backend transformers --model LLM_DIR [--gguf_file FILE.gguf] --task scifact --samples_per_query 5

Every record needs a query and a positive (``data from-beir`` output; the first of ``pos`` is the passage the query
is about). The generator writes K answers per query (``samples_per_query``, temperature 0.9, top_p 0.9: upstream's
sampling) through the llm backends, and the retriever scores each one as upstream does (FlagEmbedding
research/Reinforced_IR, ``generate_llm_dpo_train_data``)::

    e_aug = 0.8 e_q(query) + 0.2 e_q("Generate the topic about this passage: " + answer)
    score = e_aug . e_p(passage)             raw = e_q(query) . e_p(passage)

where ``e_q`` prepends the retriever folder's query prompt and ``e_p`` its passage prompt. The best answer is
``chosen``, the worst ``rejected``; the pair is kept when best > raw (the answer moves the query towards its
passage) and (best - 0.8 raw) * 0.95 >= (worst - 0.8 raw) (the answers' contributions differ by at least 5 %), and,
beyond upstream, when the two texts differ and neither is empty. Weights, prefix and threshold are config keys.

Output: one line per kept pair in TRL's preference format (``prompt`` as the generator saw it, ``chosen``,
``rejected``) plus ``chosen_score``, ``rejected_score``, ``raw_score`` (and ``qid``); ``samples_output`` optionally
keeps all K answers with their scores. Finished chunks of queries go to ``OUT.partial`` (synced); a restarted run
keeps them and samples only the rest (the backends seed every sample by prompt, sample number and ``seed``, so a
resumed run draws the same samples as an uninterrupted one).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from rir_finetune import files, precision
from rir_finetune.config import load_config, option
from rir_finetune.errors import UserError
from rir_finetune.lifecycle import ResumableJsonl, settings_fingerprint
from rir_finetune.llm.causal_lm import check_causal_lm, model_location
from rir_finetune.llm.common import BackendSettings
from rir_finetune.llm.prompts import AnswerPromptKeys, build_prompt, resolve_template
from rir_finetune.precision import DEVICE_HELP, ENCODE_DTYPE_HELP, PACK_HELP
from rir_finetune.retrieval import model_folder
from rir_finetune.retrieval.data import ANSWER_PREFIX

Record = dict[str, Any]

DROP_REASONS = ("not_better_than_query", "margin_too_small", "same_text", "empty_answer")


# ----------------------------------------------------------------------------------------------------------------
# The rule: pure functions of embeddings and scores


@dataclass(frozen=True)
class RewardRule:
    query_weight: float = 0.8  # share of the query embedding in e_aug
    answer_weight: float = 0.2  # share of the answer embedding in e_aug
    threshold: float = 0.95  # keep when (best - w_q raw) * threshold >= (worst - w_q raw)
    require_beats_query: bool = True  # upstream use_rule1: keep only when best > raw


def augmented_scores(
    q_rep: np.ndarray, a_reps: np.ndarray, p_rep: np.ndarray, query_weight: float, answer_weight: float
) -> np.ndarray:
    """Score of every answer: (w_q q + w_a a_k) . p.

    q_rep: (H,) query embedding; a_reps: (K, H) embeddings of the prefixed answers; p_rep: (H,) passage embedding.
    Returns (K,). The mixed embedding is not re-normalised (upstream does not).
    """
    aug = query_weight * q_rep[None, :] + answer_weight * a_reps  # (K, H)
    return aug @ p_rep  # (K,)


@dataclass(frozen=True)
class PairChoice:
    chosen: int  # index of the best answer (first one on ties)
    rejected: int  # index of the worst answer (first one on ties)
    dropped_by: str | None  # one of DROP_REASONS (the first rule that fails), None when the pair is kept


def choose_pair(scores: Sequence[float], raw: float, answers: Sequence[str], rule: RewardRule) -> PairChoice:
    """chosen = best, rejected = worst; keep when best > raw, the margin rule holds, the texts differ and neither
    is empty (an empty answer, which a model can write, is no text to train on)."""
    scores = np.asarray(scores, dtype=np.float64)
    best, worst = int(np.argmax(scores)), int(np.argmin(scores))
    hi, lo = float(scores[best]), float(scores[worst])
    offset = rule.query_weight * raw  # the query's part of every score; what is left is the answer's
    if rule.require_beats_query and not hi > raw:
        reason = "not_better_than_query"
    elif not (hi - offset) * rule.threshold >= lo - offset:
        reason = "margin_too_small"
    elif answers[best].strip() == answers[worst].strip():
        reason = "same_text"
    elif not answers[best].strip() or not answers[worst].strip():  # train-generator needs text on both sides
        reason = "empty_answer"
    else:
        reason = None
    return PairChoice(best, worst, reason)


def pair_prompt(prompt: str, system_prompt: str | None) -> str | list[dict[str, str]]:
    """The prompt in TRL's format: the plain text, or chat messages when a system message was sent with it."""
    if not system_prompt:
        return prompt
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}]


# ----------------------------------------------------------------------------------------------------------------
# The command


@dataclass
class RewardConfig(BackendSettings, AnswerPromptKeys):
    """reward's keys, the answer prompt's (as augment's) and the LLM backend's (the generator that is sampled)."""

    input: str | None = option(
        None, "JSONL records with 'query' and 'pos' (the first positive is the source passage)"
    )
    output: str | None = option(None, "JSONL of preference pairs (TRL format) to write")
    samples_output: str | None = option(None, "optional JSONL: every query's K answers with their scores")
    # the judge
    retriever: str | None = option(None, "retriever model folder that judges the answers")
    retriever_batch_size: int = option(
        64, "texts per forward pass of the retriever on a CPU; on CUDA as many as fit", range=">=1"
    )
    retriever_device: str = option("auto", f"the judge's device ({DEVICE_HELP})")
    retriever_dtype: str = option("auto", ENCODE_DTYPE_HELP.replace("the encoder's", "the judge's"))
    retriever_pack_sequences: bool | str = option("auto", f"the judge: {PACK_HELP}")
    retriever_max_length: int | None = option(
        None, "tokens per text; None: the folder's own limit", range=">=1"
    )
    query_instruction: str | None = option(
        None, "prepended to queries (and prefixed answers); None: the folder's prompt"
    )
    passage_instruction: str | None = option(None, "prepended to passages; None: the folder's passage prompt")
    # sampling
    samples_per_query: int = option(
        5, "K answers sampled per query (upstream 5; a pair needs 2)", range=">=2"
    )
    temperature: float = option(0.9, "sampling temperature (upstream 0.9)", range=">0")
    top_p: float = option(0.9, "nucleus sampling (upstream 0.9)", range="(0, 1]")
    max_new_tokens: int = option(300, "answer length limit in tokens", range=">=1")
    seed: int = option(
        42,
        "sampling seed (each sample's seed derives from it, the prompt and the sample number)",
        range=">=0",
    )
    # the rule (upstream's defaults)
    query_weight: float = option(
        0.8, "e_aug = query_weight e(query) + answer_weight e(prefix + answer)", range=">=0"
    )
    answer_weight: float = option(
        0.2, "the answer's share of e_aug (see query_weight); 0 would score every answer alike", range=">0"
    )
    answer_prefix: str = option(ANSWER_PREFIX, "put before every answer when it is encoded")
    threshold: float = option(
        0.95, "margin rule: (best - w_q raw) * threshold >= (worst - w_q raw)", range="[0, 1]"
    )
    require_beats_query: bool = option(True, "keep a pair only when best > raw (upstream use_rule1)")
    records_per_chunk: int = option(16, "queries sampled, scored and written together", range=">=1")

    def __post_init__(self):
        AnswerPromptKeys.__post_init__(self)
        BackendSettings.__post_init__(self)
        self.retriever_dtype = precision.check_dtype(self.retriever_dtype, "retriever_dtype")
        self.retriever_pack_sequences = precision.true_false_or_auto(
            self.retriever_pack_sequences, "retriever_pack_sequences"
        )

    @property
    def rule(self) -> RewardRule:
        return RewardRule(self.query_weight, self.answer_weight, self.threshold, self.require_beats_query)

    def fingerprint(self) -> str:
        """What the samples and scores of a partial file depend on; a resumed run must agree on all of it."""
        skip = {"output", "samples_output", "records_per_chunk", "retriever_batch_size", "retriever_device",
                "retriever_dtype", "retriever_pack_sequences", "device", "batch_size", "api_base", "n_ctx",
                "n_threads", "api_key_env", "api_timeout",
                "api_max_retries", "api_concurrency", "progress"}  # fmt: skip
        keep = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        keep["retriever"] = str(Path(self.retriever or "").resolve())
        keep["dtype"] = self.backend_settings().resolved_dtype()  # "auto" as resolved on this machine
        judge = precision.resolve_encode_dtype(
            self.retriever_dtype, precision.resolve_device(self.retriever_device, "retriever_device")
        )
        # bf16 scores differ; fp32 (a CPU's auto) is left out, so earlier runs' fingerprints still match
        if judge != "float32":
            keep["retriever_dtype"] = judge
        return settings_fingerprint(keep, length=16)


def check_record(record: Record) -> str | None:
    query = record.get("query")
    if not isinstance(query, str) or not query.strip():
        return "field 'query' must be a non-empty string"
    pos = record.get("pos")
    if not isinstance(pos, list) or not pos or not all(isinstance(p, str) and p.strip() for p in pos):
        return "field 'pos' must be a non-empty list of passages (reward scores answers against the positive)"
    return None


def _resume(records: list[Record], done: list[Record], partial: Path, key: str) -> dict[int, Record]:
    entries: dict[int, Record] = {}
    for n, entry in enumerate(done, start=1):
        i = entry.get("index")
        if entry.get("settings") != key:
            raise UserError(
                f"{partial}:{n}: this unfinished output was sampled or scored with other settings; "
                "delete it to start over"
            )
        if not isinstance(i, int) or not 0 <= i < len(records) or records[i]["query"] != entry.get("query"):
            raise UserError(
                f"{partial}:{n}: this unfinished output does not match the input (another input file?); "
                "delete it to start over"
            )
        entries[i] = entry
    return entries


class _Judge:
    """The retriever: embeddings of queries, prefixed answers and passages, by the engine's encoder."""

    def __init__(self, cfg: RewardConfig):

        from rir_finetune.retrieval.encoder import Encoder
        from rir_finetune.retrieval.model_folder import read_settings

        settings = read_settings(
            cfg.retriever,
            max_length=cfg.retriever_max_length,
            query_instruction=cfg.query_instruction,
            passage_instruction=cfg.passage_instruction,
        )
        device = precision.resolve_device(cfg.retriever_device, "retriever_device")
        self.encoder = Encoder(
            settings, batch_size=cfg.retriever_batch_size, device=device, show_progress=False,
            dtype=cfg.retriever_dtype, pack_sequences=cfg.retriever_pack_sequences,
        )  # fmt: skip
        self.cfg = cfg

    def score(self, queries: list[str], passages: list[str], answers: list[list[str]]) -> list[tuple]:
        """(scores (K,), raw) for every query."""
        cfg = self.cfg
        q_reps = self.encoder.encode_queries(queries)  # (B, H)
        p_reps = self.encoder.encode_passages(passages)  # (B, H)
        flat = [cfg.answer_prefix + a for group in answers for a in group]
        a_reps = self.encoder.encode_queries(flat)  # (B * K, H), upstream encodes them as queries
        out, start = [], 0
        for b, group in enumerate(answers):
            k_reps = a_reps[start : start + len(group)]  # (K, H)
            start += len(group)
            scores = augmented_scores(q_reps[b], k_reps, p_reps[b], cfg.query_weight, cfg.answer_weight)
            out.append((scores, float(q_reps[b] @ p_reps[b])))
        return out


def reward(
    cfg: RewardConfig,
    backend: Any,
    judge: Any,
    after_chunk: Callable[[int], None] | None = None,
    records: list[Record] | None = None,
) -> dict[str, int]:
    """Sample, score and write the pairs of ``cfg.input`` (``records``: its records, when already read); returns the
    counts.

    ``backend.generate(prompts, Sampling)`` gives K completions per prompt; ``judge.score(queries, passages,
    answers)`` gives (scores, raw) per query. ``after_chunk(n)`` runs after the n-th chunk is durable (tests).
    """
    from rir_finetune.llm.generation import Sampling

    records = records if records is not None else files.read_jsonl(cfg.input, check_record)
    out = check_outputs(cfg)
    template = resolve_template(cfg.prompt_template)
    key = cfg.fingerprint()
    # the prompt in the pairs is what the backend sent: chat messages when a system message went with it
    system_prompt = cfg.system_prompt if getattr(backend, "use_chat", True) else None
    partial = ResumableJsonl(out)
    entries = _resume(records, partial.done(), partial.partial, key)
    kept_earlier = len(entries)
    pending = [i for i in range(len(records)) if i not in entries]
    start = time.time()
    try:
        for n, lo in enumerate(range(0, len(pending), cfg.records_per_chunk), start=1):
            chunk = pending[lo : lo + cfg.records_per_chunk]
            prompts = [
                build_prompt(
                    template, records[i]["query"], cfg.task_description, cfg.query_type, cfg.answer_type
                )
                for i in chunk
            ]
            sampling = Sampling(
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                n=cfg.samples_per_query,
                seed=cfg.seed,
            )
            completions = backend.generate(prompts, sampling)
            answers = [[c.text.strip() for c in group] for group in completions]
            for i, group in zip(chunk, answers, strict=True):
                if len(group) != cfg.samples_per_query:
                    raise UserError(
                        f"backend {backend.name}: {len(group)} completions for record {i + 1}, "
                        f"asked for {cfg.samples_per_query}"
                    )
            judged = judge.score(
                [records[i]["query"] for i in chunk], [records[i]["pos"][0] for i in chunk], answers
            )
            new = []
            for i, prompt, group, (scores, raw) in zip(chunk, prompts, answers, judged, strict=True):
                entry = {"index": i, "query": records[i]["query"], "prompt": prompt, "answers": group,
                         "scores": [float(s) for s in scores], "raw_score": raw, "settings": key}  # fmt: skip
                if "qid" in records[i]:
                    entry["qid"] = records[i]["qid"]
                new.append(entry)
                entries[i] = entry
            partial.append(new)
            print(f"reward: {len(entries)}/{len(records)} queries sampled and scored", flush=True)
            if after_chunk is not None:
                after_chunk(n)
    finally:
        partial.close()

    pairs, samples = [], []
    counts = {"records": len(records), "sampled": len(pending), "kept_from_earlier_run": kept_earlier}
    counts.update({"pairs": 0, **{f"dropped_{r}": 0 for r in DROP_REASONS}})
    for i in range(len(records)):
        e = entries[i]
        choice = choose_pair(e["scores"], e["raw_score"], e["answers"], cfg.rule)
        sample = {k: e[k] for k in ("qid", "query", "prompt", "answers", "scores", "raw_score") if k in e}
        samples.append({**sample, "chosen": choice.chosen, "rejected": choice.rejected,
                        "dropped_by": choice.dropped_by})  # fmt: skip
        if choice.dropped_by is not None:
            counts[f"dropped_{choice.dropped_by}"] += 1
            continue
        pair = {
            "prompt": pair_prompt(e["prompt"], system_prompt),
            "chosen": e["answers"][choice.chosen],
            "rejected": e["answers"][choice.rejected],
            "chosen_score": e["scores"][choice.chosen],
            "rejected_score": e["scores"][choice.rejected],
            "raw_score": e["raw_score"],
        }
        if "qid" in e:
            pair["qid"] = e["qid"]
        pairs.append(pair)
    counts["pairs"] = len(pairs)
    if cfg.samples_output:
        files.write_jsonl(Path(cfg.samples_output), samples)
    if not pairs:  # a run that kept nothing is not a success; the scored samples stay in the partial file
        dropped = ", ".join(f"{counts[f'dropped_{r}']} {r}" for r in DROP_REASONS)
        raise UserError(
            f"{out}: no preference pair kept of {counts['records']} queries ({dropped}); loosen threshold, sample "
            "more (samples_per_query) or set require_beats_query false"
            + (f"; every answer with its score is in {cfg.samples_output}" if cfg.samples_output else "")
        )
    files.write_jsonl(out, pairs)
    partial.remove()
    all_scores = [s for e in entries.values() for s in e["scores"]]
    raws = [e["raw_score"] for e in entries.values()]
    dropped = ", ".join(f"{counts[f'dropped_{r}']} {r}" for r in DROP_REASONS)
    print("reward:")
    print(f"  {counts['records']} queries x {cfg.samples_per_query} answers: {counts['sampled']} sampled now, "
          f"{kept_earlier} kept from an earlier run ({partial.partial.name})")  # fmt: skip
    print(f"  pairs kept: {counts['pairs']}; dropped: {dropped}")
    print(f"  mean answer score {np.mean(all_scores):.4f}, mean raw (query-only) score {np.mean(raws):.4f}")
    print(f"  backend {backend.name}, retriever {cfg.retriever}")
    print(f"  wrote {out}" + (f" and {cfg.samples_output}" if cfg.samples_output else "")
          + f" ({time.time() - start:.1f} s)", flush=True)  # fmt: skip
    return counts


def check_outputs(cfg: RewardConfig) -> Path:
    reads = [cfg.input, cfg.retriever, cfg.model]
    out = files.check_output_file(cfg.output, key="output", reads=reads)
    if cfg.samples_output:
        samples = files.check_output_file(cfg.samples_output, key="samples_output", reads=reads)
        if samples.resolve() == out.resolve():
            raise UserError("config keys 'output' and 'samples_output' name the same file")
    return out


def check_inputs(cfg: RewardConfig) -> list[Record]:
    """Everything that can fail on bad input, before a model loads or a file is written; returns the records."""
    if not cfg.input:
        raise UserError("config key 'input' is required (JSONL records with 'query' and 'pos')")
    if not cfg.retriever:
        raise UserError("config key 'retriever' is required (the retriever folder that judges the answers)")
    records = files.read_jsonl(cfg.input, check_record)
    check_outputs(cfg)
    resolve_template(cfg.prompt_template)
    from rir_finetune.retrieval.model_folder import read_settings

    settings = read_settings(cfg.retriever)
    model_folder.check_model_folder(
        cfg.retriever, key="retriever", transformer_dir=Path(settings.transformer_dir)
    )
    if cfg.backend != "openai":  # a local generator (an API model is a name)
        folder, gguf = model_location(cfg.model, cfg.gguf_file)
        check_causal_lm(folder, gguf)
    return records


def run_reward(config_file: str | None, overrides: list[str] | dict) -> dict[str, int]:
    """``rir-finetune reward``: config file + ``--key value`` overrides -> pairs file; returns the counts."""
    from rir_finetune.llm.generation import load_backend

    cfg = load_config(RewardConfig, config_file, overrides)
    records = check_inputs(cfg)
    backend = load_backend(cfg.backend_settings())
    return reward(cfg, backend, _Judge(cfg), records=records)
