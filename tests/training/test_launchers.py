"""The launch forms of the README: torchrun --no-python with the console script, and accelerate launch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_records, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _args(model, data, out):
    return ["--model_name_or_path", str(model), "--train_data", str(data), "--output_dir", str(out), "--max_steps",
            "2", "--train_group_size", "3", "--per_device_train_batch_size", "2", "--negatives_cross_device", "true",
            "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true", "--dataloader_drop_last", "true"]  # fmt: skip


def test_torchrun_no_python_console_script(tmp_path, tiny_bert_dir):
    data = write_jsonl(tmp_path / "t.jsonl", make_records(8))
    script = Path(sys.executable).parent / "rir-finetune"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
           str(script), "train", *_args(tiny_bert_dir, data, tmp_path / "o"), "--ddp_backend", "gloo"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes x 2 queries = 4 queries per step" in r.stderr
    assert (tmp_path / "o" / "modules.json").is_file()


def test_accelerate_launch(tmp_path, tiny_bert_dir):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    data = write_jsonl(tmp_path / "t.jsonl", make_records(8))
    cmd = [accelerate, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "rir_finetune", "train", *_args(tiny_bert_dir, data, tmp_path / "o")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "o" / "modules.json").is_file()


def test_accelerate_launch_two_processes_sgd_step_equals_one_process(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): 2 x batch 2 gives the weights of 1 x batch 4."""
    import torch
    from safetensors.torch import load_file
    from test_distributed import _write_no_dropout_bert

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    model = _write_no_dropout_bert(tmp_path / "m")
    data = write_jsonl(tmp_path / "t.jsonl", make_records(8))
    # fp32 (bf16 is the default where native): the two runs agree to 1e-6
    common = ["--model_name_or_path", str(model), "--train_data", str(data), "--max_steps", "1", "--train_group_size",
              "3", "--optim", "sgd", "--learning_rate", "0.5", "--use_cpu", "true", "--save_strategy", "no",
              "--negatives_cross_device", "true", "--training_type", "retrieval_answer", "--dataloader_drop_last",
              "true", "--report_to", "none", "--sentence_pooling_method", "mean", "--bf16", "false"]  # fmt: skip
    two = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "-m", "rir_finetune", "train", *common, "--output_dir",
           str(tmp_path / "two"), "--per_device_train_batch_size", "2", "--ddp_backend", "gloo"]  # fmt: skip
    one = [sys.executable, "-m", "rir_finetune", "train", *common, "--output_dir", str(tmp_path / "one"),
           "--per_device_train_batch_size", "4"]  # fmt: skip
    runs = [subprocess.run(cmd, capture_output=True, text=True, timeout=300) for cmd in (two, one)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes x 2 queries = 4 queries per step" in runs[0].stderr
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    base = load_file(str(model / "model.safetensors"))
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-4
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("config", ["zero1", "zero2"])
def test_deepspeed_zero_two_processes_equal_ddp(tmp_path, config):
    """configs/deepspeed/zero{1,2}.json under torchrun x 2 (DeepSpeed's CPU accelerator, gloo) train the same weights
    as plain DDP: the configs leave optimizer and schedule to the Trainer, and saving writes the full weights."""
    pytest.importorskip("deepspeed")
    import torch
    from safetensors.torch import load_file
    from test_distributed import _write_no_dropout_bert

    model = _write_no_dropout_bert(tmp_path / "m")
    data = write_jsonl(tmp_path / "t.jsonl", make_records(8))
    # fp32 (bf16 is the default where native): DeepSpeed's bf16 engine keeps bf16 weights, DDP's autocast fp32 ones
    common = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
              "rir_finetune", "train", "--model_name_or_path", str(model), "--train_data", str(data), "--max_steps",
              "3", "--train_group_size", "3", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
              "--negatives_cross_device", "true", "--training_type", "retrieval_answer", "--save_strategy", "no",
              "--dataloader_drop_last", "true", "--report_to", "none", "--use_cpu", "true", "--ddp_backend", "gloo",
              "--sentence_pooling_method", "mean", "--bf16", "false"]  # fmt: skip
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    runs = {
        "ds": common + ["--output_dir", str(tmp_path / "ds"), "--deepspeed", str(root / f"configs/deepspeed/{config}.json")],
        "ddp": common + ["--output_dir", str(tmp_path / "ddp")],
    }  # fmt: skip
    for name, cmd in runs.items():
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert ("DeepSpeed ZeRO stage " + config[-1] in r.stderr) == (name == "ds")
    a = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    b = load_file(str(tmp_path / "ds" / "model.safetensors"))
    base = load_file(str(model / "model.safetensors"))
    assert set(a) == set(b)
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-4
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    assert (tmp_path / "ds" / "modules.json").is_file()


def test_deepspeed_zero2_bf16_trains_and_saves(tmp_path):
    """bf16 through the config's "auto" (the Trainer's --bf16): runs under ZeRO-2, logs finite losses, saves a model
    sentence-transformers loads (in bf16: the engine's module weights; fp32 masters stay in the checkpoints)."""
    pytest.importorskip("deepspeed")
    import numpy as np
    from sentence_transformers import SentenceTransformer

    model = tmp_path / "m"
    from conftest import build_tiny_bert

    build_tiny_bert(model)
    data = write_jsonl(tmp_path / "t.jsonl", make_records(8))
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "rir_finetune", "train", "--model_name_or_path", str(model), "--train_data", str(data), "--max_steps", "2",
           "--train_group_size", "3", "--per_device_train_batch_size", "2", "--save_strategy", "no",
           "--dataloader_drop_last", "true", "--use_cpu", "true", "--ddp_backend", "gloo", "--bf16", "true",
           "--deepspeed", str(root / "configs/deepspeed/zero2.json"), "--output_dir", str(tmp_path / "o"),
           "--logging_steps", "1"]  # fmt: skip
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "DS_ACCELERATOR": "cpu"}
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DeepSpeed ZeRO stage 2" in r.stderr
    emb = SentenceTransformer(str(tmp_path / "o"), device="cpu").encode(["cell protein level"])
    assert np.isfinite(emb).all()
