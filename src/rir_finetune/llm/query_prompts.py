"""Prompts for query generation: ask an LLM to write a query that a passage answers, then to judge the pair.

Reinforced-IR starts from an unlabeled corpus: for each sampled passage the LLM is told the retrieval task, what
kind of text the query is (a question, a claim, a title...) and what the passage is, and asked for one query of a
randomly drawn length and language style, optionally after a few (passage, query) examples. The same LLM then
answers 0 or 1: does the passage really answer (support, refute...) the query? ``QUERY_TASKS`` holds those settings
for the BEIR datasets (and CISI); ``--task NAME`` picks one and ``task_description`` / ``query_type`` /
``passage_type`` / ``mission`` override it. The length and style weights are upstream's.

Everything random is drawn from a ``random.Random`` the caller seeds per (passage, query number), so a prompt does
not depend on batching or on what an earlier run already finished.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from rir_finetune.errors import UserError


@dataclass(frozen=True)
class Example:
    query: str
    passage: str | None = None  # None: a query on its own (the user's examples may have no passage)


@dataclass(frozen=True)
class QueryTask:
    description: str  # the retrieval task as an instruction ("Given a question, retrieve ...")
    query_type: str  # what a query is: question, scientific claim, paper title ...
    passage_type: str  # what a passage is: document, user reply, paper abstract ...
    mission: str  # what to write; may use {query_type}, {passage_type} and {stance} (supported / refuted)
    relation: tuple[str, str] = ("can answer", "cannot answer")  # quality check: the passage ... the query
    examples: tuple[Example, ...] = field(default=(), repr=False)  # few-shot (passage, query) pairs


_ANSWER = "Generate a {query_type} that the {passage_type} can answer."
_STANCE = "Generate a {query_type} that can be {stance} by the {passage_type}."
_SUPPORT = ("can support or refute", "can neither support nor refute")

# Short examples written for this tool (not taken from any benchmark's queries).
_QUESTION_EXAMPLES = (
    Example(
        "what causes the northern lights",
        "Aurora. An aurora is a natural light display in the sky, seen mostly near the Arctic and Antarctic. "
        "It happens when charged particles of the solar wind hit gases of the upper atmosphere.",
    ),
    Example(
        "How long can a tardigrade survive without water?",
        "Tardigrades are micro-animals that survive extreme conditions. Dried out, they enter a state called "
        "cryptobiosis in which they can live for decades and revive within hours when given water.",
    ),
)
_CLAIM_EXAMPLES = (
    Example(
        "Regular aerobic exercise lowers resting blood pressure in adults with hypertension.",
        "In a trial of 120 adults with stage 1 hypertension, 12 weeks of supervised aerobic training reduced "
        "systolic blood pressure by 7 mmHg compared with controls.",
    ),
    Example(
        "Vitamin C supplements do not shorten the common cold in the general population.",
        "A meta-analysis of 29 trials found that routine vitamin C supplementation did not reduce the duration "
        "of colds, except in people under heavy physical stress.",
    ),
)
_LIBRARY_EXAMPLES = (
    Example(
        "How do users of a university library decide which catalogue records to look at?",
        "A study of 300 catalogue searches at a university library showed that users judged records mainly by "
        "title and date, and rarely used subject headings to refine their searches.",
    ),
    Example(
        "automatic indexing compared with manual indexing",
        "Experiments with automatically assigned index terms show retrieval effectiveness close to that of "
        "terms chosen by trained indexers, at a fraction of the cost.",
    ),
)


def _task(description, query_type, passage_type, mission=_ANSWER, relation=("can answer", "cannot answer"),
          examples=_QUESTION_EXAMPLES) -> QueryTask:  # fmt: skip
    return QueryTask(description, query_type, passage_type, mission, relation, examples)


QUERY_TASKS: dict[str, QueryTask] = {
    "generic": _task("Given a question, retrieve passages that answer the question.", "question", "passage"),
    "cisi": _task(
        "Given a question about library and information science, retrieve documents that answer it.",
        "question", "document", examples=_LIBRARY_EXAMPLES,
    ),
    "scifact": _task(
        "Given a scientific claim, retrieve documents that support or refute the claim.",
        "scientific claim", "document", _STANCE, _SUPPORT, _CLAIM_EXAMPLES,
    ),
    "fever": _task(
        "Given a claim, retrieve documents that support or refute the claim.",
        "claim", "document", _STANCE, _SUPPORT, _CLAIM_EXAMPLES,
    ),
    "climate-fever": _task(
        "Given a claim about climate change, retrieve documents that support or refute the claim.",
        "claim", "document", "Generate a {query_type} about climate change that can be {stance} by the "
        "{passage_type}.", _SUPPORT, _CLAIM_EXAMPLES,
    ),
    "nfcorpus": _task("Given a question, retrieve documents that best answer the question.", "question",
                      "document"),
    "trec-covid": _task(
        "Given a query on COVID-19, retrieve documents that answer the query.", "query", "document",
        "Generate a {query_type} on COVID-19 that the {passage_type} can answer.",
    ),
    "fiqa": _task("Given a financial question, retrieve user replies that best answer the question.",
                  "financial question", "user reply"),
    "nq": _task("Given a question, retrieve Wikipedia passages that answer the question.", "question",
                "Wikipedia passage"),
    "hotpotqa": _task("Given a multi-hop question, retrieve documents that help answer the question.",
                      "multi-hop question", "document"),
    "msmarco": _task(
        "Given a web search query, retrieve passages that answer the query.", "web search query", "passage",
        "Generate a {query_type} that is relevant to the {passage_type}.",
        ("is relevant to", "is not relevant to"),
    ),
    "dbpedia-entity": _task(
        "Given a query, retrieve relevant entity descriptions from DBpedia.", "query", "entity description",
        "Generate a {query_type} that is relevant to the {passage_type} from DBpedia.",
        ("is relevant to", "is not relevant to"),
    ),
    "arguana": _task(
        "Given a claim, find documents that refute the claim.", "claim", "document",
        "Generate a {query_type} that can be refuted by the {passage_type}.", ("can refute", "cannot refute"),
        _CLAIM_EXAMPLES,
    ),
    "webis-touche2020": _task(
        "Given a question, retrieve detailed and persuasive arguments that answer the question.", "question",
        "argument", "Generate a yes/no {query_type} that the detailed and persuasive {passage_type} can answer.",
    ),
    "scidocs": _task(
        "Given a scientific paper title, retrieve abstracts of papers that the paper cites.",
        "scientific paper title", "paper abstract",
        "Generate a {query_type} of a paper that would cite the paper with the given {passage_type}.",
        ("is possibly cited by the paper with", "is not possibly cited by the paper with"), (),
    ),
    "quora": _task(
        "Given a question, retrieve questions that are semantically equivalent to the given question.",
        "question", "question", "Generate a {query_type} that is semantically equivalent to the given "
        "{passage_type}.", ("is semantically equivalent to", "is not semantically equivalent to"),
    ),
    "cqadupstack": _task(
        "Given a question, retrieve detailed question descriptions from StackExchange that duplicate it.",
        "question", "question description",
        "Generate a {query_type} that duplicates the given {passage_type} from StackExchange.",
        ("is a duplicate of", "is not a duplicate of"),
    ),
}  # fmt: skip

# (value, weight): upstream's distributions of requested length and style
QUERY_LENGTHS = (
    ("less than 5 words", 2),
    ("5 to 10 words", 5),
    ("10 to 15 words", 4),
    ("at least 15 words", 1),
)
CLAIM_LENGTHS = (("10 to 15 words", 5), ("at least 15 words", 2))
QUERY_STYLES = (
    ("plain and simple", 4), ("common and formal", 4), ("casual and informal", 2), ("professional and complex", 1),
)  # fmt: skip
STANCES = ("supported", "refuted")


def resolve_task(
    name: str,
    task_description: str | None = None,
    query_type: str | None = None,
    passage_type: str | None = None,
    mission: str | None = None,
) -> QueryTask:
    """The preset ``name`` with any of the given fields replacing the preset's."""
    if name not in QUERY_TASKS:
        raise UserError(f"config key 'task': {name!r} is not one of {', '.join(QUERY_TASKS)}")
    preset = QUERY_TASKS[name]
    task = QueryTask(
        description=task_description or preset.description,
        query_type=query_type or preset.query_type,
        passage_type=passage_type or preset.passage_type,
        mission=mission or preset.mission,
        relation=preset.relation,
        examples=preset.examples,
    )
    try:
        task.mission.format(query_type="q", passage_type="p", stance="s")
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(
            f"config key 'mission': {task.mission!r} may only use {{query_type}}, {{passage_type}}, {{stance}} ({e})"
        ) from None
    return task


@dataclass(frozen=True)
class Variant:
    """What was drawn for one prompt; written into every record's provenance."""

    length: str
    style: str
    stance: str | None  # supported / refuted for claim missions, else None
    examples: tuple[int, ...]  # indices into the example pool, in prompt order

    def as_dict(self) -> dict:
        return {
            "length": self.length,
            "style": self.style,
            "stance": self.stance,
            "examples": list(self.examples),
        }


def draw_variant(task: QueryTask, rng: random.Random, pool_size: int, num_examples: int) -> Variant:
    """Length, style, stance and few-shot examples for one prompt (claims get the longer lengths)."""
    lengths = CLAIM_LENGTHS if "claim" in task.query_type.lower() else QUERY_LENGTHS
    length = rng.choices([v for v, _ in lengths], weights=[w for _, w in lengths])[0]
    style = rng.choices([v for v, _ in QUERY_STYLES], weights=[w for _, w in QUERY_STYLES])[0]
    stance = rng.choice(STANCES) if "{stance}" in task.mission else None
    examples = tuple(rng.sample(range(pool_size), min(num_examples, pool_size)))
    return Variant(length, style, stance, examples)


def _fence(text: str) -> str:
    return f"```\n{text}\n```"


def query_generation_prompt(task: QueryTask, passage: str, variant: Variant, pool: list[Example]) -> str:
    """The user message asking for one query that ``passage`` answers, in the drawn length and style."""
    q, p = task.query_type, task.passage_type
    mission = task.mission.format(query_type=q, passage_type=p, stance=variant.stance or "supported")
    parts = [
        f"Here is a retrieval task (Task) and a {p} (Passage):",
        f"Task: {task.description}",
        f"Passage:\n{_fence(passage)}",
        f"Given the retrieval task and the {p}, your mission is to:\n- {mission}",
        "Note:\n"
        f'- The {q} must not use pronouns that point at the passage ("this", "that", "it", "there", "here").\n'
        f"- The {q} should be clear and {variant.length} long.\n"
        f"- The {q} should be {variant.style} in its language style.",
    ]
    shots = [pool[i] for i in variant.examples]
    if shots and all(e.passage for e in shots):
        lines = ["Examples:"]
        for n, e in enumerate(shots, start=1):
            lines.append(f"{n}. Passage:\n{_fence(e.passage)}\n{q.capitalize()}: {e.query}")
        parts.append("\n".join(lines))
    elif shots:
        parts.append(f"Examples of {q}s for this task:\n" + "\n".join(f"- {e.query}" for e in shots))
    parts.append(f"Write only the {q}, without any explanation.\n\n{q.capitalize()}:")
    return "\n\n".join(parts)


def quality_check_prompt(task: QueryTask, query: str, passage: str) -> str:
    """The user message asking for 1 (the pair is good) or 0 (it is not)."""
    q, p = task.query_type, task.passage_type
    yes, no = task.relation
    return "\n\n".join(
        [
            f"Given a retrieval task (Task), a {q} (Query) and a {p} (Passage), judge whether the {p} {yes} the {q}.",
            f"Task: {task.description}",
            f"Query: {query}",
            f"Passage:\n{_fence(passage)}",
            f"Your output must be one of:\n- 0: No, the {p} {no} the {q}.\n- 1: Yes, the {p} {yes} the {q}.",
            "Do not explain. Answer with 1 or 0 only.",
        ]
    )


_LABEL = re.compile(  # "Question:", "**Generated query:**", "1. Scientific claim:", "Here is the question:"
    r"^(?:\d+[.)]\s*)?[\w\s-]{0,40}?\b(?:query|question|claim|title|output|answer)\s*:\s*", re.IGNORECASE
)
_QUOTES = "\"'`*“”‘’«» "


def clean_query(text: str) -> str:
    """The query in an LLM's reply: its first non-empty line, without a leading label ("Question:") or quotes."""
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        line = _LABEL.sub("", line.strip(_QUOTES).replace("**", ""), count=1).strip().strip(_QUOTES).strip()
        if line:
            return " ".join(line.split())
    return ""


_JUDGEMENT = re.compile(r"(?<![\d.])([01])(?!\d|\.\d)")  # "1", "Output: 0", "1." but not "10", "0.5"


def parse_judgement(text: str) -> int | None:
    """The first standalone 0 or 1 in a quality-check reply, else a leading yes (1) or no (0); None otherwise."""
    m = _JUDGEMENT.search(text)
    if m:
        return int(m.group(1))
    word = re.match(r"\W*(yes|no)\b", text, re.IGNORECASE)
    return None if word is None else int(word.group(1).lower() == "yes")
