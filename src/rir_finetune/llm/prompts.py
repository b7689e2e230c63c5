"""Prompts for query augmentation: ask an LLM to write the passage that would answer a query (HyDE-style).

Reinforced-IR writes, for every query, a hypothetical answer: the prompt states the task, names what kind of text
the query is (a question, a claim, a title...) and asks for a passage. ``TASKS`` holds those settings for the BEIR
datasets; ``--task NAME`` picks one, and ``task_description`` / ``query_type`` / ``answer_type`` override it.
"""

from __future__ import annotations

import string

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
