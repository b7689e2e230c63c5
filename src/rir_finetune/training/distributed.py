"""The one module that touches ``torch.distributed``. Every function works unchanged in a single process.

Convention for cross-device negatives (SPEC section 4): every rank gathers the embeddings of all ranks and computes
every objective over the whole gathered batch of N = W*B queries, so the loss *value* on each rank equals the loss
of one process holding all N queries. Autograd reaches only the local shard; since every rank computes the same
loss, the missing contributions of the other ranks' copies are equal to the local one, so the backward of the
gather multiplies the local gradient by W. After DDP averages over W ranks, the optimizer sees exactly the
single-process gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from rir_finetune.errors import UserError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0; backward returns the local slice of the gradient times W (see module doc)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        w, r = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(w)]
        dist.all_gather(parts, x.contiguous())
        ctx.n, ctx.r, ctx.w = x.size(0), r, w
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad[ctx.r * ctx.n : (ctx.r + 1) * ctx.n] * ctx.w


def gather_with_grad(x: Tensor) -> Tensor:
    """(n, ...) on each rank -> (W*n, ...) in rank order; gradient flows to the local rows (scaled by W)."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """(n, ...) on each rank -> (W*n, ...) in rank order, without autograd (teacher scores)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def check_same_across_ranks(**values: int) -> None:
    """Raise a clear error (instead of a hang in all_gather) when ranks disagree on batch shapes."""
    if not is_distributed():
        return
    names = sorted(values)
    local = torch.tensor([int(values[k]) for k in names], dtype=torch.long, device=_comm_device())
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    table = torch.stack(parts).cpu()
    for i, name in enumerate(names):
        col = table[:, i].tolist()
        if len(set(col)) > 1:
            raise UserError(
                f"ranks disagree on {name} ({col} for ranks 0..{len(col) - 1}); cross-device negatives need the same "
                "batch shape on every rank: use dataloader_drop_last and a fixed train_group_size"
            )


def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over ranks (for logging)."""
    if not is_distributed():
        return x
    y = x.detach().clone().to(_comm_device())
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return (y / world_size()).to(x.device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from rank ``src`` to every rank (evaluation results)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
