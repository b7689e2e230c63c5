"""Gradient caching (GradCache, Gao et al. 2021): the batch size is bounded by compute, not by memory.

1. Embed every chunk of queries, passages and answers without an autograd graph, recording the RNG state before
   each chunk.
2. Compute every objective on the cached embeddings (made leaf tensors) and backpropagate to the embeddings only.
3. Re-run each chunk with a graph, restoring its RNG state so dropout draws the same masks, and push its cached
   gradient through: backward of sum(reps * cached_grad).

Peak activation memory is one chunk's, whatever the batch. The result equals a plain step that encodes in the same
chunks (``sub_batch_size`` = chunk size), dropout included; without dropout it equals the unchunked step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rir_finetune.training.model import Reps
from rir_finetune.training.model import split_features as chunks

PARTS = ("queries", "passages", "answers", "answer_candidates")


def get_rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class _Chunk:
    part: str
    start: int
    features: dict[str, Tensor]
    rng: dict


def cached_step(
    encode: Callable[[dict[str, Tensor]], Tensor],
    batch: dict,
    chunk_size: int,
    loss_fn: Callable[[Reps], Tensor],
    backward: Callable[[Tensor], None] = Tensor.backward,
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    scale: float = 1.0,
) -> tuple[Tensor, object]:
    """One GradCache step; parameter gradients are accumulated by ``backward``.

    encode: tokenised chunk -> (n, D) embeddings (runs the model; called twice per chunk).
    batch: a :class:`rir_finetune.training.collator.Batch`-like mapping with the tokenised parts.
    loss_fn: :class:`Reps` -> an object with ``.loss`` (scalar), e.g. ``compute_objectives``'s output.
    backward: how to backpropagate a scalar (``accelerator.backward`` applies loss scaling / DeepSpeed).
    no_sync: context that suspends DDP's gradient all-reduce; used for every chunk but the last, so the
        gradients are synchronised once per step.
    scale: factor on the gradients (1 / gradient_accumulation_steps).
    Returns (loss detached, loss_fn's output).
    """
    todo = [(p, batch[p]) for p in PARTS if batch.get(p) is not None]
    plan: list[_Chunk] = []
    cached: dict[str, list[Tensor]] = {}
    with torch.no_grad():
        for part, feats in todo:
            start = 0
            for ch in chunks(feats, chunk_size):
                plan.append(_Chunk(part, start, ch, get_rng_state()))
                cached.setdefault(part, []).append(encode(ch))
                start += ch["input_ids"].size(0)
    after_first_pass = get_rng_state()

    leaves = {p: torch.cat(v).detach().requires_grad_(True) for p, v in cached.items()}
    reps = _as_reps(leaves, batch)
    out = loss_fn(reps)
    out.loss.backward()  # gradients reach only the cached embeddings
    grads = {p: t.grad for p, t in leaves.items()}

    plan = [ch for ch in plan if grads[ch.part] is not None]  # parts no objective uses need no second pass
    for i, ch in enumerate(plan):
        set_rng_state(ch.rng)
        ctx = no_sync() if i < len(plan) - 1 else contextlib.nullcontext()
        with ctx:
            r = encode(ch.features)  # (n, D), with a graph
            g = grads[ch.part][ch.start : ch.start + r.size(0)]
            backward((r * g).sum() * scale)
    set_rng_state(after_first_pass)
    return out.loss.detach(), out


def _as_reps(leaves: dict[str, Tensor], batch: dict) -> Reps:
    q = leaves["queries"]
    a_cand = leaves.get("answer_candidates")
    a = leaves.get("answers")
    if a_cand is not None:
        a = a_cand.view(q.size(0), -1, a_cand.size(-1))[:, 0]
    return Reps(q_reps=q, p_reps=leaves["passages"], a_reps=a, a_cand_reps=a_cand)
