"""The launch forms of the README: torchrun --no-python with the console script, and accelerate launch."""

from __future__ import annotations

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
