"""`rounds: N`: reward + train_generator close each round, the next round answers with that DPO generator and
trains from the last retriever; fingerprints chain across rounds; the plan and the report cover every round."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml

from conftest import write_jsonl
from rir_finetune.errors import UserError
from rir_finetune.round.config import load_round_config
from rir_finetune.round.plan import Stage, build_stages
from rir_finetune.round.run import plan, print_plan, run_round
from rir_finetune.round.stages import GENERATOR_LLM_KEYS, REWARD_LLM_KEYS
from round_fixtures import round_config

# a few DPO steps that move a tiny random Llama
GENERATOR = {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "lr_scheduler_type": "constant",
             "max_length": 64, "disable_tqdm": True, "report_to": "none", "seed": 0}  # fmt: skip
# the tiny retriever and LLM rarely beat the query alone: keep every pair whose answers differ
REWARD = {"samples_per_query": 2, "threshold": 1.0, "require_beats_query": False}


def rounds_config(tmp_path: Path, bert: Path, llm_dir: Path, out: Path, **top) -> Path:
    """The one-round slice config with rounds: 2 and a few DPO steps; ``top`` sets more top-level keys."""
    path = round_config(tmp_path, bert, llm_dir, out)
    cfg = yaml.safe_load(path.read_text())
    cfg.update(rounds=2, alphas=[0.5], reward=dict(REWARD), train_generator=dict(GENERATOR), **top)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _labels(steps) -> list[str]:
    return [s.stage.label for s in steps]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_two_rounds_run_chain_skip_and_rerun_downstream(tmp_path, tiny_bert_dir, tiny_causal_lm_dir, capsys):
    out = tmp_path / "out"
    path = str(rounds_config(tmp_path, tiny_bert_dir, tiny_causal_lm_dir, out))

    # the plan names both rounds, where round 2's answers come from, and where its retriever starts
    run_round(path, [], dry_run=True)
    printed = capsys.readouterr().out
    gen_dir, ret_dir = out / "train_generator" / "model", out / "train" / "model"
    assert "round plan: 2 rounds" in printed
    assert f"round 2/2: answers by round 1's DPO generator {gen_dir} (backend transformers)" in printed
    assert f"train starts from {ret_dir}" in printed
    for label in ("1.queries", "1.eval", "1.reward", "1.train_generator", "2.augment", "2.train", "2.eval"):
        assert f"  {label} " in printed
    assert "2.queries" not in printed and "2.reward" not in printed and not out.exists()

    run_round(path, [])
    err = capsys.readouterr().err
    expected = ["1.queries", "1.augment", "1.mine", "1.train", "1.test_answers", "1.eval", "1.reward",
                "1.train_generator", "2.augment", "2.mine", "2.train", "2.test_answers", "2.eval"]  # fmt: skip
    assert [ln.split(":")[1].strip() for ln in err.splitlines() if ln.endswith("(not run yet)")] == expected

    # round 1 keeps the one-round layout; round 2 lives under round_2/
    assert (out / "eval" / "summary.json").is_file() and (out / "round_2" / "eval" / "summary.json").is_file()
    assert (gen_dir / "config.json").is_file() and (gen_dir / "adapter").is_dir()
    # the generator that reward sampled from and DPO trained is the llm section's; round 2's answers are DPO's
    reward_keys = yaml.safe_load((out / "reward" / "config.yaml").read_text())
    assert reward_keys["model"] == str(tiny_causal_lm_dir) and reward_keys["retriever"] == str(ret_dir)
    assert yaml.safe_load((out / "train_generator" / "config.yaml").read_text())["model"] == str(
        tiny_causal_lm_dir
    )
    for stage in ("augment", "test_answers"):
        keys = yaml.safe_load((out / "round_2" / stage / "config.yaml").read_text())
        assert (keys["backend"], keys["model"]) == ("transformers", str(gen_dir))
        mark = json.loads((out / "round_2" / stage / "stage.json").read_text())
        assert mark["round"] == 2 and mark["generator"] == {"backend": "transformers", "model": str(gen_dir)}
    assert yaml.safe_load((out / "round_2" / "train" / "config.yaml").read_text())[
        "model_name_or_path"
    ] == str(ret_dir)
    # round 2's answers are what the DPO model writes, and DPO changed the weights
    from safetensors.torch import load_file

    from rir_finetune.prep.augment import run_augment

    again = tmp_path / "again.jsonl"
    first = tmp_path / "first.jsonl"
    answers = _read_jsonl(out / "round_2" / "test_answers" / "answers.jsonl")
    first.write_text(json.dumps({k: answers[0][k] for k in ("qid", "query")}) + "\n")
    run_augment(
        str(out / "round_2" / "test_answers" / "config.yaml"), ["--input", str(first), "--output", str(again)]
    )
    assert _read_jsonl(again)[0]["answer"] == answers[0]["answer"]
    trained, base = (
        load_file(str(gen_dir / "model.safetensors")),
        load_file(str(tiny_causal_lm_dir / "model.safetensors")),
    )
    assert any(not torch.equal(trained[k], base[k]) for k in base)

    # the report: one section per round, reward counts, DPO steps, metrics of both rounds
    counts = json.loads((out / "reward" / "stage.json").read_text())["result"]["counts"]
    pairs = _read_jsonl(out / "reward" / "pairs.jsonl")
    assert counts["records"] == 8 and counts["pairs"] == len(pairs) >= 1
    report = (out / "report.md").read_text()
    assert "## Round 1" in report and "## Round 2" in report and "## Across rounds" in report
    assert f"8 queries x 2 sampled answers, {len(pairs)} preference pairs kept" in report
    assert "train_generator: 2 DPO steps" in report
    r2 = json.loads((out / "round_2" / "eval" / "summary.json").read_text())
    assert f"| 2 | {r2['trained/query']['ndcg@10']:.4f} |" in report
    assert set(r2) == {
        f"{m}/{mode}" for m in ("base", "trained") for mode in ("query", "answer", "fused_0.5")
    }

    # a rerun has nothing to do
    run_round(path, [])
    err = capsys.readouterr().err
    assert err.count("skipped, up to date") == 13 and "not run yet" not in err and "rerun" not in err

    # a train_generator key: it and everything of round 2 after it run again; round 1's retriever stages do not
    run_round(path, ["--train_generator.max_steps", "3"])
    err = capsys.readouterr().err
    for label in ("1.queries", "1.augment", "1.mine", "1.train", "1.test_answers", "1.eval", "1.reward"):
        assert f"round: {label}: skipped, up to date" in err
    for label in ("1.train_generator", "2.augment", "2.mine", "2.train", "2.test_answers", "2.eval"):
        assert f"round: {label}: rerun" in err
    assert json.loads((gen_dir / "trainer_state.json").read_text())["global_step"] == 3


def test_round_one_is_unchanged_by_more_rounds(tmp_path, tiny_bert_dir, tiny_causal_lm_dir):
    """rounds: 2 keeps round 1's folders and fingerprints: a finished one-round folder is its round 1."""
    one = round_config(tmp_path, tiny_bert_dir, tiny_causal_lm_dir, tmp_path / "out")
    cfg = yaml.safe_load(one.read_text())
    cfg.update(rounds=2, reward=dict(REWARD), train_generator=dict(GENERATOR))
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump(cfg))
    a = {s.stage.key: s for s in plan(load_round_config(str(one), []))}
    b = {s.stage.key: s for s in plan(load_round_config(str(two), []))}
    assert list(a) == ["queries", "augment", "mine", "train", "test_answers", "eval"]
    assert list(b) == [
        *a,
        "reward",
        "train_generator",
        "2.augment",
        "2.mine",
        "2.train",
        "2.test_answers",
        "2.eval",
    ]
    for key in a:
        assert (a[key].fingerprint, a[key].stage.folder) == (b[key].fingerprint, b[key].stage.folder)
        assert a[key].stage.label == key and b[key].stage.label == f"1.{key}"
    assert b["2.train"].stage.folder == tmp_path / "out" / "round_2" / "train"


def test_when_the_generator_stages_run(tmp_path, tiny_bert_dir, tiny_causal_lm_dir):
    path = str(round_config(tmp_path, tiny_bert_dir, tiny_causal_lm_dir, tmp_path / "out"))

    def names(*overrides):
        return _labels(plan(load_round_config(path, list(overrides))))

    assert names()[-1] == "eval"  # no generator section, one round: as before
    assert names("--reward.samples_per_query", "3")[-1:] == ["reward"]
    assert names("--train_generator.max_steps", "2")[-2:] == ["reward", "train_generator"]
    assert names("--train_generator.max_steps", "2", "--final_generator", "false")[-1] == "eval"
    # several rounds: every round but the last ends with them; the last only when asked
    two = names("--rounds", "2", "--train_generator.max_steps", "2")
    assert two[6:8] == ["1.reward", "1.train_generator"] and two[-1] == "2.eval"
    assert names("--rounds", "3", "--final_generator", "true")[-3:] == [
        "3.eval",
        "3.reward",
        "3.train_generator",
    ]
    three = plan(load_round_config(path, ["--rounds", "3"]))
    by = {s.stage.label: s.stage for s in three}
    assert by["3.augment"].settings["model"] == str(
        tmp_path / "out" / "round_2" / "train_generator" / "model"
    )
    assert by["3.train"].settings["model_name_or_path"] == str(
        tmp_path / "out" / "round_2" / "train" / "model"
    )
    assert by["3.augment"].settings["input"] == str(tmp_path / "out" / "queries" / "train.jsonl")
    assert by["2.reward"].settings["retriever"] == str(tmp_path / "out" / "round_2" / "train" / "model")
    cfg = load_round_config(path, [])
    cfg.stages = ["queries", "mine", "train", "train_generator"]
    with pytest.raises(UserError, match="'train_generator' needs the 'reward' stage"):
        plan(cfg)
    with pytest.raises(UserError, match="config key 'rounds': must be a positive integer, got 0"):
        load_round_config(path, ["--rounds", "0"])


def test_from_until_take_round_qualified_and_plain_names(tmp_path, tiny_bert_dir, tiny_causal_lm_dir):
    path = str(rounds_config(tmp_path, tiny_bert_dir, tiny_causal_lm_dir, tmp_path / "out"))
    cfg = load_round_config(path, [])
    steps = plan(cfg, until="2.mine")
    assert [s.action for s in steps].count("after-until") == 3 and steps[9].stage.label == "2.mine"
    steps = plan(cfg, until="train")  # a plain name: its first round
    assert steps[3].stage.label == "1.train" and steps[4].action == "after-until"
    with pytest.raises(UserError, match="earlier stage '1.queries' is not complete"):
        plan(cfg, start="2.train")
    with pytest.raises(UserError, match="--from 3.train: not a stage of this round .*2.eval"):
        plan(cfg, start="3.train")


def test_generator_chain_reaches_round_two_only(tmp_path, tiny_bert_dir, tiny_causal_lm_dir):
    """If round 1's generator changes, round 2's stages change; round 1's retriever stages do not."""
    path = str(rounds_config(tmp_path, tiny_bert_dir, tiny_causal_lm_dir, tmp_path / "out"))
    a = {s.stage.label: s.fingerprint for s in plan(load_round_config(path, []))}
    b = {
        s.stage.label: s.fingerprint for s in plan(load_round_config(path, ["--train_generator.beta", "0.2"]))
    }
    changed = sorted(k for k in a if a[k] != b[k])
    assert changed == sorted(
        ["1.train_generator", "2.augment", "2.mine", "2.train", "2.test_answers", "2.eval"]
    )
    c = {
        s.stage.label: s.fingerprint
        for s in plan(load_round_config(path, ["--reward.samples_per_query", "3"]))
    }
    assert sorted(k for k in a if a[k] != c[k]) == sorted(["1.reward", *changed])


def test_a_gguf_generator_becomes_a_transformers_folder(tmp_path, tiny_bert_dir, capsys):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    llm = {"backend": "llama_cpp", "model": str(gguf), "n_threads": 2, "max_new_tokens": 8}
    path = rounds_config(tmp_path, tiny_bert_dir, gguf, tmp_path / "out", llm=llm)
    steps = plan(load_round_config(str(path), []))
    by = {s.stage.label: s.stage for s in steps}
    assert by["1.augment"].settings["backend"] == "llama_cpp" and by["1.train_generator"].settings[
        "model"
    ] == str(gguf)
    assert (
        by["1.reward"].settings["backend"] == "llama_cpp" and by["1.reward"].settings["max_new_tokens"] == 8
    )
    gen_dir = str(tmp_path / "out" / "train_generator" / "model")
    for label in ("2.augment", "2.test_answers"):
        keys = by[label].settings
        assert (keys["backend"], keys["model"], keys["n_threads"]) == ("transformers", gen_dir, 2)
    print_plan(steps, cfg=load_round_config(str(path), []))
    assert "(backend transformers, not the llm section's llama_cpp)" in capsys.readouterr().out
    # an API model is not a folder to train: train_generator needs its local copy
    api = {"backend": "openai", "api_base": "http://127.0.0.1:9/v1", "model": "some/model"}
    path = rounds_config(tmp_path / "api", tiny_bert_dir, gguf, tmp_path / "out_api", llm=api)
    with pytest.raises(UserError, match="set train_generator.model"):
        plan(load_round_config(str(path), []))


def test_reward_subset_and_inherited_keys(tmp_path, tiny_bert_dir, tiny_causal_lm_dir):
    from rir_finetune.generator.dpo import GeneratorArguments
    from rir_finetune.generator.reward import RewardConfig

    assert set(REWARD_LLM_KEYS) <= {f.name for f in fields(RewardConfig)}
    assert set(GENERATOR_LLM_KEYS) <= {f.name for f in fields(GeneratorArguments)}
    path = str(
        rounds_config(tmp_path, tiny_bert_dir, tiny_causal_lm_dir, tmp_path / "out", max_reward_queries=3)
    )
    by = {s.stage.label: s.stage for s in plan(load_round_config(path, []))}
    reward = by["1.reward"]
    assert reward.settings["input"] == str(tmp_path / "out" / "reward" / "records.jsonl")
    assert reward.extra == {"source": str(tmp_path / "out" / "queries" / "train.jsonl"), "limit": 3}
    assert "temperature" not in reward.settings  # reward samples at its own (upstream's) temperature


def test_reward_never_samples_for_the_dev_queries(tmp_path, tiny_bert_dir, tiny_causal_lm_dir, monkeypatch):
    """With a dev split the generator learns from the training records only (the dev queries choose alpha, in this
    round and, answered by the DPO generator, in the next): reward's records are the dev stage's train.jsonl in the
    source's order, then the first max_reward_queries."""
    from rir_finetune.prep.split import SplitConfig, split
    from rir_finetune.round import stages

    path = str(rounds_config(tmp_path, tiny_bert_dir, tiny_causal_lm_dir, tmp_path / "out", dev_queries=3,
                             max_reward_queries=4))  # fmt: skip
    by = {s.stage.label: s.stage for s in plan(load_round_config(path, []))}
    reward, dev = by["1.reward"], by["1.dev"]
    assert reward.extra["train_records"] == str(dev.outputs[0]) and dev.key in reward.depends
    source = Path(reward.extra["source"])
    source.parent.mkdir(parents=True)
    write_jsonl(
        source, [{"query": f"q{i}", "pos": [f"p{i}"], "pos_ids": [f"d{i}"], "qid": f"Q{i}"} for i in range(8)]
    )
    split(SplitConfig(input=str(source), dev_queries=3, out_dir=str(dev.folder)))
    held = {r["qid"] for r in _read_jsonl(dev.outputs[1])}
    monkeypatch.setattr(
        stages, "run_command", lambda command, config: {}
    )  # the reward command is not under test
    stages.run_reward(reward, dev.folder / "unused.yaml", resume=False)
    sampled = [r["qid"] for r in _read_jsonl(Path(reward.settings["input"]))]
    assert len(held) == 3 and sampled == [f"Q{i}" for i in range(8) if f"Q{i}" not in held][:4]


def test_no_pairs_stops_with_one_line(tmp_path):
    from rir_finetune.round.stages import run_train_generator

    pairs = tmp_path / "reward" / "pairs.jsonl"
    pairs.parent.mkdir()
    pairs.write_text("")
    stage = Stage("train_generator", "rir-finetune train-generator", tmp_path / "tg", [], {"data": str(pairs),
                  "output_dir": str(tmp_path / "tg" / "model")}, [])  # fmt: skip
    with pytest.raises(UserError, match="reward kept no preference pairs") as e:
        run_train_generator(stage, tmp_path / "tg" / "config.yaml", resume=False)
    assert "\n" not in str(e.value) and not (tmp_path / "tg").exists()


def test_shipped_two_round_config_keys_fit_their_commands(tmp_path, scifact_dir):
    """configs/round_scifact_2rounds.yaml: the generator stages' resolved keys load in their own commands."""
    from conftest import REPO
    from rir_finetune.config import build_configs
    from rir_finetune.generator.dpo import load_configs
    from rir_finetune.generator.reward import RewardConfig
    from rir_finetune.prep.augment import AugmentConfig

    cfg = load_round_config(
        str(REPO / "configs" / "round_scifact_2rounds.yaml"), ["--output_dir", str(tmp_path)]
    )
    by = {s.label: s for s in build_stages(cfg)}
    (reward,) = build_configs([RewardConfig], None, by["1.reward"].settings)
    assert (reward.samples_per_query, reward.temperature, reward.task, reward.backend) == (
        5,
        0.9,
        "scifact",
        "llama_cpp",
    )
    assert by["1.reward"].extra["limit"] == 128
    gen, dpo = load_configs(None, by["1.train_generator"].settings)
    assert (gen.lora_rank, dpo.beta, dpo.max_length) == (32, 0.1, 384) and gen.model.endswith(".gguf")
    (augment,) = build_configs([AugmentConfig], None, by["2.augment"].settings)
    assert (augment.backend, augment.model) == ("transformers", str(tmp_path / "train_generator" / "model"))

    # llama.cpp's re-quantisation is a key of the GGUF backend: round 2's DPO generator (transformers) drops it
    cfg = load_round_config(str(REPO / "configs" / "round_scifact_2rounds.yaml"),
                            ["--output_dir", str(tmp_path), "--llm.gguf_requantize", "q8_0"])  # fmt: skip
    by = {s.label: s for s in build_stages(cfg)}
    assert by["1.augment"].settings["gguf_requantize"] == "q8_0"
    assert (
        "gguf_requantize" not in by["2.augment"].settings
        and "gguf_requantize" not in by["2.test_answers"].settings
    )
    assert [s.stage.label for s in plan(cfg)][-1] == "2.eval"  # every stage that will run builds its config


def test_a_finished_train_is_not_trained_again_when_the_round_resumes(tmp_path):
    """Killed (or the launcher exited non-zero) after train wrote its model card: the stage is done; resuming it
    would be refused (no step left)."""
    from rir_finetune.round.stages import run_train

    model = tmp_path / "train" / "model"
    model.mkdir(parents=True)
    for name in ("README.md", "rir_config.yaml"):
        (model / name).write_text("x")
    stage = Stage("train", "rir-finetune train", tmp_path / "train", [model], {"output_dir": str(model)}, [])
    assert run_train(stage, tmp_path / "missing_config.yaml", resume=True) == {}  # the config is never read
    with pytest.raises(UserError):  # not resuming: it runs (and here its config does not exist)
        run_train(stage, tmp_path / "missing_config.yaml", resume=False)


def test_remine_rounds_need_no_llm_and_mine_with_the_last_retriever(
    tmp_path, tiny_bert_dir, tiny_causal_lm_dir
):
    """rounds: 2 + remine without any LLM key: no generator stages; round 2 mines with round 1's trained model."""
    base = yaml.safe_load(
        round_config(tmp_path, tiny_bert_dir, tiny_causal_lm_dir, tmp_path / "out").read_text()
    )
    base.pop("llm")
    base.update(rounds=2, remine=True, cache_dir=str(tmp_path / "store"))
    base["train"]["training_type"] = "retrieval"  # no answers without an LLM
    for section in ("mine", "eval"):  # the round's one store, not the fixture's none
        base[section].pop("use_cache")
    path = tmp_path / "remine.yaml"
    path.write_text(yaml.safe_dump(base))
    steps = plan(load_round_config(str(path), []))
    assert _labels(steps) == ["1.queries", "1.mine", "1.train", "1.eval", "2.mine", "2.train", "2.eval"]
    by = {s.stage.label: s.stage for s in steps}
    assert by["1.mine"].settings["model"] == str(tiny_bert_dir)
    assert by["2.mine"].settings["model"] == str(tmp_path / "out" / "train" / "model")
    assert (
        "train" in by["2.mine"].depends and "model" not in by["2.mine"].externals
    )  # round 1 keys: bare names
    assert by["2.train"].settings["train_data"] == str(tmp_path / "out" / "round_2" / "mine" / "train.jsonl")
    plain = plan(load_round_config(str(path), ["--remine", "false"]))
    assert {s.stage.label: s.stage for s in plain}["2.mine"].settings["model"] == str(tiny_bert_dir)
    run_round(str(path), [])
    first = _read_jsonl(tmp_path / "out" / "mine" / "train.jsonl")
    second = _read_jsonl(tmp_path / "out" / "round_2" / "mine" / "train.jsonl")
    assert [r["query"] for r in first] == [r["query"] for r in second]
    assert [r["neg"] for r in first] != [
        r["neg"] for r in second
    ]  # a trained model ranks other passages first
    assert json.loads((tmp_path / "out" / "round_2" / "eval" / "summary.json").read_text())["trained/query"]

    # the store passes from stage to stage: each model's corpus is encoded once in the whole run
    def hit(folder: str) -> bool:
        return json.loads((tmp_path / "out" / folder / "eval_config.json").read_text())["cache"]["hit"]

    assert hit("eval/base/query")  # mine stored the base model's corpus embeddings
    assert not hit("eval/trained/query")  # round 1's model is new: eval stores it ...
    assert hit("round_2/eval/base/query")
    assert not hit("round_2/eval/trained/query")
    mined = yaml.safe_load((tmp_path / "out" / "round_2" / "mine" / "config.yaml").read_text())
    assert mined["cache_dir"] == str(tmp_path / "store")
    # ... and round 2's mine read it: three models (base, round 1, round 2), three stores
    assert len([p for p in (tmp_path / "store").iterdir() if p.is_dir()]) == 3


def test_the_cache_location_is_not_part_of_a_stage_fingerprint(tmp_path):
    """Adding or moving the round's cache_dir reruns nothing; any other key does."""
    from rir_finetune.round.plan import Stage
    from rir_finetune.round.stamps import fingerprint

    def stage(**settings):
        return Stage("mine", "rir-finetune mine", tmp_path, [], {"model": "m", **settings}, [])

    assert fingerprint(stage(), {}) == fingerprint(stage(cache_dir=str(tmp_path / "store")), {})
    assert fingerprint(stage(), {}) != fingerprint(stage(negative_number=7), {})
