"""Batches: deterministic per (seed, epoch), drawn within batch groups (one dataset, or all plain datasets)."""

from __future__ import annotations

import random
from collections.abc import Iterator

from torch.utils.data import Sampler


class GroupedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's share of each global batch as ``[(record_index, epoch), ...]``.

    A global batch holds ``per_device_batch_size * world_size`` records of one batch group; rank r takes the r-th
    slice. The order depends only on (seed, epoch), never on how many batches were consumed before, so a resumed
    run that skips the first k batches sees exactly the batches an uninterrupted run would have. A group's last,
    incomplete batch is dropped with ``drop_last``; otherwise it is kept, cut to a multiple of the world size so
    every rank gets the same number of records (with one process it is kept whole).
    """

    def __init__(
        self,
        batch_groups: list[list[int]],
        per_device_batch_size: int,
        seed: int,
        world_size: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ):
        self.batch_groups = batch_groups
        self.b = per_device_batch_size
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}-{epoch}-batches")
        size = self.b * self.world_size
        batches: list[list[int]] = []
        for group in self.batch_groups:
            order = list(group)
            rng.shuffle(order)
            for start in range(0, len(order), size):
                chunk = order[start : start + size]
                if len(chunk) < size:
                    if self.drop_last:
                        continue
                    chunk = chunk[: len(chunk) - len(chunk) % self.world_size]
                    if not chunk:
                        continue
                batches.append(chunk)
        if len(self.batch_groups) > 1:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        for chunk in self.global_batches(epoch):
            per_rank = len(chunk) // self.world_size
            mine = chunk[self.rank * per_rank : (self.rank + 1) * per_rank]
            yield [(i, epoch) for i in mine]

    def __len__(self) -> int:
        size = self.b * self.world_size
        n = 0
        for group in self.batch_groups:
            full, rest = divmod(len(group), size)
            n += full + (1 if rest >= self.world_size and not self.drop_last else 0)
        return n
