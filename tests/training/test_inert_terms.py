"""Issue 16: a configured term that cannot change the model is named at train start, with what to change."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from conftest import make_records, write_jsonl
from rir_finetune.training.arguments import DataArguments, ModelArguments, ObjectiveArguments
from rir_finetune.training.objectives import answer_norm_loss, info_nce
from rir_finetune.training.objectives.compose import inert_terms
from rir_finetune.training.train import run_train

L_NORM = "config keys 'normalize_answer' and 'normalize_embeddings': L_norm (loss_norm) is identically 0"


def _check(batch_size=4, world_size=1, normalize=True, group=4, **obj):
    model = ModelArguments(model_name_or_path="m", normalize_embeddings=normalize)
    data_keys = {k: obj.pop(k) for k in ("knowledge_distillation", "answer_inbatch") if k in obj}
    data = DataArguments(train_data=["x"], train_group_size=group, **data_keys)
    return inert_terms(model, data, ObjectiveArguments(**obj), batch_size, world_size)


def test_l_norm_on_normalised_embeddings_is_named_and_really_zero():
    lines = _check(training_type="retrieval_answer")
    assert len(lines) == 1
    assert lines[0].startswith(L_NORM)
    assert (
        "normalize_answer false to stop" in lines[0] and "only for a model made for dot products" in lines[0]
    )
    # the claim holds: answers embedded with normalisation give L_norm == 0 whatever their direction
    a = F.normalize(torch.randn(8, 16) * 5, dim=-1)
    assert float(answer_norm_loss(a)) < 1e-12


def test_every_term_contributes_no_warning():
    assert _check(training_type="retrieval") == []  # configs/scifact_retrieval.yaml's objectives
    assert _check(training_type="retrieval_answer", normalize=False) == []
    assert _check(training_type="retrieval_answer", normalize_answer=False) == []
    assert (
        _check(training_type="retrieval_answer_passage", normalize=False, knowledge_distillation=True) == []
    )


def test_single_candidate_info_nce_is_named_and_really_zero():
    lines = _check(training_type="retrieval_answer", normalize=False, use_in_batch_negatives=False)
    assert lines == [
        "config keys 'use_in_batch_negatives' and 'answer_inbatch': L_qa has one candidate per query (its own "
        "answer), so it is identically 0; set use_in_batch_negatives true or answer_inbatch true"
    ]
    assert float(info_nce(torch.randn(4, 8), torch.randn(4, 8), 0.05, 1, in_batch=False)) == 0.0
    assert (
        "L_qp has one candidate"
        in _check(group=1, training_type="retrieval", use_in_batch_negatives=False)[0]
    )
    # one query per step: in-batch negatives add nothing unless shared across devices
    assert _check(batch_size=1, group=1, training_type="retrieval") != []
    assert (
        _check(batch_size=1, group=1, world_size=2, negatives_cross_device=True, training_type="retrieval")
        == []
    )


def test_weights_of_terms_that_are_never_computed():
    lines = _check(training_type="retrieval", kd_weight=0.5, ap_weight=0.25)
    assert lines == [
        "config key 'kd_weight': set to 0.5 but L_kd is never computed (knowledge_distillation is false, no "
        "teacher scores are read); remove the key or change what it depends on"
    ]
    lines = _check(
        training_type="retrieval", knowledge_distillation=True, kd_loss_type="m3_kd_loss", qp_weight=2.0
    )
    assert lines == ["config key 'qp_weight': set to 2.0 but L_qp is never computed (kd_loss_type m3_kd_loss replaces "
                     "L_qp by L_kd); remove the key or change what it depends on"]  # fmt: skip


def _opts(model_dir, data, out, **kw):
    return {"model_name_or_path": str(model_dir), "train_data": [str(data)], "output_dir": str(out),
            "per_device_train_batch_size": 4, "train_group_size": 2, "query_max_len": 16, "passage_max_len": 24,
            "max_steps": 1, "save_strategy": "no", "use_cpu": True, "disable_tqdm": True,
            "dataloader_num_workers": 0, **kw}  # fmt: skip


def test_train_start_logs_one_line(tmp_path, tiny_bert_dir, caplog):
    data = write_jsonl(tmp_path / "t.jsonl", make_records(n=8, n_neg=2))
    with caplog.at_level(logging.WARNING, logger="rir_finetune"):
        run_train(None, _opts(tiny_bert_dir, data, tmp_path / "a", training_type="retrieval_answer"))
    hits = [r.getMessage() for r in caplog.records if "cannot contribute" in r.getMessage()]
    assert len(hits) == 1 and L_NORM in hits[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rir_finetune"):
        run_train(None, _opts(tiny_bert_dir, data, tmp_path / "b", training_type="retrieval_answer",
                              normalize_embeddings=False))  # fmt: skip
    assert [r for r in caplog.records if "cannot contribute" in r.getMessage()] == []


def test_flat_teacher_targets_are_warned_with_the_fix():
    from rir_finetune.training.objectives.compose import flat_teacher_warning

    cosine = [[0.288, 0.258, 0.252, 0.245], [0.61, 0.58, 0.57, 0.55]]  # MiniLM-teacher-like cosines
    line = flat_teacher_warning(cosine, 1.0, 0.02)
    # top probability x G: exp(0) / sum(exp(-(0.03, 0.036, 0.043))) x 4 = 1.027 (first group), 1.031 (second)
    assert (
        line is not None
        and "mean top probability 1.03 / G" in line
        and "teacher_temperature near temperature (0.02)" in line
    )
    assert (
        flat_teacher_warning(cosine, 0.02, 0.02) is None
    )  # 4 / (1 + e^-1.5 + e^-1.8 + e^-2.15) = 2.66 x uniform
    assert (
        flat_teacher_warning([[5.0, 1.0, 0.0, -2.0]], 1.0, 0.02) is None
    )  # reranker logits: upstream's setting
    assert flat_teacher_warning([[0.5]], 1.0, 0.02) is None  # one passage: nothing to distil


COSINE = "config key 'normalize_embeddings': false, but"


def test_unnormalised_training_of_a_cosine_model_is_warned(tmp_path, tiny_bert_dir, minilm_dir, caplog):
    import json
    import shutil

    from rir_finetune.training.train import cosine_model_unnormalised_warning as warn

    line = warn(str(minilm_dir), False)  # the real MiniLM folder ends in a Normalize module
    assert line.startswith(f"{COSINE} {minilm_dir} is made for cosine similarity (a Normalize module")
    assert "Set normalize_embeddings true" in line
    assert warn(str(minilm_dir), True) is None
    assert warn(str(tiny_bert_dir), False) is None  # a bare HF folder (contriever's kind) says nothing
    dot = tmp_path / "dot"
    shutil.copytree(tiny_bert_dir, dot)
    (dot / "config_sentence_transformers.json").write_text(json.dumps({"similarity_fn_name": "dot"}))
    assert warn(str(dot), False) is None
    cos = tmp_path / "cos"
    shutil.copytree(tiny_bert_dir, cos)
    (cos / "config_sentence_transformers.json").write_text(json.dumps({"similarity_fn_name": "cosine"}))
    assert "(similarity_fn_name cosine)" in warn(str(cos), False)
    # and train logs it at start
    data = write_jsonl(tmp_path / "t.jsonl", make_records(n=8, n_neg=2))
    with caplog.at_level(logging.WARNING, logger="rir_finetune"):
        run_train(
            None, _opts(cos, data, tmp_path / "a", training_type="retrieval", normalize_embeddings=False)
        )
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith(COSINE)] == [
        warn(str(cos), False)
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rir_finetune"):
        run_train(None, _opts(cos, data, tmp_path / "b", training_type="retrieval"))
    assert [r for r in caplog.records if r.getMessage().startswith(COSINE)] == []


def test_no_shipped_config_trains_an_inert_term():
    """What the shipped configs train is what they say: no configured term is identically zero (the main job's
    round trains through configs/scifact_retrieval_answer.yaml)."""
    from conftest import REPO
    from rir_finetune.config import ConfigFile, check_values
    from rir_finetune.training.arguments import CONFIG_CLASSES

    checked = 0
    for path in sorted((REPO / "configs").glob("*.yaml")):
        values, _ = ConfigFile(path).flat()
        if "training_type" not in values:
            continue  # another command's config
        model, data, obj, train = check_values(list(CONFIG_CLASSES), values)
        batch = train.get("per_device_train_batch_size", 8)
        lines = inert_terms(
            ModelArguments(**model), DataArguments(**data), ObjectiveArguments(**obj), batch, 8
        )
        assert lines == [], f"{path.name}: {lines}"
        checked += 1
    assert checked >= 4
