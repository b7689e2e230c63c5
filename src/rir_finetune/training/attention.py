"""Attention for training: SDPA kernels where they exist, and a lean exact path for CPU training with dropout.

``ATTENTION`` (``rir_sdpa``) is registered with transformers' attention interface and chosen by
:meth:`rir_finetune.training.model.BiEncoder.from_pretrained` for every model that accepts a registered attention
function (``_supports_attention_backend``, e.g. BERT, MiniLM, RoBERTa-style encoders in transformers 5).

- On a GPU, in evaluation, or without attention dropout: ``torch.nn.functional.scaled_dot_product_attention``
  through transformers' own SDPA function (flash / memory-efficient kernels; on CPU the flash kernel).
- CPU training with attention dropout: torch's SDPA has no CPU kernel with dropout and falls back to its math path,
  which keeps four (B, H, L, L) fp32 tensors per layer for the backward (scores, probabilities, the dropout mask and
  the dropped probabilities: most of MiniLM's activations at 256 tokens) and
  draws the mask through a float ``bernoulli_``. Here the keep mask is drawn once as bool (1 byte per score) and
  the rest of the attention core is recomputed in the backward from q, k, v and that mask
  (``torch.utils.checkpoint``): the same function (softmax(q k^T / sqrt(d) + mask) * keep / (1 - p)) v, keeping
  one byte per score instead of four fp32 tensors.
- The keep mask comes from 16-bit slices of 64-bit random words (:func:`rir_finetune.training.dropout.keep_mask`):
  a quarter of the generator calls of ``bernoulli_``; the dropout rate is rounded to a multiple of 1/65536.
- Under bf16 autocast the softmax runs in bf16 (computed in fp32 inside the kernel, rounded once on output, as
  the fp32 softmax followed by a cast to bf16 was): its backward reads and writes half the bytes
  (benchmarks/README.md has the speed-up). fp16 keeps an fp32 softmax.

- Packed sequences (``pack_sequences``; :mod:`rir_finetune.retrieval.encoder`, shared with encoding): given
  transformers' ``cu_seq_lens_q`` keyword, attention stays within each text of the packed row; the mask builder
  returns no mask during a packed forward.

The saved model does not depend on this: the attention implementation is not written to ``config.json``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from rir_finetune.retrieval.packing import packing_mask, route_packed
from rir_finetune.training.dropout import keep_mask

ATTENTION = "rir_sdpa"

_registered = False


def register() -> str:
    """Register ``rir_sdpa`` with transformers (attention function and mask builder); returns its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(ATTENTION, route_packed(attention_forward))
        AttentionMaskInterface.register(ATTENTION, packing_mask)
        _registered = True
    return ATTENTION


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature: (B, H, L, d) q, k, v -> ((B, L, H, d) output, None)."""
    if dropout == 0.0 or not module.training or query.device.type != "cpu" or kwargs.get("is_causal"):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if key.size(1) != query.size(1):  # grouped-query attention: one key/value head per group of query heads
        rep = query.size(1) // key.size(1)
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    scale = query.size(-1) ** -0.5 if scaling is None else scaling
    bias = additive_mask(attention_mask, query.dtype)
    b, h, lq, lk = query.size(0), query.size(1), query.size(2), key.size(2)
    keep, inv_keep = keep_mask((b, h, lq, lk), dropout, query.device)
    args = (query, key, value, bias, keep, scale, inv_keep)
    if torch.is_grad_enabled():
        out = checkpoint(attention_core, *args, use_reentrant=False, preserve_rng_state=False)
    else:
        out = attention_core(*args)
    return out.transpose(1, 2).contiguous(), None


def attention_core(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, keep: Tensor, scale: float, inv_keep: float
) -> Tensor:
    """(softmax(q k^T * scale + bias) * keep) (v * inv_keep): (B, H, L, d); keep is the bool dropout mask."""
    s = torch.matmul(q * scale, k.transpose(-1, -2))  # (B, H, Lq, Lk)
    if bias is not None:
        s = s + bias
    if q.dtype == torch.float16:
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    else:  # fp32, or bf16: the kernel computes in fp32 and rounds its output once
        p = torch.softmax(s, dim=-1)
    return torch.matmul(p * keep, v * inv_keep)


def additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A bool mask (True: attend) or an additive float mask -> additive float mask (or None)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill_(~mask, torch.finfo(dtype).min)
