"""A tiny random causal LM (1-layer Llama, word-level tokenizer) for the generator tests; built offline."""

from __future__ import annotations

import json
from pathlib import Path

import conftest

WORDS = (
    "cells gene protein heart brain virus drug risk study trial mice level effect diet sleep the a of and to in "
    "is for with increase decrease blood cancer patients dose insulin glucose liver vitamin"
).split()
PROMPT_WORDS = (
    "please write a scientific paper passage to support/refute the claim claim question : ? . user assistant "
    "system passage: claim: question: answer the"
)


def build_tiny_causal_lm(folder: Path, chat: bool = True, seed: int = 0) -> Path:
    """Save a random Llama (hidden 16) and its word-level tokenizer to ``folder``."""
    words = WORDS + PROMPT_WORDS.split() + [f"w{i}" for i in range(40)]
    return conftest.build_tiny_causal_lm(folder, chat=chat, words=words, seed=seed)


def write_beir_records(path: Path, n: int) -> Path:
    """``data from-beir``-style records: query, pos, qid, pos_ids."""
    rows = []
    for i in range(n):
        topic = WORDS[i % 15]
        rows.append({"qid": f"q{i}", "query": f"{topic} w{i} increase ?",
                     "pos": [f"{topic} w{i} the study of {WORDS[(i + 3) % 15]} level"], "pos_ids": [f"d{i}"]})  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_pairs(path: Path, n: int, chat_messages: bool = False) -> Path:
    """Preference pairs in TRL's format, as ``reward`` writes them."""
    rows = []
    for i in range(n):
        prompt = (
            f"Please write a passage to answer the question.\n\nQuestion: {WORDS[i % 15]} w{i} ?\n\nPassage:"
        )
        chosen = f"the {WORDS[i % 15]} w{i} increase level"
        rejected = f"a {WORDS[(i + 5) % 15]} decrease w{(i + 7) % 40}"
        if chat_messages:
            prompt = [{"role": "system", "content": "answer"}, {"role": "user", "content": prompt}]
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "chosen_score": 0.9,
                     "rejected_score": 0.5, "raw_score": 0.6, "qid": f"q{i}"})  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
