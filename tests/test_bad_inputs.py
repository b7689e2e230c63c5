"""Every bad input of issue 8, through the CLI: one line naming file:line or the key, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest

from conftest import make_records, write_jsonl
from rir_finetune.cli import main

GOOD = make_records(6, scores=True)


def _line(**over):
    rec = dict(GOOD[0])
    rec.update(over)
    return json.dumps({k: v for k, v in rec.items() if v is not None})


# (name, lines of the data file or None for a special case, extra command-line options, expected text)
CASES = [
    ("malformed json", ["{broken"], [], "t.jsonl:7: invalid JSON"),
    ("missing query", [_line(query=None)], [], "t.jsonl:7: missing or empty 'query'"),
    ("empty query", [_line(query="  ")], [], "t.jsonl:7: missing or empty 'query'"),
    ("missing pos", [_line(pos=None)], [], "t.jsonl:7: 'pos' must be a non-empty list of strings"),
    ("empty pos", [_line(pos=[])], [], "t.jsonl:7: 'pos' must be a non-empty list"),
    ("pos wrong type", [_line(pos="text")], [], "t.jsonl:7: 'pos' must be a non-empty list"),
    ("empty passage in pos", [_line(pos=["p", " "])], [], "t.jsonl:7: 'pos' holds an empty passage"),
    ("neg wrong type", [_line(neg=[1, 2])], [], "t.jsonl:7: 'neg' must be a list of strings"),
    ("answer wrong type", [_line(answer=5)], [], "t.jsonl:7: 'answer' must be a string"),
    ("prompt wrong type", [_line(prompt=["x"])], [], "t.jsonl:7: 'prompt' must be a string"),
    ("pos_scores length", [_line(pos_scores=[1.0, 2.0])], ["--knowledge_distillation", "true"],
     "t.jsonl:7: 'pos_scores' has 2 values but 'pos' has 1"),
    ("neg_scores length", [_line(neg_scores=[1.0])], ["--knowledge_distillation", "true"],
     "t.jsonl:7: 'neg_scores' has 1 values but 'neg' has 4"),
    ("scores not numbers", [_line(neg_scores=["a", "b", "c", "d"])], ["--knowledge_distillation", "true"],
     "t.jsonl:7: 'neg_scores' must be a list of numbers"),
    ("nan teacher score", ['{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [NaN], "neg_scores": [0]}'],
     ["--knowledge_distillation", "true"], "t.jsonl:7: 'pos_scores' holds a NaN or infinite value"),
    ("infinite teacher score", ['{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1], "neg_scores": [-Infinity]}'],
     ["--knowledge_distillation", "true"], "t.jsonl:7: 'neg_scores' holds a NaN or infinite value"),
    ("answers needed but absent", [_line(answer=None)], ["--training_type", "retrieval_answer"],
     "t.jsonl:7: missing 'answer'"),
    ("empty file", "EMPTY", [], "t.jsonl: no records (empty file)"),
    ("directory without data", "EMPTY_DIR", [], "directory holds no data files"),
    ("unknown key", [], ["--train_group_sise", "4"], "unknown config key 'train_group_sise'; did you mean 'train_group_size'?"),
    ("mistyped value", [], ["--per_device_train_batch_size", "four"], "config key 'per_device_train_batch_size': expected an integer"),
    ("invalid training_type", [], ["--training_type", "retrieval_answers"], "config key 'training_type'"),
    ("invalid kd_loss_type", [], ["--kd_loss_type", "kl"], "config key 'kd_loss_type'"),
    ("zero temperature", [], ["--temperature", "0"], "config key 'temperature': must be greater than 0"),
    ("negative answer temperature", [], ["--answer_temperature", "-0.05"], "config key 'answer_temperature'"),
    ("zero teacher temperature", [], ["--teacher_temperature", "0"], "config key 'teacher_temperature'"),
    ("group size 0", [], ["--train_group_size", "0"], "config key 'train_group_size'"),
    ("missing model", [], ["--model_name_or_path", "/nonexistent/model"], "config key 'model_name_or_path': /nonexistent/model does not exist"),
    ("distillation with one passage", [], ["--knowledge_distillation", "true", "--train_group_size", "1"],
     "distillation needs at least 2 passages"),
    ("group unfillable without duplicates", "TINY", ["--train_group_size", "8"], "without duplicates"),
]  # fmt: skip


@pytest.mark.parametrize("name, lines, extra, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused(tmp_path, capsys, tiny_bert_dir, name, lines, extra, expected):
    data = tmp_path / "t.jsonl"
    if lines == "EMPTY":
        data.write_text("")
    elif lines == "EMPTY_DIR":
        data = tmp_path / "d"
        data.mkdir()
    elif lines == "TINY":  # 2 records with 1 passage each: a group of 8 cannot be filled
        write_jsonl(data, [{"query": "a", "pos": ["x"]}, {"query": "b", "pos": ["y"]}])
    else:
        write_jsonl(data, [json.dumps(r) for r in GOOD] + lines + [json.dumps(GOOD[1])])
    out = tmp_path / "out"
    args = ["train", "--model_name_or_path", str(tiny_bert_dir), "--train_data", str(data), "--output_dir", str(out),
            "--training_type", "retrieval", "--use_cpu", "true", "--max_steps", "1", "--disable_tqdm", "true"]  # fmt: skip
    # later options win: the case's own options come last
    with pytest.raises(SystemExit) as e:
        main(args + extra)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines_out = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines_out) == 1 and expected in lines_out[0], err
    assert "Traceback" not in err
    assert not (out / "model.safetensors").exists() and not (out / "modules.json").exists()
    assert not out.exists()


def test_non_finite_loss_stops_with_step_and_term(tmp_path, capsys, tiny_bert_dir, train_file):
    out = tmp_path / "out"
    common = ["train", "--model_name_or_path", str(tiny_bert_dir), "--train_data", str(train_file), "--output_dir",
              str(out), "--training_type", "retrieval", "--use_cpu", "true", "--disable_tqdm", "true",
              "--per_device_train_batch_size", "4", "--train_group_size", "2", "--save_strategy", "steps",
              "--save_steps", "1", "--sentence_pooling_method", "mean", "--normalize_embeddings", "false"]  # fmt: skip
    # 1 step leaves checkpoint-1; a NaN written into its weights makes the resumed step 2 non-finite
    main(common + ["--max_steps", "1"])
    from safetensors.torch import load_file, save_file

    weights = out / "checkpoint-1" / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("encoder.layer.0.attention.self.query.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(SystemExit) as e:
        main(common + ["--max_steps", "3", "--resume_from_checkpoint", "auto"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "error: loss_qp became nan at step 2" in err
    assert (out / "checkpoint-1" / "trainer_state.json").is_file()
    assert not (out / "checkpoint-2").exists()
