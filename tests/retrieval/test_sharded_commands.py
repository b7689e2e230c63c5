"""`mine` and `eval` over the sharded store: one process and two (torchrun, gloo, CPU) write the same files, and a
run killed while encoding encodes only the unfinished shards when run again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from synthetic_corpus import write_synthetic_beir

from rir_finetune.cli import main


def store_folder(cache: Path) -> Path:
    (folder,) = [p.parent for p in cache.glob("*/manifest.json")]
    return folder


def records(folder: Path) -> dict[int, dict]:
    return {int(p.name[6:11]): json.loads(p.read_text()) for p in sorted(folder.glob("shard-*.json"))}


def cli(*args: object, env: dict | None = None, launcher: tuple = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *launcher, "-m", "rir_finetune", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def test_killed_while_encoding_then_only_unfinished_shards_are_encoded(tmp_path, tiny_bert_dir, capsys):
    data = write_synthetic_beir(tmp_path / "data", n_docs=2000, n_queries=30, n_train=0)
    common = ("eval", "--model", tiny_bert_dir, "--data", data, "--shard_size", "500", "--show_progress", "false",
              "--k_values", "10")  # fmt: skip
    killed = cli(*common, "--output_dir", tmp_path / "o1", "--cache_dir", tmp_path / "c",
                 env={"RIR_FINETUNE_KILL_AFTER_SHARD": "1"})  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    folder = store_folder(tmp_path / "c")
    first = records(folder)
    assert sorted(first) == [0, 1] and not (tmp_path / "o1").exists()

    def run(out: str, cache: str) -> str:
        capsys.readouterr()
        main([*map(str, common), "--output_dir", str(tmp_path / out), "--cache_dir", str(tmp_path / cache)])
        return capsys.readouterr().err

    err = run("o2", "c")
    assert (
        "corpus embeddings: encoded 2 of 4 shards (1000 of 2000 passages), 2 stored by an earlier run" in err
    )
    second = records(folder)
    assert [second[i] for i in (0, 1)] == [first[0], first[1]]  # untouched: not encoded again
    assert {second[2]["run"], second[3]["run"]} != {first[0]["run"]}  # written by the second run
    assert json.loads((tmp_path / "o2" / "eval_config.json").read_text())["cache"]["hit"] is False
    # the same metrics and run as a run never killed; and then every shard is there
    assert "corpus embeddings: encoded (2000 passages)" in run("o3", "c3")
    for name in ("metrics.json", "run.trec"):
        assert (tmp_path / "o2" / name).read_text() == (tmp_path / "o3" / name).read_text()
    assert "corpus embeddings: cache hit (2000 passages)" in run("o4", "c")


def test_eval_and_mine_share_one_store(tmp_path, tiny_bert_dir, capsys):
    data = write_synthetic_beir(tmp_path / "data", n_docs=400, n_queries=20, n_train=20)
    cache = ("--cache_dir", str(tmp_path / "c"), "--model", str(tiny_bert_dir), "--shard_size", "150")
    main(
        ["eval", *cache, "--data", str(data), "--output_dir", str(tmp_path / "e"), "--show_progress", "false"]
    )
    assert "corpus embeddings: encoded (400 passages)" in capsys.readouterr().err
    main(["mine", *cache, "--input", str(data / "train.jsonl"), "--corpus", str(data / "corpus.jsonl"),
          "--output", str(tmp_path / "m.jsonl"), "--negatives", "3", "--negative_threshold", "none"])  # fmt: skip
    assert "corpus embeddings: cache hit (400 passages)" in capsys.readouterr().err
    assert len(list((tmp_path / "c").iterdir())) == 1


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("n_docs", "n_queries", "n_train", "shard_size"),
    [
        (1200, 60, 40, 300),
        pytest.param(5183, 300, 200, 1000, marks=pytest.mark.slow, id="scifact-sized"),
    ],
)
def test_two_processes_write_what_one_writes(tmp_path, tiny_bert_dir, n_docs, n_queries, n_train, shard_size):
    """torchrun --nproc_per_node 2 (gloo, CPU): each rank encodes half the shards, rank 0 searches and writes; the
    mined file, the metrics and the run equal one process's, since the shard layout does not depend on the number
    of processes. The slow case is SciFact-sized: 5,183 passages, 300 test and 200 training queries."""
    data = write_synthetic_beir(tmp_path / "data", n_docs, n_queries, n_train)
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    shards = ("--model", tiny_bert_dir, "--shard_size", shard_size)
    ev = ("eval", *shards, "--data", data, "--show_progress", "false", "--k_values", "1", "10", "100")
    mine = ("mine", *shards, "--input", data / "train.jsonl", "--corpus", data, "--negatives", "7",
            "--range_for_sampling", "5-60", "--negative_threshold", "none")  # fmt: skip
    for args, out in ((ev, ("--output_dir", tmp_path / "e2")), (mine, ("--output", tmp_path / "m2.jsonl"))):
        two = cli(*args, *out, "--cache_dir", tmp_path / f"c2_{args[0]}", launcher=torchrun)
        assert two.returncode == 0, two.stderr[-3000:]
    main([*map(str, ev), "--output_dir", str(tmp_path / "e1"), "--cache_dir", str(tmp_path / "c1")])
    main([*map(str, mine), "--output", str(tmp_path / "m1.jsonl"), "--cache_dir", str(tmp_path / "c1")])
    n_shards = -(-n_docs // shard_size)
    by_rank = [r["rank"] for _, r in sorted(records(store_folder(tmp_path / "c2_eval")).items())]
    assert by_rank == [0] * (n_shards - n_shards // 2) + [1] * (n_shards // 2)  # contiguous halves
    assert sorted(records(store_folder(tmp_path / "c2_mine"))) == list(range(n_shards))
    for name in ("metrics.json", "run.trec", "per_query.json"):
        assert (tmp_path / "e1" / name).read_text() == (tmp_path / "e2" / name).read_text(), name
    assert (tmp_path / "m1.jsonl").read_text() == (tmp_path / "m2.jsonl").read_text()
    assert len((tmp_path / "m1.jsonl").read_text().splitlines()) == n_train
