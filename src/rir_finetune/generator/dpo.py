"""``rir-finetune train-generator``: DPO of the answer generator on the retriever's preference pairs (TRL, LoRA).

    rir-finetune train-generator --config configs/generator_dpo.yaml
    rir-finetune train-generator --model LLM_DIR [--gguf_file F.gguf] --data pairs.jsonl --output_dir runs/gen

The pairs come from ``reward`` (TRL's preference format: ``prompt``, ``chosen``, ``rejected``). Training is TRL's
``DPOTrainer`` with a peft LoRA adapter (rank 32, alpha 64, every linear layer but the LM head; upstream's
LLaMA-Factory settings), sigmoid loss, beta 0.1, learning rate 1e-5, one epoch; the reference model is the base
(the adapter switched off), so only one copy of the weights is held. Every ``DPOConfig`` /
``TrainingArguments`` key works (``--max_steps 2``, ``--per_device_train_batch_size 4``...).

Prompts are shown to the model as the backend showed them when it sampled: a plain-text prompt is wrapped in the
model's chat template when it has one and ``use_chat_template`` is on (the backend's rule), else kept as text with
the answer after it; pairs that hold chat messages are used as they are.

Saved in ``output_dir``: the merged model (base + LoRA, safetensors, with the tokenizer), which ``augment
--backend transformers --model output_dir`` and ``AutoModelForCausalLM`` load; the adapter under ``adapter/``;
``trainer_state.json`` with every logged step (loss, ``rewards/margins``, ``rewards/accuracies``...); and the
checkpoints, from which ``--resume_from_checkpoint auto`` continues. bf16 autocast is on where the hardware has
bf16 arithmetic (CUDA with bf16, CPUs with AVX512-BF16 or AMX), fp32 elsewhere; ``--bf16`` sets it.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from transformers import TrainerCallback
from trl import DPOConfig

from rir_finetune import files, lifecycle
from rir_finetune.config import TRAINER_RANGES, load_config, option
from rir_finetune.errors import UserError
from rir_finetune.llm.causal_lm import check_causal_lm, model_location
from rir_finetune.precision import bf16_native
from rir_finetune.retrieval import model_folder

Record = dict[str, Any]

logger = logging.getLogger("rir_finetune")

ADAPTER_DIR = "adapter"


# ----------------------------------------------------------------------------------------------------------------
# Config


def bf16_by_default(use_cpu: bool) -> bool:
    return bf16_native("cpu" if use_cpu else None)


@dataclass
class GeneratorArguments:
    model: str | None = option(None, "the generator: a causal LM folder or a .gguf file")
    gguf_file: str | None = option(None, "GGUF file inside the 'model' folder (transformers de-quantises it)")
    data: str | None = option(None, "preference pairs (JSONL from `reward`)")
    lora_rank: int = option(32, "LoRA rank (upstream 32)", range=">=1")
    lora_alpha: float = option(64.0, "LoRA alpha (upstream 64)", range=">0")
    lora_dropout: float = option(
        0.0, "LoRA dropout (TRL turns dropout off anyway: disable_dropout)", range="[0, 1)"
    )
    lora_target_modules: list[str] = option(factory=lambda: ["all-linear"], help="all-linear: every linear")
    use_chat_template: bool = option(
        True, "plain-text prompts go through the chat template when the model has one"
    )
    system_prompt: str | None = option(
        None, "system message put before plain-text prompts in the chat template"
    )


@dataclass
class GeneratorDPOConfig(DPOConfig):
    """TRL's ``DPOConfig`` with this command's defaults: upstream's DPO settings, small CPU-friendly steps."""

    INHERITED_RANGES: ClassVar[dict[str, str]] = {**TRAINER_RANGES, "beta": ">0"}

    output_dir: str | None = option(None, "where the merged model, adapter and checkpoints go (required)")
    overwrite_output_dir: bool = option(
        False, "train into a non-empty output_dir from scratch (transformers 5 dropped it)"
    )
    learning_rate: float = option(1e-5, "upstream 1e-5")
    num_train_epochs: float = option(1.0, "upstream one epoch")
    per_device_train_batch_size: int = option(4, "pairs per step")
    max_length: int | None = option(512, "tokens of prompt + answer")
    logging_steps: float = option(1, "log margins and accuracies every step")
    save_steps: float = option(50, "save a checkpoint every this many steps")
    gradient_checkpointing: bool | None = option(
        None, "deprecated alias of activation_checkpointing (transformers 5)"
    )
    activation_checkpointing: bool | None = option(
        False, "TRL turns it on; a 135M-1B model does not need the memory"
    )
    bf16: bool | None = option(None, "None: bf16 where the hardware has it (see bf16_by_default), else fp32")

    def __post_init__(self):
        if self.output_dir is None:
            raise UserError("config key 'output_dir' is required (the folder for the trained generator)")
        import torch

        if not torch.cuda.is_available():
            self.use_cpu = True  # transformers refuses bf16 on a CPU unless told the CPU is the device
        if self.bf16 is None:
            self.bf16 = False if self.fp16 else bf16_by_default(self.use_cpu)
        super().__post_init__()


CONFIG_CLASSES = (GeneratorArguments, GeneratorDPOConfig)


def load_configs(config_file: str | None, overrides: list[str] | dict) -> tuple[GeneratorArguments, Any]:
    gen_args, dpo_args = load_config(list(CONFIG_CLASSES), config_file, overrides)
    return gen_args, dpo_args


# ----------------------------------------------------------------------------------------------------------------
# Data: the pairs, in the format the model saw when it sampled


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in value)
    )  # fmt: skip


def check_pair(record: Record) -> str | None:
    prompt = record.get("prompt")
    if not (isinstance(prompt, str) and prompt.strip()) and not _is_messages(prompt):
        return "field 'prompt' must be a non-empty string or a list of chat messages ({'role', 'content'})"
    for key in ("chosen", "rejected"):
        value = record.get(key)
        if not (isinstance(value, str) and value.strip()) and not _is_messages(value):
            return f"field {key!r} must be a non-empty string or a list of chat messages"
    return None


def read_pairs(path: str | None) -> list[Record]:
    if not path:
        raise UserError("config key 'data' is required (the preference pairs that `reward` wrote)")
    pairs = files.read_jsonl(path, check_pair, "pairs")
    kinds = {isinstance(p["prompt"], list) for p in pairs}
    if len(kinds) > 1:
        line = next(n for n, p in enumerate(pairs, 1) if isinstance(p["prompt"], list) != isinstance(pairs[0]["prompt"], list))  # fmt: skip
        raise UserError(f"{path}:{line}: mixes chat-message and plain-text prompts; use one kind per file")
    return pairs


def to_trl_example(pair: Record, chat: bool, system_prompt: str | None) -> dict[str, Any]:
    """One pair as ``DPOTrainer`` takes it: conversational when ``chat`` (or already messages), else text.

    Plain text: the answer follows the prompt after one space (the backend's answers are stripped of the space the
    model wrote first), so prompt + chosen is the text the model saw and wrote.
    """
    prompt, chosen, rejected = pair["prompt"], pair["chosen"], pair["rejected"]
    if isinstance(prompt, list):
        as_msgs = lambda a: a if isinstance(a, list) else [{"role": "assistant", "content": a}]  # noqa: E731
        return {"prompt": prompt, "chosen": as_msgs(chosen), "rejected": as_msgs(rejected)}
    if chat:
        messages = [{"role": "user", "content": prompt}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return {
            "prompt": messages,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    sep = lambda a: "" if prompt[-1:].isspace() or a[:1].isspace() else " "  # noqa: E731
    return {"prompt": prompt, "chosen": sep(chosen) + chosen, "rejected": sep(rejected) + rejected}


class _PrintMetrics(TrainerCallback):
    """One line per logged step: loss, reward margin and accuracy (TRL's rewards/* metrics)."""

    KEYS = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero or "loss" not in logs:
            return
        parts = [f"{k} {logs[k]:.4f}" for k in self.KEYS if k in logs]
        print(f"train-generator step {state.global_step}: " + ", ".join(parts), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The command


def load_model(gen_args: GeneratorArguments):
    """(model, tokenizer) of the generator, after checking it is a causal LM (nothing loads otherwise)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = model_location(gen_args.model, gen_args.gguf_file)
    check_causal_lm(folder, gguf)
    if gguf is None:
        model_folder.check_model_folder(folder, key="model")
    extra = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(str(folder), **extra)
    if gguf:  # de-quantised to fp32 weights that train like any others (never packed GGUF blocks)
        from transformers.utils.quantization_config import GgufConfig

        extra["quantization_config"] = GgufConfig(gguf_file=gguf, dequantize=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"{folder}: the tokenizer has neither a pad nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **extra)
    if (
        getattr(model, "hf_quantizer", None) is not None
    ):  # the Trainer refuses a model marked as GGUF-quantised
        model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:  # the saved model is a plain fp32 one
        del model.config.quantization_config
    return model, tokenizer


def check_inputs(gen_args: GeneratorArguments, dpo_args: Any) -> list[Record]:
    """Everything that can fail on bad input, before a model loads or a folder is created; returns the pairs."""
    folder, gguf = model_location(gen_args.model, gen_args.gguf_file)
    check_causal_lm(folder, gguf)
    pairs = read_pairs(gen_args.data)
    files.check_output_dir(dpo_args.output_dir, key="output_dir", reads=[gen_args.model, gen_args.data])
    return pairs


def train_generator(gen_args: GeneratorArguments, dpo_args: Any, pairs: list[Record]) -> Path:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOTrainer

    resume = lifecycle.resolve_resume(
        dpo_args.resume_from_checkpoint, dpo_args.output_dir, dpo_args.overwrite_output_dir
    )
    model, tokenizer = load_model(gen_args)
    chat = gen_args.use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    if isinstance(pairs[0]["prompt"], list) and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{gen_args.data}: the pairs hold chat messages but {gen_args.model} has no chat template"
        )
    dataset = Dataset.from_list([to_trl_example(p, chat, gen_args.system_prompt) for p in pairs])
    targets = gen_args.lora_target_modules
    peft_config = LoraConfig(
        r=gen_args.lora_rank,
        lora_alpha=gen_args.lora_alpha,
        lora_dropout=gen_args.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        trainer = DPOTrainer(
            model=model,
            args=dpo_args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[_PrintMetrics()],
        )
    except ValueError as e:  # lora targets that match nothing, and the like
        raise UserError(f"train-generator: {' '.join(str(e).split())[:300]}") from None
    out = Path(dpo_args.output_dir)
    precision = "bf16 autocast" if dpo_args.bf16 else "fp16" if dpo_args.fp16 else "fp32"
    print(f"train-generator: {len(dataset)} pairs ({'chat template' if chat else 'plain text'}), {precision}, "
          f"LoRA r={gen_args.lora_rank} alpha={gen_args.lora_alpha:g}, beta {dpo_args.beta}, "
          f"loss {'+'.join(dpo_args.loss_type)}" + (f", resuming from {resume}" if resume else ""), flush=True)  # fmt: skip
    start = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.time() - start
    trainer.save_state()
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    peft_model.save_pretrained(str(out / ADAPTER_DIR))
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    steps_now = max(result.global_step - (int(Path(resume).name.split("-")[-1]) if resume else 0), 1)
    logs = [h for h in trainer.state.log_history if "rewards/margins" in h]
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    print("train-generator:")
    print(f"  {result.global_step} steps ({steps_now} now) in {seconds:.1f} s: {seconds / steps_now:.2f} s/step, "
          f"peak RSS {peak_gb:.2f} GiB")  # fmt: skip
    if logs:
        first, last = logs[0], logs[-1]
        print(f"  reward margin {first['rewards/margins']:.4f} -> {last['rewards/margins']:.4f}, "
              f"accuracy {first['rewards/accuracies']:.2f} -> {last['rewards/accuracies']:.2f}")  # fmt: skip
    print(f"  saved the merged model in {out} (adapter in {out / ADAPTER_DIR}); "
          f"load it with augment --backend transformers --model {out}", flush=True)  # fmt: skip
    sys.stdout.flush()
    return out


def run_train_generator(config_file: str | None, overrides: list[str] | dict) -> Path:
    """``rir-finetune train-generator``: config file + ``--key value`` overrides -> trained generator folder."""
    gen_args, dpo_args = load_configs(config_file, overrides)
    pairs = check_inputs(gen_args, dpo_args)
    return train_generator(gen_args, dpo_args, pairs)
