"""The command line: one-line errors, exit code 2, no traceback, nothing written; `python -m` works."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import make_records, write_jsonl
from rir_finetune.cli import main


def _run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    return e.value.code, err


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("learning_rat: 1e-5\n", "unknown config key 'learning_rat'; did you mean 'learning_rate'?"),
        ("learning_rate: fast\n", "config key 'learning_rate': expected a number"),
        ("training_type: retrival_answer\n", "config key 'training_type'"),
        ("kd_loss_type: m3\n", "config key 'kd_loss_type'"),
        ("temperature: -0.1\n", "config key 'temperature': must be greater than 0"),
    ],
)
def test_bad_config_one_line_exit_2(tmp_path, capsys, tiny_bert_dir, yaml_text, key):
    data = write_jsonl(tmp_path / "t.jsonl", make_records(4))
    cfg = tmp_path / "bad.yaml"
    out = tmp_path / "out"
    cfg.write_text(
        f"model_name_or_path: {tiny_bert_dir}\ntrain_data: {data}\noutput_dir: {out}\n" + yaml_text
    )
    code, err = _run_cli(["train", "--config", str(cfg)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and key in err
    assert "Traceback" not in err
    assert not out.exists()


def test_two_config_files_are_refused_not_one_ignored(tmp_path, capsys):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    for f in (a, b):
        f.write_text(f"output_dir: {tmp_path / 'out'}\n")
    code, err = _run_cli(["eval", "-c", str(a), "--config", str(b)], capsys)
    assert code == 2 and err == f"error: command line: --config given 2 times ({a}, {b}); give one\n"
    assert not (tmp_path / "out").exists()


def test_broken_jsonl_line_7_named(tmp_path, capsys, tiny_bert_dir):
    lines = make_records(6) + ['{"query": "q", "pos": ["p"'] + make_records(2)
    data = write_jsonl(tmp_path / "t.jsonl", lines)
    code, err = _run_cli(["train", "--model_name_or_path", str(tiny_bert_dir), "--train_data", str(data),
                          "--output_dir", str(tmp_path / "o"), "--training_type", "retrieval"], capsys)  # fmt: skip
    assert code == 2 and f"{data}:7: invalid JSON" in err and err.count("\n") == 1


def test_python_dash_m_entry_point_and_console_script(tmp_path):
    for cmd in ([sys.executable, "-m", "rir_finetune", "train", "--learning_rat", "1"],):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2
        assert (
            r.stderr.strip()
            .splitlines()[-1]
            .startswith("error: command line: unknown config key 'learning_rat'")
        )
        assert "Traceback" not in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "rir_finetune", "--help"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "train" in r.stdout and "eval" in r.stdout


def test_every_command_help_lists_every_key_with_type_default_and_help(capsys):
    """`rir-finetune CMD --help` prints the key table from the command's config classes (the command table)."""
    import dataclasses

    from rir_finetune.commands import COMMANDS

    for name, cmd in COMMANDS.items():
        main([*name.split(), "--help"])  # returns: help is not an error
        out = capsys.readouterr().out
        assert out.startswith(f"Usage: rir-finetune {name}"), out[:200]
        for cls in cmd.config_classes():
            for f in dataclasses.fields(cls):
                if f.init and not f.metadata.get("hidden"):
                    assert f"  --{f.name} " in out, f"{name}: --{f.name} missing from --help"
    main(["train", "--help"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    row = lines.index("  --train_group_size int (default 8)")
    assert lines[row + 1].strip() == "passages per query: 1 positive + (G-1) negatives [>=1]"
    assert "  --learning_rate float (default 5e-05)" in out  # transformers' own fields, with their help
    assert "  --token str? (default from the environment)" in out  # a secret's value is never printed
    main(["data", "from-beir", "-h"])
    assert capsys.readouterr().out.startswith("Usage: rir-finetune data from-beir DATA_DIR [--config FILE]")


def test_our_keys_all_have_help():
    """Every key rir-finetune declares (not the ones it inherits from transformers or TRL) says what it does."""
    import dataclasses

    from rir_finetune.commands import COMMANDS

    missing = []
    for name, cmd in COMMANDS.items():
        for cls in cmd.config_classes():
            for f in dataclasses.fields(cls):
                owner = next(b for b in cls.__mro__ if f.name in vars(b).get("__annotations__", {}))
                if f.init and owner.__module__.startswith("rir_finetune") and not f.metadata.get("help"):
                    missing.append(f"{name}: {f.name}")
    assert not missing, missing
