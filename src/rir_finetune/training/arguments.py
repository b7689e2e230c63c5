"""The four config dataclasses of ``rir-finetune train``: model, data, objective, training.

Keys are flat and carry FlagEmbedding's names (and every ``transformers.TrainingArguments`` field), so an upstream
launch command runs unchanged: ``rir-finetune train --model_name_or_path ... --train_group_size 16 ...``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import TrainingArguments

from rir_finetune.config import TRAINER_RANGES, option
from rir_finetune.errors import UserError
from rir_finetune.retrieval.data import ANSWER_PREFIX
from rir_finetune.retrieval.pooling import POOLING_METHODS

TRAINING_TYPES = ("retrieval", "retrieval_answer", "retrieval_answer_passage")
KD_LOSS_TYPES = ("kl_div", "m3_kd_loss", "m3_kd_loss_weighted")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = option(
        None, "local folder or hub name of the encoder to fine-tune (required)"
    )
    config_name: str | None = option(None, "config path if not the same as model_name_or_path")
    tokenizer_name: str | None = option(None, "tokenizer path if not the same as model_name_or_path")
    cache_dir: str | None = option(None, "where hub downloads go")
    trust_remote_code: bool = option(False, "allow custom modelling code from the model folder")
    token: str | None = option(factory=lambda: os.getenv("HF_TOKEN"), help="hub token")
    sentence_pooling_method: str = option("cls", "cls | mean | last_token (upstream default cls)")
    normalize_embeddings: bool = option(True, "L2-normalise embeddings (upstream default True)")
    sub_batch_size: int | None = option(
        None, "encode in chunks of this many texts (upstream; saves little memory)", range=">=1"
    )
    fix_position_embedding: bool = option(False, "freeze the position embeddings")
    use_lora: bool = option(False, "train LoRA adapters (peft) instead of every weight")
    lora_rank: int = option(32, "LoRA rank r (with use_lora)", range=">=1")
    lora_alpha: float = option(64.0, "LoRA scaling alpha (with use_lora)", range=">0")
    lora_dropout: float = option(0.1, "dropout on the LoRA path (with use_lora)", range="[0, 1)")
    lora_target_modules: list[str] | None = option(None, "None: peft's defaults for the architecture")
    gradient_cache: bool | str | None = option(
        "auto",
        "GradCache with a memory budget (gradcache.py): memory bounded whatever the batch, at the cost of encoding "
        "part of it twice. auto: the plain step when the batch's estimated activations fit the device (free CUDA "
        "memory, or half the host's available RAM), the cache only when they do not (training/memory_plan.py; one "
        "log line says which and why); true / false force it",
    )
    gradient_cache_chunk_size: int | None = option(
        None, "texts per chunk under gradient caching; None: as many as fit half the budget", range=">=1"
    )
    gradient_cache_memory_mb: int | None = option(
        None,
        "activations kept from the first pass, the rest encoded twice; None: half the budget; 1: almost nothing "
        "kept (classic GradCache)",
        range=">=1",
    )
    attn_implementation: str | None = option(
        "auto", "auto: rir_sdpa (training/attention.py) if supported; sdpa, ..."
    )

    def __post_init__(self):
        _true_false_or_auto(self, "gradient_cache")
        if self.sentence_pooling_method not in POOLING_METHODS:
            raise UserError(
                f"config key 'sentence_pooling_method': {self.sentence_pooling_method!r} is not one of "
                f"{', '.join(POOLING_METHODS)}"
            )


@dataclass
class DataArguments:
    train_data: list[str] | None = option(None, "JSONL files or folders of them (required)")
    cache_path: str | None = option(
        None,
        "FlagEmbedding's datasets cache folder, accepted so that its launches run; ignored here: training files "
        "are read and validated in memory, nothing is cached",
    )
    train_group_size: int = option(8, "passages per query: 1 positive + (G-1) negatives", range=">=1")
    query_max_len: int = option(32, "tokens per query", range=">=1")
    passage_max_len: int = option(128, "tokens per passage", range=">=1")
    answer_max_len: int | None = option(
        None, "tokens per answer; None: same as query_max_len (upstream)", range=">=1"
    )
    pad_to_multiple_of: int | None = option(
        16,
        "pad token lengths to a multiple of this (None: to the longest text); a few distinct shapes, because the "
        "bf16 CPU kernels are built and cached per shape and exact lengths grew memory every step",
        range=">=1",
    )
    max_example_num_per_dataset: int = option(100_000_000, "cap on records read from each file", range=">=1")
    query_instruction_for_retrieval: str | None = option(
        None, "prepended to queries (and answers); None adds nothing"
    )
    query_instruction_format: str = option("{}{}", "how instruction and query are joined")
    passage_instruction_for_retrieval: str | None = option(None, "prepended to passages; None adds nothing")
    passage_instruction_format: str = option("{}{}", "how instruction and passage are joined")
    answer_prefix: str = option(ANSWER_PREFIX, "before each answer, as at inference (SPEC 5)")
    knowledge_distillation: bool = option(False, "use pos_scores / neg_scores from the data")
    shuffle_ratio: float = option(
        0.0, "probability of shuffling a positive's text chunks (upstream augmentation)", range="[0, 1]"
    )
    same_dataset_within_batch: bool = option(False, "every batch drawn from one file")
    small_threshold: int = option(
        0, "files in one folder smaller than this are merged into one dataset", range=">=0"
    )
    drop_threshold: int = option(0, "a merged small dataset smaller than this is dropped", range=">=0")
    answer_inbatch: bool = option(False, "add `neg_answer` passages as extra answer candidates (upstream)")
    eval_data: str | None = option(None, "BEIR-layout folder scored every eval_steps during training")
    eval_split: str = option("test", "split of eval_data")
    eval_name: str | None = option(None, "metric prefix: eval_<name>_ndcg@10 (default: folder name)")
    eval_max_queries: int | None = option(None, "score at most this many eval queries (speed)", range=">=1")

    def __post_init__(self):
        if self.answer_max_len is None:
            self.answer_max_len = self.query_max_len
        for side in ("query", "passage"):
            key, fmt = f"{side}_instruction_format", getattr(self, f"{side}_instruction_format")
            if fmt.count("{}") != 2:
                raise UserError(f"config key {key!r}: must contain exactly two '{{}}' (instruction, text)")
            if getattr(self, f"{side}_instruction_for_retrieval") is not None and not fmt.endswith("{}"):
                raise UserError(
                    f"config key {key!r}: {fmt!r} puts text after the {side}; the saved model's "
                    "sentence-transformers prompt is a prefix, so the text must come last ('...{}')"
                )

    def prompt(self, side: str) -> str | None:
        """The sentence-transformers prompt for ``side`` (query | passage): the prefix that training puts before
        every text, ``format(instruction, "")``; None without an instruction. Exact because the text comes last."""
        instruction = getattr(self, f"{side}_instruction_for_retrieval")
        if instruction is None:
            return None
        return getattr(self, f"{side}_instruction_format").format(instruction, "") or None


@dataclass
class ObjectiveArguments:
    training_type: str = option("retrieval_answer", "retrieval | retrieval_answer | retrieval_answer_passage")
    temperature: float = option(0.02, "tau of L_qp and L_ap", range=">0")
    answer_temperature: float = option(0.05, "tau of L_qa", range=">0")
    normalize_answer: bool = option(True, "add L_norm = mean (||a|| - 1)^2")
    qp_weight: float = option(1.0, "weight of L_qp", range=">=0")
    qa_weight: float = option(1.0, "weight of L_qa", range=">=0")
    ap_weight: float = option(0.25, "weight of L_ap (upstream hard-codes 0.25)", range=">=0")
    norm_weight: float = option(1.0, "weight of L_norm", range=">=0")
    kd_weight: float = option(1.0, "weight of L_kd", range=">=0")
    kd_loss_type: str = option("kl_div", "kl_div | m3_kd_loss | m3_kd_loss_weighted")
    teacher_temperature: float = option(
        1.0, "teacher probs = softmax(scores / teacher_temperature) (kl_div)", range=">0"
    )
    pos_score_shrink: float = option(
        0.2,
        "upstream: a positive scored above every negative moves this far toward the best negative",
        range=">=0",
    )
    negatives_cross_device: bool = option(False, "share passages and answers across processes")
    use_in_batch_negatives: bool = option(
        True, "False: every query sees only its own group (also: `no_in_batch_neg` files)"
    )

    def __post_init__(self):
        if self.training_type not in TRAINING_TYPES:
            raise UserError(
                f"config key 'training_type': {self.training_type!r} is not one of {', '.join(TRAINING_TYPES)}"
                + _close(self.training_type, TRAINING_TYPES)
            )
        if self.kd_loss_type not in KD_LOSS_TYPES:
            raise UserError(
                f"config key 'kd_loss_type': {self.kd_loss_type!r} is not one of {', '.join(KD_LOSS_TYPES)}"
                + _close(self.kd_loss_type, KD_LOSS_TYPES)
            )

    @property
    def uses_answers(self) -> bool:
        return self.training_type != "retrieval"


def _close(value: str, choices: tuple[str, ...]) -> str:
    import difflib

    m = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
    return f"; did you mean {m[0]!r}?" if m else ""


@dataclass
class RIRTrainingArguments(TrainingArguments):
    """``transformers.TrainingArguments`` plus the run-control keys of upstream launches."""

    INHERITED_RANGES: ClassVar[dict[str, str]] = TRAINER_RANGES

    overwrite_output_dir: bool = option(
        False, "allow training into a non-empty output_dir (its checkpoints are kept)"
    )
    dataloader_num_workers: int = option(
        1, "tokenisation runs in this many worker processes, off the training thread", range=">=0"
    )
    warmup_ratio: float | None = option(
        None, "upstream name; becomes warmup_steps (a float < 1 is a ratio in transformers 5)", range="[0, 1)"
    )
    bf16: bool | str = option(
        "auto",
        "bf16 mixed precision (autocast; embeddings, scores and losses stay fp32); auto: on where the device computes bf16 natively (CPUs with AVX512-BF16, AMX or Arm BF16; GPUs from Ampere on), off elsewhere and with fp16",
    )
    pack_sequences: bool | str | None = option(
        "auto",
        "encode each part as one packed row (its real tokens only, positions restarting per text, attention within "
        "each text: retrieval/packing.py) instead of padded rows; auto: packed on CUDA, padded on a CPU (its padded "
        "path is tuned)",
    )

    def __post_init__(self):
        _true_false_or_auto(self, "pack_sequences")
        if self.output_dir is None:
            raise UserError("config key 'output_dir': required (where checkpoints and the final model go)")
        if self.warmup_ratio is not None and not self.warmup_steps:
            self.warmup_steps = self.warmup_ratio
        # we log per-term losses ourselves and never need the `labels` column
        self.remove_unused_columns = False
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = (
                False  # every trainable parameter reaches the loss (pooler frozen)
            )
        self._choose_precision()
        self._choose_cpu_mode()
        super().__post_init__()

    def _choose_precision(self) -> None:
        """``bf16: auto`` -> true where the training device has native bf16 (:mod:`rir_finetune.precision`).

        On a machine without an accelerator bf16 implies ``use_cpu`` (transformers refuses bf16 without a GPU
        unless ``use_cpu`` is set, and the CPU is where the run trains anyway)."""
        from rir_finetune.precision import bf16_native

        cpu_only = not torch.accelerator.is_available()
        if isinstance(self.bf16, str):
            if self.bf16.strip().lower() != "auto":
                raise UserError(f"config key 'bf16': true, false or auto, got {self.bf16!r}")
            self.bf16 = not self.fp16 and bf16_native("cpu" if self.use_cpu or cpu_only else None)
        if self.bf16 and cpu_only:
            self.use_cpu = True

    def _choose_cpu_mode(self) -> None:
        """Several processes on a machine without an accelerator train on CPU with gloo, whatever the launch form.

        Without ``use_cpu``, accelerate's ``PartialState`` sees ``LOCAL_RANK`` but no GPU: it opens a process group
        yet leaves ``distributed_type`` NO, so the Trainer never wraps the model in DDP and gradients are never
        averaged (and without ``ddp_backend`` every rank even calls itself rank 0 of 1). ``use_cpu`` takes
        accelerate's MULTI_CPU path, which is distributed. Must run before ``_setup_devices``.
        """
        cpu_only = not torch.accelerator.is_available()
        if launched_world_size() > 1 and cpu_only and not self.use_cpu:
            self.use_cpu = True
        cpu = self.use_cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in {"1", "true", "yes"}
        if cpu and self.ddp_backend not in (None, "gloo", "mpi"):
            where = "this machine has no GPU" if cpu_only else "use_cpu is on"
            raise UserError(
                f"config key 'ddp_backend': {self.ddp_backend} needs GPUs and {where}; "
                "use --ddp_backend gloo or leave it unset"
            )
        if cpu and self.ddp_backend == "mpi" and not torch.distributed.is_mpi_available():
            raise UserError(
                "config key 'ddp_backend': this torch has no MPI support; use gloo or leave it unset"
            )
        if cpu and self.deepspeed and cpu_only:
            os.environ.setdefault(
                "DS_ACCELERATOR", "cpu"
            )  # DeepSpeed's CPU accelerator, as on a GPU-less box


def _true_false_or_auto(args, key: str) -> None:
    from rir_finetune.precision import true_false_or_auto

    setattr(args, key, true_false_or_auto(getattr(args, key), key))


def launched_world_size() -> int:
    """How many processes the launcher started (torchrun, accelerate launch, mpirun); 1 for a plain run."""
    sizes = [
        os.environ.get(k) for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    ]
    return max([int(v) for v in sizes if v and v.isdigit()] or [1])


CONFIG_CLASSES = (ModelArguments, DataArguments, ObjectiveArguments, RIRTrainingArguments)
