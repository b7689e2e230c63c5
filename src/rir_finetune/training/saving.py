"""Save a trained encoder in the sentence-transformers layout (SPEC defect 9: pooling, normalisation and prompts
travel with the weights), loadable by ``SentenceTransformer(dir)`` and ``AutoModel.from_pretrained(dir)`` alike.

Files are written to a temporary folder and moved into place with ``modules.json`` last, so a folder that has
``modules.json`` is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from rir_finetune.files import shareable

POOLING_FLAGS = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "last_token": "pooling_mode_lasttoken",
}


def sentence_transformers_files(
    dim: int,
    pooling: str,
    normalize: bool,
    max_seq_length: int,
    query_prompt: str | None,
    passage_prompt: str | None,
    query_length: int | None = None,
    document_length: int | None = None,
) -> dict[str, dict | list]:
    """The JSON files of the sentence-transformers layout, by relative path.

    ``max_seq_length`` caps plain ``encode``; ``query_length`` / ``document_length`` (sentence-transformers 6) cap
    ``encode_query`` / ``encode_document``, so queries are cut where training cut them (``query_max_len``).
    """
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    pool_cfg = {"word_embedding_dimension": dim, "include_prompt": True}
    pool_cfg.update({flag: name == pooling for name, flag in POOLING_FLAGS.items()})
    pool_cfg.update({"pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False})
    prompts = {}
    if query_prompt:
        prompts["query"] = query_prompt
    if passage_prompt:
        prompts["document"] = passage_prompt
    return {
        "modules.json": modules,
        "sentence_bert_config.json": {
            "max_seq_length": max_seq_length,
            "do_lower_case": False,
            **({"query_length": query_length} if query_length else {}),
            **({"document_length": document_length} if document_length else {}),
        },
        "1_Pooling/config.json": pool_cfg,
        "config_sentence_transformers.json": {
            "prompts": prompts,
            "default_prompt_name": None,
            "similarity_fn_name": "cosine" if normalize else "dot",
            "model_type": "SentenceTransformer",
        },
    }


def save_encoder(
    output_dir: str | os.PathLike,
    backbone: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    pooling: str,
    normalize: bool,
    max_seq_length: int,
    query_prompt: str | None = None,
    passage_prompt: str | None = None,
    query_length: int | None = None,
    document_length: int | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    extra: Callable[[Path], None] | None = None,
) -> None:
    """Write weights, tokenizer and sentence-transformers config files into ``output_dir``.

    ``extra(folder)`` may add files (the LoRA adapter); they are moved in with the rest, before modules.json.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".saving-", dir=out))
    try:
        backbone.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        dim = backbone.config.hidden_size
        files = sentence_transformers_files(
            dim,
            pooling,
            normalize,
            max_seq_length,
            query_prompt,
            passage_prompt,
            query_length,
            document_length,
        )
        for rel, content in files.items():
            if rel == "modules.json":
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(json.dumps(content, indent=2) + "\n")
        if normalize:
            (tmp / "2_Normalize").mkdir(exist_ok=True)
        if extra is not None:
            extra(tmp)
        (out / "modules.json").unlink(missing_ok=True)  # the folder is incomplete until modules.json returns
        for item in sorted(tmp.rglob("*")):
            if item.is_file():
                dest = out / item.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shareable(item)
                os.replace(item, dest)
        (out / "modules.json.tmp").write_text(json.dumps(files["modules.json"], indent=2) + "\n")
        os.replace(out / "modules.json.tmp", out / "modules.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
