"""Retrieval evaluation: metrics, answer fusion, result files and the ``eval`` command.

Built on the retrieval engine (:mod:`rir_finetune.retrieval`: data, encoder, cache, search): :mod:`.answers`
(query / answer / fused query vectors), :mod:`.metrics` (pytrec_eval), :mod:`.retrieval` (encode -> search ->
metrics for any encode callables), :mod:`.outputs` and :mod:`.run` (the ``eval`` command).

Only light modules are imported here; the encoder (torch + transformers) is imported on use.
"""

from rir_finetune.evaluation.metrics import DEFAULT_K_VALUES, compute_metrics
from rir_finetune.evaluation.retrieval import evaluate_retrieval, retrieve, run_retrieval
from rir_finetune.retrieval.data import RetrievalDataset, load_beir

__all__ = [
    "DEFAULT_K_VALUES",
    "RetrievalDataset",
    "compute_metrics",
    "evaluate_retrieval",
    "load_beir",
    "retrieve",
    "run_retrieval",
]
