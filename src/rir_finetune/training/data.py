"""Training data: JSONL records (SPEC section 1) -> validated ``datasets.Dataset`` -> one query group per item.

Reading validates every line before training starts; each problem is a :class:`UserError` naming file and line.
An item is drawn deterministically from (seed, epoch, record index): the same run always sees the same groups,
and a resumed run sees what an uninterrupted one would have.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from rir_finetune.errors import UserError, located
from rir_finetune.files import iter_jsonl
from rir_finetune.retrieval.data import with_answer_prefix
from rir_finetune.training.arguments import DataArguments

DATA_SUFFIXES = (".jsonl", ".json")
NO_IN_BATCH_NEG = "no_in_batch_neg"

FEATURES = datasets.Features(
    {
        "query": datasets.Value("string"),
        "pos": datasets.Sequence(datasets.Value("string")),
        "neg": datasets.Sequence(datasets.Value("string")),
        "answer": datasets.Value("string"),
        "pos_scores": datasets.Sequence(datasets.Value("float64")),
        "neg_scores": datasets.Sequence(datasets.Value("float64")),
        "prompt": datasets.Value("string"),
        "neg_answer": datasets.Sequence(datasets.Value("string")),
        "dataset_id": datasets.Value("int32"),
    }
)


# ----------------------------------------------------------------------------------------------------------------
# Finding and validating files


def resolve_files(paths: list[str]) -> list[Path]:
    """Files named directly, plus every ``*.jsonl``/``*.json`` inside named directories (sorted)."""
    if not paths:
        raise UserError("config key 'train_data': required (one or more JSONL files or directories)")
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in DATA_SUFFIXES)
            if not found:
                raise UserError(f"{p}: directory holds no data files (*.jsonl, *.json)")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p}: no such file or directory (config key 'train_data')")
    return files


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _check_scores(obj: dict, key: str, expected: int, path: Path, line: int) -> list[float]:
    v = obj.get(key)
    if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise located(path, line, f"'{key}' must be a list of numbers (knowledge_distillation is on)")
    if len(v) != expected:
        other = "pos" if key == "pos_scores" else "neg"
        raise located(path, line, f"'{key}' has {len(v)} values but '{other}' has {expected}")
    if not all(math.isfinite(x) for x in v):
        raise located(path, line, f"'{key}' holds a NaN or infinite value")
    return [float(x) for x in v]


def validate_record(
    obj: Any, path: Path, line: int, needs_answer: bool, needs_scores: bool, needs_neg_answer: int = 0
) -> dict[str, Any]:
    """Check one parsed JSON line against SPEC section 1 and return it normalised (every field present).

    ``needs_neg_answer``: how many distinct ``neg_answer`` passages (other than the answer) a record must have
    (``answer_inbatch``: train_group_size - 1, drawn without replacement); 0: the field is optional.
    """
    q = obj.get("query")
    if not isinstance(q, str) or not q.strip():
        raise located(path, line, "missing or empty 'query' (a non-empty string)")
    pos = obj.get("pos")
    if not _is_str_list(pos) or not pos:
        raise located(path, line, "'pos' must be a non-empty list of strings")
    if not all(p.strip() for p in pos):  # an empty positive teaches the model nothing but the special tokens
        raise located(path, line, "'pos' holds an empty passage")
    neg = obj.get("neg") if obj.get("neg") is not None else []
    if not _is_str_list(neg):
        raise located(path, line, "'neg' must be a list of strings")
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise located(path, line, "'answer' must be a string")
    if needs_answer and not (answer or "").strip():
        raise located(
            path, line, "missing 'answer' (the training_type uses answers; set training_type retrieval)"
        )
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise located(path, line, "'prompt' must be a string")
    neg_answer = obj.get("neg_answer") if obj.get("neg_answer") is not None else []
    if not _is_str_list(neg_answer):
        raise located(path, line, "'neg_answer' must be a list of strings")
    if needs_neg_answer and not neg_answer:
        raise located(path, line, "missing 'neg_answer' (answer_inbatch is on)")
    distinct = len(set(neg_answer) - {answer})
    if needs_neg_answer and distinct < needs_neg_answer:
        raise located(
            path, line, f"'neg_answer' has {distinct} distinct passages but answer_inbatch draws "
            f"train_group_size - 1 = {needs_neg_answer} without replacement; add neg_answer or lower train_group_size",
        )  # fmt: skip
    pos_scores = neg_scores = None
    if needs_scores:
        pos_scores = _check_scores(obj, "pos_scores", len(pos), path, line)
        neg_scores = _check_scores(obj, "neg_scores", len(neg), path, line) if neg else []
    return {
        "query": q, "pos": pos, "neg": neg, "answer": answer, "pos_scores": pos_scores,
        "neg_scores": neg_scores, "prompt": prompt, "neg_answer": neg_answer,
    }  # fmt: skip


def read_training_file(path: Path, **checks: bool) -> list[dict[str, Any]]:
    """Every record of ``path`` (read by :func:`rir_finetune.files.iter_jsonl`), validated and normalised."""
    records = [validate_record(obj, path, line_no, **checks) for line_no, obj in iter_jsonl(path)]
    if not records:
        raise UserError(f"{path}: no records (empty file)")
    return records


# ----------------------------------------------------------------------------------------------------------------
# Loading into a datasets.Dataset


@dataclass
class TrainData:
    dataset: datasets.Dataset  # every record, with a dataset_id column
    files: list[list[Path]]  # files of each dataset id
    no_in_batch_neg: list[bool]  # per dataset id: train without in-batch negatives
    batch_groups: list[list[int]]  # record indices that may share a batch
    short_records: int  # records with fewer than train_group_size - 1 negatives


def _is_no_in_batch_neg(path: Path) -> bool:
    return path.stem.endswith(NO_IN_BATCH_NEG) or path.parent.name.endswith(NO_IN_BATCH_NEG)


def load_train_data(args: DataArguments, needs_answer: bool, seed: int) -> TrainData:
    """Read, validate and group the training files of ``args.train_data``."""
    files = resolve_files(args.train_data or [])
    checks = {
        "needs_answer": needs_answer,
        "needs_scores": args.knowledge_distillation,
        "needs_neg_answer": args.train_group_size - 1 if args.answer_inbatch else 0,
    }
    per_file = []
    for i, f in enumerate(files):
        recs = read_training_file(f, **checks)
        if len(recs) > args.max_example_num_per_dataset:
            keep = sorted(
                random.Random(f"{seed}-{i}-subset").sample(range(len(recs)), args.max_example_num_per_dataset)
            )
            recs = [recs[j] for j in keep]
        per_file.append(recs)

    # dataset ids: small files of one directory are merged (upstream small_threshold / drop_threshold)
    groups: list[list[int]] = []
    small_by_dir: dict[Path, list[int]] = {}
    for i, f in enumerate(files):
        if args.small_threshold > 0 and len(per_file[i]) < args.small_threshold:
            small_by_dir.setdefault(f.parent, []).append(i)
        else:
            groups.append([i])
    for members in small_by_dir.values():
        if sum(len(per_file[i]) for i in members) >= args.drop_threshold:
            groups.append(members)
    if not groups:
        raise UserError("config key 'drop_threshold': every dataset was dropped as too small")

    rows: list[dict[str, Any]] = []
    group_files, flags, batch_groups = [], [], []
    plain: list[int] = []
    for did, members in enumerate(groups):
        start = len(rows)
        for i in members:
            for r in per_file[i]:
                rows.append({**r, "dataset_id": did})
        indices = list(range(start, len(rows)))
        group_files.append([files[i] for i in members])
        flag = any(_is_no_in_batch_neg(files[i]) for i in members)
        flags.append(flag)
        if args.same_dataset_within_batch or flag:
            batch_groups.append(indices)
        else:
            plain.extend(indices)
    if plain:
        batch_groups.insert(0, plain)
    short = sum(1 for r in rows if len(r["neg"]) < args.train_group_size - 1)
    if short:
        _check_fillable(rows, args.train_group_size)
    ds = datasets.Dataset.from_list(rows, features=FEATURES)
    return TrainData(ds, group_files, flags, batch_groups, short)


def _check_fillable(rows: list[dict[str, Any]], group_size: int) -> None:
    """Refuse before training when some record's group cannot be filled without duplicates."""
    distinct: dict[int, set[str]] = {}
    for r in rows:
        distinct.setdefault(r["dataset_id"], set()).update(r["pos"], r["neg"])
    bad = [r for r in rows if len(distinct[r["dataset_id"]]) - len(set(r["pos"])) < group_size - 1]
    if bad:
        have = min(len(distinct[r["dataset_id"]]) - len(set(r["pos"])) for r in bad)
        raise UserError(
            f"config key 'train_group_size': {len(bad)} records cannot fill a group of {group_size} without "
            f"duplicates (as few as {have} other distinct passages in their dataset); lower train_group_size"
        )


# ----------------------------------------------------------------------------------------------------------------
# One item: a query with its group of G passages


def _format(fmt: str, instruction: str | None, text: str) -> str:
    return text if instruction is None else fmt.format(instruction, text)


def _shuffle_text(text: str, ratio: float, rng: random.Random) -> str:
    """Upstream augmentation: with probability ``ratio`` a long text is cut in three and the parts shuffled."""
    if ratio > 0 and len(text) > 100 and rng.random() < ratio:
        size = len(text) // 3 + 1
        parts = [text[i : i + size] for i in range(0, len(text), size)]
        rng.shuffle(parts)
        return " ".join(parts)
    return text


def filler_score(scores: list[float]) -> float:
    """Teacher score of a filler (a random passage of another record): below every score of the record, the
    positive's included, by the record's score range or by 1 when the range is 0 (a record with only its positive).

    lowest - max(highest - lowest, 1). The record's lowest alone would be the positive's own score for a record
    without negatives, and the teacher would then call random passages as relevant as the positive.
    """
    lo, hi = min(scores), max(scores)
    return lo - max(hi - lo, 1.0)


class TrainDataset:
    """Map-style dataset; items are addressed by ``(record_index, epoch)`` pairs from the batch sampler.

    Negatives: G-1 drawn without replacement. A record with fewer negatives than G-1 (or none) is filled with
    random passages of other records of the same dataset (never one of its own positives); their teacher score
    is below all of the record's (:func:`filler_score`). No passage is duplicated within a group.
    """

    def __init__(self, data: TrainData, args: DataArguments, seed: int, uses_answers: bool):
        self.data = data
        self.ds = data.dataset
        self.args = args
        self.seed = seed
        self.uses_answers = uses_answers
        self._members: dict[int, list[int]] = {}
        for i, did in enumerate(self.ds["dataset_id"]):
            self._members.setdefault(did, []).append(i)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        idx, epoch = key
        rec = self.ds[int(idx)]
        args, g = self.args, self.args.train_group_size
        rng = random.Random(f"{self.seed}-{epoch}-{idx}")
        instr = rec["prompt"] if rec["prompt"] is not None else args.query_instruction_for_retrieval

        pos_i = rng.randrange(len(rec["pos"]))
        passages = [_shuffle_text(rec["pos"][pos_i], args.shuffle_ratio, rng)]
        neg = rec["neg"]
        take = min(g - 1, len(neg))
        neg_idx = rng.sample(range(len(neg)), take)
        passages += [neg[j] for j in neg_idx]
        fillers = self._fillers(int(idx), rec, g - 1 - take, rng, set(passages)) if take < g - 1 else []
        passages += fillers

        teacher = None
        if args.knowledge_distillation:
            pos_s, neg_s = rec["pos_scores"], rec["neg_scores"] or []
            p = pos_s[pos_i]
            if neg_s and p >= max(neg_s):
                p = p + (max(neg_s) - p) * self.pos_score_shrink
            teacher = [p] + [neg_s[j] for j in neg_idx] + [filler_score(pos_s + neg_s)] * len(fillers)

        item: dict[str, Any] = {
            "query": _format(args.query_instruction_format, instr, rec["query"]),
            "passages": [_format(args.passage_instruction_format, args.passage_instruction_for_retrieval, t)
                         for t in passages],
            "teacher_scores": teacher,
            "no_in_batch_neg": self.data.no_in_batch_neg[rec["dataset_id"]],
            "answer": None,
            "answer_candidates": None,
        }  # fmt: skip
        if self.uses_answers:
            answer = with_answer_prefix(rec["answer"], args.answer_prefix)  # upstream files hold it already
            item["answer"] = _format(args.query_instruction_format, instr, answer)
            if (
                args.answer_inbatch and g > 1
            ):  # G-1 distinct candidates, never the answer itself (checked at load)
                na = list(dict.fromkeys(x for x in rec["neg_answer"] if x != rec["answer"]))
                item["answer_candidates"] = [item["answer"]] + rng.sample(na, g - 1)
        return item

    pos_score_shrink: float = 0.2  # set by the driver from ObjectiveArguments

    def _fillers(self, idx: int, rec: dict, n: int, rng: random.Random, taken: set[str]) -> list[str]:
        members = self._members[rec["dataset_id"]]
        own_pos = set(rec["pos"])
        out: list[str] = []
        for _ in range(50 * n):
            if len(out) == n or len(members) < 2:
                break
            j = members[rng.randrange(len(members))]
            if j == idx:
                continue
            other = self.ds[j]
            pool = other["pos"] + other["neg"]
            cand = pool[rng.randrange(len(pool))]
            if cand not in own_pos and cand not in taken:
                out.append(cand)
                taken.add(cand)
        if len(out) < n:
            raise UserError(
                f"cannot fill a group of train_group_size={self.args.train_group_size} for record {idx} "
                "without duplicates: too few distinct passages in its dataset; lower train_group_size"
            )
        return out
