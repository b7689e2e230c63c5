"""Prompts for query augmentation: ask an LLM to write the passage that would answer a query (HyDE-style).

Reinforced-IR writes, for every query, a hypothetical answer: the prompt states the task, names what kind of text
the query is (a question, a claim, a title...) and asks for a passage. ``TASKS`` holds those settings for the BEIR
datasets; ``--task NAME`` picks one, and ``task_description`` / ``query_type`` / ``answer_type`` override it.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from rir_finetune.config import option
from rir_finetune.errors import UserError

# name -> (task description, query type); the answer type is "Passage" for all of them
TASKS: dict[str, tuple[str, str]] = {
    "generic": ("Please write a passage to answer the question.", "Question"),
    "scifact": ("Please write a scientific paper passage to support/refute the claim.", "Claim"),
    "climate-fever": ("Please write a scientific paper passage to support/refute the claim.", "Claim"),
    "fever": ("Please write a scientific paper passage to support/refute the claim.", "Claim"),
    "nfcorpus": ("Please write a passage to answer the question.", "Question"),
    "trec-covid": ("Please write a scientific paper passage to answer the question.", "Question"),
    "fiqa": ("Please write a financial article passage to answer the question.", "Question"),
    "scidocs": ("Please write a passage to cite the title.", "Title"),
    "arguana": ("Please write a counter argument for the passage.", "Passage"),
    "quora": ("Please write a duplicate passage to the question.", "Question"),
    "cqadupstack": ("Please write a duplicate passage to the question.", "Question"),
    "nq": ("Please write a passage to answer the question.", "Question"),
    "msmarco": ("Please write a passage to answer the question.", "Question"),
    "hotpotqa": ("Please write a passage to answer the question.", "Question"),
    "dbpedia-entity": ("Please write a passage to answer the question.", "Question"),
    "webis-touche2020": ("Please write a passage to answer the question.", "Question"),
}

# template name -> text; fields: {task_description}, {query_type}, {query}, {answer_type}
TEMPLATES: dict[str, str] = {
    "hyde": "{task_description}\n\n{query_type}: {query}\n\n{answer_type}:",
}
FIELDS = ("task_description", "query_type", "query", "answer_type")


def resolve_template(prompt_template: str) -> str:
    """A template by name (``hyde``) or a literal template that contains ``{query}``."""
    if prompt_template in TEMPLATES:
        return TEMPLATES[prompt_template]
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(prompt_template) if f is not None}
    except ValueError as e:
        raise UserError(f"config key 'prompt_template': {e}") from None
    if "query" not in names:
        raise UserError(
            f"config key 'prompt_template': {prompt_template!r} is neither a template name "
            f"({', '.join(TEMPLATES)}) nor a template with a {{query}} field"
        )
    unknown = sorted(names - set(FIELDS))
    if unknown:
        raise UserError(
            f"config key 'prompt_template': unknown field {{{unknown[0]}}}; fields are "
            + ", ".join("{" + f + "}" for f in FIELDS)
        )
    return prompt_template


def build_prompt(template: str, query: str, task_description: str, query_type: str, answer_type: str) -> str:
    """Fill ``template`` (already resolved) for one query."""
    return template.format(
        task_description=task_description, query_type=query_type, query=query, answer_type=answer_type
    )


@dataclass
class AnswerPromptKeys:
    """The answer prompt's keys, defined once for the commands that write answers (augment, reward)."""

    task: str = option(
        "generic", "preset of task_description and query_type: a BEIR name (scifact, nfcorpus, ...)"
    )
    task_description: str | None = option(None, "first line of the prompt; None: the task preset's")
    query_type: str | None = option(
        None, "what the query is (Question, Claim, Title...); None: the task preset's"
    )
    answer_type: str = option("Passage", "what to write")
    prompt_template: str = option(
        "hyde", "a template name, or a template with {query} (+ the three fields above)"
    )

    def __post_init__(self):
        if self.task not in TASKS:
            raise UserError(f"config key 'task': {self.task!r} is not one of {', '.join(TASKS)}")
        task_description, query_type = TASKS[self.task]
        if self.task_description is None:
            self.task_description = task_description
        if self.query_type is None:
            self.query_type = query_type
        resolve_template(self.prompt_template)

    def prompt(self, query: str) -> str:
        return build_prompt(
            resolve_template(self.prompt_template),
            query,
            self.task_description,
            self.query_type,
            self.answer_type,
        )
