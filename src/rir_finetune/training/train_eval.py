"""Retrieval evaluation during training: the in-memory model scored on a BEIR-layout set every ``eval_steps``.

Rank 0 encodes and searches (the evaluation stack, :mod:`rir_finetune.evaluation`); every rank receives the same
metrics, logged as ``eval_<name>_ndcg@10`` etc. and usable as ``metric_for_best_model``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from rir_finetune.training import distributed
from rir_finetune.training.model import BiEncoder


@torch.no_grad()
def encode_texts(
    model: BiEncoder,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_length: int,
    batch_size: int = 64,
    device: torch.device | None = None,
    dtype: str = "auto",
) -> np.ndarray:
    """(n, D) float32 embeddings in input order; texts batched by length so padding stays short. ``dtype`` as the
    ``eval`` command's (``auto``: bf16 autocast on a GPU that has it, fp32 on a CPU), so the metrics logged during
    training, and ``metric_for_best_model``, are the ones ``eval`` reports for the saved model."""
    from rir_finetune.precision import resolve_encode_dtype

    device = device or next(model.parameters()).device
    dtype = resolve_encode_dtype(dtype, str(device))
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), model.backbone.config.hidden_size), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        feats = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")  # fmt: skip
        with torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=dtype != "float32"):
            reps = model.encode({k: v.to(device) for k, v in feats.items()})
        out[idx] = reps.float().cpu().numpy()
    return out


@dataclass
class TrainingEvaluator:
    data_dir: str
    split: str
    name: str
    query_prompt: str | None  # prefix before every query, as training formats it (DataArguments.prompt)
    passage_prompt: str | None
    query_max_len: int
    passage_max_len: int
    max_queries: int | None = None
    batch_size: int = 64
    k_values: tuple[int, ...] = (1, 3, 5, 10, 100)

    def __post_init__(self):
        from rir_finetune.evaluation import load_beir

        self.dataset = load_beir(self.data_dir, self.split).limit_queries(self.max_queries)
        if not self.name:
            self.name = Path(self.data_dir).name

    def __len__(self) -> int:  # the Trainer checks that an eval dataset exists
        return len(self.dataset.queries)

    def evaluate(
        self, model: BiEncoder, tokenizer: PreTrainedTokenizerBase, prefix: str = "eval"
    ) -> dict[str, float]:
        """Metrics on rank 0, broadcast to every rank."""
        metrics: dict[str, float] = {}
        if distributed.rank() == 0:
            from rir_finetune.evaluation import evaluate_retrieval

            was_training = model.training
            model.eval()
            qi, pi = self.query_prompt or "", self.passage_prompt or ""
            try:
                raw = evaluate_retrieval(
                    lambda t: encode_texts(
                        model, tokenizer, [qi + x for x in t], self.query_max_len, self.batch_size
                    ),
                    lambda t: encode_texts(
                        model, tokenizer, [pi + x for x in t], self.passage_max_len, self.batch_size
                    ),
                    self.dataset,
                    k_values=self.k_values,
                )
            finally:
                model.train(was_training)
            metrics = {f"{prefix}_{self.name}_{k}": float(v) for k, v in raw.items()}
        return distributed.broadcast_object(metrics)
