"""The LLM teacher of ``rir-finetune score --model_type llm``: listwise ranking (RankGPT) or query likelihood (UPR).

    rir-finetune score --input train_hn.jsonl --output train_hn_llm.jsonl --model_type llm \
        --backend llama_cpp --model SmolLM2-135M-Instruct.Q4_1.gguf --llm_teacher query_likelihood

Both rank a record's passages (its ``pos`` then its ``neg``) through an LLM backend (``llm/generation.py``):

- ``listwise`` (upstream Reinforced-IR): the LLM reads numbered passages and answers with a permutation
  (``[2] > [1] > ...``); lists longer than ``window_size`` are ranked with overlapping windows from the end of the list
  to its start (``step`` apart). Broken replies are repaired (``llm/rank_prompts.py``) and the repairs counted.
  A passage ranked ``r`` (1 = best) scores ``1 / r``.
- ``query_likelihood``: a passage scores the mean log-probability of the query's tokens after a prompt that shows the
  passage and asks for a question about it (the backend's ``score``); small LLMs do this far better than ranking.

``label_mode`` chooses what is written: ``scores`` keeps ``pos`` / ``neg`` as they are and adds ``pos_scores`` /
``neg_scores`` aligned with them; ``upstream`` rewrites the record as upstream does: the teacher's top passage becomes
the only ``pos`` (score 1), the rest become ``neg`` in the teacher's order, scored 1/2, 1/3, ...
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

from rir_finetune.config import option
from rir_finetune.errors import UserError
from rir_finetune.llm.generation import BackendSettings, PromptTooLong, Sampling
from rir_finetune.llm.rank_prompts import (
    LISTWISE_FIELDS,
    LISTWISE_TEMPLATE,
    QUERY_LIKELIHOOD_FIELDS,
    QUERY_LIKELIHOOD_TEMPLATE,
    check_template,
    listwise_prompt,
    parse_permutation,
    query_likelihood_continuation,
    query_likelihood_prompt,
    truncate_words,
    window_spans,
)
from rir_finetune.prep.io import Record

LLM_TEACHERS = ("listwise", "query_likelihood")
LABEL_MODES = ("scores", "upstream")


@dataclass
class LLMTeacherKeys(BackendSettings):
    """``score``'s keys for ``--model_type llm``: the LLM backend's (as for ``generate``) and the teacher's own."""

    llm_teacher: str = option(
        "listwise", "listwise (RankGPT) | query_likelihood (UPR: mean log p(query | passage))"
    )
    label_mode: str = option(
        "scores", "scores: pos_scores/neg_scores in data order | upstream: top passage -> pos"
    )
    window_size: int = option(
        20, "listwise: passages per prompt (RankGPT 20); longer lists slide a window", range=">=2"
    )
    step: int = option(
        10, "listwise: how far each window moves towards the top (RankGPT 10); < window_size", range=">=1"
    )
    max_new_tokens: int | None = option(
        None, "listwise reply limit in tokens; None: 6 per passage shown + 8", range=">=1"
    )
    passage_max_words: int | None = option(
        100, "passages cut to this many words in prompts; None: whole", range=">=1"
    )
    query_max_words: int | None = option(
        None, "queries cut to this many words in prompts and as scored; None: whole", range=">=1"
    )
    shuffle_passages: bool = option(
        False, "listwise: show passages in a seeded random order (default: pos first)"
    )
    seed: int = option(
        42, "shuffle_passages order (per query text), and the backend's sampling seed", range=">=0"
    )
    listwise_template: str = option(LISTWISE_TEMPLATE, "fields {num}, {query}, {passages}")
    ql_template: str = option(QUERY_LIKELIHOOD_TEMPLATE, "field {passage}; the query follows after one space")


def check_keys(cfg: LLMTeacherKeys) -> None:
    """UserError naming the first bad LLM-teacher key."""
    if not getattr(cfg, "model", None):
        raise UserError(
            "config key 'model' is required: the LLM (a folder, a .gguf file, or the endpoint's model name)"
        )
    if cfg.llm_teacher not in LLM_TEACHERS:
        raise UserError(
            f"config key 'llm_teacher': {cfg.llm_teacher!r} is not one of {', '.join(LLM_TEACHERS)}"
        )
    if cfg.label_mode not in LABEL_MODES:
        raise UserError(f"config key 'label_mode': {cfg.label_mode!r} is not one of {', '.join(LABEL_MODES)}")
    if not 0 < cfg.step < cfg.window_size:
        raise UserError(
            f"config key 'step': must be between 1 and window_size - 1 ({cfg.window_size - 1}), "
            "so that windows overlap"
        )
    check_template("listwise_template", cfg.listwise_template, LISTWISE_FIELDS)
    check_template("ql_template", cfg.ql_template, QUERY_LIKELIHOOD_FIELDS)


# ----------------------------------------------------------------------------------------------------------------
# From a ranking to the record written (pure)


def reciprocal_rank_scores(order: list[int]) -> list[float]:
    """Scores in data order for a ranking (``order[0]`` is the best data index): rank r scores 1 / r."""
    scores = [0.0] * len(order)
    for rank, i in enumerate(order, start=1):
        scores[i] = 1.0 / rank
    return scores


def ranking_of(scores: list[float]) -> list[int]:
    """Data indices from the highest score to the lowest; ties keep data order."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def labelled_record(
    record: Record, order: list[int], scores: list[float], label_mode: str, name: str
) -> Record:
    """The record as written: scores aligned with ``pos`` / ``neg`` (``scores``) or upstream's relabelling.

    ``order`` ranks the data indices (``pos`` first, then ``neg``), ``scores`` are in data order. ``upstream``: the
    first of ``order`` is the only ``pos`` (score 1), the rest are ``neg`` in that order scored 1/2, 1/3, ...;
    ``pos_ids`` / ``neg_ids`` follow their passages when the record has both, else they are dropped.
    """
    pos, neg = record["pos"], record.get("neg") or []
    if label_mode == "scores":
        return {**record, "pos_scores": scores[: len(pos)], "neg_scores": scores[len(pos) :], "teacher": name}
    passages = [*pos, *neg]
    out = {k: v for k, v in record.items() if k not in ("pos_ids", "neg_ids")}
    out |= {"pos": [passages[order[0]]], "neg": [passages[i] for i in order[1:]]}
    ids = [*(record.get("pos_ids") or []), *(record.get("neg_ids") or [])]
    if "pos_ids" in record and "neg_ids" in record and len(ids) == len(passages):
        out |= {"pos_ids": [ids[order[0]]], "neg_ids": [ids[i] for i in order[1:]]}
    rr = [1.0 / rank for rank in range(1, len(order) + 1)]
    return out | {"pos_scores": rr[:1], "neg_scores": rr[1:], "teacher": name}


# ----------------------------------------------------------------------------------------------------------------
# The teacher


class LLMTeacher:
    """Ranks every record's passages with an LLM backend; ``score.py`` calls :meth:`score_records` per chunk."""

    def __init__(self, cfg: Any, backend=None):
        check_keys(cfg)
        self.cfg = cfg
        if backend is None:
            from rir_finetune.llm.generation import load_backend

            backend = load_backend(cfg.backend_settings())
        self.backend = backend
        self.name = f"{backend.name} {cfg.llm_teacher}"  # e.g. SmolLM2-135M-Instruct.Q4_1.gguf listwise
        self.counts: Counter[str] = Counter()

    # -- listwise ------------------------------------------------------------------------------------------------

    def _shown_order(self, record: Record, n: int) -> list[int]:
        order = list(range(n))
        if self.cfg.shuffle_passages:  # seeded by the query text: the same whatever the chunking
            random.Random(f"{self.cfg.seed}\0{record['query']}").shuffle(order)
        return order

    def _listwise(self, records: list[Record]) -> list[list[int]]:
        """The LLM's ranking (data indices, best first) of every record; windows of all records batched."""
        cfg = self.cfg
        passages = [[*r["pos"], *(r.get("neg") or [])] for r in records]
        orders = [self._shown_order(r, len(p)) for r, p in zip(records, passages, strict=True)]
        spans = [window_spans(len(p), cfg.window_size, cfg.step) if len(p) > 1 else [] for p in passages]
        for k in range(max(map(len, spans), default=0)):  # the k-th window of every record that has one
            todo = [(i, s[k]) for i, s in enumerate(spans) if k < len(s)]
            prompts = [
                listwise_prompt(
                    truncate_words(records[i]["query"], cfg.query_max_words),
                    [passages[i][j] for j in orders[i][a:b]],
                    cfg.passage_max_words,
                    cfg.listwise_template,
                )
                for i, (a, b) in todo
            ]
            longest = max(b - a for _, (a, b) in todo)
            sampling = Sampling(
                max_new_tokens=cfg.max_new_tokens or 6 * longest + 8, temperature=0.0, seed=cfg.seed
            )
            try:
                replies = self.backend.generate(prompts, sampling)
            except PromptTooLong as e:
                i, (a, b) = todo[e.index]
                raise _too_long(records[i], f"the listwise prompt of {b - a} passages", e) from None
            for (i, (a, b)), completions in zip(todo, replies, strict=True):
                parsed = parse_permutation(completions[0].text if completions else "", b - a)
                self.counts["windows"] += 1
                self.counts["repaired"] += parsed.repaired
                self.counts["no_ids"] += parsed.parsed == 0
                self.counts["kept_shown_order"] += parsed.order == list(range(b - a))
                for key in ("repeated", "out_of_range", "missing"):
                    self.counts[key] += getattr(parsed, key)
                window = orders[i][a:b]
                orders[i][a:b] = [window[j] for j in parsed.order]
        return orders

    # -- query likelihood ----------------------------------------------------------------------------------------

    def _query_likelihood(self, records: list[Record]) -> list[list[float]]:
        """Mean log p(query tokens | prompt with the passage) for every passage of every record, in data order."""
        cfg = self.cfg
        prompts, continuations, sizes, starts = [], [], [], []
        for r in records:
            passages = [*r["pos"], *(r.get("neg") or [])]
            starts.append(len(prompts))
            sizes.append(len(passages))
            prompts += [query_likelihood_prompt(p, cfg.passage_max_words, cfg.ql_template) for p in passages]
            continuations += [query_likelihood_continuation(r["query"], cfg.query_max_words)] * len(passages)
        try:
            logprobs = self.backend.score(prompts, continuations) if prompts else []
        except PromptTooLong as e:
            record = next(r for r, lo in zip(records, starts, strict=True) if lo <= e.index < lo + len_of(r))
            raise _too_long(record, "a query-likelihood prompt", e) from None
        if len(logprobs) != len(prompts):
            raise UserError(
                f"LLM backend {self.backend.name}: {len(logprobs)} scores for {len(prompts)} prompts"
            )
        means = []
        for lp, continuation in zip(logprobs, continuations, strict=True):
            if not lp:
                raise UserError(
                    f"LLM backend {self.backend.name}: no tokens scored for the query {continuation!r}"
                )
            means.append(sum(lp) / len(lp))
        self.counts["pairs"] += len(prompts)
        out, k = [], 0
        for n in sizes:
            out.append(means[k : k + n])
            k += n
        return out

    # -- both ----------------------------------------------------------------------------------------------------

    def score_records(self, records: list[Record], name: str) -> list[Record]:
        """The records as written (``label_mode``), each naming ``name`` as its teacher."""
        if self.cfg.llm_teacher == "listwise":
            orders = self._listwise(records)
            scores = [reciprocal_rank_scores(o) for o in orders]
        else:
            scores = self._query_likelihood(records)
            orders = [ranking_of(s) for s in scores]
        out = []
        for r, order, s in zip(records, orders, scores, strict=True):
            if r.get("neg"):
                self.counts["with_neg"] += 1
                self.counts["positive_first"] += order[0] < len(r["pos"])
            out.append(labelled_record(r, order, s, self.cfg.label_mode, name))
        return out

    def summary_lines(self) -> list[str]:
        """What the run's summary adds for this teacher: how often a positive came first, what was repaired."""
        c = self.counts
        lines = [
            f"LLM teacher ({self.cfg.llm_teacher}, label_mode {self.cfg.label_mode}): a positive ranked first in "
            f"{c['positive_first']} of {c['with_neg']} records with negatives"
        ]
        if self.cfg.llm_teacher == "listwise":
            lines.append(
                f"{c['windows']} ranking replies: {c['repaired']} repaired ({c['repeated']} repeated ids, "
                f"{c['out_of_range']} out of range, {c['missing']} missing appended), {c['no_ids']} without any id, "
                f"{c['kept_shown_order']} in the order shown"
            )
        return lines


def len_of(record: Record) -> int:
    return len(record["pos"]) + len(record.get("neg") or [])


def _too_long(record: Record, what: str, error: PromptTooLong) -> UserError:
    """The backend's context error, naming the record and the keys that shorten the prompt."""
    which = f"qid {record['qid']}" if "qid" in record else f"query {record['query'][:60]!r}"
    return UserError(
        f"record {which}: {what} does not fit the LLM's context ({error}); lower window_size or "
        "passage_max_words, or raise n_ctx"
    )
