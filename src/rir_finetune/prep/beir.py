"""``rir-finetune data from-beir`` and ``data get``: training records from BEIR-layout data.

    rir-finetune data get scifact --out data
    rir-finetune data from-beir data/scifact --split train --out train.jsonl

A record is ``{"query", "pos": [texts], "qid", "pos_ids"}``: a query with every document judged relevant
(qrels score >= ``min_relevance``, BEIR: > 0), each written as ``(title + " " + text).strip()``. The files are read
by the evaluation stack's reader (``evaluation.data``), so both commands accept the same layouts.
"""

from __future__ import annotations

import random
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar
from urllib import error as urlerror
from urllib import request

from tqdm import tqdm

from rir_finetune import files
from rir_finetune.config import load_config, option
from rir_finetune.errors import UserError, located
from rir_finetune.lifecycle import partial_path
from rir_finetune.prep.common import report
from rir_finetune.retrieval.data import DEFAULT_CORPUS_TEXT_FORMAT, RetrievalDataset, layout_files, load_beir

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"


# ----------------------------------------------------------------------------------------------------------------
# Reading BEIR files (the evaluation stack's readers; one implementation of the layout)


def load_corpus(data_dir: str | Path) -> tuple[list[str], list[str]]:
    """Doc ids and passage texts (``(title + " " + text).strip()``) of ``data_dir/corpus.jsonl``, in file order.

    Only the corpus is read, so a folder without queries or qrels works (``mine --corpus``).
    """
    path = Path(data_dir) / "corpus.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: not found (a BEIR corpus folder holds corpus.jsonl)")
    return _corpus_file(path)


def _corpus_file(path: Path) -> tuple[list[str], list[str]]:
    """Doc ids and texts of a JSONL corpus file (``_id`` or ``id``, ``title``, ``text``), in file order."""
    corpus: dict[str, dict[str, str]] = {}
    for line_no, obj in files.iter_jsonl(path):
        doc_id = obj.get("_id", obj.get("id"))
        if doc_id is None or not isinstance(obj.get("text"), str):
            raise located(path, line_no, "expected '_id' (or 'id') and 'text' fields")
        if str(doc_id) in corpus:
            raise located(path, line_no, f"duplicate id {str(doc_id)!r}")
        corpus[str(doc_id)] = {"title": str(obj.get("title") or ""), "text": obj["text"]}
    if not corpus:
        raise UserError(f"{path}: the corpus is empty")
    return RetrievalDataset(corpus, {}, {}).corpus_texts(DEFAULT_CORPUS_TEXT_FORMAT)


# ----------------------------------------------------------------------------------------------------------------
# data from-beir


@dataclass
class FromBeirConfig:
    POSITIONAL: ClassVar[tuple[str, ...]] = ("data_dir",)  # `data from-beir DATA_DIR`

    data_dir: str | None = option(
        None, "BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv); the first argument"
    )
    split: str = option("train", "which qrels/<split>.tsv gives the positives")
    out: str | None = option(None, "JSONL file to write")
    min_relevance: int = option(
        1, "a qrels score at least this counts as a positive (BEIR: relevance > 0)", range=">=1"
    )


def from_beir(cfg: FromBeirConfig) -> dict[str, int]:
    """Write one record per query with at least one judged positive; return the counts."""
    if not cfg.data_dir:
        raise UserError(
            "data from-beir: give the BEIR folder: rir-finetune data from-beir DATA_DIR --out FILE"
        )
    data_dir = Path(cfg.data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: not a folder (BEIR layout: corpus.jsonl, queries.jsonl, qrels/)")
    # every file of the data folder is an input: the output may be a new file there, never an existing one
    out = files.check_output_file(cfg.out, key="out", reads=(*layout_files(data_dir, cfg.split), data_dir))
    dataset = load_beir(data_dir, cfg.split)  # checks that every judged query and document exists
    doc_ids, doc_texts = dataset.corpus_texts(DEFAULT_CORPUS_TEXT_FORMAT)
    text_of = dict(zip(doc_ids, doc_texts, strict=True))
    counts = {"records": 0, "positives": 0, "no_positive": 0, "empty_positives": 0}
    with files.atomic_jsonl(out) as f:
        for qid in tqdm(dataset.queries, desc="from-beir", unit="query"):
            pos_ids = [d for d, rel in dataset.qrels[qid].items() if rel >= cfg.min_relevance]
            empty = [d for d in pos_ids if not text_of[d].strip()]  # no title, no text: nothing to train on
            if empty:
                counts["empty_positives"] += len(empty)
                pos_ids = [d for d in pos_ids if d not in empty]
            if not pos_ids:
                counts["no_positive"] += 1
                continue
            record = {
                "query": dataset.queries[qid],
                "pos": [text_of[d] for d in pos_ids],
                "qid": qid,
                "pos_ids": pos_ids,
            }
            f.write(files.json_line(record, str(out)))
            counts["records"] += 1
            counts["positives"] += len(pos_ids)
        if not counts["records"]:  # raised inside the block: `out` is left as it was
            raise located(dataset.qrels_file, None, f"no query of split {cfg.split!r} has a document of relevance "
                          f">= {cfg.min_relevance} (min_relevance): no record to write")  # fmt: skip
    report(
        "data from-beir",
        [
            f"{counts['records']} records ({counts['positives']} positives) from {data_dir} split {cfg.split!r}",
            f"{counts['no_positive']} judged queries without a document of relevance >= {cfg.min_relevance} skipped",
            f"{counts['empty_positives']} relevant documents without title or text left out",
            f"wrote {out}",
        ],
    )
    return counts


def run_from_beir(config_file: str | None, overrides: list[str]) -> dict[str, int]:
    return from_beir(load_config(FromBeirConfig, config_file, overrides))


# ----------------------------------------------------------------------------------------------------------------
# data get


@dataclass
class GetConfig:
    POSITIONAL: ClassVar[tuple[str, ...]] = ("name",)  # `data get NAME`

    name: str | None = option(None, "BEIR dataset name (scifact, nfcorpus, fiqa, ...); the first argument")
    out: str = option("data", "folder to unpack into; the dataset lands in OUT/NAME")
    url: str = option(BEIR_URL, "where the zip is; {name} is replaced by the dataset name")
    timeout: float = option(60.0, "seconds without an answer before giving up", range=">0")


def _safe_extract(zip_path: Path, dest: Path) -> None:
    """Unpack ``zip_path`` into ``dest``, refusing members that would land outside it."""
    root = dest.resolve()
    with zipfile.ZipFile(zip_path) as zf:
        for member in zf.namelist():
            target = (dest / member).resolve()
            if not target.is_relative_to(root):
                raise UserError(f"{zip_path}: unsafe path in the archive: {member!r}")
        zf.extractall(dest)


def _download(url: str, dest: Path, timeout: float) -> None:
    with request.urlopen(url, timeout=timeout) as resp, dest.open("wb") as f:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))


def get(cfg: GetConfig) -> Path:
    """Download and unpack BEIR dataset ``cfg.name`` into ``cfg.out``; return its folder."""
    if not cfg.name:
        raise UserError("data get: give a dataset name: rir-finetune data get NAME --out DIR")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", cfg.name):
        raise UserError(f"data get: {cfg.name!r} is not a dataset name (letters, digits, '-', '_', '.')")
    out = Path(cfg.out)
    target = out / cfg.name
    if target.is_dir() and any(target.rglob("corpus.jsonl")):
        report("data get", [f"{target} is already there (corpus.jsonl found); nothing downloaded"])
        return target
    # never replace what is there: the user's files are not ours to delete
    files.check_output_dir(out, key="out")
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise UserError(
            f"config key 'out': {target} already exists and is not a BEIR dataset (no corpus.jsonl); "
            "move it away or choose another --out"
        )
    zip_path = out / f"{cfg.name}.zip"
    if zip_path.exists():
        raise UserError(f"{zip_path} already exists; delete or move it, then retry")
    url = cfg.url.format(name=cfg.name)
    manual = (
        f"without network: download {url} on a machine that has it, then unzip it into {out}/ "
        f"(giving {target}/corpus.jsonl, queries.jsonl, qrels/)"
    )
    created_out = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        _get_into(cfg, url, manual, out, target, zip_path)
    except BaseException:
        if created_out and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a refused or interrupted download leaves no folder behind
        raise
    return target


def _get_into(cfg: GetConfig, url: str, manual: str, out: Path, target: Path, zip_path: Path) -> None:
    tmp = partial_path(zip_path)
    start = time.time()
    try:
        _download(url, tmp, cfg.timeout)
    except urlerror.HTTPError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"cannot download {cfg.name!r} from {url}: HTTP {e.code} {e.reason}; {manual}"
        ) from None
    except (urlerror.URLError, OSError, ValueError) as e:  # no route, DNS, timeout, refused, bad URL
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise UserError(f"cannot download {cfg.name!r} from {url}: {reason}; {manual}") from None
    except BaseException:  # interrupted: no half-downloaded file left behind
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(zip_path)
    try:
        with tempfile.TemporaryDirectory(dir=out, prefix=f".{cfg.name}-") as unpack:
            try:
                _safe_extract(zip_path, Path(unpack))
            except zipfile.BadZipFile:
                raise UserError(f"{zip_path}: not a zip archive (the download is damaged); retry") from None
            entries = list(Path(unpack).iterdir())
            top = (
                entries[0] if len(entries) == 1 and entries[0].is_dir() else Path(unpack)
            )  # BEIR zips hold NAME/
            if not any(top.rglob("corpus.jsonl")):
                raise UserError(f"{url}: no corpus.jsonl inside the archive; not a BEIR dataset")
            made_target = not target.exists()
            target.mkdir(exist_ok=True)  # absent or empty (checked above)
            try:
                for child in top.iterdir():
                    shutil.move(str(child), target / child.name)
            except BaseException:
                if made_target:
                    shutil.rmtree(target, ignore_errors=True)  # ours: created a moment ago
                raise
    finally:
        zip_path.unlink(missing_ok=True)  # ours: downloaded by this run
    report("data get", [f"{cfg.name} from {url} into {target} ({time.time() - start:.1f} s)"])


def run_get(config_file: str | None, overrides: list[str]) -> Path:
    return get(load_config(GetConfig, config_file, overrides))


# ----------------------------------------------------------------------------------------------------------------
# A corpus to write queries for (generate)


def read_corpus(path: str | Path) -> tuple[list[str], list[str], Path]:
    """Doc ids, passage texts (``(title + " " + text).strip()``) and the file they came from.

    ``path`` is a BEIR folder (its ``corpus.jsonl``) or a JSONL file itself; both are read the same way.
    """
    path = Path(path)
    if path.is_dir():
        ids, texts = load_corpus(path)
        return ids, texts, path / "corpus.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: corpus not found (a BEIR folder with corpus.jsonl, or a JSONL file)")
    ids, texts = _corpus_file(path)
    return ids, texts, path


def sample_passages(texts: list[str], num_passages: int | None, seed: int) -> list[int]:
    """Corpus rows to generate for, in corpus order: ``num_passages`` drawn with ``seed``, or all (non-empty)."""
    rows = [i for i, t in enumerate(texts) if t.strip()]
    if num_passages is None or num_passages >= len(rows):
        return rows
    return sorted(random.Random(seed).sample(rows, num_passages))
