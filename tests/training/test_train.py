"""End-to-end training on the tiny model: parameters move, loss drops, every objective runs, saving round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_records, write_jsonl
from rir_finetune.errors import UserError
from rir_finetune.training.train import RESOLVED_CONFIG, run_train


def _opts(model_dir, data, out, **kw):
    opts = {
        "model_name_or_path": str(model_dir),
        "train_data": [str(data)],
        "output_dir": str(out),
        "per_device_train_batch_size": 4,
        "train_group_size": 3,
        "query_max_len": 16,
        "passage_max_len": 24,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "use_cpu": True,
        "sentence_pooling_method": "mean",
        "disable_tqdm": True,
        "temperature": 0.1,
    }
    opts.update(kw)
    return opts


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize(
    "training_type, kd",
    [
        ("retrieval", None),
        ("retrieval", "kl_div"),
        ("retrieval_answer", None),
        ("retrieval_answer", "m3_kd_loss"),
        ("retrieval_answer_passage", "kl_div"),
        ("retrieval_answer_passage", "m3_kd_loss_weighted"),
    ],
)
def test_every_training_type_trains(tmp_path, tiny_bert_dir, train_file, training_type, kd):
    extra = {"knowledge_distillation": True, "kd_loss_type": kd} if kd else {}
    out = run_train(
        None, _opts(tiny_bert_dir, train_file, tmp_path / "o", training_type=training_type, **extra)
    )
    assert (out / "modules.json").is_file()
    cfg = (out / RESOLVED_CONFIG).read_text()
    assert f"training_type: {training_type}" in cfg


def test_training_changes_every_trainable_parameter(tmp_path, tiny_bert_dir, train_file):
    from transformers import BertModel

    before = {k: v.clone() for k, v in BertModel.from_pretrained(tiny_bert_dir).state_dict().items()}
    out = run_train(None, _opts(tiny_bert_dir, train_file, tmp_path / "o", max_steps=3,
                                training_type="retrieval_answer_passage"))  # fmt: skip
    after = _weights(out)
    unchanged = [k for k, v in after.items() if "pooler" not in k and torch.equal(v, before[k])]
    assert unchanged == []
    # the pooler never reaches the sentence embedding: frozen, not trained
    assert all(torch.equal(after[k], before[k]) for k in after if "pooler" in k)


def test_training_lowers_loss_on_a_fixed_batch(tmp_path, tiny_bert_dir, train_file):
    from rir_finetune.training.arguments import ObjectiveArguments
    from rir_finetune.training.collator import RIRCollator
    from rir_finetune.training.model import BiEncoder, load_tokenizer
    from rir_finetune.training.objectives import compute_objectives

    recs = [json.loads(line) for line in train_file.read_text().splitlines()][:4]
    tok = load_tokenizer(str(tiny_bert_dir))
    items = [{"query": r["query"], "passages": [r["pos"][0], *r["neg"][:2]], "answer": r["answer"],
              "answer_candidates": None, "teacher_scores": None, "no_in_batch_neg": False} for r in recs]  # fmt: skip
    batch = RIRCollator(tok, 16, 24, 16)(items)
    cfg = ObjectiveArguments(training_type="retrieval_answer", temperature=0.1)

    def loss_of(folder):
        model = BiEncoder.from_pretrained(str(folder), pooling="mean", normalize=True).eval()
        with torch.no_grad():
            reps = model(**batch)
            return compute_objectives(reps.q_reps, reps.p_reps, cfg, a_reps=reps.a_reps).loss.item()

    out = run_train(None, _opts(tiny_bert_dir, train_file, tmp_path / "o", max_steps=12, num_train_epochs=4))
    assert loss_of(out) < loss_of(tiny_bert_dir) - 0.05


def test_saved_model_loads_in_sentence_transformers_with_equal_embeddings(
    tmp_path, tiny_bert_dir, train_file
):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from rir_finetune.training.model import BiEncoder, load_tokenizer

    out = run_train(None, _opts(tiny_bert_dir, train_file, tmp_path / "o", query_instruction_for_retrieval="Q: ",
                                normalize_embeddings=True))  # fmt: skip
    texts = ["cell protein level", "heart risk w3 and blood glucose in women"]
    ours = BiEncoder.from_pretrained(str(out), pooling="mean", normalize=True).eval()
    tok = load_tokenizer(str(out))
    with torch.no_grad():
        q = ours.encode(dict(tok(["Q: " + t for t in texts], padding=True, truncation=True, max_length=24,
                                 return_tensors="pt")))  # fmt: skip
        p = ours.encode(dict(tok(texts, padding=True, truncation=True, max_length=24, return_tensors="pt")))
    st = SentenceTransformer(str(out), device="cpu")
    assert st.max_seq_length == 24
    st_q = st.encode(texts, prompt_name="query", convert_to_tensor=True)
    st_p = st.encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(st_q, q, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(st_p, p, atol=1e-5, rtol=1e-4)
    assert type(AutoModel.from_pretrained(out)).__name__ == "BertModel"


def test_cls_pooling_unnormalised_is_saved_as_such(tmp_path, tiny_bert_dir, train_file):
    out = run_train(None, _opts(tiny_bert_dir, train_file, tmp_path / "o", sentence_pooling_method="cls",
                                normalize_embeddings=False))  # fmt: skip
    pool = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pool["pooling_mode_cls_token"] and not pool["pooling_mode_mean_tokens"]
    assert [m["path"] for m in json.loads((out / "modules.json").read_text())] == ["", "1_Pooling"]


def test_refuses_non_empty_output_dir_and_resumes(tmp_path, tiny_bert_dir, train_file):
    out = tmp_path / "o"
    run_train(None, _opts(tiny_bert_dir, train_file, out, max_steps=2, save_strategy="steps", save_steps=1))
    with pytest.raises(UserError, match="is not empty; resume with --resume_from_checkpoint auto"):
        run_train(None, _opts(tiny_bert_dir, train_file, out, max_steps=3))
    # auto picks checkpoint-2 and continues to step 3
    run_train(None, _opts(tiny_bert_dir, train_file, out, max_steps=3, save_strategy="steps", save_steps=1,
                          resume_from_checkpoint="auto"))  # fmt: skip
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    # overwrite_output_dir lets a fresh run use the folder
    run_train(None, _opts(tiny_bert_dir, train_file, out, max_steps=1, overwrite_output_dir=True))


def test_per_term_losses_are_logged(tmp_path, tiny_bert_dir, train_file):
    out = tmp_path / "o"
    run_train(None, _opts(tiny_bert_dir, train_file, out, max_steps=2, save_strategy="steps", save_steps=2,
                          training_type="retrieval_answer_passage", knowledge_distillation=True))  # fmt: skip
    logs = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    first = logs[0]
    assert {"loss", "loss_qp", "loss_qa", "loss_ap", "loss_norm", "loss_kd"} <= set(first)
    # the logged total is the weighted sum of the logged terms (defaults: 1, 1, 0.25, 1, 1)
    total = (
        first["loss_qp"] + first["loss_qa"] + 0.25 * first["loss_ap"] + first["loss_norm"] + first["loss_kd"]
    )
    assert first["loss"] == pytest.approx(total, rel=1e-3)


def test_records_without_negatives_train(tmp_path, tiny_bert_dir):
    recs = make_records(8, n_neg=0)
    f = write_jsonl(tmp_path / "t.jsonl", recs)
    out = run_train(
        None, _opts(tiny_bert_dir, f, tmp_path / "o", train_group_size=1, training_type="retrieval")
    )
    assert (out / "model.safetensors").is_file()


def test_bad_data_fails_before_anything_is_written(tmp_path, tiny_bert_dir):
    f = write_jsonl(tmp_path / "t.jsonl", make_records(6)[:6] + ["{broken"])
    out = tmp_path / "o"
    with pytest.raises(UserError, match=r"t.jsonl:7: invalid JSON"):
        run_train(None, _opts(tiny_bert_dir, f, out))
    assert not out.exists()


def test_missing_answers_for_answer_training_type(tmp_path, tiny_bert_dir):
    f = write_jsonl(tmp_path / "t.jsonl", make_records(5, answers=False))
    with pytest.raises(UserError, match=r"t.jsonl:1: missing 'answer'"):
        run_train(None, _opts(tiny_bert_dir, f, tmp_path / "o", training_type="retrieval_answer"))


def test_missing_model_path(tmp_path, train_file):
    with pytest.raises(UserError, match="model_name_or_path': .* does not exist"):
        run_train(None, _opts(tmp_path / "nope", train_file, tmp_path / "o"))


def test_lora_trains_adapters_only_and_saves_merged_weights_that_load_anywhere(
    tmp_path, tiny_bert_dir, train_file
):
    """use_lora: base weights stay, adapters move; the saved (merged) model embeds exactly like the adapted model."""
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    from rir_finetune.training.arguments import ModelArguments
    from rir_finetune.training.lora import apply_lora
    from rir_finetune.training.model import BiEncoder, load_tokenizer
    from rir_finetune.training.trainer import load_backbone_weights

    base = _weights(tiny_bert_dir)
    out = run_train(None, _opts(tiny_bert_dir, train_file, tmp_path / "o", max_steps=3, use_lora=True, lora_rank=4,
                                lora_alpha=8, lora_dropout=0.0, lora_target_modules=["query", "value"],
                                normalize_embeddings=True))  # fmt: skip
    merged = _weights(out)
    assert not any("lora" in k for k in merged) and set(merged) <= set(base) | {"embeddings.position_ids"}
    changed = {k for k in base if k in merged and not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith(("query.weight", "value.weight")) for k in changed), changed
    assert any(k.endswith("query.weight") for k in changed) and any(
        k.endswith("value.weight") for k in changed
    )

    # the adapter itself, reloaded into a fresh wrapped model, embeds exactly like the merged folder
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    adapted = BiEncoder.from_pretrained(str(tiny_bert_dir), pooling="mean", normalize=True)
    apply_lora(adapted, ModelArguments(model_name_or_path=str(tiny_bert_dir), lora_rank=4, lora_alpha=8,
                                       lora_dropout=0.0, lora_target_modules=["query", "value"]))  # fmt: skip
    load_backbone_weights(adapted, out)
    tok = load_tokenizer(str(out))
    texts = ["cell protein level", "heart risk w3 and blood glucose in women"]
    feats = dict(tok(texts, padding=True, truncation=True, max_length=24, return_tensors="pt"))
    with torch.no_grad():
        expected = adapted.eval().encode(feats)
    st = SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(st, expected, atol=1e-5, rtol=1e-4)


def test_lora_target_that_matches_nothing_is_a_config_error(tmp_path, tiny_bert_dir, train_file):
    with pytest.raises(UserError, match="lora_target_modules"):
        run_train(None, _opts(tiny_bert_dir, train_file, tmp_path / "o", use_lora=True,
                              lora_target_modules=["no_such_layer"]))  # fmt: skip


def test_upstream_prefixed_answers_train_the_same_weights(tmp_path, tiny_bert_dir):
    """Answers that already carry the default answer_prefix (upstream's files) train what unprefixed ones do."""
    plain = make_records(8)
    upstream = [{**r, "answer": "Generate the topic about this passage: " + r["answer"]} for r in plain]
    outs = []
    for name, recs in (("plain", plain), ("upstream", upstream)):
        data = write_jsonl(tmp_path / f"{name}.jsonl", recs)
        outs.append(
            run_train(None, _opts(tiny_bert_dir, data, tmp_path / name, training_type="retrieval_answer"))
        )
    a, b = _weights(outs[0]), _weights(outs[1])
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_instruction_format_round_trips_into_sentence_transformers(tmp_path, tiny_bert_dir, train_file):
    """query_instruction_format "<instruct>{}\\n<query>{}": encode_query / encode_document of the saved model give the
    embeddings of the strings training built, cut at query_max_len / passage_max_len as training cut them."""
    from sentence_transformers import SentenceTransformer

    from rir_finetune.training.model import BiEncoder, load_tokenizer

    fmt, instr = "<instruct>{}\n<query>{}", "find the abstract"
    out = run_train(None, _opts(tiny_bert_dir, train_file, tmp_path / "o", query_instruction_format=fmt,
                                query_instruction_for_retrieval=instr, passage_instruction_for_retrieval="doc: ",
                                query_max_len=8, passage_max_len=24))  # fmt: skip
    long_query = (
        "cell protein level in blood of women and men with high glucose"  # > 8 tokens with the prompt
    )
    texts = ["cell protein level", long_query]
    ours = BiEncoder.from_pretrained(str(out), pooling="mean", normalize=True).eval()
    tok = load_tokenizer(str(out))

    def train_side(strings, max_len):
        with torch.no_grad():
            return ours.encode(dict(tok(strings, padding=True, truncation=True, max_length=max_len,
                                        return_tensors="pt")))  # fmt: skip

    q = train_side([fmt.format(instr, t) for t in texts], 8)
    p = train_side(["doc: " + t for t in texts], 24)
    st = SentenceTransformer(str(out), device="cpu")
    assert st.prompts["query"] == "<instruct>find the abstract\n<query>"
    torch.testing.assert_close(st.encode_query(texts, convert_to_tensor=True), q, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(st.encode_document(texts, convert_to_tensor=True), p, atol=1e-5, rtol=1e-4)
    assert st.max_seq_length == 24  # plain encode(): no text cut shorter than in training


def test_instruction_format_with_text_first_is_refused(tmp_path, tiny_bert_dir, train_file):
    with pytest.raises(UserError, match="config key 'query_instruction_format': .* text must come last"):
        run_train(None, _opts(tiny_bert_dir, train_file, tmp_path / "o", query_instruction_format="{} [{}]",
                              query_instruction_for_retrieval="find"))  # fmt: skip
    assert not (tmp_path / "o").exists()
