"""Prompts and reply parsing for LLM teachers: RankGPT-style listwise ranking and UPR-style query likelihood.

Listwise (RankGPT, upstream Reinforced-IR's ``rank_prompt``): the LLM sees numbered passages ``[1] ... [n]`` and
answers with a permutation such as ``[2] > [1] > [3]``. :func:`parse_permutation` turns any reply into a complete
permutation: ids out of range and repeats are dropped, missing ids are appended in the order shown, and each repair
is counted. Lists longer than the window are ranked by :func:`window_spans`: windows from the end of the list to
its start, each re-ordering its slice in place, so the best passages bubble to the top.

Query likelihood (UPR, Sachan et al. 2022): a passage's score is the mean log-probability of the query's tokens
after a prompt that shows the passage and asks for a question about it.

Every function here is pure (strings in, strings or numbers out).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from rir_finetune.errors import UserError

# upstream's rank_prompt (research/Reinforced_IR/data_generation/prompts/teacher_prompts.py), with ids from 1 as
# in RankGPT; fields: {num}, {query}, {passages}
LISTWISE_TEMPLATE = (
    "This is RankGPT, an intelligent assistant that can rank passages based on their relevancy to the query.\n"
    "The following are {num} passages, each indicated by number identifier []. "
    "I can rank them based on their relevance to query: {query}\n"
    "{passages}\n"
    "The search query is: {query}\n"
    "I will rank the {num} passages above based on their relevance to the search query. The passages will be "
    "listed in descending order using identifiers, and the most relevant passages should be listed first, and the "
    "output format should be [] > [] > etc, e.g., [1] > [2] > etc.\n"
    "The ranking results of the {num} passages (only identifiers) is:"
)
LISTWISE_FIELDS = ("num", "query", "passages")

# UPR's instruction for a decoder-only LM; field: {passage}. The query is scored as the continuation " {query}".
QUERY_LIKELIHOOD_TEMPLATE = "Passage: {passage}\nPlease write a question based on this passage.\nQuestion:"
QUERY_LIKELIHOOD_FIELDS = ("passage",)


def check_template(key: str, template: str, fields: tuple[str, ...]) -> str:
    """``template`` when it has every one of ``fields`` and no other; else a UserError naming config ``key``."""
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise UserError(f"config key {key!r}: {e}") from None
    missing = [f for f in fields if f not in names]
    unknown = sorted(names - set(fields))
    if missing or unknown:
        bad = f"has no {{{missing[0]}}} field" if missing else f"has an unknown field {{{unknown[0]}}}"
        raise UserError(
            f"config key {key!r}: the template {bad}; its fields are "
            + ", ".join("{" + f + "}" for f in fields)
        )
    return template


def truncate_words(text: str, max_words: int | None) -> str:
    """The first ``max_words`` whitespace-separated words, joined by single spaces (RankGPT truncates by words)."""
    words = text.split()
    return " ".join(words if max_words is None else words[:max_words])


def listwise_prompt(
    query: str, passages: list[str], max_words: int | None = None, template: str = LISTWISE_TEMPLATE
) -> str:
    """The ranking prompt for ``passages`` (shown as ``[1]`` ... ``[n]`` in the order given)."""
    lines = "\n".join(f"[{i}] {truncate_words(p, max_words)}" for i, p in enumerate(passages, start=1))
    return template.format(num=len(passages), query=query.strip(), passages=lines)


def query_likelihood_prompt(
    passage: str, max_words: int | None = None, template: str = QUERY_LIKELIHOOD_TEMPLATE
) -> str:
    """The prompt whose continuation :func:`query_likelihood_continuation` is scored."""
    return template.format(passage=truncate_words(passage, max_words))


def query_likelihood_continuation(query: str, max_words: int | None = None) -> str:
    """What follows the prompt: the query after one space (it follows ``Question:``)."""
    return " " + truncate_words(query, max_words)


@dataclass
class ParsedRanking:
    """A complete permutation recovered from a reply, and what had to be repaired to get it."""

    order: list[int]  # 0-based positions in the list shown, best first; a permutation of range(n)
    parsed: int  # ids taken from the reply as they were
    repeated: int  # ids seen again after their first mention (dropped)
    out_of_range: int  # ids outside 1..n (dropped)
    missing: int  # ids never mentioned (appended in the order shown)

    @property
    def repaired(self) -> bool:
        return bool(self.repeated or self.out_of_range or self.missing)


_BRACKETED = re.compile(r"\[\s*(\d+)\s*\]")
_NUMBER = re.compile(r"\d+")


def parse_permutation(reply: str, n: int) -> ParsedRanking:
    """Turn an LLM reply to :func:`listwise_prompt` into a permutation of ``range(n)`` (0-based, best first).

    The ids are the bracketed numbers (``[3]``); a reply without any brackets falls back to its bare numbers
    (``3 > 1 > 2``). The first mention of an id counts; repeats and ids outside ``1..n`` are dropped; ids never
    mentioned follow in the order shown. ``"[2] > [1] > [2] > [5]"`` with ``n=4`` is ``[1, 0, 2, 3]`` with one
    repeat, one id out of range and two missing.
    """
    tokens = _BRACKETED.findall(reply) or _NUMBER.findall(reply)
    order: list[int] = []
    seen: set[int] = set()
    repeated = out_of_range = 0
    for tok in tokens:
        i = int(tok) - 1
        if not 0 <= i < n:
            out_of_range += 1
        elif i in seen:
            repeated += 1
        else:
            seen.add(i)
            order.append(i)
    missing = [i for i in range(n) if i not in seen]
    return ParsedRanking(
        order=order + missing,
        parsed=len(order),
        repeated=repeated,
        out_of_range=out_of_range,
        missing=len(missing),
    )


def window_spans(n: int, window_size: int, step: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` slices a sliding-window ranking of ``n`` passages visits, in order (RankGPT).

    From the end of the list towards its start, each window ``window_size`` long and ``step`` before the previous
    one (windows overlap, so a passage can climb from any window to the top); the last window starts at 0 (RankGPT's loop stops before reaching it when ``n - window_size`` is not a
    multiple of ``step``, leaving the first passages out). A list that fits is one window.
    """
    if window_size < 2 or not 0 < step < window_size:
        raise ValueError(f"need window_size >= 2 and 0 < step < window_size, got {window_size} and {step}")
    if n <= window_size:
        return [(0, n)]
    spans = []
    end = n
    while True:
        start = max(end - window_size, 0)
        spans.append((start, end))
        if start == 0:
            return spans
        end -= step
