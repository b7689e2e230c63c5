"""Score matrices between embeddings, always in fp32."""

from __future__ import annotations

import torch
from torch import Tensor


def batch_scores(x: Tensor, c: Tensor, temperature: float) -> Tensor:
    """Every row of ``x`` against every candidate of ``c``.

    x: (N, D), c: (M, D) -> (N, M) = <x_i, c_m> / temperature, in fp32.
    """
    return (x.float() @ c.float().T) / temperature  # (N, M)


def group_scores(x: Tensor, c: Tensor, group_size: int, temperature: float) -> Tensor:
    """Each row of ``x`` against its own group of ``group_size`` candidates.

    x: (N, D), c: (N*G, D) -> (N, G) with [i, j] = <x_i, c_{i*G + j}> / temperature, in fp32.
    """
    n = x.size(0)
    c = c.float().view(n, group_size, -1)  # (N, G, D)
    return torch.einsum("nd,ngd->ng", x.float(), c) / temperature  # (N, G)
