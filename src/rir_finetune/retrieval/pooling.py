"""Pooling token states into one sentence embedding: the one function that training and retrieval both use."""

from __future__ import annotations

import torch
from torch import Tensor

POOLING_METHODS = ("cls", "mean", "last_token")


def pool(hidden: Tensor, attention_mask: Tensor, method: str) -> Tensor:
    """Sentence embedding from token states.

    hidden: (n, L, D), attention_mask: (n, L) -> (n, D).
    cls: the first token; mean: the mean over non-padding tokens, always fp32 (half-precision sums overflow);
    last_token: the last non-padding token (works for left and right padding).
    """
    if method == "cls":
        return hidden[:, 0]
    if method == "mean":  # summed in fp32: an fp16 sum over a long input overflows (65504)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (n, L, 1), 0/1: exact in any dtype
        total = (hidden * mask).sum(dim=1, dtype=torch.float32)  # (n, D)
        return total / attention_mask.sum(dim=1, keepdim=True).float().clamp(min=1e-9)
    if method == "last_token":
        seq_len = attention_mask.size(1)
        last = seq_len - 1 - attention_mask.flip(dims=[1]).int().argmax(dim=1)  # (n,) last real token
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    raise ValueError(f"unknown pooling method {method!r}")
