"""Dropout for CPU training: the keep mask from 16-bit slices of 64-bit random words, four scores per generator call.

torch's CPU ``bernoulli_`` draws a double per element, serially (MKL's vectorised generator is used on Intel CPUs
only): in a bf16 MiniLM step on 2 cores it was a quarter of the time (2.0 s of 7.9 s, the attention masks most of
it). :func:`keep_mask` draws 64-bit words with ``random_`` (one generator call each) and compares each 16-bit slice
with a threshold: the dropout rate is rounded to a multiple of 1/65536 (0.1 -> 0.100006), kept values are scaled
by the exact inverse of the keep rate (the expectation is unchanged), the default generator's state replays the same
mask (gradient caching re-encodes with it). :class:`Dropout` replaces ``torch.nn.Dropout`` in a backbone for the
CPU only: elsewhere (CUDA: fused Philox kernels) and in evaluation it is ``torch.nn.Dropout``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def keep_mask(shape: tuple[int, ...], p: float, device: torch.device | str = "cpu") -> tuple[Tensor, float]:
    """Dropout's keep mask: a bool tensor of ``shape``, True with probability 1 - t / 65536 (t = round(p * 65536)),
    and the factor 65536 / (65536 - t) that keeps the expectation; drawn from the default generator."""
    t = round(p * 65536)
    if t >= 65536:
        return torch.zeros(shape, dtype=torch.bool, device=device), 0.0
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)  # all 64 bits
    keep = words.view(torch.int16)[:n].view(shape) >= t - 32768  # each int16 uniform on [-32768, 32767]
    return keep, 65536 / (65536 - t)


class Dropout(nn.Dropout):
    """``torch.nn.Dropout`` with :func:`keep_mask` on the CPU; the backward keeps the bool mask only."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        keep, scale = keep_mask(tuple(x.shape), self.p, x.device)
        return (x * keep).mul_(scale)


def use_fast_dropout(module: nn.Module) -> int:
    """Replace every ``torch.nn.Dropout`` (exactly that class) inside ``module``; returns how many."""
    count = 0
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, Dropout(child.p, child.inplace))
                count += 1
    return count
