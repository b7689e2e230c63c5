"""The bi-encoder: one shared transformer embeds queries, answers and passages. Embeddings only, no losses."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from rir_finetune.errors import UserError
from rir_finetune.retrieval.pooling import pool

logger = logging.getLogger("rir_finetune")


def trim_padding(features: dict[str, Tensor], multiple: int | None = None) -> dict[str, Tensor]:
    """Drop padding columns that no row needs (right or left padding): (n, L) -> (n, L').

    ``multiple``: L' is the longest text rounded up to a multiple of this (at most L), as the collator pads, so
    chunks take a few distinct shapes (the CPU's bf16 kernels are cached per shape: every new one costs memory).
    """
    mask = features["attention_mask"]
    longest = int(mask.sum(dim=1).max())
    if multiple and multiple > 1:
        longest = min(mask.size(1), -(-longest // multiple) * multiple)
    if longest == mask.size(1):
        return features
    right = bool((mask[:, 0] == 1).all())
    cut = slice(0, longest) if right else slice(mask.size(1) - longest, mask.size(1))
    return {k: (v[:, cut] if v.dim() == 2 and v.size(1) == mask.size(1) else v) for k, v in features.items()}


def split_features(
    features: dict[str, Tensor], size: int, multiple: int | None = None
) -> list[dict[str, Tensor]]:
    """Chunks of ``size`` rows, each padded only to its own longest text (rounded up to ``multiple``)."""
    n = features["input_ids"].size(0)
    return [
        trim_padding({k: v[i : i + size] for k, v in features.items()}, multiple) for i in range(0, n, size)
    ]


@dataclass
class Reps:
    """Embeddings of one batch, fp32."""

    q_reps: Tensor  # (B, D)
    p_reps: Tensor  # (B*G, D)
    a_reps: Tensor | None = None  # (B, D)
    a_cand_reps: Tensor | None = None  # (B*Ga, D) when answer candidates are given


class BiEncoder(nn.Module):
    """Shared encoder with pooling and optional L2 normalisation.

    ``forward`` embeds the tokenised queries, passages and (optionally) answers of a batch and returns
    :class:`Reps`; the trainer hands them to :func:`rir_finetune.training.objectives.compute_objectives`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        pooling: str = "cls",
        normalize: bool = True,
        sub_batch_size: int | None = None,
        pad_to_multiple_of: int | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.normalize = normalize
        self.sub_batch_size = sub_batch_size
        self.pad_to_multiple_of = pad_to_multiple_of  # sub-batches keep the collator's length multiple
        self.config = getattr(backbone, "config", None)
        self.pack_sequences: bool | str = "auto"  # auto: packed on CUDA, padded on a CPU
        self._packing = None  # retrieval.encoder.Support, found at the first packed forward

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        pooling: str,
        normalize: bool,
        sub_batch_size: int | None = None,
        attn_implementation: str | None = "auto",
        config_name: str | None = None,
        **hf_kwargs,
    ) -> BiEncoder:
        """``attn_implementation``: ``auto`` (``rir_sdpa`` of :mod:`.attention` where the model accepts it, else
        transformers' default; with the CPU dropout of :mod:`.dropout`), None (transformers' default) or any name transformers knows (sdpa, eager, ...)."""
        try:
            if (
                config_name
            ):  # the architecture from another folder (upstream's config_name), weights from path
                from transformers import AutoConfig

                hf_kwargs["config"] = AutoConfig.from_pretrained(config_name, **hf_kwargs)
            backbone = load_backbone(path, attn_implementation, **hf_kwargs)
        except OSError as e:
            raise UserError(
                f"config key 'model_name_or_path': cannot load a model from {path!r} ({e})"
            ) from None
        freeze_unused(backbone)
        return cls(backbone, pooling=pooling, normalize=normalize, sub_batch_size=sub_batch_size)

    # -- encoding ------------------------------------------------------------------------------------------------

    def encode(self, features: dict[str, Tensor]) -> Tensor:
        """Tokenised texts -> (n, D) fp32 embeddings, in chunks of ``sub_batch_size`` when set."""
        if not self.sub_batch_size or self.sub_batch_size >= features["input_ids"].size(0):
            return self._encode_once(features)
        return torch.cat(
            [
                self._encode_once(ch)
                for ch in split_features(features, self.sub_batch_size, self.pad_to_multiple_of)
            ],
            dim=0,
        )

    def _encode_once(self, features: dict[str, Tensor]) -> Tensor:
        if self._packs(features):
            from rir_finetune.retrieval.packing import packed_hidden

            hidden = packed_hidden(self.backbone, features, self._packing.position_offset)  # (n, L, D)
        else:
            hidden = self.backbone(**features, return_dict=True).last_hidden_state  # (n, L, D)
        reps = pool(hidden, features["attention_mask"], self.pooling).float()  # (n, D)
        return F.normalize(reps, dim=-1) if self.normalize else reps

    def _packs(self, features: dict[str, Tensor]) -> bool:
        from rir_finetune.retrieval import packing

        if not packing.pack_wanted(self.pack_sequences, features["input_ids"].device) or not packing.packable(
            features
        ):
            return False
        if self._packing is None:
            self._packing = packing.packing_support(self.backbone)
            if not self._packing.ok:
                logger.info("pack_sequences: padded batches instead: %s", self._packing.reason)
        return self._packing.ok

    def forward(
        self,
        queries: dict[str, Tensor] | None = None,
        passages: dict[str, Tensor] | None = None,
        answers: dict[str, Tensor] | None = None,
        answer_candidates: dict[str, Tensor] | None = None,
        features: dict[str, Tensor] | None = None,
        **_: object,
    ) -> Reps | Tensor:
        """Embed a batch's parts (-> :class:`Reps`), or one tokenised chunk ``features`` (-> (n, D))."""
        if features is not None:
            return self.encode(features)
        q_reps = self.encode(queries)  # (B, D)
        p_reps = self.encode(passages)  # (B*G, D)
        a_reps = self.encode(answers) if answers is not None else None  # (B, D)
        a_cand_reps = None
        if answer_candidates is not None:
            a_cand_reps = self.encode(answer_candidates)  # (B*Ga, D), each group led by the answer itself
            a_reps = a_cand_reps.view(q_reps.size(0), -1, a_cand_reps.size(-1))[:, 0]  # (B, D)
        return Reps(q_reps=q_reps, p_reps=p_reps, a_reps=a_reps, a_cand_reps=a_cand_reps)

    # -- trainer hooks ---------------------------------------------------------------------------------------------

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, **kw
    ) -> None:
        """Recompute activations in backward (``gradient_checkpointing``); non-reentrant by default."""
        kwargs = activation_checkpointing_kwargs or {"use_reentrant": False}
        if hasattr(self.backbone, "activation_checkpointing_enable"):
            self.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **kw)
        else:
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    gradient_checkpointing_enable = activation_checkpointing_enable

    @property
    def is_activation_checkpointing(self) -> bool:
        flag = getattr(type(self.backbone), "is_activation_checkpointing", None)
        if flag is not None:
            return bool(self.backbone.is_activation_checkpointing)
        return bool(getattr(self.backbone, "is_gradient_checkpointing", False))

    def enable_input_require_grads(self) -> None:
        self.backbone.enable_input_require_grads()


def load_backbone(path: str, attn_implementation: str | None, **hf_kwargs) -> nn.Module:
    if attn_implementation != "auto":
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        return AutoModel.from_pretrained(path, **extra, **hf_kwargs)
    from rir_finetune.training.attention import register
    from rir_finetune.training.dropout import use_fast_dropout

    try:
        backbone = AutoModel.from_pretrained(path, attn_implementation=register(), **hf_kwargs)
    except ValueError:  # the architecture takes no registered attention function: transformers' default
        backbone = AutoModel.from_pretrained(path, **hf_kwargs)
    use_fast_dropout(
        backbone
    )  # CPU dropout masks from 16-bit random slices (dropout.py); elsewhere unchanged
    return backbone


def freeze_unused(backbone: nn.Module) -> None:
    """Freeze modules that never reach the sentence embedding (BERT's pooler), so no parameter trains unused."""
    pooler = getattr(backbone, "pooler", None)
    if isinstance(pooler, nn.Module):
        for p in pooler.parameters():
            p.requires_grad_(False)


def load_tokenizer(path: str, **hf_kwargs) -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(path, **hf_kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {path!r} ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def check_model_path(path: str | None) -> None:
    if not path:
        raise UserError("config key 'model_name_or_path': required (a local model folder or a hub name)")
    p = Path(path)
    looks_local = p.is_absolute() or path.startswith(".") or path.count("/") > 1
    if looks_local and not p.exists():
        raise UserError(f"config key 'model_name_or_path': {path} does not exist")
