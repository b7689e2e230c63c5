"""The trainer's own hooks: input preparation (teacher scores stay fp32), the non-finite-loss stop on every rank."""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rir_finetune.training.trainer import NonFiniteLossError, RIRTrainer


def _bare_trainer(deepspeed_dtype: torch.dtype | None) -> RIRTrainer:
    """An RIRTrainer without __init__: just what input preparation reads (DeepSpeed on, casting to its dtype)."""
    t = object.__new__(RIRTrainer)
    t.args = SimpleNamespace(device=torch.device("cpu"))
    t.is_deepspeed_enabled = deepspeed_dtype is not None
    plugin = SimpleNamespace(hf_ds_config=SimpleNamespace(dtype=lambda: deepspeed_dtype))
    t.accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))
    return t


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_teacher_scores_stay_fp32_under_deepspeed(dtype):
    """bf16 has 8 bits of mantissa: 10.0, 10.01, 10.02 would all become 10.0 (m3_kd_loss's order lost); fp16 turns
    70000 into inf. The Trainer casts every float input to the engine's dtype; teacher scores must not be."""
    teacher = torch.tensor([[10.0, 10.01, 10.02], [70000.0, 1.0, 2.0]], dtype=torch.float32)
    assert len(set(teacher[0].to(dtype).tolist())) < 3 or not torch.isfinite(teacher.to(dtype)).all()
    batch = {"queries": {"input_ids": torch.ones(2, 3, dtype=torch.long)}, "teacher_scores": teacher.clone(),
             "no_in_batch_neg": False}  # fmt: skip
    out = _bare_trainer(dtype)._prepare_inputs(batch)
    assert out["teacher_scores"].dtype == torch.float32
    assert torch.equal(out["teacher_scores"], teacher)
    assert out["queries"]["input_ids"].dtype == torch.long
    assert _bare_trainer(dtype)._prepare_inputs({**batch, "teacher_scores": None})["teacher_scores"] is None


# -- a non-finite loss on one rank stops every rank -------------------------------------------------------------------


def _worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        t = object.__new__(RIRTrainer)
        t.state = SimpleNamespace(global_step=4)
        t.args = SimpleNamespace(output_dir="runs/x")
        t._term_values, t._term_names, t._term_count = None, [], 0
        qa = float("nan") if rank == 1 else 0.5  # only rank 1 sees it
        try:
            t._record_terms({"loss_qp": torch.tensor(1.0), "loss_qa": torch.tensor(qa)})
            results[rank] = "continued"
        except NonFiniteLossError as e:
            results[rank] = str(e)
        dist.barrier()  # a rank that continued would reach the next collective alone
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_non_finite_loss_on_one_rank_stops_every_rank_with_step_and_term():
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_worker, args=(_free_port(), results), nprocs=2, start_method="spawn", join=True)
        results = dict(results)
    for rank in (0, 1):
        assert results[rank].startswith("loss_qa became nan on rank 1 at step 5; training stopped"), results[
            rank
        ]


# -- only the saving process writes the model -------------------------------------------------------------------------


def test_only_the_saving_process_writes_the_model(tmp_path, monkeypatch):
    """transformers 5's save_model calls _save on every rank; ranks that are not the saving one must write nothing
    (two ranks replacing the same files raced for modules.json.tmp under torchrun)."""
    from conftest import build_tiny_bert
    from rir_finetune.training.model import BiEncoder, load_tokenizer

    folder = build_tiny_bert(tmp_path / "m")
    t = object.__new__(RIRTrainer)
    t.model = BiEncoder.from_pretrained(str(folder), pooling="mean", normalize=True)
    t.processing_class = load_tokenizer(str(folder))
    t.accelerator = SimpleNamespace(unwrap_model=lambda m: m)
    t.save_info = {"pooling": "mean", "normalize": True, "max_seq_length": 32}
    t.args = SimpleNamespace(should_save=False, output_dir=str(tmp_path / "out"))
    t._save(str(tmp_path / "rank1"))
    assert not (tmp_path / "rank1").exists()
    t.args = SimpleNamespace(should_save=True, output_dir=str(tmp_path / "out"))
    t._save(str(tmp_path / "rank0"))
    assert (tmp_path / "rank0" / "modules.json").is_file()
    assert (tmp_path / "rank0" / "training_args.bin").is_file()


def test_release_freed_memory_trims_only_after_growth(monkeypatch):
    from rir_finetune.training import trainer as trainer_module
    from rir_finetune.training.trainer import ReleaseFreedMemory

    mib = 1 << 20
    resident = iter([2000, 2050, 2128, 2129, 1000, 1100, 1128, 1129, 1129] * 1)
    trims = []
    monkeypatch.setattr(trainer_module, "resident_bytes", lambda: next(resident) * mib)
    monkeypatch.setattr(trainer_module, "release_free_memory", lambda: trims.append(True))
    cb = ReleaseFreedMemory(margin=128 * mib)
    seen = []
    for _ in range(9):
        cb.on_step_end(None, None, None)
        seen.append(len(trims))
    # 2000 sets the reference; 2050 and 2128 are within 128 MiB of it; 2129 is not: trim; the next step (1000)
    # sets a new reference; 1100 and 1128 are within it; 1129 trims; the step after sets the reference again
    assert seen == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert cb.trims == 2


def test_release_freed_memory_is_attached_where_the_malloc_setting_is(monkeypatch):
    from rir_finetune.training import trainer as trainer_module
    from rir_finetune.training.trainer import ReleaseFreedMemory

    for kept in (True, False):
        for chunk in (None, 16):
            monkeypatch.setattr(trainer_module, "freed_memory_kept", lambda k=kept: k)
            t = object.__new__(RIRTrainer)
            t.gradient_cache_chunk_size = chunk
            added = []
            t.add_callback = added.append
            RIRTrainer._add_memory_callbacks(t)
            assert [type(c) for c in added] == ([ReleaseFreedMemory] if kept else [])
            if kept:  # the gradient cache (bounded memory) trims every step, the plain step on growth only
                assert added[0].every_step == (chunk is not None)


def test_release_freed_memory_every_step(monkeypatch):
    from rir_finetune.training import trainer as trainer_module
    from rir_finetune.training.trainer import ReleaseFreedMemory

    trims = []
    monkeypatch.setattr(trainer_module, "release_free_memory", lambda: trims.append(True))
    cb = ReleaseFreedMemory(every_step=True)
    for _ in range(3):
        cb.on_step_end(None, None, None)
    assert len(trims) == 3
