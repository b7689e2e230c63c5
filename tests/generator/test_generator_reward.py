"""`rir-finetune reward`: K sampled answers from a tiny random Llama judged by a tiny random BERT retriever."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from generator_fixtures import WORDS, build_tiny_causal_lm, write_beir_records

from rir_finetune.cli import main
from rir_finetune.config import load_config
from rir_finetune.errors import UserError
from rir_finetune.generator.reward import (
    DROP_REASONS,
    RewardConfig,
    _Judge,
    choose_pair,
    reward,
    run_reward,
)
from rir_finetune.llm.generation import load_backend


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("reward_llm") / "llm", chat=True)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# the tiny LLM's answers rarely beat the query alone: keep every pair whose answers differ, so there are pairs to compare
KEEP = ("--threshold", "1", "--require_beats_query", "false")


def _args(src, out, retriever, llm, *extra):
    return ["--input", str(src), "--output", str(out), "--retriever", str(retriever), "--model", str(llm),
            "--samples_per_query", "4", "--max_new_tokens", "6", "--records_per_chunk", "3",
            "--query_instruction", "q: ", "--passage_instruction", "p: ", *extra]  # fmt: skip


def test_reward_writes_trl_pairs_and_counts(tiny_llm, minilm_dir, tmp_path, capsys):
    # passages in the LLM's words; even queries are far from their passage (random answers help), odd ones are
    # the passage's own words (no answer of a random LLM beats them): both kept and dropped pairs
    src = tmp_path / "train.jsonl"
    passages = [" ".join(WORDS[i : i + 12]) for i in range(8)]
    queries = [f"xylophone quartz zebra {i}?" if i % 2 == 0 else passages[i] for i in range(8)]
    src.write_text("".join(json.dumps({"qid": f"q{i}", "query": q, "pos": [p]}) + "\n"
                           for i, (q, p) in enumerate(zip(queries, passages, strict=True))))  # fmt: skip
    out, samples = tmp_path / "pairs.jsonl", tmp_path / "samples.jsonl"
    main(["reward", *_args(src, out, minilm_dir, tiny_llm, "--samples_output", str(samples))])
    printed = capsys.readouterr().out
    rows, pairs = _read(samples), _read(out)
    assert len(rows) == 8 and all(len(r["answers"]) == 4 == len(r["scores"]) for r in rows)
    # the counts printed and the pairs written follow the rule applied to the samples
    cfg = RewardConfig()
    reasons = [choose_pair(r["scores"], r["raw_score"], r["answers"], cfg.rule).dropped_by for r in rows]
    kept = reasons.count(None)
    assert len(pairs) == kept
    dropped = ", ".join(f"{reasons.count(r)} {r}" for r in DROP_REASONS)
    assert f"pairs kept: {kept}; dropped: {dropped}" in printed
    assert 0 < kept < 8 and reasons.count("not_better_than_query") > 0  # both outcomes are exercised
    for pair in pairs:
        row = next(r for r in rows if r["qid"] == pair["qid"])
        assert set(pair) == {
            "prompt",
            "chosen",
            "rejected",
            "chosen_score",
            "rejected_score",
            "raw_score",
            "qid",
        }
        assert pair["prompt"] == row["prompt"] and row["prompt"].endswith(
            f"Question: {row['query']}\n\nPassage:"
        )
        assert pair["chosen_score"] == max(row["scores"]) and pair["rejected_score"] == min(row["scores"])
        assert pair["chosen"] == row["answers"][int(np.argmax(row["scores"]))]
    assert not out.with_name(out.name + ".partial").exists()


def test_scores_are_upstreams_formula_with_the_folder_prompts(tiny_llm, tiny_bert_dir, tmp_path):
    """Reference: encode by hand with the engine's encoder (instructions prepended to whole texts)."""
    from rir_finetune.retrieval.encoder import Encoder
    from rir_finetune.retrieval.model_folder import read_settings

    cfg = load_config(RewardConfig, None, _args("in", "out", tiny_bert_dir, tiny_llm))
    answers = [["the cells w1", "heart risk", "a b", "study"]]
    (scores, raw), = _Judge(cfg).score(["gene w1 ?"], ["gene w1 the study"], answers)  # fmt: skip
    enc = Encoder(read_settings(tiny_bert_dir), show_progress=False)
    q = enc.encode(["gene w1 ?"], "q: ")[0]
    p = enc.encode(["gene w1 the study"], "p: ")[0]
    a = enc.encode(["Generate the topic about this passage: " + t for t in answers[0]], "q: ")
    np.testing.assert_allclose(scores, (0.8 * q + 0.2 * a) @ p, rtol=1e-5, atol=1e-6)
    assert raw == pytest.approx(float(q @ p), abs=1e-6)
    # the judge's own dtype and packing keys: packed fp32 scores as padded; a bf16 judge is a new fingerprint
    on_cpu = [
        *_args("in", "out", tiny_bert_dir, tiny_llm),
        "--retriever_device",
        "cpu",
    ]  # auto there: fp32, padded
    plain = load_config(RewardConfig, None, on_cpu)
    (scores_plain, _), = _Judge(plain).score(["gene w1 ?"], ["gene w1 the study"], answers)  # fmt: skip
    packed = load_config(RewardConfig, None, [*on_cpu, "--retriever_pack_sequences", "true"])
    judge = _Judge(packed)
    assert judge.encoder.packing.ok and _Judge(plain).encoder.packing is None
    (scores_packed, _), = judge.score(["gene w1 ?"], ["gene w1 the study"], answers)  # fmt: skip
    np.testing.assert_allclose(scores_packed, scores_plain, atol=1e-5)
    assert packed.fingerprint() == plain.fingerprint()
    bf16 = load_config(RewardConfig, None, [*on_cpu, "--retriever_dtype", "bf16"])
    assert _Judge(bf16).encoder.dtype == "bfloat16" and bf16.fingerprint() != plain.fingerprint()


def test_every_pair_kept_when_the_rules_are_off(tiny_llm, tiny_bert_dir, tmp_path, capsys):
    src = write_beir_records(tmp_path / "train.jsonl", 8)
    out = tmp_path / "pairs.jsonl"
    counts = run_reward(None, _args(src, out, tiny_bert_dir, tiny_llm, "--threshold", "1",
                                    "--require_beats_query", "false"))  # fmt: skip
    assert counts["pairs"] + counts["dropped_same_text"] == 8 and counts["pairs"] >= 6
    assert counts["dropped_not_better_than_query"] == counts["dropped_margin_too_small"] == 0
    assert all(p["chosen"] != p["rejected"] for p in _read(out))


def test_resumed_run_writes_what_an_uninterrupted_one_writes(tiny_llm, tiny_bert_dir, tmp_path, capsys):
    src = write_beir_records(tmp_path / "train.jsonl", 8)
    whole, broken = tmp_path / "whole.jsonl", tmp_path / "broken.jsonl"
    run_reward(None, _args(src, whole, tiny_bert_dir, tiny_llm, *KEEP))

    cfg = load_config(RewardConfig, None, _args(src, broken, tiny_bert_dir, tiny_llm, *KEEP))
    backend = load_backend(cfg.backend_settings())

    def killed(n):
        if n == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reward(cfg, backend, _Judge(cfg), after_chunk=killed)
    partial = broken.with_name(broken.name + ".partial")
    assert len(_read(partial)) == 6 and not broken.exists()  # two chunks of 3 are durable
    counts = run_reward(None, _args(src, broken, tiny_bert_dir, tiny_llm, *KEEP))
    assert (counts["sampled"], counts["kept_from_earlier_run"]) == (2, 6)
    assert broken.read_text() == whole.read_text() and len(_read(whole)) > 0

    # a partial file sampled with other settings is refused, not mixed in
    partial.write_text(json.dumps({"index": 0, "query": "x", "settings": "other"}) + "\n")
    with pytest.raises(
        UserError, match=r"\.partial:1: this unfinished output was sampled or scored with other"
    ):
        run_reward(None, _args(src, broken, tiny_bert_dir, tiny_llm))


def _cli_error(args, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_bad_input_one_line_nothing_written(tiny_llm, tiny_bert_dir, tmp_path, capsys):
    src = write_beir_records(tmp_path / "train.jsonl", 3)
    out = tmp_path / "out" / "pairs.jsonl"
    err = _cli_error(
        ["reward", *_args(src, out, tiny_bert_dir, tiny_llm), "--samples_per_query", "1"], capsys
    )
    assert "'samples_per_query'" in err
    no_pos = tmp_path / "no_pos.jsonl"
    no_pos.write_text(json.dumps({"query": "a ?", "pos": ["p"]}) + "\n" + json.dumps({"query": "b ?"}) + "\n")
    err = _cli_error(["reward", *_args(no_pos, out, tiny_bert_dir, tiny_llm)], capsys)
    assert f"{no_pos}:2: field 'pos'" in err
    err = _cli_error(["reward", *_args(src, out, tiny_bert_dir, tiny_bert_dir)], capsys)
    assert "not a causal language model (BertModel)" in err
    assert not out.parent.exists()
