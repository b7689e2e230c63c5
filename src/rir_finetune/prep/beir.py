"""``rir-finetune data from-beir`` and ``data get``: training records from BEIR-layout data.

    rir-finetune data get scifact --out data
    rir-finetune data from-beir data/scifact --split train --out train.jsonl

A record is ``{"query", "pos": [texts], "qid", "pos_ids"}``: a query with every document judged relevant
(qrels score >= ``min_relevance``, BEIR: > 0), each written as ``(title + " " + text).strip()``.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib import error as urlerror
from urllib import request

from tqdm import tqdm

from rir_finetune.errors import UserError, located
from rir_finetune.prep.common import load_config, report
from rir_finetune.prep.io import atomic_jsonl, check_output_path, dump_line, partial_path

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"


# ----------------------------------------------------------------------------------------------------------------
# Reading BEIR files


def doc_text(doc: dict) -> str:
    """The passage text of a BEIR document: ``(title + " " + text).strip()``."""
    return f"{doc.get('title') or ''} {doc.get('text') or ''}".strip()


def _read_beir_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"{path}: not found (BEIR layout: corpus.jsonl, queries.jsonl, qrels/<split>.tsv)")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise located(path, line_no, f"invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(row, dict) or "_id" not in row:
                raise located(path, line_no, "expected a JSON object with an '_id' field")
            rows.append(row)
    return rows


def load_corpus(data_dir: str | Path) -> dict[str, str]:
    """``{doc_id: passage text}`` from ``corpus.jsonl``, in file order."""
    return {str(d["_id"]): doc_text(d) for d in _read_beir_jsonl(Path(data_dir) / "corpus.jsonl")}


def load_queries(data_dir: str | Path) -> dict[str, str]:
    """``{query_id: text}`` from ``queries.jsonl``, in file order."""
    return {str(q["_id"]): str(q.get("text") or "") for q in _read_beir_jsonl(Path(data_dir) / "queries.jsonl")}


def load_qrels(data_dir: str | Path, split: str) -> dict[str, dict[str, int]]:
    """``{query_id: {doc_id: relevance}}`` from ``qrels/<split>.tsv`` (header line, tab-separated)."""
    path = Path(data_dir) / "qrels" / f"{split}.tsv"
    if not path.is_file():
        have = sorted(p.stem for p in (Path(data_dir) / "qrels").glob("*.tsv"))
        hint = f"; splits here: {', '.join(have)}" if have else ""
        raise UserError(f"{path}: not found{hint}")
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            parts = line.rstrip("\n").split("\t")
            if not line.strip() or (line_no == 1 and parts[0] == "query-id"):
                continue
            if len(parts) != 3:
                raise located(path, line_no, "expected 3 tab-separated columns: query-id, corpus-id, score")
            try:
                score = int(float(parts[2]))
            except ValueError:
                raise located(path, line_no, f"score {parts[2]!r} is not a number") from None
            qrels.setdefault(parts[0], {})[parts[1]] = score
    return qrels


# ----------------------------------------------------------------------------------------------------------------
# data from-beir


@dataclass
class FromBeirConfig:
    data_dir: str | None = None  # BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv); the first argument
    split: str = "train"  # which qrels/<split>.tsv gives the positives
    out: str | None = None  # JSONL file to write
    min_relevance: int = 1  # a qrels score at least this counts as a positive (BEIR: relevance > 0)


def from_beir(cfg: FromBeirConfig) -> dict[str, int]:
    """Write one record per query with at least one judged positive; return the counts."""
    if not cfg.data_dir:
        raise UserError("data from-beir: give the BEIR folder: rir-finetune data from-beir DATA_DIR --out FILE")
    data_dir = Path(cfg.data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: not a folder (BEIR layout: corpus.jsonl, queries.jsonl, qrels/)")
    out = check_output_path(data_dir / "queries.jsonl", cfg.out, key="out")
    if out.resolve() in {(data_dir / n).resolve() for n in ("corpus.jsonl", "queries.jsonl")}:
        raise UserError(f"{out}: the output would overwrite the BEIR data; write to another path")
    qrels = load_qrels(data_dir, cfg.split)
    queries = load_queries(data_dir)
    corpus = load_corpus(data_dir)
    counts = {"records": 0, "positives": 0, "no_positive": 0, "query_missing": 0, "doc_missing": 0}
    with atomic_jsonl(out) as f:
        # queries.jsonl order, then any qrels query it lacks (counted as missing)
        order = [q for q in queries if q in qrels] + [q for q in qrels if q not in queries]
        for qid in tqdm(order, desc="from-beir", unit="query"):
            if qid not in queries:
                counts["query_missing"] += 1
                continue
            judged = [d for d, rel in qrels[qid].items() if rel >= cfg.min_relevance]
            present = [d for d in judged if d in corpus]
            counts["doc_missing"] += len(judged) - len(present)
            if not present:
                counts["no_positive"] += 1
                continue
            record = {"query": queries[qid], "pos": [corpus[d] for d in present], "qid": qid, "pos_ids": present}
            f.write(dump_line(record))
            counts["records"] += 1
            counts["positives"] += len(present)
    report(
        "data from-beir",
        [
            f"{counts['records']} records ({counts['positives']} positives) from {data_dir} split {cfg.split!r}",
            f"{counts['no_positive']} judged queries without a positive in the corpus skipped",
            f"{counts['query_missing']} qrels queries missing from queries.jsonl skipped",
            f"{counts['doc_missing']} judged documents missing from corpus.jsonl",
            f"wrote {out}",
        ],
    )
    return counts


def run_from_beir(config_file: str | None, overrides: list[str]) -> dict[str, int]:
    return from_beir(load_config(FromBeirConfig, config_file, overrides, positional=("data_dir",)))


# ----------------------------------------------------------------------------------------------------------------
# data get


@dataclass
class GetConfig:
    name: str | None = None  # BEIR dataset name (scifact, nfcorpus, fiqa, ...); the first argument
    out: str = "data"  # folder to unpack into; the dataset lands in OUT/NAME
    url: str = BEIR_URL  # where the zip is; {name} is replaced by the dataset name
    timeout: float = 60.0  # seconds without an answer before giving up


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
    url = cfg.url.format(name=cfg.name)
    manual = (
        f"without network: download {url} on a machine that has it, then unzip it into {out}/ "
        f"(giving {target}/corpus.jsonl, queries.jsonl, qrels/)"
    )
    out.mkdir(parents=True, exist_ok=True)
    zip_path = out / f"{cfg.name}.zip"
    tmp = partial_path(zip_path)
    start = time.time()
    try:
        _download(url, tmp, cfg.timeout)
    except urlerror.HTTPError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot download {cfg.name!r} from {url}: HTTP {e.code} {e.reason}; {manual}") from None
    except (urlerror.URLError, OSError, ValueError) as e:  # no route, DNS, timeout, refused, bad URL
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise UserError(f"cannot download {cfg.name!r} from {url}: {reason}; {manual}") from None
    tmp.replace(zip_path)
    with tempfile.TemporaryDirectory(dir=out, prefix=f".{cfg.name}-") as unpack:
        try:
            _safe_extract(zip_path, Path(unpack))
        except zipfile.BadZipFile:
            raise UserError(f"{zip_path}: not a zip archive (the download is damaged); delete it and retry") from None
        entries = list(Path(unpack).iterdir())
        top = entries[0] if len(entries) == 1 and entries[0].is_dir() else Path(unpack)  # BEIR zips hold NAME/
        if not any(top.rglob("corpus.jsonl")):
            raise UserError(f"{zip_path}: no corpus.jsonl inside; not a BEIR dataset")
        if target.exists():
            shutil.rmtree(target)
        target.mkdir()
        for child in top.iterdir():
            shutil.move(str(child), target / child.name)
    zip_path.unlink()
    report("data get", [f"{cfg.name} from {url} into {target} ({time.time() - start:.1f} s)"])
    return target


def run_get(config_file: str | None, overrides: list[str]) -> Path:
    return get(load_config(GetConfig, config_file, overrides, positional=("name",)))
