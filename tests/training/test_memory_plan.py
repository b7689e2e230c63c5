"""``gradient_cache: auto``: the rule with given numbers, the estimate against what autograd really keeps, and a run
that logs its choice, records it, and keeps it when resumed."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml

from rir_finetune.training import memory_plan
from rir_finetune.training.memory_plan import ModelShape, batch_parts, decide

GIB = 2**30


def test_plain_when_the_estimated_peak_fits_the_budget():
    plan = decide(activations=2 * GIB, per_text=0.1 * GIB, budget=10 * GIB, peak_factor=3.0, max_texts=64)
    assert plan.gradient_cache is False
    assert "the plain step" in plan.reason and "6.00 GiB" in plan.reason and "10.00 GiB" in plan.reason


def test_cache_when_it_does_not_with_chunks_that_fill_half_the_budget():
    # peak 3 x 4 GiB = 12 > 10: cache; kept graphs: 10 / 2 / 3 = 1.667 GiB of activations (5 GiB at peak);
    # a chunk: the other 5 GiB / (0.1 GiB x 3 per text) = 16.67 -> 16 texts
    plan = decide(activations=4 * GIB, per_text=0.1 * GIB, budget=10 * GIB, peak_factor=3.0, max_texts=64)
    assert plan.gradient_cache is True
    assert plan.keep_bytes == int(10 * GIB / 2 / 3)
    assert plan.chunk_size == 16
    assert "exceeds the budget" in plan.reason and "chunks of 16 texts" in plan.reason


def test_forcing_and_the_users_chunk_and_memory_win():
    fits = dict(activations=GIB, per_text=0.01 * GIB, budget=10 * GIB, peak_factor=1.5, max_texts=64)
    forced = decide(**fits, forced=True)  # a small footprint whatever the device holds: 16 texts, 1 GiB kept
    assert (forced.gradient_cache, forced.chunk_size, forced.keep_bytes) == (True, 16, 1024 << 20)
    assert decide(**fits, forced=True, chunk_size=3).chunk_size == 3
    big = dict(activations=100 * GIB, per_text=0.01 * GIB, budget=10 * GIB, peak_factor=1.5, max_texts=64)
    assert decide(**big, forced=False).gradient_cache is False
    plan = decide(**big, chunk_size=5, memory_mb=300)
    assert (plan.gradient_cache, plan.chunk_size, plan.keep_bytes) == (True, 5, 300 << 20)
    # memory_mb given, chunk from what it leaves: (10 GiB - 2 GiB x 1.5) / (0.01 GiB x 1.5) = 466 -> capped at 64
    assert decide(**big, memory_mb=2048).chunk_size == 64


def test_a_budget_the_weights_already_exceed_gives_the_fixed_sizes_of_the_forced_cache():
    plan = decide(activations=GIB, per_text=0.1 * GIB, budget=-GIB, peak_factor=3.0, max_texts=64)
    assert (plan.gradient_cache, plan.chunk_size, plan.keep_bytes) == (True, 16, 1024 << 20)
    assert "leave no budget" in plan.reason
    # a tiny budget still records a whole megabyte kept (the key's range is >= 1)
    plan = decide(activations=GIB, per_text=0.1 * GIB, budget=2**20, peak_factor=3.0, max_texts=64)
    assert plan.keep_bytes == 1 << 20 and plan.chunk_size == 1


def test_a_forced_plain_step_records_sizes_that_do_not_depend_on_free_memory():
    """A resumed run compares its keys with the first run's: with ``gradient_cache false`` they must not move with
    the memory free at each start."""
    plans = [decide(activations=GIB, per_text=0.01 * GIB, budget=b * GIB, peak_factor=3.0, max_texts=64,
                    forced=False) for b in (8, 9)]  # fmt: skip
    assert plans[0] == plans[1] and (plans[0].chunk_size, plans[0].keep_bytes) == (16, 1024 << 20)


def test_parts_of_a_batch():
    parts = batch_parts(16, 4, 64, 256, 64, False, False)
    assert [(p.texts, p.max_len) for p in parts] == [(16, 64), (64, 256)]
    assert batch_parts(16, 4, 64, 256, 48, True, False)[-1] == memory_plan.Part(16, 48)
    assert batch_parts(16, 4, 64, 256, 48, True, True)[-1] == memory_plan.Part(64, 48)


def _saved_bytes(model, n: int, length: int, bf16: bool) -> float:
    from rir_finetune.training.gradcache import SavedBytes

    feats = {"input_ids": torch.randint(5, 60, (n, length)), "attention_mask": torch.ones(n, length, dtype=torch.long),
             "token_type_ids": torch.zeros(n, length, dtype=torch.long)}  # fmt: skip
    counter = SavedBytes({p.untyped_storage().data_ptr() for p in model.parameters()})
    with counter(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(features=feats)
    return counter.bytes


@pytest.mark.parametrize("bf16", [False, True])
def test_estimate_is_within_a_quarter_of_what_autograd_keeps(tiny_bert_dir, minilm_dir, bf16):
    """CPU training with attention dropout (rir_sdpa keeps a 1-byte mask per score): the estimate of one forward,
    from the config alone, against the bytes autograd saves (parameters excluded; autocast's weight copies are not
    parameters and count)."""
    from rir_finetune.training.model import BiEncoder

    cases = ((tiny_bert_dir, 8, 32), (minilm_dir, 8, 64), (minilm_dir, 8, 256), (minilm_dir, 2, 64))
    for folder, n, length in cases:
        model = BiEncoder.from_pretrained(str(folder), pooling="mean", normalize=True).train()
        shape = ModelShape.of(model.backbone.config)
        assert shape.attention_dropout > 0
        measured = _saved_bytes(model, n, length, bf16)
        estimate, _ = memory_plan.activation_estimate(shape, [memory_plan.Part(n, length)], 2 if bf16 else 4,
                                                      "keep_mask")  # fmt: skip
        assert 0.75 < estimate / measured < 1.25, (folder.name, n, length, estimate, measured)


def test_parameters_are_counted_on_the_meta_device(minilm_dir):
    from transformers import AutoConfig, AutoModel

    n = memory_plan.count_params(AutoConfig.from_pretrained(minilm_dir))
    assert n == sum(p.numel() for p in AutoModel.from_pretrained(minilm_dir).parameters())


def _opts(tiny_bert_dir, train_file, out, **kw):
    return {"model_name_or_path": str(tiny_bert_dir), "train_data": [str(train_file)], "output_dir": str(out),
            "per_device_train_batch_size": 4, "train_group_size": 3, "query_max_len": 16, "passage_max_len": 24,
            "max_steps": 1, "save_strategy": "no", "use_cpu": True, "report_to": "none", "disable_tqdm": True,
            "training_type": "retrieval", "bf16": False, **kw}  # fmt: skip


def test_a_run_logs_and_records_its_choice(tmp_path, tiny_bert_dir, train_file, monkeypatch, caplog):
    from rir_finetune.training.train import RESOLVED_CONFIG, run_train

    caplog.set_level(logging.INFO, logger="rir_finetune")
    out = run_train(None, _opts(tiny_bert_dir, train_file, tmp_path / "roomy"))
    cfg = yaml.safe_load((out / RESOLVED_CONFIG).read_text())
    assert cfg["gradient_cache"] is False  # a tiny BERT fits any host
    assert any("gradient_cache auto -> the plain step" in r.getMessage() and "available RAM" in r.getMessage()
               for r in caplog.records)  # fmt: skip

    caplog.clear()
    monkeypatch.setattr(memory_plan, "available_ram", lambda: 2 * 2**20)  # 2 MiB: the batch cannot fit
    out = run_train(None, _opts(tiny_bert_dir, train_file, tmp_path / "tight"))
    cfg = yaml.safe_load((out / RESOLVED_CONFIG).read_text())
    assert cfg["gradient_cache"] is True and cfg["gradient_cache_chunk_size"] >= 1
    assert any("gradient_cache auto -> the cache" in r.getMessage() for r in caplog.records)


def test_a_resumed_run_keeps_the_recorded_choice(tmp_path, tiny_bert_dir, train_file, monkeypatch):
    from rir_finetune.training.train import RESOLVED_CONFIG, run_train

    monkeypatch.setattr(memory_plan, "available_ram", lambda: 2 * 2**20)
    opts = _opts(tiny_bert_dir, train_file, tmp_path / "o", max_steps=2, save_strategy="steps", save_steps=1)
    run_train(None, opts)
    first = yaml.safe_load((tmp_path / "o" / RESOLVED_CONFIG).read_text())
    assert first["gradient_cache"] is True
    # the host has room now: a new run would go plain
    monkeypatch.setattr(memory_plan, "available_ram", lambda: 1e15)
    run_train(None, {**opts, "max_steps": 3, "resume_from_checkpoint": "auto"})
    again = yaml.safe_load((tmp_path / "o" / RESOLVED_CONFIG).read_text())
    keys = ("gradient_cache", "gradient_cache_chunk_size", "gradient_cache_memory_mb")
    assert {k: again[k] for k in keys} == {k: first[k] for k in keys}


def test_eager_attention_is_estimated_with_its_score_matrices_on_every_device():
    from rir_finetune.training.memory_plan import ModelShape, _attention_kind

    shape = ModelShape(layers=2, hidden=32, heads=2, intermediate=64, attention_dropout=0.0)
    assert (
        _attention_kind(shape, "cuda", "eager") == "math" and _attention_kind(shape, "cpu", "eager") == "math"
    )
    assert _attention_kind(shape, "cuda", "sdpa") == "kernel"
