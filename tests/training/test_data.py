"""Training data: validation with file:line errors, deterministic groups, fillers, instructions, batching."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import make_records, write_jsonl
from rir_finetune.errors import UserError
from rir_finetune.training.arguments import DataArguments
from rir_finetune.training.data import TrainDataset, load_train_data
from rir_finetune.training.sampler import GroupedBatchSampler


def _data_args(paths, **kw):
    return DataArguments(train_data=[str(p) for p in paths], **kw)


def _load(paths, needs_answer=False, **kw):
    return load_train_data(_data_args(paths, **kw), needs_answer=needs_answer, seed=42)


GOOD = {
    "query": "q",
    "pos": ["p"],
    "neg": ["n1", "n2"],
    "answer": "a",
    "pos_scores": [1.0],
    "neg_scores": [0.5, 0.2],
}


@pytest.mark.parametrize(
    "bad_line, kw, message",
    [
        ("{not json", {}, "invalid JSON"),
        (json.dumps({"pos": ["p"]}), {}, "missing or empty 'query'"),
        (json.dumps({"query": "q"}), {}, "'pos' must be a non-empty list"),
        (json.dumps({"query": "q", "pos": []}), {}, "'pos' must be a non-empty list"),
        (json.dumps({"query": "q", "pos": "p"}), {}, "'pos' must be a non-empty list"),
        (json.dumps({"query": "q", "pos": ["p"], "neg": [1]}), {}, "'neg' must be a list of strings"),
        (json.dumps({"query": 3, "pos": ["p"]}), {}, "missing or empty 'query'"),
        (json.dumps({"query": "q", "pos": ["p"]}), {"needs_answer": True}, "missing 'answer'"),
        (
            json.dumps({**GOOD, "pos_scores": [1.0, 2.0]}),
            {"knowledge_distillation": True},
            "'pos_scores' has 2 values but 'pos' has 1",
        ),
        (
            json.dumps({**GOOD, "neg_scores": [0.1]}),
            {"knowledge_distillation": True},
            "'neg_scores' has 1 values but 'neg' has 2",
        ),
        (
            json.dumps({k: v for k, v in GOOD.items() if k != "pos_scores"}),
            {"knowledge_distillation": True},
            "'pos_scores' must be a list of numbers",
        ),
        (
            json.dumps({**GOOD, "neg_scores": ["x", 1]}),
            {"knowledge_distillation": True},
            "'neg_scores' must be a list of numbers",
        ),
        (
            '{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [NaN], "neg_scores": [1]}',
            {"knowledge_distillation": True},
            "NaN or infinite",
        ),
        (
            '{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1], "neg_scores": [Infinity]}',
            {"knowledge_distillation": True},
            "NaN or infinite",
        ),
        ("[1, 2]", {}, "expected a JSON object"),
    ],
)
def test_bad_record_names_file_and_line_7(tmp_path, bad_line, kw, message):
    lines = [json.dumps(GOOD)] * 6 + [bad_line] + [json.dumps(GOOD)] * 2
    f = write_jsonl(tmp_path / "train.jsonl", lines)
    needs_answer = kw.pop("needs_answer", False)
    with pytest.raises(UserError) as e:
        _load([f], needs_answer=needs_answer, **kw)
    assert str(e.value).startswith(f"{f}:7: ")
    assert message in str(e.value)


def test_empty_file_and_empty_directory(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="empty.jsonl: no records"):
        _load([empty])
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="holds no data files"):
        _load([d])
    with pytest.raises(UserError, match="no such file or directory"):
        _load([tmp_path / "missing.jsonl"])


def test_directory_and_files_mix(tmp_path):
    write_jsonl(tmp_path / "d" / "a.jsonl", make_records(3))
    write_jsonl(tmp_path / "d" / "b.jsonl", make_records(2))
    f = write_jsonl(tmp_path / "c.jsonl", make_records(4))
    data = _load([tmp_path / "d", f])
    assert len(data.dataset) == 9 and len(data.files) == 3


def _dataset(tmp_path, records, group_size=4, **kw):
    f = write_jsonl(tmp_path / "t.jsonl", records)
    args = _data_args([f], train_group_size=group_size, **kw)
    data = load_train_data(args, needs_answer=False, seed=1)
    return TrainDataset(data, args, seed=1, uses_answers=False), data


def test_sampling_is_deterministic_per_seed_epoch_record(tmp_path):
    ds, _ = _dataset(tmp_path, make_records(6, n_neg=10))
    assert ds[(3, 0)] == ds[(3, 0)]
    epochs = [tuple(ds[(3, e)]["passages"]) for e in range(6)]
    assert len(set(epochs)) > 1  # a new draw each epoch
    ds2, _ = _dataset(tmp_path, make_records(6, n_neg=10))
    assert ds2[(3, 2)] == ds[(3, 2)]  # a new process draws the same


def test_group_shape_positive_first_no_duplicates(tmp_path):
    recs = make_records(6, n_neg=10)
    ds, _ = _dataset(tmp_path, recs, group_size=5)
    item = ds[(2, 0)]
    assert len(item["passages"]) == 5 and item["passages"][0] in recs[2]["pos"]
    assert len(set(item["passages"])) == 5
    assert all(p in recs[2]["neg"] for p in item["passages"][1:])


def test_few_or_no_negatives_are_filled_without_duplicates(tmp_path):
    recs = make_records(8, n_neg=3)
    recs[0]["neg"] = []
    recs[1]["neg"] = recs[1]["neg"][:1]
    ds, data = _dataset(tmp_path, recs, group_size=4)
    assert data.short_records == 2
    for idx in (0, 1):
        item = ds[(idx, 0)]
        assert len(item["passages"]) == 4 and len(set(item["passages"])) == 4
        assert not set(item["passages"][1:]) & set(recs[idx]["pos"])
    assert set(recs[1]["neg"]) <= set(ds[(1, 0)]["passages"])


def test_teacher_scores_follow_passages_and_fillers_score_below_them(tmp_path):
    recs = make_records(6, n_neg=2, scores=True)
    recs[0]["neg_scores"] = [3.0, 1.0]
    recs[0]["pos_scores"] = [4.0]
    ds, _ = _dataset(tmp_path, recs, group_size=4, knowledge_distillation=True)
    ds.pos_score_shrink = 0.2
    item = ds[(0, 0)]
    by_text = dict(zip(recs[0]["neg"], recs[0]["neg_scores"], strict=True))
    # positive above every negative: 4 + (3 - 4) * 0.2 = 3.8 (upstream's shrink)
    assert item["teacher_scores"][0] == pytest.approx(3.8)
    assert item["teacher_scores"][1:3] == [by_text[p] for p in item["passages"][1:3]]
    assert item["teacher_scores"][3] == 1.0 - (4.0 - 1.0)  # filler: lowest - range, below every real passage


def test_fillers_of_a_record_without_negatives_score_below_its_positive(tmp_path):
    """No negatives: the record's only score is the positive's, so a filler gets 5 - 1 = 4 (the range is 0)."""
    recs = make_records(6, n_neg=2, scores=True)
    recs[0]["neg"], recs[0]["neg_scores"], recs[0]["pos_scores"] = [], [], [5.0]
    ds, _ = _dataset(tmp_path, recs, group_size=3, knowledge_distillation=True)
    assert ds[(0, 0)]["teacher_scores"] == [5.0, 4.0, 4.0]


def test_instructions_none_adds_nothing_prompt_overrides(tmp_path):
    recs = make_records(3)
    recs[1]["prompt"] = "P: "
    ds, _ = _dataset(tmp_path, recs, group_size=2)
    assert ds[(0, 0)]["query"] == recs[0]["query"]
    assert "None" not in ds[(0, 0)]["query"]
    ds2, _ = _dataset(tmp_path, recs, group_size=2, query_instruction_for_retrieval="Q: ",
                      passage_instruction_for_retrieval="D: ")  # fmt: skip
    assert ds2[(0, 0)]["query"] == "Q: " + recs[0]["query"]
    assert ds2[(1, 0)]["query"] == "P: " + recs[1]["query"]
    assert all(p.startswith("D: ") for p in ds2[(0, 0)]["passages"])


def test_no_in_batch_neg_naming_convention(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", make_records(4))
    write_jsonl(tmp_path / "b_no_in_batch_neg.jsonl", make_records(4))
    data = _load([tmp_path / "a.jsonl", tmp_path / "b_no_in_batch_neg.jsonl"])
    assert data.no_in_batch_neg == [False, True]
    # the flagged file forms its own batch group even without same_dataset_within_batch
    assert sorted(map(sorted, data.batch_groups)) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_same_dataset_batches_and_sampler_determinism(tmp_path):
    for name, n in (("a", 10), ("b", 7), ("c", 5)):
        write_jsonl(tmp_path / f"{name}.jsonl", make_records(n))
    data = _load([tmp_path / f"{x}.jsonl" for x in "abc"], same_dataset_within_batch=True)
    ids = data.dataset["dataset_id"]
    s = GroupedBatchSampler(data.batch_groups, per_device_batch_size=3, seed=7)
    batches = list(s)
    assert len(batches) == len(s)
    for b in batches:
        assert len({ids[i] for i, _ in b}) == 1
    assert sorted(i for b in batches for i, _ in b) == list(range(22))  # every record once per epoch
    s.set_epoch(1)
    assert list(s) != batches and all(e == 1 for b in list(s) for _, e in b)
    s.set_epoch(0)
    assert list(s) == batches


def test_sampler_shards_global_batches_across_ranks():
    groups = [list(range(10))]
    full = GroupedBatchSampler(groups, 4, seed=3)
    r0 = list(GroupedBatchSampler(groups, 2, seed=3, world_size=2, rank=0, drop_last=True))
    r1 = list(GroupedBatchSampler(groups, 2, seed=3, world_size=2, rank=1, drop_last=True))
    one = list(full)
    assert len(r0) == len(r1) == 2  # 10 records, global batch 4, last partial dropped
    for k in range(2):
        assert [i for i, _ in r0[k] + r1[k]] == [i for i, _ in one[k]]
    # without drop_last the partial batch (2 records) is split evenly over the ranks
    r0k = list(GroupedBatchSampler(groups, 2, seed=3, world_size=2, rank=0))
    assert len(r0k) == 3 and len(r0k[-1]) == 1


def test_small_datasets_merged_and_dropped(tmp_path):
    write_jsonl(tmp_path / "d" / "big.jsonl", make_records(10))
    write_jsonl(tmp_path / "d" / "s1.jsonl", make_records(2))
    write_jsonl(tmp_path / "d" / "s2.jsonl", make_records(3))
    data = _load([tmp_path / "d"], same_dataset_within_batch=True, small_threshold=5)
    assert Counter(data.dataset["dataset_id"]) == {0: 10, 1: 5}
    data = _load([tmp_path / "d"], same_dataset_within_batch=True, small_threshold=5, drop_threshold=6)
    assert Counter(data.dataset["dataset_id"]) == {0: 10}


def test_answers_get_the_inference_prefix(tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", make_records(3))
    args = _data_args([f], train_group_size=2, query_instruction_for_retrieval="Q: ")
    ds = TrainDataset(load_train_data(args, needs_answer=True, seed=1), args, seed=1, uses_answers=True)
    rec = make_records(3)[0]
    assert ds[(0, 0)]["answer"] == "Q: Generate the topic about this passage: " + rec["answer"]
    args.answer_prefix = ""
    assert ds[(0, 0)]["answer"] == "Q: " + rec["answer"]


def test_upstream_prefixed_answers_are_not_prefixed_again(tmp_path):
    """Upstream's files hold "Generate the topic about this passage: " + answer; the default prefix is not doubled."""
    plain = make_records(3)
    upstream = [{**r, "answer": "Generate the topic about this passage: " + r["answer"]} for r in plain]
    items = []
    for name, recs in (("plain", plain), ("upstream", upstream)):
        f = write_jsonl(tmp_path / f"{name}.jsonl", recs)
        args = _data_args([f], train_group_size=2)
        ds = TrainDataset(load_train_data(args, needs_answer=True, seed=1), args, seed=1, uses_answers=True)
        items.append(ds[(0, 0)]["answer"])
    assert items[0] == items[1] == "Generate the topic about this passage: " + plain[0]["answer"]


def test_eval_encodes_upstream_prefixed_answers_as_training_does():
    """`eval --mode answer`: the answer string handed to the passage encoder is the one training encodes."""
    from rir_finetune.evaluation.answers import query_side_reps

    seen = []

    def encode(texts):
        seen.extend(texts)
        return [[0.0]] * len(texts)

    answers = {"1": "Generate the topic about this passage: cells grow", "2": "cells grow"}
    query_side_reps(["1", "2"], ["q1", "q2"], encode, encode, mode="answer", answers=answers)
    assert seen == ["Generate the topic about this passage: cells grow"] * 2


def test_prompt_is_the_prefix_training_puts_before_every_text(tmp_path):
    """DataArguments.prompt feeds the saved sentence-transformers prompts and the in-training evaluator."""
    recs = make_records(3)
    ds, _ = _dataset(tmp_path, recs, group_size=2, query_instruction_for_retrieval="find",
                     query_instruction_format="<instruct>{}\n<query>{}", passage_instruction_for_retrieval="D",
                     passage_instruction_format="{}: {}")  # fmt: skip
    assert ds.args.prompt("query") == "<instruct>find\n<query>"
    assert ds.args.prompt("passage") == "D: "
    item = ds[(0, 0)]
    assert item["query"] == ds.args.prompt("query") + recs[0]["query"]
    assert all(p.startswith("D: ") for p in item["passages"])
    assert _data_args([]).prompt("query") is None  # no instruction: no prompt


def test_answer_inbatch_candidates_are_drawn_without_replacement(tmp_path):
    recs = make_records(4)
    for i, r in enumerate(recs):
        r["neg_answer"] = [f"cells w{i} grow {k}" for k in range(3)] + [
            r["answer"]
        ]  # the answer itself: skipped
    f = write_jsonl(tmp_path / "t.jsonl", recs)
    args = _data_args([f], train_group_size=4, answer_inbatch=True)
    ds = TrainDataset(load_train_data(args, needs_answer=True, seed=1), args, seed=1, uses_answers=True)
    for e in range(5):
        cands = ds[(0, e)]["answer_candidates"]
        assert cands[0] == ds[(0, e)]["answer"]
        assert sorted(cands[1:]) == sorted(recs[0]["neg_answer"][:3])  # all 3 distinct ones, no repeat


def test_answer_inbatch_with_too_few_distinct_neg_answers_is_refused(tmp_path):
    recs = make_records(4)
    for r in recs:
        r["neg_answer"] = ["a passage", "another passage", "another passage"]
    f = write_jsonl(tmp_path / "t.jsonl", recs)
    with pytest.raises(UserError, match=r"t.jsonl:1: 'neg_answer' has 2 distinct passages but answer_inbatch draws "
                                        r"train_group_size - 1 = 3 without replacement"):  # fmt: skip
        load_train_data(_data_args([f], train_group_size=4, answer_inbatch=True), needs_answer=True, seed=1)
