"""Every launch form of README "Several GPUs and nodes", run as written, on this CPU-only machine.

One SGD step (lr 0.5, `retrieval_answer` + `m3_kd_loss`, cross-device negatives) with 2 processes x 2 queries must
move the weights as 1 process x 4 queries does: the difference at most 1 % of the single-process step. Before the
fix, plain `torchrun` (no `--use_cpu`) differed by 92 % of the step and `--ddp_backend gloo` by 600 times it: the
Trainer never wrapped the model in DDP. A form that cannot train right is refused before the first step.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import make_records, write_jsonl

pytestmark = pytest.mark.multiprocess

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A no-dropout tiny BERT, 8 records with teacher scores, a config, and the single-process reference step."""
    from test_distributed import _write_no_dropout_bert

    root = tmp_path_factory.mktemp("launch")
    model = _write_no_dropout_bert(root / "m")
    data = write_jsonl(root / "t.jsonl", make_records(8, scores=True))
    cfg = root / "x.yaml"
    cfg.write_text(yaml.safe_dump({
        "model_name_or_path": str(model), "train_data": [str(data)], "max_steps": 1, "train_group_size": 3,
        "optim": "sgd", "learning_rate": 0.5, "save_strategy": "no", "negatives_cross_device": True,
        "knowledge_distillation": True, "kd_loss_type": "m3_kd_loss", "training_type": "retrieval_answer",
        "dataloader_drop_last": True, "report_to": "none", "sentence_pooling_method": "mean",
        "normalize_embeddings": False, "dataloader_num_workers": 0, "disable_tqdm": True,
        "bf16": False,  # the forms are compared in fp32 (bf16 is the default where native)
    }))  # fmt: skip
    r = subprocess.run([str(BIN / "rir-finetune"), "train", "--config", str(cfg), "--output_dir", str(root / "one"),
                        "--per_device_train_batch_size", "4"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    base = load_file(str(model / "model.safetensors"))
    one = load_file(str(root / "one" / "model.safetensors"))
    step = max((one[k] - base[k]).abs().max().item() for k in one)
    assert step > 1e-4  # the step did something
    return {"root": root, "cfg": cfg, "one": one, "step": step}


def _launch(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PET_MASTER_PORT": str(_free_port())}  # torchrun's --master_port (default 29500)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _assert_single_process_weights(setup, out: Path) -> None:
    two = load_file(str(out / "model.safetensors"))
    diff = max((two[k] - setup["one"][k]).abs().max().item() for k in two)
    assert diff <= 0.01 * setup["step"], (
        f"differs by {diff:.3g}, {100 * diff / setup['step']:.1f} % of the step"
    )


TORCHRUN = {
    "torchrun": ["torchrun", "--nproc_per_node", "2", "-m", "rir_finetune", "train"],
    "torchrun_gloo": [
        "torchrun",
        "--nproc_per_node",
        "2",
        "-m",
        "rir_finetune",
        "train",
        "--ddp_backend",
        "gloo",
    ],
}


@pytest.mark.parametrize("form", sorted(TORCHRUN))
def test_torchrun_two_by_two_equals_one_by_four(setup, form):
    """README: `torchrun --nproc_per_node N -m rir_finetune train --config x.yaml` (with/without --ddp_backend gloo)."""
    cmd = TORCHRUN[form]
    out = setup["root"] / form
    r = _launch([str(BIN / cmd[0]), *cmd[1:], "--config", str(setup["cfg"]), "--output_dir", str(out),
                 "--per_device_train_batch_size", "2"])  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes x 2 queries = 4 queries per step" in r.stderr
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in r.stderr
    _assert_single_process_weights(setup, out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "form", ["no_python", "use_cpu", "accelerate_multi_gpu", "accelerate_multi_gpu_use_cpu"]
)
def test_other_launch_forms_equal_one_process(setup, form):
    """README: torchrun --no-python with the console script; accelerate launch --multi_gpu; each with --use_cpu."""
    out = setup["root"] / form
    tail = ["--config", str(setup["cfg"]), "--output_dir", str(out), "--per_device_train_batch_size", "2"]
    if form == "no_python":
        cmd = [
            str(BIN / "torchrun"),
            "--no-python",
            "--nproc_per_node",
            "2",
            str(BIN / "rir-finetune"),
            "train",
        ]
    elif form == "use_cpu":
        cmd = [
            str(BIN / "torchrun"),
            "--nproc_per_node",
            "2",
            "-m",
            "rir_finetune",
            "train",
            "--use_cpu",
            "true",
        ]
    else:
        port = str(_free_port())
        cmd = [shutil.which("accelerate", path=str(BIN)), "launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", port, "-m", "rir_finetune", "train"]  # fmt: skip
        if form.endswith("use_cpu"):
            cmd += ["--use_cpu", "true"]
    r = _launch([*cmd, *tail])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes x 2 queries = 4 queries per step" in r.stderr
    _assert_single_process_weights(setup, out)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero1", "zero2"])
def test_deepspeed_as_the_readme_writes_it_equals_one_process(setup, config):
    """README: the torchrun line plus `--deepspeed configs/deepspeed/zeroN.json`, nothing else (no --use_cpu, no
    DS_ACCELERATOR): one SGD step of 2 x 2 equals 1 x 4."""
    pytest.importorskip("deepspeed")
    out = setup["root"] / config
    ds = Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / f"{config}.json"
    env_before = os.environ.pop("DS_ACCELERATOR", None)
    try:
        r = _launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "-m", "rir_finetune", "train", "--config",
                     str(setup["cfg"]), "--output_dir", str(out), "--per_device_train_batch_size", "2",
                     "--deepspeed", str(ds)], timeout=600)  # fmt: skip
    finally:
        if env_before is not None:
            os.environ["DS_ACCELERATOR"] = env_before
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"DeepSpeed ZeRO stage {config[-1]}" in r.stderr
    _assert_single_process_weights(setup, out)


def test_nccl_on_a_cpu_only_machine_is_refused_before_the_first_step(setup):
    """README's GPU form with `--ddp_backend nccl` on this machine: one line naming the key, exit 2, no model."""
    if torch.accelerator.is_available():
        pytest.skip("this machine has an accelerator")
    out = setup["root"] / "nccl"
    r = _launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "-m", "rir_finetune", "train", "--config",
                 str(setup["cfg"]), "--output_dir", str(out), "--ddp_backend", "nccl"])  # fmt: skip
    assert r.returncode != 0
    line = (
        "error: config key 'ddp_backend': nccl needs GPUs and this machine has no GPU; use --ddp_backend gloo"
    )
    # one line per rank that got there: torchrun stops the other rank once one failed (on a busy machine, first)
    assert 1 <= sum(x.startswith(line) for x in r.stderr.splitlines()) <= 2
    assert "rir_finetune/" not in r.stderr  # no traceback through our code (torchrun prints its own)
    assert not (out / "modules.json").exists()


# -- the start-up checks on their own (no processes) ----------------------------------------------------------------


def _args(**kw):
    from types import SimpleNamespace

    from transformers.training_args import ParallelMode

    base = {"n_gpu": 1, "parallel_mode": ParallelMode.NOT_PARALLEL, "world_size": 1}
    return SimpleNamespace(**{**base, **kw})


def test_launched_processes_without_distributed_trainer_are_refused(monkeypatch):
    from rir_finetune.errors import UserError
    from rir_finetune.training.trainer import check_parallel_mode

    check_parallel_mode(_args())  # one plain process: fine
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        UserError, match="2 processes were launched .* not_parallel with world size 1: gradients"
    ):
        check_parallel_mode(_args())


def test_one_process_with_several_gpus_is_refused():
    from transformers.training_args import ParallelMode

    from rir_finetune.errors import UserError
    from rir_finetune.training.trainer import check_parallel_mode

    with pytest.raises(UserError, match="one process sees 4 GPUs .* torchrun --nproc_per_node 4"):
        check_parallel_mode(_args(n_gpu=4, parallel_mode=ParallelMode.NOT_DISTRIBUTED))


def test_unwrapped_model_with_several_processes_is_refused():
    from rir_finetune.errors import UserError
    from rir_finetune.training.trainer import check_model_wrapped

    check_model_wrapped(torch.nn.Linear(2, 2), _args(), deepspeed=False)  # one process: unwrapped is right
    with pytest.raises(
        UserError, match="2 processes but the model is wrapped as Linear, not DistributedDataParallel"
    ):
        check_model_wrapped(torch.nn.Linear(2, 2), _args(world_size=2), deepspeed=False)


def test_nccl_with_use_cpu_is_refused_in_the_arguments(monkeypatch, tmp_path):
    """Refused before accelerate's PartialState (which would raise a traceback about the backend)."""
    from rir_finetune.errors import UserError
    from rir_finetune.training.arguments import RIRTrainingArguments

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        UserError, match="config key 'ddp_backend': nccl needs GPUs and .*use --ddp_backend gloo"
    ):
        RIRTrainingArguments(output_dir=str(tmp_path), use_cpu=True, ddp_backend="nccl")
