"""The four config dataclasses of ``rir-finetune train``: model, data, objective, training.

Keys are flat and carry FlagEmbedding's names (and every ``transformers.TrainingArguments`` field), so an upstream
launch command runs unchanged: ``rir-finetune train --model_name_or_path ... --train_group_size 16 ...``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers import TrainingArguments

from rir_finetune.errors import UserError
from rir_finetune.retrieval.pooling import POOLING_METHODS

TRAINING_TYPES = ("retrieval", "retrieval_answer", "retrieval_answer_passage")
KD_LOSS_TYPES = ("kl_div", "m3_kd_loss", "m3_kd_loss_weighted")


@dataclass
class ModelArguments:
    RANGES: ClassVar[dict[str, str]] = {  # checked by config.build_configs (guards.py)
        "sub_batch_size": ">=1", "lora_rank": ">=1", "lora_alpha": ">0", "lora_dropout": "[0, 1)",
        "gradient_cache_chunk_size": ">=1", "gradient_cache_memory_mb": ">=0",
    }  # fmt: skip
    model_name_or_path: str | None = None  # local folder or hub name of the encoder to fine-tune (required)
    config_name: str | None = None  # config path if not the same as model_name_or_path
    tokenizer_name: str | None = None  # tokenizer path if not the same as model_name_or_path
    cache_dir: str | None = None  # where hub downloads go
    trust_remote_code: bool = False  # allow custom modelling code from the model folder
    token: str | None = field(default_factory=lambda: os.getenv("HF_TOKEN"))  # hub token
    sentence_pooling_method: str = "cls"  # cls | mean | last_token (upstream default cls)
    normalize_embeddings: bool = True  # L2-normalise embeddings (upstream default True)
    sub_batch_size: int | None = None  # encode in chunks of this many texts (upstream; saves little memory)
    fix_position_embedding: bool = False  # freeze the position embeddings
    use_lora: bool = False  # train LoRA adapters (peft) instead of every weight
    lora_rank: int = 32
    lora_alpha: float = 64.0
    lora_dropout: float = 0.1
    lora_target_modules: list[str] | None = None  # None: peft's defaults for the architecture
    # GradCache with a memory budget (gradcache.py): true bounds memory whatever the batch (the main job's shapes:
    # 2.98 GiB at ~1.36x the step time on a 2-core CPU); None (auto) and false: the plain step (every activation of
    # the batch kept at once: fastest, ~10 GiB for the main job's shapes)
    gradient_cache: bool | None = None
    gradient_cache_chunk_size: int = 16  # texts per chunk under gradient caching
    gradient_cache_memory_mb: int = 1024  # activations kept from the first pass; the rest encoded twice
    attn_implementation: str | None = "auto"  # auto: rir_sdpa (training/attention.py) if supported; sdpa, ...

    def __post_init__(self):
        if self.sentence_pooling_method not in POOLING_METHODS:
            raise UserError(
                f"config key 'sentence_pooling_method': {self.sentence_pooling_method!r} is not one of "
                f"{', '.join(POOLING_METHODS)}"
            )
        if self.sub_batch_size is not None and self.sub_batch_size <= 0:
            self.sub_batch_size = None
        if self.gradient_cache_chunk_size <= 0:
            raise UserError("config key 'gradient_cache_chunk_size': must be a positive integer")


@dataclass
class DataArguments:
    RANGES: ClassVar[dict[str, str]] = {
        "train_group_size": ">=1", "query_max_len": ">=1", "passage_max_len": ">=1", "answer_max_len": ">=1",
        "pad_to_multiple_of": ">=1", "max_example_num_per_dataset": ">=1", "shuffle_ratio": "[0, 1]",
        "small_threshold": ">=0", "drop_threshold": ">=0", "eval_max_queries": ">=1",
    }  # fmt: skip
    train_data: list[str] | None = None  # JSONL files or folders of them (required)
    cache_path: str | None = None  # datasets cache folder
    train_group_size: int = 8  # passages per query: 1 positive + (G-1) negatives
    query_max_len: int = 32  # tokens per query
    passage_max_len: int = 128  # tokens per passage
    answer_max_len: int | None = None  # tokens per answer; None: same as query_max_len (upstream)
    # pad token lengths to a multiple of this (None: to the longest text). A few distinct shapes: on a CPU the bf16
    # kernels are built and cached per shape (~5 MiB each), exact lengths grew memory every step
    pad_to_multiple_of: int | None = 16
    max_example_num_per_dataset: int = 100_000_000  # cap on records read from each file
    query_instruction_for_retrieval: str | None = (
        None  # prepended to queries (and answers); None adds nothing
    )
    query_instruction_format: str = "{}{}"  # how instruction and query are joined
    passage_instruction_for_retrieval: str | None = None  # prepended to passages; None adds nothing
    passage_instruction_format: str = "{}{}"
    answer_prefix: str = (
        "Generate the topic about this passage: "  # before each answer, as at inference (SPEC 5)
    )
    knowledge_distillation: bool = False  # use pos_scores / neg_scores from the data
    shuffle_ratio: float = 0.0  # probability of shuffling a positive's text chunks (upstream augmentation)
    same_dataset_within_batch: bool = False  # every batch drawn from one file
    small_threshold: int = 0  # files in one folder smaller than this are merged into one dataset
    drop_threshold: int = 0  # a merged small dataset smaller than this is dropped
    answer_inbatch: bool = False  # add `neg_answer` passages as extra answer candidates (upstream)
    eval_data: str | None = None  # BEIR-layout folder scored every eval_steps during training
    eval_split: str = "test"  # split of eval_data
    eval_name: str | None = None  # metric prefix: eval_<name>_ndcg@10 (default: folder name)
    eval_max_queries: int | None = None  # score at most this many eval queries (speed)

    def __post_init__(self):
        if self.train_group_size < 1:
            raise UserError("config key 'train_group_size': must be at least 1")
        for key in ("query_max_len", "passage_max_len"):
            if getattr(self, key) < 1:
                raise UserError(f"config key {key!r}: must be a positive integer")
        if self.answer_max_len is None:
            self.answer_max_len = self.query_max_len
        if not 0.0 <= self.shuffle_ratio <= 1.0:
            raise UserError("config key 'shuffle_ratio': must be between 0 and 1")
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
    RANGES: ClassVar[dict[str, str]] = {
        "temperature": ">0", "answer_temperature": ">0", "teacher_temperature": ">0", "qp_weight": ">=0",
        "qa_weight": ">=0", "ap_weight": ">=0", "norm_weight": ">=0", "kd_weight": ">=0", "pos_score_shrink": ">=0",
    }  # fmt: skip
    training_type: str = "retrieval_answer"  # retrieval | retrieval_answer | retrieval_answer_passage
    temperature: float = 0.02  # tau of L_qp and L_ap
    answer_temperature: float = 0.05  # tau of L_qa
    normalize_answer: bool = True  # add L_norm = mean (||a|| - 1)^2
    qp_weight: float = 1.0  # weight of L_qp
    qa_weight: float = 1.0  # weight of L_qa
    ap_weight: float = 0.25  # weight of L_ap (upstream hard-codes 0.25)
    norm_weight: float = 1.0  # weight of L_norm
    kd_weight: float = 1.0  # weight of L_kd
    kd_loss_type: str = "kl_div"  # kl_div | m3_kd_loss | m3_kd_loss_weighted
    teacher_temperature: float = 1.0  # teacher probs = softmax(scores / teacher_temperature) (kl_div)
    pos_score_shrink: float = (
        0.2  # upstream: a positive scored above every negative moves this far toward the best negative
    )
    negatives_cross_device: bool = False  # share passages and answers across processes
    use_in_batch_negatives: bool = (
        True  # False: every query sees only its own group (also: `no_in_batch_neg` files)
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
        for key in ("temperature", "answer_temperature", "teacher_temperature"):
            if not getattr(self, key) > 0:
                raise UserError(f"config key {key!r}: must be greater than 0, got {getattr(self, key)}")
        for key in ("qp_weight", "qa_weight", "ap_weight", "norm_weight", "kd_weight"):
            if getattr(self, key) < 0:
                raise UserError(f"config key {key!r}: must not be negative")

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

    RANGES: ClassVar[dict[str, str]] = {  # TrainingArguments' numbers; 0 never means "off" unless upstream says so
        "per_device_train_batch_size": ">=1", "per_device_eval_batch_size": ">=1", "num_train_epochs": ">0",
        "max_steps": "-1 | >=1", "learning_rate": ">0", "warmup_steps": ">=0", "warmup_ratio": "[0, 1)",
        "weight_decay": ">=0", "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)", "adam_epsilon": ">0",
        "gradient_accumulation_steps": ">=1", "max_grad_norm": ">=0", "label_smoothing_factor": "[0, 1)",
        "neftune_noise_alpha": ">0", "torch_empty_cache_steps": ">=1", "logging_steps": ">0", "eval_steps": ">0",
        "eval_delay": ">=0", "eval_accumulation_steps": ">=1", "save_steps": ">0", "save_total_limit": ">=1",
        "seed": ">=0", "data_seed": ">=0", "dataloader_num_workers": ">=0", "dataloader_prefetch_factor": ">=1",
        "ddp_bucket_cap_mb": ">=1", "ddp_timeout": ">=1", "local_rank": ">=-1",
    }  # fmt: skip

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "allow training into a non-empty output_dir (its checkpoints are kept)"},
    )
    dataloader_num_workers: int = field(
        default=1,
        metadata={"help": "tokenisation runs in this many worker processes, off the training thread"},
    )
    warmup_ratio: float | None = field(
        default=None,
        metadata={"help": "upstream name; becomes warmup_steps (a float < 1 is a ratio in transformers 5)"},
    )
    bf16: bool | str = field(
        default=False,
        metadata={
            "help": "bf16 mixed precision (autocast; embeddings, scores and losses stay fp32); auto: on where the "
            "device computes bf16 natively (CPUs with AVX512-BF16, AMX or Arm BF16; GPUs from Ampere on), "
            "off elsewhere and with fp16"
        },
    )

    def __post_init__(self):
        if self.output_dir is None:
            raise UserError("config key 'output_dir': required (where checkpoints and the final model go)")
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise UserError("config key 'warmup_ratio': must be in [0, 1)")
            if not self.warmup_steps:
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


def launched_world_size() -> int:
    """How many processes the launcher started (torchrun, accelerate launch, mpirun); 1 for a plain run."""
    sizes = [
        os.environ.get(k) for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    ]
    return max([int(v) for v in sizes if v and v.isdigit()] or [1])


CONFIG_CLASSES = (ModelArguments, DataArguments, ObjectiveArguments, RIRTrainingArguments)
