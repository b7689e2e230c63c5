"""Where a generator model is, and whether it is a causal LM, checked from its files before anything loads.

Every command that loads a text generator through transformers (augment, generate, score's LLM teacher, reward,
train-generator) runs :func:`check_causal_lm` first: an encoder folder (BERT) would otherwise load with a randomly
initialised LM head and write noise."""

from __future__ import annotations

import json
from pathlib import Path

from rir_finetune.errors import UserError
from rir_finetune.llm.common import check_gguf
from rir_finetune.llm.common import model_file as model_location  # noqa: F401 (one rule for --model / --gguf_file)

# architectures that generate text left to right; BERT-like encoders have a causal-LM head class too
# (BertLMHeadModel), so the saved architecture, not the model type, decides
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def is_causal_architecture(architectures: list[str]) -> bool:
    return bool(architectures) and all(str(a).endswith(_CAUSAL_SUFFIXES) for a in architectures)


def check_causal_lm(folder: Path, gguf_file: str | None, key: str = "model") -> None:
    """A UserError naming the folder when its ``config.json`` describes something other than a causal LM.

    A GGUF file is a language model by construction (llama.cpp's format); a folder must have a ``config.json`` whose
    ``architectures`` are causal-LM classes (without architectures, which transformers always saves: a model type
    that transformers has a causal LM for).
    """
    if gguf_file is not None:
        check_gguf(folder / gguf_file)  # llama.cpp's format: a language model by construction, if it is one
        return
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder}: not a model folder (no config.json); config key {key!r}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{config_path}: unreadable model config ({e})") from None
    archs = config.get("architectures") or []
    if archs:
        ok = is_causal_architecture(archs)
    else:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        ok = config.get("model_type", "") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # nothing more to tell from
    if not ok:
        what = ", ".join(archs) or config.get("model_type", "unknown")
        raise UserError(
            f"{folder}: not a causal language model ({what}); config key {key!r} needs a text generator"
        )
