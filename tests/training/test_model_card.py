"""Every model that `train` saves carries a model card: front matter, base model, data, terms, resolved config."""

from __future__ import annotations

import yaml

from rir_finetune.training.model_card import active_terms, model_card


def test_terms_follow_the_training_type():
    assert active_terms({"training_type": "retrieval"}) == ["qp"]
    assert active_terms({"training_type": "retrieval_answer"}) == ["qp", "qa", "norm"]
    assert active_terms({"training_type": "retrieval_answer", "normalize_answer": False}) == ["qp", "qa"]
    assert active_terms({"training_type": "retrieval_answer_passage", "knowledge_distillation": True}) == [
        "qp", "qa", "norm", "ap", "kd",
    ]  # fmt: skip


def test_card_text():
    cfg = {"model_name_or_path": "BAAI/bge-base-en-v1.5", "train_data": ["t.jsonl"], "output_dir": "runs/x",
           "training_type": "retrieval_answer_passage", "ap_weight": 0.25, "temperature": 0.02,
           "answer_temperature": 0.05, "knowledge_distillation": True, "kd_loss_type": "m3_kd_loss"}  # fmt: skip
    logs = [
        {"step": 5, "loss": 1.0},
        {"step": 5, "eval_sf_ndcg@10": 0.61},
        {"step": 10, "eval_sf_ndcg@10": 0.625},
    ]
    text = model_card(cfg, logs)
    front = yaml.safe_load(text.split("---")[1])
    assert front["base_model"] == "BAAI/bge-base-en-v1.5" and front["library_name"] == "sentence-transformers"
    assert "| L_ap | 0.25 | 0.02 | answer -> passages InfoNCE |" in text
    assert "| L_kd | 1.0 | 0.02 | distillation from teacher scores (m3_kd_loss) |" in text
    assert "| eval_sf_ndcg@10 | 0.6250 |" in text  # the last evaluation
    assert "`t.jsonl`" in text and "kd_loss_type: m3_kd_loss" in text


def test_train_writes_the_card(tmp_path, tiny_bert_dir, train_file):
    from rir_finetune.training.train import run_train

    out = tmp_path / "run"
    run_train(None, ["--model_name_or_path", str(tiny_bert_dir), "--train_data", str(train_file), "--output_dir",
                     str(out), "--max_steps", "1", "--per_device_train_batch_size", "4", "--train_group_size", "2",
                     "--query_max_len", "16", "--passage_max_len", "24", "--use_cpu", "true",
                     "--save_strategy", "no", "--report_to", "none"])  # fmt: skip
    text = (out / "README.md").read_text()
    assert text.startswith("---\n") and f"base model: `{tiny_bert_dir}`" in text
    assert "| L_qp | 1.0 | 0.02 |" in text
    assert "output_dir: " + str(out) in text
