"""The Trainer: ``compute_loss`` runs the model once and the objectives once, and logs every named term."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

from rir_finetune.cpu_memory import freed_memory_kept, release_free_memory, resident_bytes
from rir_finetune.errors import UserError
from rir_finetune.training import distributed
from rir_finetune.training.arguments import ObjectiveArguments
from rir_finetune.training.gradcache import cached_step
from rir_finetune.training.lora import is_lora, load_adapter, merged_state_dict, save_adapter
from rir_finetune.training.model import BiEncoder
from rir_finetune.training.objectives import compute_objectives
from rir_finetune.training.sampler import GroupedBatchSampler
from rir_finetune.training.saving import save_encoder


class NonFiniteLossError(UserError):
    """Training stopped on a NaN or infinite loss; the last saved checkpoint is kept."""


class KillAfterSave(TrainerCallback):
    """Test hook: ``RIR_FINETUNE_KILL_AFTER_SAVE=N`` SIGKILLs the process right after checkpoint N is saved."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def unshard(prepared: DataLoader, sampler: GroupedBatchSampler) -> DataLoader:
    """Undo accelerate's sharding of our (already sharded) batch sampler and let ``set_epoch`` reach it.

    With several processes accelerate wraps the sampler in a ``BatchSamplerShard``, which has no ``set_epoch``; on
    resume ``skip_first_batches`` wraps that again in a ``SkipBatchSampler``. The Trainer forwards ``set_epoch``
    one level down only, so a run resumed after epoch 0 replayed epoch 0's batches. The shard now forwards it.
    """
    shard = getattr(prepared, "batch_sampler", None)
    if shard is not None and shard is not sampler and getattr(shard, "batch_sampler", None) is sampler:
        shard.num_processes, shard.process_index = 1, 0
        shard.set_epoch = sampler.set_epoch
    return prepared


def check_parallel_mode(args) -> None:
    """Several processes => the Trainer is in distributed mode over all of them; one process => one device.

    Without this a launch that accelerate does not recognise as distributed trains every rank on its own: the
    model is never wrapped in DDP, gradients are never averaged, and the run still saves a (wrong) model.
    """
    from transformers.training_args import ParallelMode

    from rir_finetune.training.arguments import launched_world_size

    launched, group = launched_world_size(), distributed.world_size()
    w = max(launched, group, args.world_size)
    if args.n_gpu > 1 and args.parallel_mode == ParallelMode.NOT_DISTRIBUTED:
        raise UserError(
            f"one process sees {args.n_gpu} GPUs (the Trainer would use nn.DataParallel, which this trainer does not "
            f"support): launch one process per GPU with torchrun --nproc_per_node {args.n_gpu} -m rir_finetune "
            "train ..., or set CUDA_VISIBLE_DEVICES to one GPU"
        )
    if w > 1 and (args.parallel_mode != ParallelMode.DISTRIBUTED or args.world_size != w or group != w):
        raise UserError(
            f"{launched} processes were launched (process group of {group}) but the Trainer runs "
            f"{args.parallel_mode.value} with world size {args.world_size}: gradients would not be averaged; "
            "on a CPU-only machine pass --use_cpu true; on GPUs start one process per GPU"
        )


def check_model_wrapped(model: torch.nn.Module, args, deepspeed: bool) -> None:
    """With several processes the model that trains must be DDP- or DeepSpeed-wrapped (gradients averaged)."""
    w = max(distributed.world_size(), args.world_size)
    if w <= 1:
        return
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    engine = deepspeed and type(model).__name__ == "DeepSpeedEngine"
    if not (ddp or engine):
        raise UserError(
            f"{w} processes but the model is wrapped as {type(model).__name__}, not DistributedDataParallel or "
            "DeepSpeed: gradients would not be averaged; launch with torchrun or accelerate launch (DDP) or "
            "--deepspeed (FSDP and other wrappers are not supported)"
        )


class ReleaseFreedMemory(TrainerCallback):
    """Give the heap's free pages back to the kernel (glibc ``malloc_trim``) at step boundaries.

    With the CPU allocator setting of :mod:`rir_finetune.cpu_memory` freed blocks stay in the heap for reuse, and
    blocks of varying sizes leave resident holes that a later step may not fit into: memory climbed over the steps.
    A trim returns them, and the next step faults its working set in again, once. Two policies (their measured
    peaks and times: benchmarks/README.md, "the trim policy"):

    - ``every_step`` (with the gradient cache, whose point is bounded memory): trimming only on growth let the peak
      climb over an epoch.
    - on growth (the plain step, chosen for speed): trim when a step ends with more resident memory than the step
      that set the reference, by more than ``margin``; the step after a trim sets the next reference. A steady run
      never trims: a trim every step slowed the plain step by a third at about the same peak.
    """

    def __init__(self, every_step: bool = False, margin: int = 128 << 20):
        self.every_step = every_step
        self.margin = margin
        self.reference: int | None = None
        self.trims = 0

    def on_step_end(self, args, state, control, **kwargs):
        if self.every_step:
            release_free_memory()
            self.trims += 1
            return
        rss = resident_bytes()
        if self.reference is None:
            self.reference = rss
        elif rss > self.reference + self.margin:
            release_free_memory()
            self.trims += 1
            self.reference = None


class RIRTrainer(Trainer):
    def __init__(
        self,
        *args: Any,
        objective_args: ObjectiveArguments,
        batch_sampler: GroupedBatchSampler,
        save_info: dict[str, Any],
        gradient_cache_chunk_size: int | None = None,
        gradient_cache_memory_bytes: int = 0,
        pad_to_multiple_of: int | None = None,
        retrieval_evaluator: Any = None,
        **kwargs: Any,
    ):
        super().__init__(*args, eval_dataset=retrieval_evaluator, **kwargs)
        check_parallel_mode(self.args)
        if isinstance(self.model, BiEncoder):
            self.model.pack_sequences = getattr(self.args, "pack_sequences", "auto")
        self._wrap_checked = False
        self.retrieval_evaluator = retrieval_evaluator
        self.objective_args = objective_args
        self.gradient_cache_chunk_size = gradient_cache_chunk_size  # None: plain step
        self.gradient_cache_memory_bytes = gradient_cache_memory_bytes  # graphs kept from the first pass
        self.pad_to_multiple_of = (
            pad_to_multiple_of  # gradient-cache chunks keep the collator's length multiple
        )
        self.batch_sampler = batch_sampler
        self.save_info = save_info  # pooling, normalize, max_seq_length, query_prompt, passage_prompt
        self._term_values: torch.Tensor | None = None  # running sum of the named terms since the last log
        self._term_names: list[str] = []
        self._term_count = 0
        self._add_memory_callbacks()
        if os.environ.get("RIR_FINETUNE_KILL_AFTER_SAVE"):
            self.add_callback(KillAfterSave(int(os.environ["RIR_FINETUNE_KILL_AFTER_SAVE"])))

    def _add_memory_callbacks(self) -> None:
        if freed_memory_kept():  # the CPU allocator setting is on (cpu_memory.py): bound what it keeps
            self.add_callback(ReleaseFreedMemory(every_step=bool(self.gradient_cache_chunk_size)))

    # -- data ------------------------------------------------------------------------------------------------------

    def get_train_dataloader(self) -> DataLoader:
        """Our batch sampler already shards across ranks; accelerate must not shard it again."""
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=self.batch_sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers
            and self.args.dataloader_num_workers > 0,
            prefetch_factor=self.args.dataloader_prefetch_factor
            if self.args.dataloader_num_workers > 0
            else None,
        )
        return unshard(self.accelerator.prepare(loader), self.batch_sampler)

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Inputs to the device; ``teacher_scores`` stay fp32 (under DeepSpeed the Trainer casts every float input to
        the engine's bf16/fp16: close scores would tie or swap, fp16 overflows above 65504)."""
        if not isinstance(inputs.get("teacher_scores"), torch.Tensor):
            return super()._prepare_inputs(inputs)
        teacher = inputs["teacher_scores"].to(device=self.args.device, dtype=torch.float32)
        inputs = super()._prepare_inputs({k: v for k, v in inputs.items() if k != "teacher_scores"})
        return {**inputs, "teacher_scores": teacher}

    # -- loss ------------------------------------------------------------------------------------------------------

    def _objectives(self, reps, inputs):
        return compute_objectives(
            reps.q_reps,
            reps.p_reps,
            self.objective_args,
            a_reps=reps.a_reps,
            a_cand_reps=reps.a_cand_reps,
            teacher_scores=inputs.get("teacher_scores"),
            in_batch=self.objective_args.use_in_batch_negatives and not inputs.get("no_in_batch_neg", False),
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        reps = model(**inputs)
        out = self._objectives(reps, inputs)
        self._record_terms(out.terms)
        return (out.loss, {"reps": reps, "terms": out.terms}) if return_outputs else out.loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self._wrap_checked:  # before the first forward, whatever the launch form
            check_model_wrapped(model, self.args, self.is_deepspeed_enabled)
            self._wrap_checked = True
        if not self.gradient_cache_chunk_size:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)
        no_sync = getattr(model, "no_sync", None) or contextlib.nullcontext
        scale = 1.0 / self.current_gradient_accumulation_steps
        with self.compute_loss_context_manager():
            loss, out = cached_step(
                encode=lambda feats: model(features=feats),
                batch=inputs,
                chunk_size=self.gradient_cache_chunk_size,
                loss_fn=lambda reps: self._objectives(reps, inputs),
                backward=self.accelerator.backward,
                no_sync=no_sync,
                scale=scale,
                keep_bytes=self.gradient_cache_memory_bytes,
                params=list(model.parameters()),
                pad_to_multiple_of=self.pad_to_multiple_of,
            )
        self._record_terms(out.terms)
        return loss * scale

    def _record_terms(self, terms: dict[str, torch.Tensor]) -> None:
        """Accumulate the terms on their device; one host sync per step, for the non-finite check."""
        names = list(terms)
        values = torch.stack([terms[k].detach().float() for k in names])  # (T,)
        # every rank sees every rank's terms: all stop together (one rank stopping alone leaves the rest waiting in
        # the next collective forever)
        table = distributed.gather_no_grad(values).view(-1, len(names))  # (W, T)
        if not bool(torch.isfinite(table).all()):
            rows = table.tolist()
            r, t = next(
                (r, t) for r, row in enumerate(rows) for t, v in enumerate(row) if not math.isfinite(v)
            )
            where = f" on rank {r}" if len(rows) > 1 else ""
            raise NonFiniteLossError(
                f"{names[t]} became {rows[r][t]}{where} at step {self.state.global_step + 1}; training stopped, the "
                f"last checkpoint in {self.args.output_dir} is kept (lower learning_rate or raise temperature)"
            )
        self._term_values = values if self._term_values is None else self._term_values + values
        self._term_names = names
        self._term_count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._term_count:
            means = distributed.all_reduce_mean(self._term_values / self._term_count).tolist()
            for name, value in zip(self._term_names, means, strict=True):
                logs[name] = round(value, 6)
            self._term_values, self._term_count = None, 0
        super().log(logs, start_time)

    # -- evaluation during training ------------------------------------------------------------------------------

    def evaluate(
        self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        if self.retrieval_evaluator is None:
            raise UserError(
                "evaluation needs an eval set: set eval_data (a BEIR-layout folder) or eval_strategy no"
            )
        model = self.accelerator.unwrap_model(self.model)
        metrics = self.retrieval_evaluator.evaluate(model, self.processing_class, metric_key_prefix)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # -- saving and loading ----------------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the model on the saving process only. transformers 5's ``save_model`` calls ``_save`` on every rank
        (its own ``_save`` returns early on the others): without this guard W processes wrote the same files at once
        and one could lose the race for ``modules.json.tmp`` and crash (seen under torchrun in CI)."""
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        model: BiEncoder = self.accelerator.unwrap_model(self.model)
        backbone = model.backbone
        extra = None
        if is_lora(backbone):  # merged weights for loading anywhere, the adapter for resuming
            state_dict = merged_state_dict(backbone)
            extra = functools.partial(save_adapter, backbone)
            backbone = backbone.get_base_model()
        elif state_dict is not None:
            prefix = "backbone."
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        save_encoder(
            output_dir, backbone, self.processing_class, state_dict=state_dict, extra=extra, **self.save_info
        )
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model or self.model)
        load_backbone_weights(model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_backbone_weights(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)


def load_backbone_weights(model: BiEncoder, folder: str | os.PathLike) -> None:
    """Load the weights that :func:`save_encoder` wrote (``model.safetensors`` or sharded) into ``model``."""
    folder = Path(folder)
    if is_lora(model.backbone):
        load_adapter(model.backbone, folder)
        return
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no model weights (model*.safetensors) in this checkpoint")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    target = model.backbone
    base = getattr(target, "base_model_prefix", "")
    own = target.state_dict()
    if base and not any(k in own for k in state) and any(k.startswith(base + ".") for k in state):
        state = {k[len(base) + 1 :]: v for k, v in state.items()}
    missing, unexpected = target.load_state_dict(state, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing:
        raise UserError(f"{folder}: checkpoint lacks {len(missing)} weights of the model (e.g. {missing[0]})")
