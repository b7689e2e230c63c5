"""Gradient caching (GradCache, Gao et al. 2021) with a memory budget: memory bounded, second pass only where needed.

1. Embed every chunk of queries, passages and answers, recording the RNG state before each chunk. While the
   activations kept for the backward fit ``keep_bytes`` (counted exactly, as autograd saves them), a chunk runs with
   its graph and keeps it; once the next chunk would not fit, the rest run without a graph.
2. Compute every objective on the embeddings (detached leaf tensors) and backpropagate to the embeddings only.
3. Push each chunk's embedding gradient through its encoder: a kept chunk through its kept graph (no second
   forward), any other chunk by re-running it with a graph, its RNG state restored so dropout draws the same
   masks: backward of sum(reps * cached_grad).

Peak activation memory is ``keep_bytes`` plus one chunk's, whatever the batch: when the whole batch fits the budget
no chunk is encoded twice (a plain step's cost); ``keep_bytes=0`` is classic GradCache (every chunk twice). The
result equals a plain step that encodes in the same chunks (``sub_batch_size`` = chunk size), dropout included;
without dropout it equals the unchunked step.
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
    reps: Tensor | None = None  # with its graph, when kept


class SavedBytes:
    """Counts the bytes autograd saves for the backward inside the context (each storage once, parameters not)."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, t: Tensor) -> Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in self.exclude and ptr not in self.seen:
            self.seen.add(ptr)
            self.bytes += st.nbytes()
        return t

    def __call__(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def cached_step(
    encode: Callable[[dict[str, Tensor]], Tensor],
    batch: dict,
    chunk_size: int,
    loss_fn: Callable[[Reps], Tensor],
    backward: Callable[[Tensor], None] = Tensor.backward,
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    scale: float = 1.0,
    keep_bytes: int = 0,
    params: list[Tensor] | None = None,
    pad_to_multiple_of: int | None = None,
) -> tuple[Tensor, object]:
    """One GradCache step; parameter gradients are accumulated by ``backward``.

    encode: tokenised chunk -> (n, D) embeddings (runs the model; called twice per chunk).
    batch: a :class:`rir_finetune.training.collator.Batch`-like mapping with the tokenised parts.
    loss_fn: :class:`Reps` -> an object with ``.loss`` (scalar), e.g. ``compute_objectives``'s output.
    backward: how to backpropagate a scalar (``accelerator.backward`` applies loss scaling / DeepSpeed).
    no_sync: context that suspends DDP's gradient all-reduce; used for every chunk but the last, so the
        gradients are synchronised once per step.
    scale: factor on the gradients (1 / gradient_accumulation_steps).
    keep_bytes: budget for the activations of chunks that keep their graph from the first pass (0: none).
    params: the model's parameters (their storages are not activations); needed when ``keep_bytes`` > 0.
    pad_to_multiple_of: each chunk is padded to its longest text rounded up to this (as the collator pads).
    Returns (loss detached, loss_fn's output).
    """
    todo = [(p, batch[p]) for p in PARTS if batch.get(p) is not None]
    plan: list[_Chunk] = []
    cached: dict[str, list[Tensor]] = {}
    exclude = {p.untyped_storage().data_ptr() for p in params or []}
    kept_bytes, per_token = 0, 0.0  # saved bytes so far; the most seen per token of a chunk
    keeping = keep_bytes > 0
    for part, feats in todo:
        start = 0
        for ch in chunks(feats, chunk_size, pad_to_multiple_of):
            c = _Chunk(part, start, ch, get_rng_state())
            tokens = ch["input_ids"].numel()
            keeping = keeping and kept_bytes + per_token * tokens <= keep_bytes
            if keeping:
                counter = SavedBytes(exclude)
                with counter(), no_sync():  # DDP: only the last backward's forward may run outside no_sync
                    r = encode(ch)
                per_token = max(per_token, counter.bytes / max(tokens, 1))
                if kept_bytes + counter.bytes <= keep_bytes:
                    kept_bytes += counter.bytes
                    c.reps = r
                else:  # over budget: this graph is dropped, this chunk and the rest run twice
                    keeping = False
                cached.setdefault(part, []).append(r.detach())
            else:
                with torch.no_grad():
                    cached.setdefault(part, []).append(encode(ch))
            plan.append(c)
            start += ch["input_ids"].size(0)
    after_first_pass = get_rng_state()

    leaves = {p: torch.cat(v).detach().requires_grad_(True) for p, v in cached.items()}
    reps = _as_reps(leaves, batch)
    out = loss_fn(reps)
    out.loss.backward()  # gradients reach only the cached embeddings
    grads = {p: t.grad for p, t in leaves.items()}

    plan = [ch for ch in plan if grads[ch.part] is not None]  # parts no objective uses need no second pass
    plan.sort(key=lambda ch: ch.reps is None)  # kept graphs first: freed before any re-encoding
    if no_sync is not contextlib.nullcontext and plan and plan[-1].reps is not None:
        # DDP all-reduces in the backward of a forward that ran outside no_sync: re-encode the last chunk
        plan[-1].reps = None
    for i, ch in enumerate(plan):
        ctx = no_sync() if i < len(plan) - 1 else contextlib.nullcontext()
        with ctx:
            r = ch.reps
            if r is None:
                set_rng_state(ch.rng)
                r = encode(ch.features)  # (n, D), with a graph
            ch.reps = None
            g = grads[ch.part][ch.start : ch.start + r.size(0)]
            backward((r * g).sum() * scale)
            del r
    set_rng_state(after_first_pass)
    return out.loss.detach(), out


def _as_reps(leaves: dict[str, Tensor], batch: dict) -> Reps:
    q = leaves["queries"]
    a_cand = leaves.get("answer_candidates")
    a = leaves.get("answers")
    if a_cand is not None:
        a = a_cand.view(q.size(0), -1, a_cand.size(-1))[:, 0]
    return Reps(q_reps=q, p_reps=leaves["passages"], a_reps=a, a_cand_reps=a_cand)
