"""L_norm: keeps answer embeddings near unit length."""

from __future__ import annotations

from torch import Tensor


def answer_norm_loss(a: Tensor) -> Tensor:
    """Mean squared deviation of the answer norms from 1.

    a: (N, D) answer embeddings -> scalar L = mean_i (||a_i||_2 - 1)^2, in fp32.
    At inference the answer embedding is added to the query embedding, so its scale must stay comparable.
    """
    norms = a.float().norm(p=2, dim=-1)  # (N,)
    return ((norms - 1.0) ** 2).mean()
