"""LoRA adapters (peft) on the shared encoder: ``use_lora: true``.

Training updates only the adapters. Every save writes two things: the merged weights (base + scaling * B @ A) as an
ordinary model, so the output loads in sentence-transformers and transformers like any other run, and the adapter
itself under ``adapter/`` (peft's own format), which is what a resumed run loads back. The merged weights are
computed without touching the live model (no merge/unmerge round trip, which would drift the base weights).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rir_finetune.errors import UserError

ADAPTER_DIR = "adapter"


def apply_lora(model: nn.Module, args) -> None:
    """Wrap ``model.backbone`` with LoRA adapters from the model arguments (rank, alpha, dropout, target modules)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
        bias="none",
    )
    try:
        model.backbone = get_peft_model(model.backbone, config)
    except ValueError as e:  # unknown architecture without target modules, or targets that match nothing
        raise UserError(
            f"config key 'lora_target_modules': {e} (name the linear layers to adapt, e.g. [query, value])"
        ) from None


def is_lora(backbone: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(backbone, PeftModel)


def merged_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter's delta added: the weights of the merged model."""
    from peft.tuners.lora import LoraLayer

    base = backbone.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if adapter in module.lora_A or adapter in getattr(module, "lora_embedding_A", {}):
                    delta = module.get_delta_weight(adapter).detach()
                    deltas[name] = deltas[name] + delta if name in deltas else delta
    merged: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        if "lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        module_name, _, leaf = key.rpartition(".")
        if leaf == "weight" and module_name in deltas:
            value = value + deltas[module_name].to(value.dtype)
        merged[key] = value.detach()
    return merged


def save_adapter(backbone: nn.Module, folder: Path) -> None:
    backbone.save_pretrained(str(folder / ADAPTER_DIR), safe_serialization=True)


def load_adapter(backbone: nn.Module, folder: Path) -> None:
    """Load the adapter weights a checkpoint saved under ``adapter/`` into the (already wrapped) backbone."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_DIR / "adapter_model.safetensors"
    if not path.is_file():
        raise UserError(
            f"{folder}: no LoRA adapter ({ADAPTER_DIR}/adapter_model.safetensors) in this checkpoint"
        )
    result = set_peft_model_state_dict(backbone, load_file(str(path)))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"{path}: adapter does not match the configured LoRA ({unexpected[0]} is unexpected)")
