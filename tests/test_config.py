"""Config loading: YAML/JSON files, command-line overrides, type conversion, unknown keys, upstream launch."""

from __future__ import annotations

import json

import pytest

from rir_finetune.config import build_configs, parse_overrides
from rir_finetune.errors import UserError
from rir_finetune.training.arguments import CONFIG_CLASSES

UPSTREAM_LAUNCH = """
--output_dir OUT --model_name_or_path facebook/contriever --train_data data/train.jsonl
--same_dataset_within_batch --learning_rate 1e-5 --fp16 --num_train_epochs 1 --per_device_train_batch_size 16
--dataloader_drop_last True --normalize_embeddings False --temperature 0.02 --query_max_len 512
--passage_max_len 512 --gradient_checkpointing --deepspeed ds.json --train_group_size 16 --negatives_cross_device
--logging_steps 1 --save_steps 1000 --query_instruction_for_retrieval EMPTY --sentence_pooling_method mean
--knowledge_distillation True --kd_loss_type m3_kd_loss --training_type retrieval_answer
""".split()


def _build(tokens, config_file=None):
    return build_configs(list(CONFIG_CLASSES), config_file, tokens)


def test_upstream_launch_accepted_option_for_option(tmp_path):
    tokens = [("" if t == "EMPTY" else t.replace("OUT", str(tmp_path / "o"))) for t in UPSTREAM_LAUNCH]
    tokens = [t.replace("ds.json", str(tmp_path / "ds.json")) for t in tokens]
    (tmp_path / "ds.json").write_text(
        json.dumps({"zero_optimization": {"stage": 1}, "train_batch_size": "auto"})
    )
    # deepspeed needs the package; everything else is checked without it
    tokens = tokens[: tokens.index("--deepspeed")] + tokens[tokens.index("--deepspeed") + 2 :]
    model, data, obj, train = _build(tokens + ["--use_cpu", "true"])
    assert model.sentence_pooling_method == "mean" and model.normalize_embeddings is False
    assert data.train_group_size == 16 and data.query_max_len == 512 and data.answer_max_len == 512
    assert data.same_dataset_within_batch and data.knowledge_distillation
    assert data.query_instruction_for_retrieval == ""
    assert obj.negatives_cross_device and obj.kd_loss_type == "m3_kd_loss" and obj.temperature == 0.02
    assert train.learning_rate == 1e-5 and train.fp16 and train.gradient_checkpointing
    assert train.per_device_train_batch_size == 16 and train.dataloader_drop_last and train.save_steps == 1000


def test_yaml_reads_scientific_notation_strings_as_floats(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'o'}\nlearning_rate: 1e-5\ntemperature: 2e-2\nuse_cpu: true\n")
    _, _, obj, train = _build([], cfg)
    assert train.learning_rate == pytest.approx(1e-5) and obj.temperature == pytest.approx(0.02)


def test_command_line_overrides_file(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"output_dir": str(tmp_path / "o"), "train_group_size": 4, "use_cpu": True}))
    _, data, _, _ = _build(["--train_group_size", "2"], cfg)
    assert data.train_group_size == 2


def test_sectioned_yaml_is_flattened(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model:\n  sentence_pooling_method: mean\ntraining:\n  output_dir: {tmp_path}/o\n  use_cpu: true\n"
    )
    model, *_ = _build([], cfg)
    assert model.sentence_pooling_method == "mean"


def test_unset_instruction_is_none_not_the_text_none(tmp_path):
    _, data, _, _ = _build(["--output_dir", str(tmp_path / "o"), "--use_cpu", "true"])
    assert data.query_instruction_for_retrieval is None


@pytest.mark.parametrize(
    "tokens, message",
    [
        (["--learning_rat", "1e-5"], "unknown config key 'learning_rat'; did you mean 'learning_rate'?"),
        (["--train_group_sise", "4"], "did you mean 'train_group_size'?"),
        (["--learning_rate", "fast"], "config key 'learning_rate': expected a number, got 'fast'"),
        (["--train_group_size", "2.5"], "config key 'train_group_size': expected an integer"),
        (["--fp16", "maybe"], "config key 'fp16': expected true or false"),
        (["--training_type", "retreival"], "'retreival' is not one of retrieval, retrieval_answer"),
        (["--kd_loss_type", "kl"], "config key 'kd_loss_type'"),
        (["--temperature", "0"], "config key 'temperature': must be greater than 0"),
        (["--answer_temperature", "-1"], "config key 'answer_temperature': must be greater than 0"),
        (["--sentence_pooling_method", "max"], "config key 'sentence_pooling_method'"),
        # a value lost (`--output_dir $EMPTY`): a text key never becomes the text "true"
        (
            ["--model_name_or_path", "--fp16", "false"],
            "config key 'model_name_or_path': expected text, got true (a YAML",
        ),
        (["--modle_name_or_path", "x"], "did you mean 'model_name_or_path'?"),
    ],
)
def test_bad_keys_and_values_name_the_key(tmp_path, tokens, message):
    with pytest.raises(UserError) as e:
        _build(["--output_dir", str(tmp_path / "o"), "--use_cpu", "true", *tokens])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_resume_from_checkpoint_true_stays_the_text_true(tmp_path):
    """resume_from_checkpoint is text, yet `true` (YAML's, or a bare flag) is one of its values: auto."""
    from rir_finetune import lifecycle

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'o'}\nresume_from_checkpoint: true\n")
    assert lifecycle.is_auto(_build(["--use_cpu", "true"], cfg)[3].resume_from_checkpoint)
    bare = _build(["--output_dir", str(tmp_path / "o"), "--use_cpu", "true", "--resume_from_checkpoint"])
    assert bare[3].resume_from_checkpoint == "true"


def test_unknown_key_in_file_names_the_file_and_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("output_dir: o\nqurey_max_len: 32\n")
    with pytest.raises(
        UserError, match=r"bad.yaml:2: unknown config key 'qurey_max_len'; did you mean 'query_max_len'"
    ):
        _build([], cfg)
    sectioned = tmp_path / "sections.yaml"
    sectioned.write_text("training:\n  output_dir: o\ndata:\n  query_max_len: 32\n  train_group_sise: 4\n")
    with pytest.raises(UserError, match=r"sections.yaml:5: unknown config key 'train_group_sise'"):
        _build([], sectioned)


def test_bad_value_in_file_names_the_file_and_line(tmp_path):
    cfg = tmp_path / "bad.json"
    cfg.write_text('{\n  "output_dir": "o",\n  "learning_rate": -1\n}\n')
    with pytest.raises(
        UserError, match=r"bad.json:3: config key 'learning_rate': must be greater than 0, got -1"
    ):
        _build([], cfg)


def test_broken_yaml_names_file_and_line(tmp_path):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("output_dir: o\nlearning_rate: [1e-5\n")
    with pytest.raises(UserError, match=r"broken.yaml:\d+: invalid YAML"):
        _build([], cfg)


def test_parse_overrides_forms():
    got = parse_overrides(["--a", "1", "--flag", "--b=x", "--lst", "p", "q", "--neg", "-1"])
    assert got == {"a": "1", "flag": True, "b": "x", "lst": ["p", "q"], "neg": "-1"}


@pytest.mark.parametrize(
    "path", sorted((__import__("pathlib").Path(__file__).parents[1] / "configs").glob("*.yaml"))
)
def test_shipped_configs_load_and_open_with_their_command(tmp_path, path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    # the opening comment holds the command that runs this config; this test builds train's configs
    assert any("rir-finetune " in h or "-m rir_finetune " in h for h in header), path
    if not any(" train " in h and "rir_finetune" in h.replace("-", "_") for h in header):
        pytest.skip(f"{path.name} is another command's config")
    assert any(
        ("rir-finetune train" in h or "-m rir_finetune train" in h) and path.name in "".join(header)
        for h in header
    )
    overrides = ["--output_dir", str(tmp_path / "o"), "--use_cpu", "true", "--fp16", "false"]
    overrides += ["--train_data", "x.jsonl", "--model_name_or_path", "m"]
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        overrides += ["--deepspeed", "none"]
    model, data, obj, train = _build(overrides, path)
    assert obj.training_type in path.read_text()


def test_deepspeed_without_the_package_is_a_clean_error(tmp_path):
    try:
        import deepspeed  # noqa: F401

        pytest.skip("deepspeed is installed")
    except ImportError:
        pass
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 1}}')
    with pytest.raises(UserError, match="not installed"):
        _build(["--output_dir", str(tmp_path / "o"), "--deepspeed", str(ds)])


def test_last_positional_list_field_takes_every_remaining_bare_argument():
    """`compare A B C --seed 1`: a list-typed last positional key takes all bare arguments; scalar ones take one."""
    from dataclasses import dataclass

    from rir_finetune.config import load_config, option, split_positional

    @dataclass
    class Many:
        name: str = option("", "a scalar positional")
        runs: list[str] = option(factory=list, help="a list positional")
        seed: int = option(0, "an option")

    Many.POSITIONAL = ("name", "runs")  # a class attribute, as the ClassVar of the real configs

    cfg = load_config(Many, None, ["n", "a", "b=x,y", "c", "--seed", "3"])
    assert (cfg.name, cfg.runs, cfg.seed) == ("n", ["a", "b=x,y", "c"], 3)
    assert load_config(Many, None, ["n", "a"]).runs == ["a"]  # one bare argument is still a list
    assert load_config(Many, None, ["n", "--runs", "a", "b"]).runs == ["a", "b"]
    with pytest.raises(UserError, match="'runs' given twice"):
        load_config(Many, None, ["n", "a", "--runs", "b"])
    # without the class (or with a scalar last key) one bare argument per key, as before
    assert split_positional(["n", "a"], ("name", "runs")) == {"name": "n", "runs": "a"}
    with pytest.raises(UserError, match="unexpected argument 'b'"):
        split_positional(["n", "a", "b"], ("name", "runs"))
    with pytest.raises(UserError, match="unexpected argument 'b'"):
        split_positional(["a", "b"], ("name",), Many)
