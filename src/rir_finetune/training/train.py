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
import os
import re
from pathlib import Path

import yaml

from rir_finetune import guards
from rir_finetune.config import build_configs, to_dict
from rir_finetune.errors import UserError
from rir_finetune.training import distributed
from rir_finetune.training.arguments import (
    CONFIG_CLASSES,
    DataArguments,
    ModelArguments,
    ObjectiveArguments,
    RIRTrainingArguments,
)

logger = logging.getLogger("rir_finetune")

RESOLVED_CONFIG = "rir_config.yaml"


def load_configs(
    config_file: str | None, overrides: list[str] | dict
) -> tuple[ModelArguments, DataArguments, ObjectiveArguments, RIRTrainingArguments]:
    model_args, data_args, obj_args, train_args = build_configs(list(CONFIG_CLASSES), config_file, overrides)
    return model_args, data_args, obj_args, train_args


def resolve_resume(train_args: RIRTrainingArguments) -> str | None:
    """``resume_from_checkpoint``: a path, ``auto`` (latest checkpoint in output_dir, if any) or None.

    Refuses a non-empty output_dir unless resuming or ``overwrite_output_dir`` is set.
    """
    out = Path(train_args.output_dir)
    resume = train_args.resume_from_checkpoint
    auto = resume is not None and str(resume).lower() in {"auto", "latest", "true"}
    if auto:
        resume = latest_complete_checkpoint(out)
        if resume is None:
            logger.info(
                "resume_from_checkpoint auto: no complete checkpoint in %s, starting from scratch", out
            )
    elif resume is not None and not Path(resume).is_dir():
        raise UserError(f"config key 'resume_from_checkpoint': {resume} is not a checkpoint folder")
    if (
        resume is None
        and not auto
        and out.is_dir()
        and any(out.iterdir())
        and not train_args.overwrite_output_dir
    ):
        only_ours = {p.name for p in out.iterdir()} <= {RESOLVED_CONFIG, guards.LOCK_NAME}
        if not only_ours:
            raise UserError(
                f"config key 'output_dir': {out} is not empty; resume with --resume_from_checkpoint auto, "
                "or pass --overwrite_output_dir true, or choose another folder"
            )
    return resume


def checkpoint_is_complete(folder: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint is complete when it parses and weights exist."""
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return any(folder.glob("model*.safetensors"))


def latest_complete_checkpoint(out: Path) -> str | None:
    """Newest ``checkpoint-N`` in ``out`` that was written completely (a kill mid-save leaves an incomplete one)."""
    if not out.is_dir():
        return None
    found = []
    for p in out.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    for _, p in sorted(found, reverse=True):
        if checkpoint_is_complete(p):
            return str(p)
        logger.warning("skipping incomplete checkpoint %s (interrupted while saving)", p)
    return None


def write_resolved_config(out: Path, parts: list) -> None:
    resolved: dict = {}
    for part in parts:
        resolved.update(to_dict(part))
    resolved.pop("token", None)
    resolved.pop("hub_token", None)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (RESOLVED_CONFIG + ".tmp")
    tmp.write_text(yaml.safe_dump(json.loads(json.dumps(resolved, default=str)), sort_keys=False))
    os.replace(tmp, out / RESOLVED_CONFIG)


def run_train(config_file: str | None, overrides: list[str] | dict) -> Path:
    """Train and save; returns the output folder. Raises :class:`UserError` for bad input."""
    model_args, data_args, obj_args, train_args = load_configs(config_file, overrides)
    if model_args.gradient_cache is None:  # auto: the plain step, the fastest here (benchmarks/README.md)
        model_args.gradient_cache = False
    level = logging.INFO if train_args.process_index == 0 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    logger.setLevel(level)

    from rir_finetune.training.model import check_model_path

    check_model_path(model_args.model_name_or_path)
    guards.check_training_start(model_args, data_args, train_args, bookkeeping={RESOLVED_CONFIG})  # issue 13
    resume = resolve_resume(train_args)
    if resume is not None:  # a resumed run continues the checkpoint's settings (issue 13)
        parts = [model_args, data_args, obj_args, train_args]
        guards.check_resume_settings(Path(train_args.output_dir) / RESOLVED_CONFIG, parts)

    from rir_finetune.training.data import TrainDataset, load_train_data

    data = load_train_data(data_args, needs_answer=obj_args.uses_answers, seed=train_args.seed)
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

    # one run per output_dir; a refused run leaves the folder as it found it (guards.py, issue 13)
    with guards.refused_run_cleanup(train_args.output_dir, ours={RESOLVED_CONFIG}):
        if train_args.process_index == 0:
            guards.lock_folder(train_args.output_dir)
        try:
            return _train(model_args, data_args, obj_args, train_args, data, resume, TrainDataset, evaluator)
        finally:
            guards.unlock_folder(train_args.output_dir)


def cosine_model_unnormalised_warning(model: str, normalize: bool) -> str | None:
    """A warning line when ``normalize_embeddings`` is false for a model folder that says it is scored by cosine
    similarity (a sentence-transformers ``Normalize`` module, or ``similarity_fn_name: cosine``): raw dot products
    over the temperature then train a geometry the model was not made for. In the SciFact ablation this cost
    all-MiniLM-L6-v2 0.054 nDCG@10 (benchmarks/README.md). Bare HF folders (contriever) say nothing and get none."""
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
        "); trained on raw dot products it learns another geometry (the SciFact ablation lost 0.054 nDCG@10 this way"
        " with all-MiniLM-L6-v2). Set normalize_embeddings true, unless you mean to train it for dot products"
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
    if train_args.process_index == 0:
        write_resolved_config(out, [model_args, data_args, obj_args, train_args])

    hf = {"trust_remote_code": model_args.trust_remote_code, "cache_dir": model_args.cache_dir,
          "token": model_args.token}  # fmt: skip
    tokenizer = load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path, **hf)
    model = BiEncoder.from_pretrained(
        model_args.model_name_or_path,
        pooling=model_args.sentence_pooling_method,
        normalize=model_args.normalize_embeddings,
        sub_batch_size=model_args.sub_batch_size,
        attn_implementation=model_args.attn_implementation,
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
    sampler = GroupedBatchSampler(
        data.batch_groups,
        per_device_batch_size=train_args.per_device_train_batch_size,
        seed=train_args.seed,
        world_size=train_args.world_size,
        rank=train_args.process_index,
        drop_last=train_args.dataloader_drop_last,
    )
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
    trainer.save_model(str(out))
    if train_args.process_index == 0:
        from rir_finetune.training.model_card import write_model_card

        resolved = yaml.safe_load((out / RESOLVED_CONFIG).read_text(encoding="utf-8"))
        write_model_card(out, resolved, trainer.state.log_history)
    distributed.barrier()
    if train_args.process_index == 0:
        logger.info("saved the fine-tuned model to %s", out)
    return out
