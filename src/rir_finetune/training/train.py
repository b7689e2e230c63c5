"""``rir-finetune train``: config -> data -> collator -> model -> trainer -> saved sentence-transformers folder.

    rir-finetune train --config configs/scifact_retrieval.yaml
    rir-finetune train --config configs/tiny.yaml --output_dir runs/x --max_steps 5
    torchrun --nproc_per_node 8 -m rir_finetune train --config configs/reinforced_ir_round1.yaml

Everything that can be checked is checked before the first step, and nothing is written to ``output_dir`` until
the configuration and every data file have passed.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import yaml

from rir_finetune import files, lifecycle
from rir_finetune.config import load_config, to_dict
from rir_finetune.errors import UserError
from rir_finetune.retrieval import model_folder
from rir_finetune.training import distributed
from rir_finetune.training.arguments import (
    CONFIG_CLASSES,
    DataArguments,
    ModelArguments,
    ObjectiveArguments,
    RIRTrainingArguments,
)
from rir_finetune.training.memory_plan import resolve_gradient_cache

logger = logging.getLogger("rir_finetune")

RESOLVED_CONFIG = lifecycle.RESOLVED_CONFIG

# keys that may change when a run resumes: how long, how often to save / log / evaluate, where output goes
RESUME_MAY_CHANGE = {
    "resume_from_checkpoint", "overwrite_output_dir", "output_dir", "max_steps", "num_train_epochs",
    "cache_dir", "cache_path", "token", "trust_remote_code", "eval_data", "eval_split", "eval_name",
    "eval_max_queries",
}  # fmt: skip
# TrainingArguments keys that define the optimisation a checkpoint continues
RESUME_MUST_MATCH = {
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio", "weight_decay",
    "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim", "optim_args", "seed", "data_seed",
    "per_device_train_batch_size", "gradient_accumulation_steps", "fp16", "bf16", "dataloader_drop_last",
}  # fmt: skip


def load_configs(
    config_file: str | None, overrides: list[str] | dict
) -> tuple[ModelArguments, DataArguments, ObjectiveArguments, RIRTrainingArguments]:
    model_args, data_args, obj_args, train_args = load_config(list(CONFIG_CLASSES), config_file, overrides)
    return model_args, data_args, obj_args, train_args


def _is_local(path: str | None) -> bool:
    return bool(path) and (Path(path).exists() or Path(path).is_absolute() or str(path).startswith("."))


def check_training_start(model_args, data_args, train_args) -> None:
    """Before ``train`` reads data or writes anything: the output folder, the model folder, the lengths.

    - ``output_dir`` is never the base model, tokenizer, data or eval folder (nor holds one), never a file;
    - ``resume_from_checkpoint auto`` only in a folder that is empty, absent, or holds an earlier run of ours:
      it never turns someone's folder into a training folder;
    - a local model folder has config.json, tokenizer files and readable weights;
    - ``query_max_len`` / ``passage_max_len`` / ``answer_max_len`` fit the model's position table.
    """
    model = model_args.model_name_or_path
    tokenizer = model_args.tokenizer_name
    reads = [model, tokenizer, model_args.config_name, *(data_args.train_data or []), data_args.eval_data]
    out = files.check_output_dir(
        train_args.output_dir, key="output_dir", reads=[p for p in reads if _is_local(p)]
    )
    if lifecycle.is_auto(train_args.resume_from_checkpoint) and not lifecycle.holds_a_run(
        out, {RESOLVED_CONFIG}
    ):
        raise UserError(
            f"config key 'output_dir': {out} holds files but no earlier run (no {RESOLVED_CONFIG}, no checkpoint-N); "
            "resume_from_checkpoint auto would train over them. Choose an empty folder"
        )
    if _is_local(model):
        model_folder.check_model_folder(model, key="model_name_or_path", need_tokenizer=not tokenizer)
        if (
            tokenizer
            and _is_local(tokenizer)
            and not any((Path(tokenizer) / f).is_file() for f in model_folder.TOKENIZER_FILES)
        ):
            raise UserError(f"config key 'tokenizer_name': {tokenizer} has no tokenizer files")
        for key in ("query_max_len", "passage_max_len", "answer_max_len"):
            model_folder.check_max_length(key, getattr(data_args, key, None), model_args.config_name or model)


def check_some_batch(data, data_args, train_args) -> None:
    """A run that would take no optimisation step is refused before anything is written: too few records for one
    batch (with ``dataloader_drop_last``, or fewer than the processes)."""
    from rir_finetune.training.sampler import GroupedBatchSampler

    sampler = GroupedBatchSampler(
        data.batch_groups, train_args.per_device_train_batch_size, train_args.seed, train_args.world_size,
        drop_last=train_args.dataloader_drop_last,
    )  # fmt: skip
    if len(sampler) == 0:
        per_step = train_args.per_device_train_batch_size * train_args.world_size
        largest = max((len(g) for g in data.batch_groups), default=0)
        raise UserError(
            f"config key 'train_data': {len(data.dataset)} records make no batch of {per_step} "
            f"({train_args.world_size} process(es) x per_device_train_batch_size "
            f"{train_args.per_device_train_batch_size}; the largest batch group holds {largest}"
            f"{', dataloader_drop_last drops the rest' if train_args.dataloader_drop_last else ''}); add records or "
            "lower per_device_train_batch_size"
        )


def check_resume_settings(parts: list, output_dir: str) -> None:
    """A resumed run continues the checkpoint's run: the optimisation keys of TrainingArguments and every key of
    ours except lengths, cadence and output keys must equal those recorded in the run's resolved config."""
    new: dict = {}
    defining: set[str] = set()
    for part in parts:
        values = to_dict(part)
        new.update(values)
        defining |= (
            RESUME_MUST_MATCH if isinstance(part, RIRTrainingArguments) else set(values) - RESUME_MAY_CHANGE
        )
    lifecycle.check_resume_settings(Path(output_dir) / RESOLVED_CONFIG, new, defining)


def run_train(config_file: str | None, overrides: list[str] | dict) -> Path:
    """Train and save; returns the output folder. Raises :class:`UserError` for bad input."""
    model_args, data_args, obj_args, train_args = load_configs(config_file, overrides)
    level = logging.INFO if train_args.process_index == 0 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    logger.setLevel(level)
    # gradient_cache auto: the plain step where the batch fits the device, else the cache; one log line says which
    resolve_gradient_cache(model_args, data_args, obj_args, train_args)

    from rir_finetune.training.model import check_model_path

    check_model_path(model_args.model_name_or_path)
    check_training_start(model_args, data_args, train_args)
    resume = lifecycle.resolve_resume(
        train_args.resume_from_checkpoint,
        train_args.output_dir,
        train_args.overwrite_output_dir,
        {RESOLVED_CONFIG},
    )
    if resume is not None:  # a resumed run continues the checkpoint's settings
        check_resume_settings([model_args, data_args, obj_args, train_args], train_args.output_dir)

    from rir_finetune.training.data import TrainDataset, load_train_data

    data = load_train_data(data_args, needs_answer=obj_args.uses_answers, seed=train_args.seed)
    check_some_batch(data, data_args, train_args)
    if data.short_records:
        logger.warning(
            "%d of %d records have fewer than train_group_size - 1 = %d negatives; their groups are filled with "
            "random passages of other records (no duplicates)",
            data.short_records, len(data.dataset), data_args.train_group_size - 1,
        )  # fmt: skip
    if train_args.eval_strategy != "no" and not data_args.eval_data:
        raise UserError("config key 'eval_strategy': evaluation needs eval_data (a BEIR-layout folder)")
    evaluator = None
    if data_args.eval_data:  # loaded now: a bad eval set fails here, not at step eval_steps
        from rir_finetune.training.train_eval import TrainingEvaluator

        evaluator = TrainingEvaluator(
            data_args.eval_data,
            data_args.eval_split,
            data_args.eval_name or "",
            data_args.prompt("query"),
            data_args.prompt("passage"),
            data_args.query_max_len,
            data_args.passage_max_len,
            max_queries=data_args.eval_max_queries,
            batch_size=train_args.per_device_eval_batch_size,
        )
    if model_args.gradient_cache and train_args.deepspeed:
        raise UserError(
            "config keys 'gradient_cache' and 'deepspeed': gradient caching is not supported with DeepSpeed"
        )
    if data_args.cache_path:
        logger.warning(
            "config key 'cache_path': ignored (training files are read in memory; nothing is cached)"
        )
    if data_args.knowledge_distillation and data_args.train_group_size < 2:
        raise UserError("config key 'train_group_size': distillation needs at least 2 passages per query")
    from rir_finetune.training.objectives.compose import inert_terms

    for line in inert_terms(model_args, data_args, obj_args, train_args.per_device_train_batch_size,
                            train_args.world_size):  # fmt: skip
        logger.warning("a configured term cannot contribute: %s", line)
    line = cosine_model_unnormalised_warning(model_args.model_name_or_path, model_args.normalize_embeddings)
    if line:
        logger.warning("%s", line)
    if data_args.knowledge_distillation and obj_args.kd_loss_type == "kl_div":
        from rir_finetune.training.objectives.compose import flat_teacher_warning

        sample = data.dataset.select(range(min(1000, len(data.dataset))))
        groups = [list(r["pos_scores"] or []) + list(r["neg_scores"] or []) for r in sample]
        line = flat_teacher_warning(groups, obj_args.teacher_temperature, obj_args.temperature)
        if line:
            logger.warning("%s", line)

    # one run per output_dir; a refused run leaves the folder as it found it
    with lifecycle.refused_run_cleanup(train_args.output_dir, ours={RESOLVED_CONFIG}):
        if train_args.process_index == 0:
            lifecycle.lock_folder(train_args.output_dir)
        try:
            return _train(model_args, data_args, obj_args, train_args, data, resume, TrainDataset, evaluator)
        finally:
            lifecycle.unlock_folder(train_args.output_dir)


def cosine_model_unnormalised_warning(model: str, normalize: bool) -> str | None:
    """A warning line when ``normalize_embeddings`` is false for a model folder that says it is scored by cosine
    similarity (a sentence-transformers ``Normalize`` module, or ``similarity_fn_name: cosine``): raw dot products
    over the temperature then train a geometry the model was not made for (the SciFact ablation in benchmarks/README.md
    lost nDCG@10 this way). Bare HF folders (contriever) say nothing and get none."""
    root = Path(model)
    if normalize or not root.is_dir():
        return None
    try:
        modules = json.loads((root / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        modules = []
    try:
        st_cfg = json.loads((root / "config_sentence_transformers.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        st_cfg = {}
    says = []
    if any(isinstance(m, dict) and str(m.get("type", "")).endswith(".Normalize") for m in modules):
        says.append("a Normalize module")
    if isinstance(st_cfg, dict) and st_cfg.get("similarity_fn_name") == "cosine":
        says.append("similarity_fn_name cosine")
    if not says:
        return None
    return (
        f"config key 'normalize_embeddings': false, but {model} is made for cosine similarity ({' and '.join(says)}"
        "); trained on raw dot products it learns another geometry (all-MiniLM-L6-v2 lost nDCG@10 this way in the "
        "SciFact ablation, benchmarks/README.md). Set normalize_embeddings true, unless you mean to train it for dot products"
    )


def planned_steps(batches_per_epoch: int, train_args) -> int:
    """The optimisation steps the Trainer will run to (its own rule: max_steps, else epochs x updates per epoch)."""
    if train_args.max_steps > 0:
        return train_args.max_steps
    per_epoch = max(math.ceil(batches_per_epoch / train_args.gradient_accumulation_steps), 1)
    return math.ceil(train_args.num_train_epochs * per_epoch)


def check_steps_left(checkpoint: str, planned: int, out: Path) -> None:
    """A finished run (its model card, written last, is there) resumed must have steps left: at its end the Trainer
    would run one more step and rewrite the folder for nothing. A run killed between its last checkpoint and the
    final save goes on: that step at learning rate 0 changes no weight, and the final model gets saved."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    done = int(state.get("global_step", 0))
    if done >= planned and (out / "README.md").is_file():
        raise UserError(
            f"config key 'resume_from_checkpoint': {checkpoint} is at step {done}, and this run ends at step "
            f"{planned}: nothing left to train (raise max_steps or num_train_epochs to train on)"
        )


def _train(model_args, data_args, obj_args, train_args, data, resume, dataset_cls, evaluator) -> Path:
    from transformers import set_seed

    from rir_finetune.cpu_memory import keep_freed_memory
    from rir_finetune.training.collator import RIRCollator
    from rir_finetune.training.model import BiEncoder, load_tokenizer
    from rir_finetune.training.sampler import GroupedBatchSampler
    from rir_finetune.training.trainer import RIRTrainer

    keep_freed_memory()  # CPU steps reuse their freed activation memory (cpu_memory.py)
    set_seed(train_args.seed)
    out = Path(train_args.output_dir)
    sampler = GroupedBatchSampler(
        data.batch_groups,
        per_device_batch_size=train_args.per_device_train_batch_size,
        seed=train_args.seed,
        world_size=train_args.world_size,
        rank=train_args.process_index,
        drop_last=train_args.dataloader_drop_last,
    )
    if resume is not None:
        check_steps_left(resume, planned_steps(len(sampler), train_args), out)
    if train_args.process_index == 0:
        resolved = {
            k: v for part in (model_args, data_args, obj_args, train_args) for k, v in to_dict(part).items()
        }
        lifecycle.write_resolved_config(out, resolved)

    hf = {"trust_remote_code": model_args.trust_remote_code, "cache_dir": model_args.cache_dir,
          "token": model_args.token}  # fmt: skip
    tokenizer = load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path, **hf)
    model = BiEncoder.from_pretrained(
        model_args.model_name_or_path,
        pooling=model_args.sentence_pooling_method,
        normalize=model_args.normalize_embeddings,
        sub_batch_size=model_args.sub_batch_size,
        attn_implementation=model_args.attn_implementation,
        config_name=model_args.config_name,
        **hf,
    )
    model.pad_to_multiple_of = data_args.pad_to_multiple_of
    if model_args.fix_position_embedding:
        for name, p in model.backbone.named_parameters():
            if "position_embeddings" in name:
                p.requires_grad_(False)
    if model_args.use_lora:
        from rir_finetune.training.lora import apply_lora

        apply_lora(model, model_args)

    dataset = dataset_cls(data, data_args, seed=train_args.seed, uses_answers=obj_args.uses_answers)
    dataset.pos_score_shrink = obj_args.pos_score_shrink
    collator = RIRCollator(
        tokenizer,
        query_max_len=data_args.query_max_len,
        passage_max_len=data_args.passage_max_len,
        answer_max_len=data_args.answer_max_len,
        pad_to_multiple_of=data_args.pad_to_multiple_of,
    )
    save_info = {
        "pooling": model_args.sentence_pooling_method,
        "normalize": model_args.normalize_embeddings,
        # plain encode(): no text cut shorter than in training; encode_query/encode_document: exactly as training
        "max_seq_length": max(data_args.query_max_len, data_args.passage_max_len),
        "query_length": data_args.query_max_len,
        "document_length": data_args.passage_max_len,
        "query_prompt": data_args.prompt("query"),  # the formatted instruction, as training prepends it
        "passage_prompt": data_args.prompt("passage"),
    }
    w = train_args.world_size
    logger.info(
        "batch anatomy: %d processes x %d queries = %d queries per step, %d passages per query "
        "(%s negatives%s), training_type %s%s",
        w, train_args.per_device_train_batch_size, w * train_args.per_device_train_batch_size,
        data_args.train_group_size,
        "in-batch + hard" if obj_args.use_in_batch_negatives else "hard",
        ", shared across devices" if obj_args.negatives_cross_device and w > 1 else "",
        obj_args.training_type,
        f", distillation {obj_args.kd_loss_type}" if data_args.knowledge_distillation else "",
    )  # fmt: skip
    trainer = RIRTrainer(
        model=model,
        args=train_args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
        objective_args=obj_args,
        batch_sampler=sampler,
        save_info=save_info,
        gradient_cache_chunk_size=model_args.gradient_cache_chunk_size if model_args.gradient_cache else None,
        gradient_cache_memory_bytes=model_args.gradient_cache_memory_mb << 20,
        pad_to_multiple_of=data_args.pad_to_multiple_of,
        retrieval_evaluator=evaluator,
    )
    if trainer.is_deepspeed_enabled and train_args.process_index == 0:
        plugin = trainer.accelerator.state.deepspeed_plugin
        logger.info("DeepSpeed ZeRO stage %s (%s)", plugin.zero_stage, train_args.deepspeed)
    trainer.train(resume_from_checkpoint=resume)
    if trainer.state.global_step == 0:  # never save the base model as the fine-tuned one
        raise UserError(
            f"config key 'max_steps': the run ended after 0 optimisation steps; nothing was trained into {out}"
        )
    trainer.save_model(str(out))
    if train_args.process_index == 0:
        from rir_finetune.training.model_card import write_model_card

        resolved = yaml.safe_load((out / RESOLVED_CONFIG).read_text(encoding="utf-8"))
        write_model_card(out, resolved, trainer.state.log_history)
    distributed.barrier()
    if train_args.process_index == 0:
        logger.info("saved the fine-tuned model to %s", out)
    return out
