"""What a model folder says about encoding (pooling, normalisation, max length, prompts), its content hash, and the
checks every command runs on a model before and after loading it.

Before loading: :func:`check_model_folder` (exists, config.json, tokenizer files, readable safetensors) and
:func:`check_max_length` (lengths within the model's positions); after loading: :func:`check_tokenizer` (vocabulary
not a stub) and :func:`check_finite_weights` (no NaN / inf parameter); results: :func:`check_finite_array`.

A sentence-transformers folder states these in ``modules.json`` (a ``Normalize`` module means L2-normalised
output), ``<pooling dir>/config.json`` (``pooling_mode`` or the legacy ``pooling_mode_*_token`` flags),
``sentence_bert_config.json`` (``max_seq_length``, older versions), ``tokenizer_config.json``
(``model_max_length``, which sentence-transformers 6 uses) and ``config_sentence_transformers.json`` (``prompts``,
``similarity_fn_name``). A plain transformers folder gets what sentence-transformers would guess: mean pooling
(last-token for ``*ForCausalLM`` architectures) and cosine similarity, i.e. normalised embeddings. Every value can
be overridden; an override wins over the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rir_finetune.errors import UserError, located
from rir_finetune.retrieval.pooling import POOLING_METHODS

_ST_POOLING = {"cls": "cls", "mean": "mean", "lasttoken": "last_token"}
_LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "lasttoken",
}
# files that never change the encoder: skipped by the fingerprint (checkpoints carry optimizer state)
_NOT_MODEL = {
    "optimizer.pt",
    "scheduler.pt",
    "trainer_state.json",
    "training_args.bin",
    "README.md",
    ".gitattributes",
}


@dataclass(frozen=True)
class EncoderSettings:
    """How texts become vectors; every field is part of the corpus-cache key."""

    transformer_dir: str  # folder of the transformers model and tokenizer (the folder itself for most models)
    pooling: str  # cls | mean | last_token
    normalize: bool  # L2-normalise embeddings (inner product = cosine)
    max_length: int  # tokens per text, after the instruction is prepended
    query_instruction: str  # prepended to every query
    passage_instruction: (
        str  # prepended to every passage (and to every answer, which is encoded as a passage)
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise located(path, e.lineno, f"invalid JSON: {e.msg}") from None


def _st_pooling(pool_dir: Path) -> str:
    cfg = _read_json(pool_dir / "config.json") if (pool_dir / "config.json").is_file() else {}
    mode = cfg.get("pooling_mode")
    if mode is None:  # legacy format: one boolean flag per mode
        mode = [
            _LEGACY_POOLING.get(k, k) for k, v in cfg.items() if k.startswith("pooling_mode_") and v
        ] or "mean"
    if isinstance(mode, list):
        mode = mode[0] if len(mode) == 1 else "+".join(map(str, mode))
    if mode not in _ST_POOLING:
        raise located(
            pool_dir / "config.json",
            None,
            f"pooling {mode!r} is not supported; set --pooling cls|mean|last_token",
        )
    return _ST_POOLING[mode]


def _max_length(transformer_dir: Path, st_config: dict[str, Any]) -> int:
    model_cfg = transformer_dir / "config.json"
    max_pos = _read_json(model_cfg).get("max_position_embeddings") if model_cfg.is_file() else None
    tok_cfg = transformer_dir / "tokenizer_config.json"
    tok_max = _read_json(tok_cfg).get("model_max_length") if tok_cfg.is_file() else None
    length = st_config.get("max_seq_length")
    if length is None and isinstance(tok_max, (int, float)) and tok_max < 1_000_000:
        length = int(tok_max)
    if length is None:
        length = max_pos or 512
    return int(min(length, max_pos)) if isinstance(max_pos, int) and max_pos > 0 else int(length)


def read_settings(
    model_dir: str | Path,
    *,
    pooling: str | None = None,
    normalize: bool | None = None,
    max_length: int | None = None,
    query_instruction: str | None = None,
    passage_instruction: str | None = None,
) -> EncoderSettings:
    """Settings of ``model_dir``; a keyword that is not ``None`` overrides what the folder says."""
    root = Path(model_dir)
    if not root.is_dir():
        raise UserError(f"{root}: model folder not found")
    modules_path = root / "modules.json"
    modules = _read_json(modules_path) if modules_path.is_file() else None
    transformer_dir, folder_pooling, folder_normalize = root, "mean", None
    if modules is not None:
        for mod in modules:
            kind = str(mod.get("type", "")).rsplit(".", 1)[-1]
            if kind == "Transformer":
                transformer_dir = root / mod.get("path", "")
            elif kind == "Pooling":
                folder_pooling = _st_pooling(root / mod.get("path", ""))
            elif kind == "Normalize":
                folder_normalize = True
    elif (root / "config.json").is_file():
        archs = _read_json(root / "config.json").get("architectures") or [""]
        folder_pooling = "last_token" if str(archs[0]).endswith("ForCausalLM") else "mean"
    if not (transformer_dir / "config.json").is_file():
        raise located(transformer_dir, None, "not a model folder (no config.json)")
    st_path = root / "config_sentence_transformers.json"
    st_cfg = _read_json(st_path) if st_path.is_file() else {}
    if folder_normalize is None:  # sentence-transformers scores with cosine unless the folder says otherwise
        folder_normalize = st_cfg.get("similarity_fn_name") in (None, "cosine")
    prompts = st_cfg.get("prompts") or {}
    default_prompt = prompts.get(st_cfg.get("default_prompt_name") or "", "")
    folder_query = prompts.get("query", default_prompt)
    folder_passage = next(
        (prompts[k] for k in ("document", "passage", "corpus") if k in prompts), default_prompt
    )
    sbert_path = transformer_dir / "sentence_bert_config.json"
    sbert_cfg = _read_json(sbert_path) if sbert_path.is_file() else {}
    pooling = pooling if pooling is not None else folder_pooling
    if pooling not in POOLING_METHODS:
        raise UserError(f"config key 'pooling': {pooling!r} is not one of {', '.join(POOLING_METHODS)}")
    return EncoderSettings(
        transformer_dir=str(transformer_dir),
        pooling=pooling,
        normalize=folder_normalize if normalize is None else normalize,
        max_length=max_length if max_length is not None else _max_length(transformer_dir, sbert_cfg),
        query_instruction=folder_query if query_instruction is None else query_instruction,
        passage_instruction=folder_passage if passage_instruction is None else passage_instruction,
    )


def model_fingerprint(model_dir: str | Path) -> str:
    """SHA-256 over the relative path and bytes of every file that defines the model (weights, configs, tokenizer).

    Two folders with the same name but different weights get different fingerprints; a copy of a folder elsewhere
    gets the same one. Training-state files (optimizer, scheduler, trainer state) and checkpoint sub-folders are
    left out.
    """
    root = Path(model_dir)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if (
            rel.name in _NOT_MODEL
            or rel.name.startswith("rng_state")
            or rel.parts[0].startswith("checkpoint-")
        ):
            continue
        h.update(str(rel.as_posix()).encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Checks before and after loading a model

TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "sentencepiece.model",
    "spm.model",
    "vocab.model",
)


def check_model_folder(
    path: str | os.PathLike | None,
    *,
    key: str,
    need_tokenizer: bool = True,
    transformer_dir: Path | None = None,
) -> Path:
    """A local model folder ready to load: it exists, has ``config.json``, tokenizer files and readable weights.

    ``transformer_dir`` is where the transformers model lives (a sentence-transformers folder may keep it in a
    sub-folder); default ``path``.
    """
    if not path:
        raise UserError(f"config key {key!r}: required (a local model folder)")
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"config key {key!r}: {root} is not a model folder (not found)")
    inner = transformer_dir or root
    if not (inner / "config.json").is_file():
        raise UserError(f"config key {key!r}: {inner} is not a model folder (no config.json)")
    if need_tokenizer and not any((d / f).is_file() for d in {root, inner} for f in TOKENIZER_FILES):
        raise UserError(
            f"config key {key!r}: {inner} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
            "copy them from the base model"
        )
    for weights in sorted(inner.glob("*.safetensors")):
        check_safetensors(weights)
    return root


def check_safetensors(path: Path) -> None:
    """The header of a ``.safetensors`` file parses and its data is as long as the header says."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 0 or 8 + n > size:
                raise ValueError("truncated header")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"file is {size} bytes, its header needs {8 + n + end}")
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"{path}: damaged weights file ({e}); copy the model again") from None


def check_tokenizer(tokenizer: Any, model_config: Any, where: str | os.PathLike) -> None:
    """A tokenizer whose vocabulary is a stub (far smaller than the model's embedding table) is refused."""
    vocab = len(tokenizer)
    model_vocab = getattr(model_config, "vocab_size", None)
    if isinstance(model_vocab, int) and model_vocab > 0 and 2 * vocab < model_vocab:
        raise UserError(
            f"{where}: the tokenizer has {vocab} tokens but the model {model_vocab}; "
            "tokenizer files are missing or wrong"
        )


def check_finite_weights(model: Any, where: str | os.PathLike) -> None:
    """A model with a NaN or infinite parameter gives garbage everywhere: refused, naming a parameter."""
    import torch

    for name, p in model.named_parameters():
        if p.is_floating_point() and p.numel() and not bool(torch.isfinite(p).all()):
            raise UserError(f"{where}: weight {name} holds NaN or infinite values; the model is broken")


def check_finite_array(values: Any, what: str) -> None:
    """Embeddings or scores with NaN / inf cannot be right."""
    import numpy as np

    arr = np.asarray(values)
    if arr.size and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).reshape(arr.shape[0], -1).any(axis=1).sum()) if arr.ndim else 1
        raise UserError(
            f"{what}: {bad} of {arr.shape[0] if arr.ndim else 1} are NaN or infinite; the model is broken"
        )


def model_max_positions(model_dir: str | os.PathLike) -> int | None:
    """``max_position_embeddings`` (or ``n_positions``) of ``model_dir/config.json``, None when unknown."""
    cfg_path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = cfg.get(name)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_max_length(key: str, value: int | None, model_dir: str | os.PathLike) -> None:
    """A length above the model's position table is refused before the first batch."""
    limit = model_max_positions(model_dir)
    if value is not None and limit is not None and value > limit:
        raise UserError(f"config key {key!r}: {value} is above the model's {limit} positions ({model_dir})")
