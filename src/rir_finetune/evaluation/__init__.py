"""Retrieval evaluation: data -> encode -> exact search -> metrics.

The pieces, in data-flow order: :mod:`.data` (BEIR / FlagEmbedding layouts), :mod:`.model_folder` (what a model
folder says about pooling and prompts), :mod:`.encoder` (texts -> vectors), :mod:`.cache` (corpus vectors on disk),
:mod:`.answers` (query / answer / fused query vectors), :mod:`.search` (faiss or torch exact search),
:mod:`.metrics` (pytrec_eval), :mod:`.retrieval` (the three chained, for any encode callables), :mod:`.outputs`
and :mod:`.run` (the ``eval`` command).

Only light modules are imported here; :mod:`.encoder` (torch + transformers) is imported on use.
"""

from rir_finetune.evaluation.data import RetrievalDataset, load_beir
from rir_finetune.evaluation.metrics import DEFAULT_K_VALUES, compute_metrics
from rir_finetune.evaluation.retrieval import evaluate_retrieval, retrieve, run_retrieval

__all__ = [
    "DEFAULT_K_VALUES",
    "RetrievalDataset",
    "compute_metrics",
    "evaluate_retrieval",
    "load_beir",
    "retrieve",
    "run_retrieval",
]
