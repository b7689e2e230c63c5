"""The model card (``README.md``) written into every model that ``train`` saves.

Front matter in the Hugging Face hub's format (``huggingface_hub.ModelCardData``: base model, library, tags,
pipeline), then what a reader needs to reuse or reproduce the model: how to load it, the base model, the data, the
objective terms with their weights and temperatures, the evaluation metrics logged during training (when
``eval_data`` was set), and the resolved config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from rir_finetune.files import atomic_write

TERMS = {  # term -> (weight key, temperature key, description)
    "qp": ("qp_weight", "temperature", "query -> passages InfoNCE (in-batch and hard negatives)"),
    "qa": ("qa_weight", "answer_temperature", "query -> LLM answers InfoNCE"),
    "norm": ("norm_weight", None, "answer-norm term, mean (||a|| - 1)^2"),
    "ap": ("ap_weight", "temperature", "answer -> passages InfoNCE"),
    "kd": ("kd_weight", "temperature", "distillation from teacher scores"),
}


def active_terms(config: dict[str, Any]) -> list[str]:
    """The objective terms a resolved training config trains (SPEC section 3)."""
    kind = config.get("training_type", "retrieval")
    terms = ["qp"]
    if kind in {"retrieval_answer", "retrieval_answer_passage"}:
        terms += ["qa"] + (["norm"] if config.get("normalize_answer", True) else [])
    if kind == "retrieval_answer_passage":
        terms.append("ap")
    if config.get("knowledge_distillation"):
        terms.append("kd")
    return terms


def _eval_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    last = [e for e in log_history if any(k.startswith("eval_") and "ndcg" in k for k in e)]
    if not last:
        return {}
    return {k: float(v) for k, v in last[-1].items() if k.startswith("eval_") and isinstance(v, (int, float))}


def model_card(config: dict[str, Any], log_history: list[dict[str, Any]] | None = None) -> str:
    """The card's text for a resolved training config (``rir_config.yaml``'s mapping)."""
    from huggingface_hub import ModelCardData

    base = str(config.get("model_name_or_path") or "")
    data = config.get("train_data") or []
    data = [data] if isinstance(data, str) else list(data)
    card_data = ModelCardData(
        library_name="sentence-transformers",
        pipeline_tag="sentence-similarity",
        tags=[
            "sentence-transformers",
            "feature-extraction",
            "dense-retrieval",
            "reinforced-ir",
            "rir-finetune",
        ],
        base_model=base if base and not os.path.isabs(base) else None,
    )
    terms = active_terms(config)
    steps = [e.get("step") for e in (log_history or []) if "loss" in e]
    lines = [
        "---",
        card_data.to_yaml(),
        "---",
        "",
        f"# {Path(str(config.get('output_dir', 'model'))).name}",
        "",
        f"A dense retriever fine-tuned by rir-finetune with the Reinforced-IR objective from "
        f"`{base or 'a base model'}`.",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "model = SentenceTransformer(PATH)",
        "q = model.encode_query(['a query'])      # the saved query prompt is applied",
        "d = model.encode_document(['a passage'])",
        "```",
        "",
        "## Training",
        "",
        f"- base model: `{base}`",
        f"- data: {', '.join(f'`{d}`' for d in data) or 'unknown'}",
        f"- training_type `{config.get('training_type')}`, {config.get('train_group_size')} passages per query, "
        f"{config.get('per_device_train_batch_size')} queries per device, pooling "
        f"`{config.get('sentence_pooling_method')}`, normalised: {config.get('normalize_embeddings')}",
        f"- steps logged: {max((s for s in steps if s is not None), default=0)}; learning rate "
        f"{config.get('learning_rate')}; seed {config.get('seed')}",
        "",
        "| term | weight | temperature | what |",
        "|---|---|---|---|",
    ]
    for t in terms:
        wkey, tkey, what = TERMS[t]
        weight = config.get(wkey, 1.0)
        temp = config.get(tkey) if tkey else "-"
        extra = f" ({config.get('kd_loss_type')})" if t == "kd" else ""
        lines.append(f"| L_{t} | {weight} | {temp} | {what}{extra} |")
    metrics = _eval_metrics(log_history or [])
    if metrics:
        lines += [
            "",
            "## Evaluation during training (last evaluation)",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())]
    lines += [
        "",
        "## Resolved config",
        "",
        "```yaml",
        yaml.safe_dump(config, sort_keys=True).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(
    folder: str | os.PathLike, config: dict[str, Any], log_history: list[dict[str, Any]] | None = None
) -> Path:
    path = Path(folder) / "README.md"
    text = model_card(json.loads(json.dumps(config, default=str)), log_history)
    atomic_write(path, lambda f: f.write(text))
    return path
