"""Gradient caching equals the plain step (encoded in the same chunks), dropout on, for every objective."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rir_finetune.training.arguments import ObjectiveArguments
from rir_finetune.training.collator import RIRCollator
from rir_finetune.training.gradcache import cached_step
from rir_finetune.training.model import BiEncoder, load_tokenizer
from rir_finetune.training.objectives import compute_objectives

CHUNK = 3
CASES = [
    ("retrieval", None),
    ("retrieval", "kl_div"),
    ("retrieval_answer", "m3_kd_loss"),
    ("retrieval_answer_passage", None),
    ("retrieval_answer_passage", "kl_div"),
    ("retrieval_answer_passage", "m3_kd_loss"),
]


def _batch(model_dir, n=5, g=3, offset=0):
    from conftest import make_records

    tok = load_tokenizer(str(model_dir))
    recs = make_records(n + offset, n_neg=g - 1, scores=True)[offset:]
    items = [{"query": r["query"], "passages": [r["pos"][0], *r["neg"]], "answer": r["answer"],
              "answer_candidates": None, "teacher_scores": [r["pos_scores"][0], *r["neg_scores"]],
              "no_in_batch_neg": False} for r in recs]  # fmt: skip
    return dict(RIRCollator(tok, 16, 24, 16)(items))


def _cfg(training_type, kd, cross=False):
    return ObjectiveArguments(training_type=training_type, kd_loss_type=kd or "kl_div", temperature=0.05,
                              negatives_cross_device=cross)  # fmt: skip


def _loss_fn(cfg, batch, kd):
    def fn(reps):
        return compute_objectives(reps.q_reps, reps.p_reps, cfg, a_reps=reps.a_reps,
                                  teacher_scores=batch["teacher_scores"] if kd else None)  # fmt: skip

    return fn


def _plain_and_cached(model, batch, cfg, kd):
    plain = copy.deepcopy(model)
    plain.sub_batch_size = CHUNK  # the same chunks, so dropout draws the same masks in the same order
    torch.manual_seed(11)
    reps = plain(**batch)
    ref = _loss_fn(cfg, batch, kd)(reps)
    ref.loss.backward()

    cached = copy.deepcopy(model)
    torch.manual_seed(11)
    loss, _ = cached_step(lambda f: cached(features=f), batch, CHUNK, _loss_fn(cfg, batch, kd))
    after_cached = torch.rand(1)
    torch.manual_seed(11)
    plain2 = copy.deepcopy(model)
    plain2.sub_batch_size = CHUNK
    plain2(**batch)
    assert torch.equal(after_cached, torch.rand(1))  # the RNG ends where the plain step leaves it
    return ref, plain, loss, cached


@pytest.mark.parametrize("training_type, kd", CASES)
def test_cached_equals_plain_with_dropout(tiny_bert_dir, training_type, kd):
    model = BiEncoder.from_pretrained(str(tiny_bert_dir), pooling="mean", normalize=False).train()
    batch = _batch(tiny_bert_dir)
    ref, plain, loss, cached = _plain_and_cached(model, batch, _cfg(training_type, kd), kd)
    torch.testing.assert_close(loss, ref.loss.detach())
    n_checked = 0
    for (name, p1), (_, p2) in zip(plain.named_parameters(), cached.named_parameters(), strict=True):
        if p1.grad is None:
            assert p2.grad is None, name
            continue
        # float tolerance relative to the tensor's largest gradient (unnormalised reps / 0.05 give large ones)
        assert (p2.grad - p1.grad).abs().max() <= 1e-5 * p1.grad.abs().max() + 1e-8, name
        n_checked += 1
    assert n_checked > 10


@pytest.mark.parametrize("keep_bytes", [10**12, 100_000, 1])
def test_memory_budget_equals_plain_and_encodes_twice_only_what_does_not_fit(tiny_bert_dir, keep_bytes):
    """Chunks whose activations fit the budget keep their graph (encoded once); the rest are encoded twice; the
    step equals the plain chunked step whatever the split, dropout on."""
    model = BiEncoder.from_pretrained(str(tiny_bert_dir), pooling="mean", normalize=False).train()
    batch = _batch(tiny_bert_dir)
    kd = "kl_div"
    cfg = _cfg("retrieval_answer_passage", kd)
    plain = copy.deepcopy(model)
    plain.sub_batch_size = CHUNK
    torch.manual_seed(11)
    ref = _loss_fn(cfg, batch, kd)(plain(**batch))
    ref.loss.backward()

    cached = copy.deepcopy(model)
    calls = []

    def encode(f):
        calls.append(torch.is_grad_enabled())
        return cached(features=f)

    torch.manual_seed(11)
    loss, _ = cached_step(encode, batch, CHUNK, _loss_fn(cfg, batch, kd), keep_bytes=keep_bytes,
                          params=list(cached.parameters()))  # fmt: skip
    n_chunks = sum(-(-batch[p]["input_ids"].size(0) // CHUNK) for p in ("queries", "passages", "answers"))
    twice = len(calls) - n_chunks
    if keep_bytes == 10**12:
        assert twice == 0  # everything fits: a plain step's cost
    elif keep_bytes == 1:
        assert twice == n_chunks  # nothing fits (the first chunk's graph is dropped): classic GradCache
    else:
        assert 0 < twice < n_chunks
    torch.testing.assert_close(loss, ref.loss.detach())
    for (name, p1), (_, p2) in zip(plain.named_parameters(), cached.named_parameters(), strict=True):
        if p1.grad is not None:
            assert (p2.grad - p1.grad).abs().max() <= 1e-5 * p1.grad.abs().max() + 1e-8, name


def test_saved_bytes_counts_activations_not_parameters(tiny_bert_dir):
    from rir_finetune.training.gradcache import SavedBytes

    model = BiEncoder.from_pretrained(str(tiny_bert_dir), pooling="mean", normalize=False).train()
    batch = _batch(tiny_bert_dir)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes, with_params = [], []
    for n in (3, 6):
        feats = {k: v[:n] for k, v in batch["passages"].items()}
        for exclude, out in ((params, sizes), (set(), with_params)):
            counter = SavedBytes(exclude)
            with counter():
                model(features=feats)
            out.append(counter.bytes)
    # the weights autograd saves are counted only without the exclusion, once, whatever the chunk
    assert with_params[0] - sizes[0] == with_params[1] - sizes[1] > 0
    assert 1.5 * sizes[0] < sizes[1] < 2.5 * sizes[0]  # activations: proportional to the chunk


def test_dropout_really_differs_between_draws(tiny_bert_dir):
    # guards the test above: with dropout on, two unseeded passes differ, so equality needs the RNG replay
    model = BiEncoder.from_pretrained(str(tiny_bert_dir), pooling="mean", normalize=False).train()
    batch = _batch(tiny_bert_dir)
    assert not torch.equal(model(features=batch["queries"]), model(features=batch["queries"]))


def test_trainer_with_gradient_cache_matches_chunked_plain_run(tmp_path, tiny_bert_dir, train_file):
    from safetensors.torch import load_file

    from rir_finetune.training.train import run_train

    # fp32 (bf16 is the default where native): the two runs agree to 1e-6
    common = {"model_name_or_path": str(tiny_bert_dir), "train_data": [str(train_file)], "max_steps": 2,
              "per_device_train_batch_size": 4, "train_group_size": 3, "query_max_len": 16, "passage_max_len": 24,
              "learning_rate": 1e-3, "use_cpu": True, "save_strategy": "no", "disable_tqdm": True, "seed": 5,
              "training_type": "retrieval_answer_passage", "knowledge_distillation": True,
              "kd_loss_type": "m3_kd_loss", "report_to": "none", "bf16": False}  # fmt: skip
    a = run_train(None, {**common, "output_dir": str(tmp_path / "plain"), "sub_batch_size": CHUNK})
    b = run_train(None, {**common, "output_dir": str(tmp_path / "gc"), "gradient_cache": True,
                         "gradient_cache_chunk_size": CHUNK})  # fmt: skip
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-5)


# ---- under two gloo processes with cross-device negatives --------------------------------------------------------


def _worker(rank, port, model_dir, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        out = {}
        for training_type, kd in CASES:
            torch.manual_seed(0)
            model = BiEncoder.from_pretrained(model_dir, pooling="mean", normalize=False).train()
            batch = _batch(model_dir, n=4, offset=4 * rank)
            ref, plain, loss, cached = _plain_and_cached(
                model, batch, _cfg(training_type, kd, cross=True), kd
            )
            diffs = []
            for p1, p2 in zip(plain.parameters(), cached.parameters(), strict=True):
                if p1.grad is not None:
                    diffs.append(float((p1.grad - p2.grad).abs().max() / (p1.grad.abs().max() + 1e-12)))
            out[(training_type, kd)] = (float(ref.loss), float(loss), max(diffs))
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_cached_equals_plain_under_two_processes(tiny_bert_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_worker, args=(port, str(tiny_bert_dir), results), nprocs=2, start_method="spawn")
        results = dict(results)
    for rank in (0, 1):
        for case, (ref_loss, loss, rel_diff) in results[rank].items():
            assert loss == pytest.approx(ref_loss, rel=1e-5), case
            assert rel_diff < 1e-4, case


@pytest.mark.slow
@pytest.mark.multiprocess
def test_trainer_gradient_cache_under_ddp_matches_chunked_plain(tmp_path, tiny_bert_dir, train_file):
    """torchrun, 2 processes, cross-device negatives: GradCache (one DDP sync per step) == plain chunked step."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    common = ["--model_name_or_path", str(tiny_bert_dir), "--train_data", str(train_file), "--max_steps", "2",
              "--per_device_train_batch_size", "2", "--train_group_size", "3", "--query_max_len", "16",
              "--passage_max_len", "24", "--learning_rate", "1e-3", "--use_cpu", "true", "--save_strategy", "no",
              "--report_to", "none", "--training_type", "retrieval_answer_passage", "--knowledge_distillation", "true",
              "--kd_loss_type", "m3_kd_loss", "--negatives_cross_device", "true", "--dataloader_drop_last", "true",
              "--seed", "5", "--bf16", "false"]  # fmt: skip
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
              "rir_finetune", "train", "--ddp_backend", "gloo"]  # fmt: skip
    runs = {"plain": ["--sub_batch_size", str(CHUNK)],
            "gc": ["--gradient_cache", "true", "--gradient_cache_chunk_size", str(CHUNK)]}  # fmt: skip
    for name, extra in runs.items():
        r = subprocess.run(launch + common + extra + ["--output_dir", str(tmp_path / name)], capture_output=True,
                           text=True, timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
    wa = load_file(str(tmp_path / "plain" / "model.safetensors"))
    wb = load_file(str(tmp_path / "gc" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-5)
