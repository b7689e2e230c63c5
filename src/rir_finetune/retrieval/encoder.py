"""Texts -> embeddings with a transformers model: pooling, normalisation, length-sorted batches, fp32 output.

The model computes in ``dtype``: ``float32``, or ``bfloat16`` under ``torch.autocast`` (weights stay fp32;
matmuls in bf16, LayerNorm, softmax, pooling and normalisation in fp32); ``auto`` (the default) = bf16 on a CUDA
device that has it, fp32 on a CPU (:func:`rir_finetune.precision.resolve_encode_dtype`). bf16 changes embeddings in the third decimal and may swap near-tied
documents; the embedding cache keys it separately.

Texts are tokenized once (truncated to ``max_length``), sorted by token count, longest first, and cut into batches
of ``batch_size`` on a CPU; on CUDA into batches of as many texts as a token budget holds (:func:`batch_tokens`:
a share of the free memory over what one token needs in a layer), so a large GPU gets hundreds of texts per forward.
Each batch pads to nearly its own length (in bf16 to a multiple of 16: fewer kernel shapes); the embeddings come
back in input order. On CUDA each batch is encoded as one packed row of its real tokens
(``pack_sequences``, :mod:`rir_finetune.retrieval.packing`, which training shares: no FLOPs on padding, the same
embeddings); on a CPU padded (length-sorted batches leave little padding, and its padded path is tuned). Before
anything is encoded
the folder is checked (:mod:`rir_finetune.guards`: tokenizer files, weights readable and finite, max length within
the model's positions, the device present); embeddings with NaN or infinity are an error, never a result.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from rir_finetune import precision
from rir_finetune.errors import UserError
from rir_finetune.retrieval import model_folder
from rir_finetune.retrieval.model_folder import EncoderSettings, read_settings
from rir_finetune.retrieval.packing import (
    pack_wanted,
    packable,
    packed_hidden,
    packing_support,
    register_packed_sdpa,
)
from rir_finetune.retrieval.pooling import pool

logger = logging.getLogger("rir_finetune")

BF16_PAD_MULTIPLE = 16  # bf16 batches pad to a multiple of this: CPU bf16 kernels are cached per shape
TOKENIZE_CHUNK = 32_768  # texts tokenized and sorted together; bounds the memory held by token ids


# on CUDA: share of the free memory an encoding batch may fill (the allocator's rounding, the pooled output and
# whatever else the process allocates meanwhile take the rest), and the most texts a batch holds
ENCODE_MEMORY_SHARE = 0.5
GPU_MAX_TEXTS = 4096


def length_sorted_batches(
    lengths: list[int], batch_size: int, max_tokens: int | None = None
) -> list[np.ndarray]:
    """Positions of the texts, longest first (ties in input order), cut into batches of at most ``batch_size``
    texts and, with ``max_tokens``, at most that many padded tokens (texts x the batch's longest; one text at
    least).

    Every position appears exactly once, so writing batch results to ``out[idx]`` restores input order."""
    order = np.argsort([-n for n in lengths], kind="stable")
    if max_tokens is None:
        return [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    batches, b = [], 0
    while b < len(order):
        n = max(1, min(batch_size, max_tokens // max(lengths[order[b]], 1)))  # the first is the longest
        batches.append(order[b : b + n])
        b += n
    return batches


def bytes_per_token(config, elem_bytes: int, seq_len: int, packed: bool) -> int:
    """Memory one token takes in an inference forward, one layer live at a time: the layer's input and output,
    q, k, v, the attention's context and projection, the FFN's two intermediate products, the fp32 last hidden
    state; padded (not packed) attention also holds a row of scores and probabilities per head."""
    h = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0))
    inter = int(getattr(config, "intermediate_size", None) or 4 * h)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    scores = 0 if packed else 2 * heads * seq_len * elem_bytes
    return elem_bytes * (7 * h + 2 * inter) + 4 * h + scores


def batch_tokens(free_bytes: float, per_token: int, share: float = ENCODE_MEMORY_SHARE) -> int:
    """Padded tokens per batch that fit ``share`` of ``free_bytes``, at ``per_token`` bytes each (at least 1)."""
    return max(1, int(share * free_bytes // max(per_token, 1)))


class Encoder:
    """A model folder ready to encode queries and passages the way :class:`EncoderSettings` says."""

    def __init__(
        self,
        settings: EncoderSettings,
        *,
        batch_size: int = 64,
        device: str = "auto",
        show_progress: bool = True,
        trust_remote_code: bool = False,
        dtype: str = "auto",
        pack_sequences: bool | str = "auto",
    ):
        self.settings = settings
        device = precision.resolve_device(device)
        self.dtype = precision.resolve_encode_dtype(dtype, device)  # float32 | bfloat16 | float16
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.show_progress = show_progress
        path = settings.transformer_dir
        precision.check_device(device)
        model_folder.check_model_folder(path, key="model")  # config, tokenizer files, readable weights
        model_folder.check_max_length("max_length", settings.max_length, path)
        pack = pack_wanted(pack_sequences, self.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            self.model = _load_model(path, trust_remote_code, pack)
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: cannot load the model ({str(e).strip().splitlines()[0]})") from None
        if self.tokenizer.pad_token is None:  # decoder-only tokenizers: padding is masked out anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model_folder.check_tokenizer(self.tokenizer, self.model.config, path)
        model_folder.check_finite_weights(self.model, path)
        self.model.to(self.device).eval()
        self.packing = packing_support(self.model) if pack else None
        self._logged_batches = False
        if self.packing is not None and not self.packing.ok:
            logger.info("pack_sequences: padded batches instead: %s", self.packing.reason)

    @classmethod
    def from_folder(cls, model_dir: str | Path, **kwargs) -> Encoder:
        """Read the folder's settings (no overrides) and load it."""
        return cls(read_settings(model_dir), **kwargs)

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        """(n, H) float32 query embeddings, the query instruction prepended."""
        return self.encode(texts, self.settings.query_instruction, desc="queries")

    def encode_passages(self, texts: list[str]) -> np.ndarray:
        """(n, H) float32 passage embeddings, the passage instruction prepended."""
        return self.encode(texts, self.settings.passage_instruction, desc="passages")

    @torch.inference_mode()
    def encode(self, texts: list[str], instruction: str = "", desc: str = "encode") -> np.ndarray:
        """Embed ``texts`` (instruction prepended) into an (n, H) float32 array in input order."""
        out: np.ndarray | None = None
        bar = tqdm(total=len(texts), desc=desc, unit="text", disable=not self.show_progress or not texts)
        for start in range(0, len(texts), TOKENIZE_CHUNK):
            chunk = [instruction + t for t in texts[start : start + TOKENIZE_CHUNK]]
            enc = self.tokenizer(chunk, truncation=True, max_length=self.settings.max_length)
            for idx in self._batches([len(ids) for ids in enc["input_ids"]]):
                feats = self.tokenizer.pad(
                    {k: [enc[k][i] for i in idx] for k in enc}, return_tensors="pt", **self._padding(enc, idx)
                )
                reps = self._embed({k: v.to(self.device) for k, v in feats.items()})  # (b, H)
                if out is None:
                    out = np.empty((len(texts), reps.shape[1]), dtype=np.float32)
                out[start + idx] = reps.float().cpu().numpy()
                bar.update(len(idx))
        bar.close()
        if out is None:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        model_folder.check_finite_array(out, f"{self.settings.transformer_dir}: {desc} embeddings")
        return out

    def _batches(self, lengths: list[int]) -> list[np.ndarray]:
        """``batch_size`` texts per batch on a CPU; on CUDA as many as :func:`batch_tokens` holds (logged once)."""
        if self.device.type != "cuda" or not lengths:
            return length_sorted_batches(lengths, self.batch_size)
        elem = 4 if self.dtype == "float32" else 2
        packed = self.packing is not None and self.packing.ok
        per_token = bytes_per_token(self.model.config, elem, max(lengths), packed)
        free = precision.cuda_free_bytes(self.device)
        tokens = batch_tokens(free, per_token)
        batches = length_sorted_batches(lengths, GPU_MAX_TEXTS, tokens)
        if not self._logged_batches:
            self._logged_batches = True
            logger.info(
                "encoding on %s: batches of up to %d tokens (%.1f GiB free, %d bytes per token), %d texts in the "
                "first", self.device, tokens, free / 2**30, per_token, len(batches[0]),
            )  # fmt: skip
        return batches

    def _padding(self, enc, idx) -> dict:
        """fp32: to the batch's longest text. bf16: rounded up to a multiple of 16 (at most ``max_length``), so the
        batches take a few shapes: oneDNN builds and caches bf16 kernels per shape, which grew the process with
        every new length over a corpus of length-sorted batches."""
        if self.dtype == "float32":
            return {}
        longest = max(len(enc["input_ids"][i]) for i in idx)
        m = BF16_PAD_MULTIPLE
        return {
            "padding": "max_length",
            "max_length": max(longest, min(self.settings.max_length, -(-longest // m) * m)),
        }

    def _embed(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """features: input_ids / attention_mask / ... of shape (B, L). Returns (B, H) pooled (normalised) reps."""
        with torch.autocast(
            self.device.type, dtype=getattr(torch, self.dtype), enabled=self.dtype != "float32"
        ):
            if self.packing is not None and self.packing.ok and packable(features):
                hidden = packed_hidden(self.model, features, self.packing.position_offset)  # (B, L, H)
            else:
                hidden = self.model(**features, return_dict=True).last_hidden_state  # (B, L, H)
        hidden = hidden.float()
        reps = pool(hidden, features["attention_mask"], self.settings.pooling)  # (B, H)
        if self.settings.normalize:
            reps = torch.nn.functional.normalize(reps, dim=-1)
        return reps


def _load_model(path: str, trust_remote_code: bool, pack: bool):
    """fp32 weights; packing needs :data:`PACKED_SDPA` (transformers' SDPA for unpacked batches, which compute as
    before), which an architecture without registered attention functions refuses: then transformers' default."""
    if pack:
        try:
            return AutoModel.from_pretrained(
                path,
                dtype=torch.float32,
                trust_remote_code=trust_remote_code,
                attn_implementation=register_packed_sdpa(),
            )
        except ValueError:
            pass
    return AutoModel.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code)
