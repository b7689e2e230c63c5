"""Reliability, by class of failure, through the real CLI: a run that did no work never succeeds; a model that cannot
do the job is refused before anything is written; the round validates everything before it clears anything, writes
only where it may, and keeps a copied folder's finished stages; a full disk is one line; outputs are shareable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, make_records, write_jsonl
from rir_finetune.cli import main
from round_fixtures import round_config, tiny_beir


def refused(argv: list[str], capsys, code: int = 2) -> str:
    """The CLI in this process exits ``code`` with one ``error:`` line and no traceback; returns that line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert e.value.code == code, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def digest(root: Path) -> dict[str, bytes | str]:
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))
    }


def round_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rir_finetune", "round", *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO, **kw)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# A run that would do no work is refused before it writes anything


@pytest.mark.parametrize("length", [["--num_train_epochs", "1"], ["--max_steps", "3"]])
def test_train_with_fewer_records_than_one_batch_is_refused(tiny_bert_dir, tmp_path, capsys, length):
    data = write_jsonl(tmp_path / "t.jsonl", make_records(3, n_neg=1))
    out = tmp_path / "out"
    line = refused(["train", "--model_name_or_path", str(tiny_bert_dir), "--train_data", str(data), "--output_dir",
                    str(out), "--training_type", "retrieval", "--train_group_size", "2", "--use_cpu", "true",
                    "--per_device_train_batch_size", "4", "--dataloader_drop_last", "true", *length], capsys)  # fmt: skip
    assert "config key 'train_data': 3 records make no batch of 4" in line, line
    assert not out.exists()


def _llm_commands(bert: Path, tmp: Path) -> dict[str, list[str]]:
    rec = write_jsonl(tmp / "r.jsonl", make_records(4, n_neg=1))
    corpus = tiny_beir(tmp / "beir")
    return {
        "augment": ["augment", "--input", str(rec), "--output", str(tmp / "a.jsonl"), "--model", str(bert),
                    "--backend", "transformers"],
        "generate": ["generate", str(corpus), "--output", str(tmp / "g.jsonl"), "--model", str(bert)],
        "reward": ["reward", "--input", str(rec), "--output", str(tmp / "p.jsonl"), "--retriever", str(bert),
                   "--model", str(bert)],
        "score": ["score", "--input", str(rec), "--output", str(tmp / "s.jsonl"), "--model_type", "llm", "--model",
                  str(bert)],
        "train-generator": ["train-generator", "--model", str(bert), "--data", str(tmp / "pairs.jsonl"),
                            "--output_dir", str(tmp / "gen")],
    }  # fmt: skip


@pytest.mark.parametrize("command", ["augment", "generate", "reward", "score", "train-generator"])
def test_an_encoder_given_as_the_llm_is_refused_by_every_command_that_generates(tiny_bert_dir, tmp_path, capsys,
                                                                                 command):  # fmt: skip
    """A BERT folder loads as a causal LM with a random head and writes noise: refused before anything loads."""
    argv = _llm_commands(tiny_bert_dir, tmp_path)[command]
    if command == "train-generator":
        write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    before = digest(tmp_path)
    line = refused(argv, capsys)
    assert "not a causal language model (BertModel)" in line, line
    assert digest(tmp_path) == before


def test_reward_that_keeps_no_pair_fails(tiny_bert_dir, tiny_causal_lm_dir, tmp_path, capsys):
    rec = write_jsonl(tmp_path / "r.jsonl", make_records(2, n_neg=1))
    line = refused(["reward", "--input", str(rec), "--output", str(tmp_path / "p.jsonl"), "--retriever",
                    str(tiny_bert_dir), "--model", str(tiny_causal_lm_dir), "--samples_per_query", "2",
                    "--max_new_tokens", "4", "--threshold", "0", "--require_beats_query", "true"], capsys)  # fmt: skip
    assert "no preference pair kept of 2 queries" in line and "loosen threshold" in line, line
    assert not (tmp_path / "p.jsonl").exists()


# ----------------------------------------------------------------------------------------------------------------
# Values and writes train-generator never checked


def test_train_generator_refuses_a_negative_beta_and_writing_into_its_model(
    tiny_causal_lm_dir, tmp_path, capsys
):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    base = ["train-generator", "--model", str(tiny_causal_lm_dir), "--data", str(pairs)]
    line = refused([*base, "--output_dir", str(tmp_path / "g"), "--beta", "-1"], capsys)
    assert line == "error: config key 'beta': must be greater than 0, got -1.0", line
    model = tmp_path / "model"
    shutil.copytree(tiny_causal_lm_dir, model)
    before = digest(model)
    line = refused(["train-generator", "--model", str(model), "--data", str(pairs), "--output_dir", str(model),
                    "--overwrite_output_dir", "true"], capsys)  # fmt: skip
    assert "writing there would change it" in line, line
    gguf = tmp_path / "gg"
    gguf.mkdir()
    (gguf / "notes.gguf").write_text("not a model\n")
    line = refused(["train-generator", "--model", str(gguf / "notes.gguf"), "--data", str(pairs), "--output_dir",
                    str(gguf)], capsys)  # fmt: skip
    assert "not a GGUF file" in line, line
    assert digest(model) == before and not (tmp_path / "g").exists()


# ----------------------------------------------------------------------------------------------------------------
# The round: everything validated before anything is cleared; only its own folder; one at a time


def test_round_dry_run_refuses_missing_inputs_and_a_malformed_file(
    tmp_path, tiny_bert_dir, tiny_causal_lm_dir
):
    path = round_config(tmp_path, tiny_bert_dir, tiny_causal_lm_dir, tmp_path / "out")
    for flag, missing in (("--data", tmp_path / "nowhere"), ("--llm.model", tmp_path / "llm.gguf")):
        r = round_cli(["--config", str(path), "--dry-run", flag, str(missing)])
        assert r.returncode == 2 and r.stderr.startswith(f"error: command line ({flag})"), r.stderr[-2000:]
        assert f"{missing} not found" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text() + "train: [unclosed\n")
    r = round_cli(["--config", str(bad), "--dry-run"])
    assert r.returncode == 2 and r.stderr.startswith(f"error: {bad}:") and "invalid YAML" in r.stderr, (
        r.stderr
    )
    assert r.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_round_writes_only_into_its_own_folder(tmp_path, tiny_bert_dir, tiny_causal_lm_dir):
    path = round_config(tmp_path, tiny_bert_dir, tiny_causal_lm_dir, tmp_path / "out")
    data = tmp_path / "beir"
    for out, expected in ((data, "is (or holds) the input"), (tiny_bert_dir, "is (or holds) the input"),
                          (tmp_path, "is (or holds) the input")):  # fmt: skip
        before = digest(Path(out))
        r = round_cli(["--config", str(path), "--output_dir", str(out), "--until", "queries"])
        assert r.returncode == 2 and expected in r.stderr and r.stderr.count("\n") == 1, r.stderr[-2000:]
        assert digest(Path(out)) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my own report\n")
    r = round_cli(["--config", str(path), "--output_dir", str(mine), "--until", "queries"])
    assert r.returncode == 2 and "the round did not create it" in r.stderr, r.stderr[-2000:]
    assert [p.name for p in mine.iterdir()] == ["report.md"] and (
        mine / "report.md"
    ).read_text() == "my own report\n"


def test_two_rounds_on_one_folder_do_not_run_at_once(tmp_path, tiny_bert_dir, tiny_causal_lm_dir):
    """A second round on a folder another process is writing is refused at once (the lock every command takes)."""
    path = round_config(tmp_path, tiny_bert_dir, tiny_causal_lm_dir, tmp_path / "out")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from rir_finetune import lifecycle; "
                               f"lifecycle.lock_folder({str(tmp_path / 'out')!r}); print('held', flush=True); "
                               "time.sleep(120)"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        r = round_cli(["--config", str(path)])
        assert r.returncode == 2 and "another run is writing into this folder" in r.stderr, r.stderr[-2000:]
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".rir_finetune.lock"]
    finally:
        holder.kill()
        holder.wait()


def test_a_copied_round_skips_every_finished_stage_and_a_changed_key_says_what(tmp_path, tiny_bert_dir,
                                                                                tiny_causal_lm_dir):  # fmt: skip
    path = round_config(tmp_path, tiny_bert_dir, tiny_causal_lm_dir, tmp_path / "out")
    old = os.umask(0o022)
    try:
        r = round_cli(["--config", str(path)])
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr[-3000:]
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.name != ".rir_finetune.lock"]
    private = sorted(str(p) for p in written if p.stat().st_mode & 0o044 != 0o044)
    assert not private, (
        private
    )  # report.md, report.png, stage.json, weights: readable by others, as umask says
    assert {"report.md", "report.png", "stage.json", "model.safetensors"} <= {p.name for p in written}
    copy = tmp_path / "elsewhere" / "copied"
    shutil.copytree(tmp_path / "out", copy, symlinks=True)
    r = round_cli(["--config", str(path), "--output_dir", str(copy)])
    assert r.returncode == 0 and r.stderr.count("skipped, up to date") == 6, r.stderr[-3000:]
    r = round_cli(
        ["--config", str(path), "--output_dir", str(copy), "--dry-run", "--train.learning_rate", "0.002"]
    )
    assert r.returncode == 0, r.stderr[-2000:]
    plan = {line.split()[0]: line for line in r.stdout.splitlines()[1:]}
    assert "key 'learning_rate': 0.001 -> '0.002'" in plan["train"], r.stdout
    assert "upstream stage 'train' changed" in plan["eval"] and "skip" in plan["mine"], r.stdout


# ----------------------------------------------------------------------------------------------------------------
# A full disk is one line; an interrupted augment keeps what it finished


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("cannot mount a small tmpfs here (needs root in a namespace that allows mounts)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_augment_keeps_its_partial_file(small_disk, tiny_bert_dir, tiny_causal_lm_dir,
                                                                    tmp_path, capsys):  # fmt: skip
    long = make_records(40, n_neg=3)
    for r in long:  # outputs far larger than the disk
        r["pos"] = [p + " filler" * 300 for p in r["pos"]]
        r["neg"] = [n + " filler" * 300 for n in r["neg"]]
    rec = write_jsonl(tmp_path / "r.jsonl", long)
    line = refused(["mine", "--input", str(rec), "--output", str(small_disk / "m.jsonl"), "--model", "bm25",
                    "--negatives", "1", "--range_for_sampling", "0-20", "--negative_threshold", "none"], capsys, code=1)  # fmt: skip
    assert line.startswith(f"error: {small_disk / 'm.jsonl'}: No space left on device"), line
    assert not list(small_disk.iterdir())  # no half-written output, no temporary file
    line = refused(["augment", "--input", str(rec), "--output", str(small_disk / "a.jsonl"), "--model",
                    str(tiny_causal_lm_dir), "--max_new_tokens", "40", "--batch_size", "4"], capsys, code=1)  # fmt: skip
    assert "No space left on device" in line and "continue from OUT.partial" in line, line
    partial = small_disk / "a.jsonl.partial"
    assert partial.exists() and not (small_disk / "a.jsonl").exists()
    assert all(json.loads(x) for x in partial.read_text().splitlines())  # whole lines only


# ----------------------------------------------------------------------------------------------------------------
# What a run writes, others can read (the process umask, as any tool)


def test_outputs_take_the_process_umask(tiny_bert_dir, tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", make_records(8, n_neg=1))
    out = tmp_path / "model"
    old = os.umask(0o022)
    try:
        main(["train", "--model_name_or_path", str(tiny_bert_dir), "--train_data", str(data), "--output_dir",
              str(out), "--training_type", "retrieval", "--train_group_size", "2", "--use_cpu", "true",
              "--per_device_train_batch_size", "4", "--max_steps", "1", "--dataloader_num_workers", "0"])  # fmt: skip
        written = [p for p in out.rglob("*") if p.is_file() and p.name != ".rir_finetune.lock"]
        private = sorted(str(p.relative_to(out)) for p in written if p.stat().st_mode & 0o044 != 0o044)
        assert written and not private, private
        assert {"model.safetensors", "README.md", "modules.json", "rir_config.yaml"} <= {
            p.name for p in written
        }
    finally:
        os.umask(old)
