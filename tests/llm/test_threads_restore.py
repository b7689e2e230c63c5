"""The transformers backend leaves torch's thread count as it found it, and sizes its batches to the free GPU memory.

torch's thread count is process-wide: a backend that lowered it for busy cores and kept it lowered gave every later
stage of a round in the same process (mining, training, evaluation) one thread."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rir_finetune.llm import common
from rir_finetune.llm.common import BackendSettings, Sampling, torch_threads
from rir_finetune.llm.hf_backend import TransformersBackend, kv_bytes_per_token, row_bytes, rows_that_fit


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_torch_threads_lowers_inside_and_restores_after(two_threads):
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with torch_threads(8):  # never more threads than the process had
        assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("a failed call")
    assert torch.get_num_threads() == 2


def test_backend_calls_run_on_their_threads_and_leave_the_process_count(
    tiny_causal_lm_dir, two_threads, monkeypatch
):
    monkeypatch.setattr(common, "busy_cores", lambda cpus: 1.0)  # one core busy: the backend takes one thread
    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    backend = TransformersBackend(BackendSettings(model=str(tiny_causal_lm_dir), device="cpu", progress=False,
                                                  dtype="float32"))  # fmt: skip
    assert backend.threads == 1
    assert torch.get_num_threads() == 2  # loading did not keep it lowered
    seen = []
    backend.model.register_forward_pre_hook(lambda m, a: seen.append(torch.get_num_threads()))
    backend.generate(["cells gene"], Sampling(max_new_tokens=3))
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2
    seen.clear()
    backend.score(["cells gene"], ["protein"])
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2


def test_kv_cache_and_row_bytes_from_the_config():
    # SmolLM2-135M's shape: 30 layers, 9 heads of 64, 3 key-value heads, hidden 576, MLP 1536, vocabulary 49152
    cfg = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                          hidden_size=576, intermediate_size=1536, vocab_size=49152)  # fmt: skip
    assert kv_bytes_per_token(cfg, 2) == 2 * 30 * 3 * 64 * 2 == 23040
    # 200 prompt + 256 new tokens in bf16: KV 23040 x 456; prefill 2 x (4 x 576 + 2 x 1536) x 200 + mask 200 x 456;
    # one row of fp32 logits with its log-softmax: 49152 x (2 + 8)
    assert row_bytes(cfg, 2, 200, 256) == 23040 * 456 + 2_150_400 + 91_200 + 491_520 == 13_239_360
    assert rows_that_fit(10 * 2**30, 13_239_360, 5000) == 648  # 0.8 x 10 GiB / 13.2 MB
    assert rows_that_fit(10 * 2**30, 13_239_360, 300) == 300  # never more rows than are left
    assert (
        rows_that_fit(1e6, 13_239_360, 300) == 1
    )  # one row even when none fits (it fails loudly, not silently)


def test_batch_is_sized_on_cuda_and_configured_on_the_cpu(tiny_causal_lm_dir, monkeypatch):
    backend = TransformersBackend(BackendSettings(model=str(tiny_causal_lm_dir), device="cpu", progress=False,
                                                  dtype="float32", batch_size=8))  # fmt: skip
    assert backend._rows(100, 50, 1, 8, 1000) == 8
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    backend.device = "cuda:0"
    per_row = row_bytes(backend.model.config, 4, 100, 50)
    assert (
        backend._rows(100, 50, 1, 8, 10**6) == int(0.8 * 3 * 2**30 // per_row) > 8
    )  # free + reserved unused
