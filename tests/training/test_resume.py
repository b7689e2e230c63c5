"""A run killed (SIGKILL) after a checkpoint and resumed with `auto` ends exactly where an uninterrupted run does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rir_finetune.lifecycle import latest_complete_checkpoint


def _cmd(model_dir, data, out, nproc=1, **kw):
    opts = {
        "model_name_or_path": model_dir, "train_data": data, "output_dir": out, "per_device_train_batch_size": 4,
        "train_group_size": 3, "query_max_len": 16, "passage_max_len": 24, "max_steps": 6, "learning_rate": 1e-3,
        "logging_steps": 1, "save_strategy": "steps", "save_steps": 2, "use_cpu": "true", "disable_tqdm": "true",
        "sentence_pooling_method": "mean", "knowledge_distillation": "true", "kd_loss_type": "m3_kd_loss",
        "training_type": "retrieval_answer", "seed": 7, "report_to": "none",
    }  # fmt: skip
    opts.update(kw)
    args = [a for k, v in opts.items() for a in (f"--{k}", str(v))]
    if nproc == 1:
        return [sys.executable, "-m", "rir_finetune", "train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "rir_finetune", "train", *args, "--ddp_backend", "gloo"]  # fmt: skip


def _run(cmd, env=None, expect_kill=False):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    if expect_kill:
        assert r.returncode != 0
    else:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _losses(out: Path, step: int):
    logs = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["log_history"]
    return [(e["step"], round(e["loss"], 4)) for e in logs if "loss" in e]


@pytest.mark.parametrize(
    "nproc, kill_at",
    [
        (1, 4),
        pytest.param(2, 2, marks=[pytest.mark.multiprocess, pytest.mark.slow]),  # killed in epoch 1 of 2
        pytest.param(2, 4, marks=[pytest.mark.multiprocess, pytest.mark.slow]),  # killed in epoch 2 of 2
    ],
)
def test_kill_and_resume_matches_uninterrupted(tmp_path, tiny_bert_dir, nproc, kill_at):
    from conftest import make_records, write_jsonl

    # 12 records, 4 per step per process: steps cross an epoch boundary; the kill lands mid-epoch
    data = write_jsonl(tmp_path / "t.jsonl", make_records(12 * nproc, scores=True))
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run(_cmd(tiny_bert_dir, data, ref, nproc))
    _run(
        _cmd(tiny_bert_dir, data, run, nproc),
        env={"RIR_FINETUNE_KILL_AFTER_SAVE": str(kill_at)},
        expect_kill=True,
    )
    assert latest_complete_checkpoint(run).endswith(f"checkpoint-{kill_at}")
    assert not (run / "modules.json").exists()  # no final model left looking complete
    _run(_cmd(tiny_bert_dir, data, run, nproc, resume_from_checkpoint="auto"))
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert _losses(ref, 6) == _losses(run, 6)


def test_incomplete_checkpoint_is_skipped(tmp_path):
    good, bad = tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"
    for d in (good, bad):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
    (good / "trainer_state.json").write_text("{}")
    (bad / "trainer_state.json").write_text('{"log_hist')  # killed while writing
    assert latest_complete_checkpoint(tmp_path) == str(good)


@pytest.mark.slow
@pytest.mark.parametrize("delay", [4.0, 7.5, 11.0])
def test_sigkill_at_a_random_moment_then_resume(tmp_path, tiny_bert_dir, delay):
    """A kill at an arbitrary moment (mid-step, mid-save or before the first checkpoint) loses nothing."""
    import signal
    import time

    from conftest import make_records, write_jsonl

    data = write_jsonl(tmp_path / "t.jsonl", make_records(12, scores=True))
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run(_cmd(tiny_bert_dir, data, ref, max_steps=12, save_steps=1))
    proc = subprocess.Popen(_cmd(tiny_bert_dir, data, run, max_steps=12, save_steps=1), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _run(_cmd(tiny_bert_dir, data, run, max_steps=12, save_steps=1, resume_from_checkpoint="auto"))
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert _losses(ref, 12) == _losses(run, 12)


def test_set_epoch_reaches_the_sampler_through_accelerates_shard_and_skip_wrappers():
    """Several processes: accelerate wraps our sampler in BatchSamplerShard, resume in SkipBatchSampler on top; the
    Trainer's set_epoch (DataLoaderShard.set_epoch plus one level down) must still reach it, or a run resumed in epoch
    1 replays epoch 0's batches."""
    from accelerate.data_loader import prepare_data_loader, skip_first_batches
    from torch.utils.data import DataLoader

    from rir_finetune.training.sampler import GroupedBatchSampler
    from rir_finetune.training.trainer import unshard

    sampler = GroupedBatchSampler([list(range(16))], per_device_batch_size=2, seed=3, world_size=2, rank=0)

    class Keys:  # returns the (record, epoch) key it is asked for
        def __getitem__(self, key):
            return key

        def __len__(self):
            return 16

    loader = DataLoader(Keys(), batch_sampler=sampler, collate_fn=lambda items: items)
    prepared = unshard(
        prepare_data_loader(loader, num_processes=2, process_index=0, put_on_device=False), sampler
    )
    resumed = skip_first_batches(prepared, 1)
    resumed.set_epoch(1)  # what transformers' _run_epoch does
    underlying = getattr(resumed.batch_sampler, "batch_sampler", None)
    if hasattr(underlying, "set_epoch"):
        underlying.set_epoch(1)
    expected = list(sampler)[1:]  # epoch 1's batches after the first, keys (record, 1)
    assert sampler.epoch == 1 and expected[0][0][1] == 1
    assert list(resumed) == expected
