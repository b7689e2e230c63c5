"""Collator: a list of query groups -> one tokenised :class:`Batch`, each part padded to its longest text rounded up
to ``pad_to_multiple_of`` (never beyond the part's maximum length)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase


class Batch(TypedDict):
    queries: dict[str, Tensor]  # (B, Lq)
    passages: dict[str, Tensor]  # (B*G, Lp), positive first in each group
    answers: dict[str, Tensor] | None  # (B, La)
    answer_candidates: dict[str, Tensor] | None  # (B*G, La): answer then passages retrieved by it
    teacher_scores: Tensor | None  # (B, G) raw teacher scores, fp32
    no_in_batch_neg: bool  # train this batch without in-batch negatives


@dataclass
class RIRCollator:
    tokenizer: PreTrainedTokenizerBase
    query_max_len: int = 32
    passage_max_len: int = 128
    answer_max_len: int = 32
    pad_to_multiple_of: int | None = None

    def _tok(self, texts: list[str], max_len: int) -> dict[str, Tensor]:
        enc = dict(
            self.tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        )
        return pad_columns(enc, self.tokenizer, self.pad_to_multiple_of, max_len)

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        flags = {it["no_in_batch_neg"] for it in items}
        if len(flags) > 1:
            raise ValueError("a batch mixes no_in_batch_neg and ordinary records")
        has_answers = items[0]["answer"] is not None
        has_cands = items[0]["answer_candidates"] is not None
        has_teacher = items[0]["teacher_scores"] is not None
        return Batch(
            queries=self._tok([it["query"] for it in items], self.query_max_len),
            passages=self._tok([p for it in items for p in it["passages"]], self.passage_max_len),
            # with candidates the answer is their first member: encoded once, there
            answers=(
                self._tok([it["answer"] for it in items], self.answer_max_len)
                if has_answers and not has_cands
                else None
            ),
            answer_candidates=(
                self._tok([c for it in items for c in it["answer_candidates"]], self.answer_max_len)
                if has_cands
                else None
            ),
            teacher_scores=(
                torch.tensor([it["teacher_scores"] for it in items], dtype=torch.float32)
                if has_teacher
                else None
            ),
            no_in_batch_neg=flags.pop(),
        )


def pad_columns(
    enc: dict[str, Tensor], tokenizer: PreTrainedTokenizerBase, multiple: int | None, cap: int
) -> dict[str, Tensor]:
    """(n, L) -> (n, L'): L' = L rounded up to ``multiple``, at most ``cap`` (``max_length`` need not be a multiple,
    which transformers' own ``pad_to_multiple_of`` refuses). Padding goes on the tokenizer's padding side."""
    length = enc["input_ids"].size(1)
    target = min(cap, -(-length // multiple) * multiple) if multiple and multiple > 1 else length
    if target <= length:
        return enc
    fill = {"input_ids": tokenizer.pad_token_id or 0, "token_type_ids": tokenizer.pad_token_type_id}
    left = tokenizer.padding_side == "left"
    out = {}
    for k, v in enc.items():
        if v.dim() != 2 or v.size(1) != length:
            out[k] = v
            continue
        pad = v.new_full((v.size(0), target - length), fill.get(k, 0))
        out[k] = torch.cat([pad, v] if left else [v, pad], dim=1)
    return out
