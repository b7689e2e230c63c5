"""``bf16: auto``: mixed precision where the device computes bf16 natively, fp32 elsewhere."""

from __future__ import annotations

import pytest
import torch

from rir_finetune.config import build_configs
from rir_finetune.errors import UserError
from rir_finetune.training.arguments import CONFIG_CLASSES, RIRTrainingArguments


def train_args(tmp_path, **overrides) -> RIRTrainingArguments:
    keys = {
        "model_name_or_path": "m",
        "train_data": ["d.jsonl"],
        "output_dir": str(tmp_path / "out"),
        **overrides,
    }
    return build_configs(list(CONFIG_CLASSES), None, keys)[3]


@pytest.mark.skipif(
    torch.accelerator.is_available(), reason="the CPU rules; a GPU machine resolves on the GPU"
)
@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_cpu(tmp_path, monkeypatch, native):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": native, "avx2": True})
    args = train_args(tmp_path, bf16="auto")
    assert args.bf16 is native
    assert args.use_cpu is native  # bf16 on a machine without a GPU needs transformers' use_cpu
    # the default is auto: `rir-finetune train` without a config computes as the shipped configs do
    assert train_args(tmp_path).bf16 is native
    assert train_args(tmp_path, bf16=False).bf16 is False


@pytest.mark.skipif(torch.accelerator.is_available(), reason="the CPU rules")
def test_bf16_true_on_a_cpu_only_machine_trains_on_the_cpu(tmp_path):
    args = train_args(tmp_path, bf16=True)  # transformers alone refuses this without use_cpu
    assert args.bf16 is True and args.use_cpu is True


def test_bf16_takes_true_false_or_auto(tmp_path):
    with pytest.raises(UserError, match=r"config key 'bf16': true, false or auto, got 'sometimes'"):
        train_args(tmp_path, bf16="sometimes")


def test_gradient_cache_and_packing_take_true_false_or_auto(tmp_path):
    from rir_finetune.training.arguments import ModelArguments

    keys = {"model_name_or_path": "m", "train_data": ["d.jsonl"], "output_dir": str(tmp_path / "out")}
    model_args, _, _, train_args = build_configs(list(CONFIG_CLASSES), None, keys)
    assert (model_args.gradient_cache, train_args.pack_sequences) == ("auto", "auto")
    assert (model_args.gradient_cache_chunk_size, model_args.gradient_cache_memory_mb) == (None, None)
    forced = build_configs(
        list(CONFIG_CLASSES), None, {**keys, "gradient_cache": "true", "pack_sequences": "false"}
    )
    assert (forced[0].gradient_cache, forced[3].pack_sequences) == (True, False)
    assert ModelArguments(gradient_cache=None).gradient_cache == "auto"
    with pytest.raises(UserError, match=r"config key 'pack_sequences': true, false or auto, got 'often'"):
        build_configs(list(CONFIG_CLASSES), None, {**keys, "pack_sequences": "often"})
