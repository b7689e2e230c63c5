"""Packed sequences (``pack_sequences``): no FLOPs on padding, in the encoder and in training.

A padded batch becomes one row of its real tokens; attention stays within each text. Equal to the padded path
(tests/training/test_packing.py); :func:`packing_support` checks each backbone once and callers stay padded otherwise.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger("rir_finetune")


# -- packed sequences: no FLOPs on padding in the encoder's linear layers ------------------------------------
#
# A padded part of a batch, (n, L) token ids with a mask, becomes one row of its T real tokens (T <= n * L):
# position ids restart at every text, and the attention stays within each text. The backbone runs on (1, T); the
# hidden states are scattered back to (n, L) for pooling, so pooling, normalisation and everything downstream are the
# padded path's. Texts are right-aligned in that layout whatever the tokenizer's padding side (positions count from
# each text's first real token).
#
# Attention (``rir_sdpa`` in training, :data:`PACKED_SDPA` here) receives transformers' packed-sequence keywords
# (``cu_seq_lens_q`` = [0, len_0, len_0 + len_1, ...], ``max_length_q``), which transformers forwards to the attention
# function of every layer (and gradient checkpointing replays them). With them:
#
# - on CUDA, without dropout, in bf16/fp16: torch's variable-length flash kernel (``torch.nn.attention.varlen``) when
#   this torch has it, so attention costs sum(len_i^2) and nothing is padded at all;
# - otherwise q, k and v are laid out (n, heads, L, d) for that layer's attention core (SDPA on a GPU, with dropout;
#   ``rir_sdpa``'s CPU path) with a key-padding mask, and the output is gathered back to (1, T): the linear layers,
#   most of an encoder's FLOPs at these lengths, see real tokens only.
#
# While a packed forward runs, their mask builder returns no mask (transformers would otherwise build a (T, T)
# block-diagonal one from the restarting position ids). :func:`packing_support` checks a backbone once: its attention
# takes the keywords and the packed forward equals the padded one on a few texts (models whose positions start at
# ``pad_token_id + 1``, RoBERTa's family, pass with that offset); otherwise the caller stays padded.

PACKED_SDPA = "rir_packed_sdpa"  # transformers' SDPA, plus packed rows: the encoder's attention
PACKABLE_ATTENTION = ("rir_sdpa", PACKED_SDPA, "flash_attention_2", "flash_attention_3")
_ACTIVE: ContextVar[bool] = ContextVar("rir_finetune_packed_forward", default=False)
_varlen_failed: set[tuple[str, torch.dtype]] = (
    set()
)  # (device, dtype) whose kernel failed: padded there from then on


def packing_active() -> bool:
    """True inside a packed forward (the mask builder then returns no mask)."""
    return _ACTIVE.get()


@contextmanager
def _packed_forward():
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@dataclass
class Packing:
    index: Tensor  # (T,) each real token's place in the flattened (n * L) padded batch
    n: int
    width: int  # L
    inputs: dict[str, Tensor]  # (1, T) input_ids, token_type_ids, position_ids
    kwargs: dict  # the packed-sequence keywords for the attention of every layer


def pack_features(features: dict[str, Tensor], position_offset: int = 0) -> Packing:
    """(n, L) padded features -> one (1, T) row of real tokens and what unpacks it."""
    mask = features["attention_mask"]
    n, width = mask.shape
    index = mask.reshape(-1).nonzero().squeeze(1)  # (T,)
    lengths = mask.sum(dim=1, dtype=torch.int32)  # (n,)
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))  # (n + 1,)
    positions = (mask.long().cumsum(dim=1) - 1).reshape(-1)[index] + position_offset  # (T,) restart per text
    inputs = {
        k: features[k].reshape(-1)[index][None] for k in ("input_ids", "token_type_ids") if k in features
    }
    inputs["position_ids"] = positions[None]
    kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": width, "max_length_k": width}
    return Packing(index, n, width, inputs, kwargs)


def packed_hidden(backbone: nn.Module, features: dict[str, Tensor], position_offset: int = 0) -> Tensor:
    """The backbone's last hidden states of padded ``features``, computed packed: (n, L, D), zeros at padding."""
    p = pack_features(features, position_offset)
    with _packed_forward():
        hidden = backbone(**p.inputs, **p.kwargs, return_dict=True).last_hidden_state[0]  # (T, D)
    out = hidden.new_zeros(p.n * p.width, hidden.size(-1)).index_copy(0, p.index, hidden)
    return out.view(p.n, p.width, -1)


def packable(features: dict[str, Tensor]) -> bool:
    """Only the keys :func:`pack_features` knows (a caller's own position ids or embeddings stay padded)."""
    return set(features) <= {"input_ids", "attention_mask", "token_type_ids"}


# -- attention -----------------------------------------------------------------------------------------------------


def _varlen_usable(query: Tensor, dropout: float) -> bool:
    if (
        (str(query.device), query.dtype) in _varlen_failed
        or not query.is_cuda
        or dropout > 0
        or query.dtype not in (torch.float16, torch.bfloat16)
    ):
        return False
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return False
    return query.size(-1) % 8 == 0 and query.size(-1) <= 256


def packed_attention(
    padded_attention, module, query: Tensor, key: Tensor, value: Tensor, cu: Tensor, width: int, dropout: float,
    scaling: float | None, **kwargs,
) -> tuple[Tensor, None]:  # fmt: skip
    """Attention within each text of a packed row: (1, H, T, d) q, k, v -> ((1, T, H, d) output, None).

    ``padded_attention``: the attention function for padded (n, H, L, d) inputs with a mask, called when no
    variable-length kernel applies."""
    if _varlen_usable(query, dropout):
        from torch.nn.attention.varlen import varlen_attn

        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, H, d)
        try:
            out = varlen_attn(q, k, v, cu, cu, width, width, scale=scaling, enable_gqa=k.size(1) != q.size(1))
            return out[None], None
        except torch.OutOfMemoryError:  # the batch, not the kernel: the padded layout would need more
            raise
        except (
            RuntimeError,
            NotImplementedError,
        ) as e:  # a kernel this GPU or build lacks: padded from now on
            _varlen_failed.add((str(query.device), query.dtype))
            logger.info(
                "packed attention: the variable-length kernel is unavailable (%s); padded per layer", e
            )
    n, t = cu.numel() - 1, query.size(2)
    lengths = cu.diff().long()  # (n,)
    doc = torch.repeat_interleave(torch.arange(n, device=query.device), lengths, output_size=t)  # (T,)
    index = doc * width + torch.arange(t, device=query.device) - cu[:-1].long()[doc]  # (T,) place in (n * L)

    def unpack(x: Tensor) -> Tensor:  # (1, h, T, d) -> (n, h, L, d)
        rows = x[0].transpose(0, 1)  # (T, h, d)
        full = rows.new_zeros(n * width, *rows.shape[1:]).index_copy(0, index, rows)
        return full.view(n, width, *rows.shape[1:]).transpose(1, 2)

    keys = torch.arange(width, device=query.device)[None, :] < lengths[:, None]  # (n, L) real keys
    out, _ = padded_attention(module, unpack(query), unpack(key), unpack(value), keys[:, None, None, :],
                              dropout=dropout, scaling=scaling, **kwargs)  # fmt: skip  # (n, L, H, d)
    return out.reshape(n * width, *out.shape[2:]).index_select(0, index)[None], None


def route_packed(padded_attention):
    """An attention function (transformers' signature) that sends a packed row (``cu_seq_lens_q`` given, no mask,
    batch 1) to :func:`packed_attention` and everything else to ``padded_attention``."""

    def forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        cu = kwargs.pop("cu_seq_lens_q", None)
        if cu is not None and attention_mask is None and query.size(0) == 1:
            width = int(kwargs.pop("max_length_q"))
            rest = {
                k: v for k, v in kwargs.items() if k not in ("cu_seq_lens_k", "max_length_k", "position_ids")
            }
            return packed_attention(
                padded_attention, module, query, key, value, cu, width, dropout, scaling, **rest
            )
        return padded_attention(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    return forward


def packing_mask(*args, **kwargs):
    """transformers' SDPA mask, except in a packed forward: there the texts' bounds travel as ``cu_seq_lens_q``, and
    the (T, T) block-diagonal mask transformers would build from the restarting position ids is never needed."""
    from transformers.masking_utils import sdpa_mask

    return None if packing_active() else sdpa_mask(*args, **kwargs)


def register_packed_sdpa() -> str:
    """Register :data:`PACKED_SDPA` with transformers (attention function and mask builder); returns its name."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, route_packed(sdpa_attention_forward))
    AttentionMaskInterface.register(PACKED_SDPA, packing_mask)
    return PACKED_SDPA


# -- which backbones take it ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Support:
    ok: bool
    position_offset: int = 0
    reason: str = ""


def packing_support(backbone: nn.Module) -> Support:
    """Whether ``backbone`` computes the same packed as padded: its attention takes packed sequences, and a forward of
    three texts of different lengths agrees (positions from 0, or from ``pad_token_id + 1``)."""
    config = backbone.config
    layer_types = getattr(config, "layer_types", None) or ()
    if getattr(config, "sliding_window", None) or "sliding_attention" in layer_types:
        # a local window comes from the mask builder, which a packed forward bypasses: every layer would attend to
        # the whole text (ModernBERT's local layers). Short probe texts would not show it: refuse by the config
        return Support(False, reason="sliding-window attention layers take no packed sequences here")
    impl = getattr(config, "_attn_implementation", None)
    if impl not in PACKABLE_ATTENTION:
        return Support(
            False, reason=f"attention {impl!r} takes no packed sequences (these do: {PACKABLE_ATTENTION})"
        )
    device = next(backbone.parameters()).device
    vocab = int(getattr(config, "vocab_size", 1000))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(min(5, vocab - 1), max(6, min(vocab, 1000)), (3, 8), generator=gen)
    mask = torch.zeros(3, 8, dtype=torch.long)
    for row, n in enumerate((5, 3, 8)):
        mask[row, :n] = 1
    pad = getattr(config, "pad_token_id", None)
    feats = {"input_ids": ids.masked_fill(mask == 0, pad or 0).to(device), "attention_mask": mask.to(device)}
    was_training, precision = backbone.training, torch.get_float32_matmul_precision()
    backbone.eval()  # no dropout: no random draws, nothing moves the generator
    torch.set_float32_matmul_precision("highest")  # no TF32: the two paths may differ by rounding only
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            ref = backbone(**feats, return_dict=True).last_hidden_state.float()
            real = mask.to(device).bool()
            scale = 1.0 + ref[real].abs().max().item()
            for offset in dict.fromkeys([0] + ([pad + 1] if isinstance(pad, int) else [])):
                got = packed_hidden(backbone, feats, offset).float()
                if (got[real] - ref[real]).abs().max().item() <= 1e-4 * scale:
                    return Support(True, offset)
        return Support(False, reason="the packed forward differs from the padded one")
    except (TypeError, ValueError, RuntimeError, IndexError) as e:
        return Support(
            False, reason=f"the packed forward fails ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        )
    finally:
        backbone.train(was_training)
        torch.set_float32_matmul_precision(precision)


def pack_wanted(mode: bool | str, device: torch.device) -> bool:
    """``pack_sequences``: true / false, or auto = on CUDA (the CPU's padded path is tuned: few shapes, cached kernels)."""
    return device.type == "cuda" if mode == "auto" else bool(mode)
