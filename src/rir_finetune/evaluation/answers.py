"""Inference with answers (SPEC section 5): query vectors from the query, from an LLM-written answer, or both.

    q_vec = alpha * E_query(query) + (1 - alpha) * E_passage(answer_prefix + answer)

(the prefix is not added again to an answer that already starts with it, see :func:`with_answer_prefix`)

``mode``: ``query`` (alpha = 1 in effect), ``answer`` (the answer's passage embedding alone), ``fused`` (the sum
above). Answers are encoded as passages: with the passage instruction, never the query instruction. With
``renormalize`` the fused vector is L2-normalised; that rescales each query's scores and leaves its ranking (and so
every metric) unchanged, it only matters for the scores written to the run file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from rir_finetune.errors import UserError, located
from rir_finetune.files import iter_jsonl
from rir_finetune.retrieval.data import ANSWER_PREFIX, with_answer_prefix

MODES = ("query", "answer", "fused")
DEFAULT_ALPHA = 0.8  # upstream Reinforced-IR
_ID_FIELDS = ("_id", "qid", "query_id")
_ANSWER_FIELDS = ("answer", "text")


def load_answers(path: str | Path) -> dict[str, str]:
    """``{query id: answer}`` from a JSONL file with ``_id``/``qid``/``query_id`` and ``answer``/``text``."""
    path = Path(path)
    if not path.is_file():
        raise located(path, None, "answers file not found")
    answers: dict[str, str] = {}
    for lineno, obj in iter_jsonl(path):
        qid = next((obj[f] for f in _ID_FIELDS if obj.get(f) is not None), None)
        answer = next((obj[f] for f in _ANSWER_FIELDS if obj.get(f) is not None), None)
        if qid is None:
            raise located(path, lineno, f"missing query id (one of {', '.join(_ID_FIELDS)})")
        if not isinstance(answer, str):
            raise located(path, lineno, f"missing answer text (one of {', '.join(_ANSWER_FIELDS)})")
        answers[str(qid)] = answer
    return answers


def check_answers(answers: dict[str, str], query_ids: list[str], source: str | Path) -> None:
    """Raise a UserError naming ``source`` when some query has no answer."""
    missing = [qid for qid in query_ids if qid not in answers]
    if missing:
        shown = ", ".join(repr(q) for q in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise UserError(f"{source}: no answer for {len(missing)} of {len(query_ids)} queries ({shown})")


def fuse(
    query_reps: np.ndarray, answer_reps: np.ndarray, alpha: float, renormalize: bool = False
) -> np.ndarray:
    """alpha * query_reps + (1 - alpha) * answer_reps, both (Q, H); optionally L2-normalised. Returns (Q, H)."""
    fused = alpha * query_reps + (1.0 - alpha) * answer_reps  # (Q, H)
    if renormalize:
        fused = fused / np.maximum(np.linalg.norm(fused, axis=1, keepdims=True), 1e-12)
    return fused.astype(np.float32, copy=False)


def query_side_reps(
    query_ids: list[str],
    query_texts: list[str],
    encode_queries: Callable[[list[str]], np.ndarray],
    encode_passages: Callable[[list[str]], np.ndarray],
    mode: str = "query",
    answers: dict[str, str] | None = None,
    alpha: float = DEFAULT_ALPHA,
    answer_prefix: str = ANSWER_PREFIX,
    renormalize: bool = False,
    answers_source: str | Path = "answers",
) -> np.ndarray:
    """(Q, H) search vectors for the queries in ``mode``; ``answers`` is needed for ``answer`` and ``fused``."""
    if mode not in MODES:
        raise UserError(f"config key 'mode': {mode!r} is not one of {', '.join(MODES)}")
    if mode == "query":
        return np.asarray(encode_queries(query_texts), dtype=np.float32)
    if answers is None:
        raise UserError(f"mode {mode!r} needs answers: pass --answers FILE (JSONL of query id and answer)")
    check_answers(answers, query_ids, answers_source)
    answer_reps = np.asarray(
        encode_passages([with_answer_prefix(answers[q], answer_prefix) for q in query_ids]), dtype=np.float32
    )
    if mode == "answer":
        return answer_reps
    query_reps = np.asarray(encode_queries(query_texts), dtype=np.float32)
    return fuse(query_reps, answer_reps, alpha, renormalize)
