"""``rir-finetune data split``: hold out dev queries from training records, as a BEIR folder ``eval`` can score.

    rir-finetune data split work/train.jsonl --dev_queries 100 --corpus ../shared/data/scifact --out_dir work/split

Writes ``OUT/train.jsonl`` (the records not held out, in their order), ``OUT/dev.jsonl`` (the held-out records, with
their answers when they have them: ``eval --answers``) and ``OUT/dev_beir/`` (``queries.jsonl``, ``qrels/dev.tsv`` from
each record's ``pos_ids``, and ``corpus.jsonl`` linked to the corpus), so that a choice made on held-out queries
(the fused weight alpha) is never made on the test split it is reported on. Which records are held out depends only
on the seed and each record's own key (its ``qid``; without one, its query and positives' ids), never on its position:
the ``dev_queries`` records whose keys hash lowest. A rerun holds out the same ones, and so does a later round whose
records were rewritten around them (a corpus-only round regenerates its pseudo queries each round; a positional
choice would then hold out queries whose passages the previous round trained on).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from rir_finetune import files
from rir_finetune.config import load_config, option
from rir_finetune.errors import UserError, located
from rir_finetune.prep.common import report
from rir_finetune.prep.io import Record, check_training_record

DEV_SPLIT = "dev"


@dataclass
class SplitConfig:
    POSITIONAL: ClassVar[tuple[str, ...]] = ("input",)  # `data split RECORDS`

    input: str | None = option(None, "training records (JSONL with query, pos, pos_ids; the first argument)")
    dev_queries: int = option(100, "queries held out as dev queries (all records of each)", range=">=1")
    seed: int = option(42, "which records are held out", range=">=0")
    corpus: str | None = option(
        None, "BEIR folder (or corpus.jsonl) the pos_ids point into; the dev folder links its corpus"
    )
    out_dir: str | None = option(None, "folder for train.jsonl, dev.jsonl and dev_beir/ (required)")


def split(cfg: SplitConfig) -> dict[str, int]:
    if not cfg.input:
        raise UserError("config key 'input' is required (the training records to split)")
    records: list[tuple[int, Record]] = []
    for line_no, record in files.iter_jsonl(cfg.input):
        problem = check_training_record(record)
        if problem is None and not (isinstance(record.get("pos_ids"), list) and record["pos_ids"]):
            problem = "field 'pos_ids' is required: the dev queries' judgements are their positives' ids"
        if problem:
            raise located(cfg.input, line_no, problem)
        records.append((line_no, record))
    keys = [record_key(r) for _, r in records]
    distinct = list(dict.fromkeys(keys))  # a query with several records (one per positive) is one query
    if len(distinct) <= cfg.dev_queries:
        raise UserError(
            f"config key 'dev_queries': {cfg.dev_queries} would leave none of the {len(distinct)} queries of "
            f"{cfg.input} to train on"
        )
    corpus = _corpus_file(cfg.corpus)
    out = files.check_output_dir(cfg.out_dir, key="out_dir", reads=[cfg.input, cfg.corpus])
    held = set(sorted(distinct, key=lambda k: held_out_rank(k, cfg.seed))[: cfg.dev_queries])
    train = [r for k, (_, r) in zip(keys, records, strict=True) if k not in held]
    merged: dict[
        str, Record
    ] = {}  # every record of a held-out query: one dev query judged on all its positives
    for i, (k, (_, r)) in enumerate(zip(keys, records, strict=True)):
        if k not in held:
            continue
        if k not in merged:
            merged[k] = {**r, "qid": _qid(r, i), "pos": list(r["pos"]), "pos_ids": list(r["pos_ids"])}
            continue
        for text, doc in zip(r["pos"], r["pos_ids"], strict=True):
            if doc not in merged[k]["pos_ids"]:
                merged[k]["pos"].append(text)
                merged[k]["pos_ids"].append(doc)
    dev = list(merged.values())
    files.write_jsonl(out / "train.jsonl", train)
    files.write_jsonl(out / "dev.jsonl", dev)
    beir = out / "dev_beir"
    files.write_jsonl(beir / "queries.jsonl", [{"_id": r["qid"], "text": r["query"]} for r in dev])
    rows = ["query-id\tcorpus-id\tscore"] + [
        f"{r['qid']}\t{d}\t1" for r in dev for d in dict.fromkeys(r["pos_ids"])
    ]
    files.atomic_write(beir / "qrels" / f"{DEV_SPLIT}.tsv", lambda f: f.write("\n".join(rows) + "\n"))
    if corpus is not None:
        link = beir / "corpus.jsonl"
        link.unlink(missing_ok=True)
        os.symlink(corpus.resolve(), link)
    counts = {"records": len(records), "train": len(train), "dev": len(dev)}
    report("data split", [f"{len(dev)} of {len(distinct)} queries held out ({len(records) - len(train)} of "
                          f"{len(records)} records; seed {cfg.seed}) -> {out / 'dev.jsonl'}",
                          f"{len(train)} to train on -> {out / 'train.jsonl'}",
                          f"dev BEIR folder: {beir} (split {DEV_SPLIT!r})"])  # fmt: skip
    return counts


def record_key(record: Record) -> str:
    """A record's identity that survives reordering and rewriting around it: its qid, else query + positives' ids."""
    key = record.get("qid")
    if key is None:
        return json.dumps([record.get("query"), record.get("pos_ids")], ensure_ascii=False)
    return str(key)


def held_out_rank(key: str, seed: int) -> str:
    """The order in which queries are held out: a seeded hash of a record's stable key (:func:`record_key`)."""
    return hashlib.sha256(f"{seed}-dev-{key}".encode()).hexdigest()


def _qid(record: Record, index: int) -> str:
    return str(record["qid"]) if record.get("qid") is not None else f"dev{index}"


def _corpus_file(corpus: str | None) -> Path | None:
    if corpus is None:
        return None
    path = Path(corpus)
    path = path / "corpus.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"config key 'corpus': {corpus}: no corpus.jsonl there")
    return path


def run_split(config_file: str | None, overrides: list[str] | dict) -> dict[str, int]:
    return split(load_config(SplitConfig, config_file, overrides))
