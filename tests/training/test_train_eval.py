"""Evaluation during training: logged per eval_steps, usable for the best model, equal to `rir-finetune eval`."""

from __future__ import annotations

import json

import pytest

from conftest import make_records, write_jsonl
from rir_finetune.errors import UserError
from rir_finetune.training.train import run_train


def _beir(folder, records):
    """A small BEIR folder: every record's positive and negatives are documents; its query is judged."""
    docs, queries, qrels = [], [], ["query-id\tcorpus-id\tscore"]
    for i, r in enumerate(records):
        queries.append({"_id": f"q{i}", "text": r["query"]})
        docs.append({"_id": f"d{i}", "title": "", "text": r["pos"][0]})
        qrels.append(f"q{i}\td{i}\t1")
        docs += [{"_id": f"d{i}n{j}", "title": "", "text": n} for j, n in enumerate(r["neg"])]
    write_jsonl(folder / "corpus.jsonl", docs)
    write_jsonl(folder / "queries.jsonl", queries)
    (folder / "qrels").mkdir()
    (folder / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n")
    return folder


def _opts(model, data, out, eval_dir, **kw):
    return {
        "model_name_or_path": str(model), "train_data": [str(data)], "output_dir": str(out),
        "per_device_train_batch_size": 4, "train_group_size": 3, "query_max_len": 24, "passage_max_len": 24,
        "max_steps": 3, "learning_rate": 1e-3, "use_cpu": True, "disable_tqdm": True, "report_to": "none",
        "sentence_pooling_method": "mean", "training_type": "retrieval", "eval_data": str(eval_dir),
        "eval_name": "tiny", "eval_strategy": "steps", "eval_steps": 1, "save_strategy": "steps", "save_steps": 1,
        "metric_for_best_model": "tiny_ndcg@10", "load_best_model_at_end": True, **kw,
    }  # fmt: skip


def test_eval_every_step_and_best_model(tmp_path, tiny_bert_dir):
    recs = make_records(12)
    data = write_jsonl(tmp_path / "t.jsonl", recs)
    eval_dir = _beir(tmp_path / "beir", recs)
    out = run_train(None, _opts(tiny_bert_dir, data, tmp_path / "o", eval_dir))
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    evals = [e for e in state["log_history"] if "eval_tiny_ndcg@10" in e]
    assert [e["step"] for e in evals] == [1, 2, 3]
    assert {"eval_tiny_recall@10", "eval_tiny_mrr@10", "eval_tiny_map@100"} <= set(evals[0])
    best = max(evals, key=lambda e: e["eval_tiny_ndcg@10"])
    assert state["best_metric"] == pytest.approx(best["eval_tiny_ndcg@10"])
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best['step']}")

    # the saved (best) model scored by `rir-finetune eval` gives the same figure
    from rir_finetune.evaluation.run import run_eval

    metrics = run_eval(None, ["--model", str(out), "--data", str(eval_dir), "--split", "test", "--output_dir",
                              str(tmp_path / "ev"), "--show_progress", "false", "--cache_dir", str(tmp_path / "c")])  # fmt: skip
    assert metrics["ndcg@10"] == pytest.approx(best["eval_tiny_ndcg@10"], abs=1e-6)


def test_eval_strategy_without_eval_data_is_refused(tmp_path, tiny_bert_dir, train_file):
    opts = _opts(tiny_bert_dir, train_file, tmp_path / "o", "x")
    del opts["eval_data"]
    with pytest.raises(UserError, match="evaluation needs eval_data"):
        run_train(None, opts)
    assert not (tmp_path / "o").exists()


def test_bad_eval_folder_fails_before_training(tmp_path, tiny_bert_dir, train_file):
    (tmp_path / "beir").mkdir()
    with pytest.raises(UserError):
        run_train(None, _opts(tiny_bert_dir, train_file, tmp_path / "o", tmp_path / "beir"))
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_eval_under_two_processes_reaches_every_rank(tmp_path, tiny_bert_dir):
    # rank 1 needs the metrics too: with metric_for_best_model, a rank without them would fail (KeyError)
    import subprocess
    import sys

    recs = make_records(16)
    data = write_jsonl(tmp_path / "t.jsonl", recs)
    eval_dir = _beir(tmp_path / "beir", recs)
    opts = _opts(tiny_bert_dir, data, tmp_path / "o", eval_dir, per_device_train_batch_size=2,
                 negatives_cross_device=True, dataloader_drop_last=True)  # fmt: skip
    args = [a for k, v in opts.items() for a in (f"--{k}", *(v if isinstance(v, list) else [str(v)]))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "rir_finetune", "train", *args, "--ddp_backend", "gloo"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    state = json.loads((tmp_path / "o" / "checkpoint-3" / "trainer_state.json").read_text())
    assert len([e for e in state["log_history"] if "eval_tiny_ndcg@10" in e]) == 3
    assert state["best_model_checkpoint"]


def test_training_eval_encodes_in_evals_float_type(tiny_bert_dir):
    """encode_texts takes eval's dtype rule: auto is fp32 on a CPU (bit for bit), bf16 autocast when asked (close,
    not equal: it did compute in bf16), so logged metrics are what `eval` reports on the same device."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    from rir_finetune.training.model import BiEncoder
    from rir_finetune.training.train_eval import encode_texts

    model = BiEncoder(AutoModel.from_pretrained(tiny_bert_dir), pooling="mean").eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    texts = [r["pos"][0] for r in make_records(6)]
    cpu = torch.device("cpu")
    fp32, auto, bf16 = (encode_texts(model, tok, texts, 24, 4, cpu, d) for d in ("float32", "auto", "bf16"))
    assert np.array_equal(fp32, auto) and bf16.dtype == np.float32
    assert 0 < np.abs(fp32 - bf16).max() < 0.05
