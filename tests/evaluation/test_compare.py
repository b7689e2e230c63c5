"""``rir-finetune compare``: eval's per_query.json (its mean is metrics.json), the paired statistics against
independent computations, the CLI end to end on real eval outputs, grouped seeds, one-line errors."""

from __future__ import annotations

import itertools
import json
import statistics
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from conftest import WORDS, build_tiny_bert
from eval_fixtures import write_beir
from rir_finetune.cli import main
from rir_finetune.evaluation.compare import run_compare

TOPICS = WORDS[10:22]


@pytest.fixture(scope="module")
def eval_runs(tmp_path_factory, tiny_bert_dir) -> tuple[Path, Path]:
    """The real `eval` of two tiny random BERTs on a BEIR folder of 12 documents and 8 judged queries."""
    root = tmp_path_factory.mktemp("compare_eval")
    corpus = {f"d{i}": (t, f"{t} w{i} " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(6)))
              for i, t in enumerate(TOPICS)}  # fmt: skip
    queries = {f"q{i}": f"{t} effect w{i}" for i, t in enumerate(TOPICS[:8])}
    data = write_beir(root / "beir", corpus, queries, [(f"q{i}", f"d{i}", 1) for i in range(8)])
    other = build_tiny_bert(root / "other_bert", seed=1)
    for name, model in (("a", tiny_bert_dir), ("b", other)):
        main(["eval", "--model", str(model), "--data", str(data), "--output_dir", str(root / name),
              "--use_cache", "false", "--show_progress", "false"])  # fmt: skip
    return root / "a", root / "b"


def write_run(folder: Path, values: dict[str, float], metric: str = "ndcg@10") -> str:
    """An eval output folder by hand: per_query.json with one metric (and recall@100 = 1)."""
    folder.mkdir(parents=True)
    per_query = {qid: {metric: v, "recall@100": 1.0} for qid, v in values.items()}
    (folder / "per_query.json").write_text(json.dumps(per_query))
    return str(folder)


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_per_query_json_covers_every_judged_query_and_its_mean_is_metrics_json(eval_runs):
    for folder in eval_runs:
        per_query, metrics = read(folder / "per_query.json"), read(folder / "metrics.json")
        assert sorted(per_query) == [f"q{i}" for i in range(8)]
        assert all(list(v) == list(metrics) for v in per_query.values())
        # the same sum in the same order as metrics.json's: equal to the last bit
        assert {m: sum(v[m] for v in per_query.values()) / 8 for m in metrics} == metrics


def test_cli_end_to_end(eval_runs, tmp_path, capsys):
    a, b = eval_runs
    capsys.readouterr()
    main(["compare", str(a), str(b), "--output_dir", str(tmp_path / "cmp")])
    out = capsys.readouterr().out
    result = read(tmp_path / "cmp" / "compare.json")
    pa, pb = read(a / "per_query.json"), read(b / "per_query.json")
    assert out.startswith("8 queries paired") and result["paired_queries"] == 8
    assert [(c["group"], c["metric"]) for c in result["comparisons"]] == [
        ("b", "ndcg@10"),
        ("b", "recall@100"),
    ]
    for c in result["comparisons"]:
        d = {q: pb[q][c["metric"]] - pa[q][c["metric"]] for q in pa}
        assert c["differences"] == d
        assert c["mean_difference"] == pytest.approx(sum(d.values()) / 8, abs=1e-15)
        assert (c["wins"], c["ties"], c["losses"]) == (sum(x > 0 for x in d.values()),
                                                       sum(x == 0 for x in d.values()), sum(x < 0 for x in d.values()))  # fmt: skip
        assert c["interval"][0] <= c["mean_difference"] <= c["interval"][1] and 0 < c["p_value"] <= 1
        mean, lo, hi = (f"{x:+.4f}" for x in (c["mean_difference"], *c["interval"]))
        assert f"| b | {c['metric']} | {mean} | [{lo}, {hi}] |" in out
    assert [g["mean"]["ndcg@10"] for g in result["groups"]] == [
        pytest.approx(read(f / "metrics.json")["ndcg@10"], abs=1e-15) for f in (a, b)
    ]
    assert out in (tmp_path / "cmp" / "compare.md").read_text()
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_against_itself(eval_runs, tmp_path, monkeypatch, capsys):
    """Every difference is 0: mean 0, interval [0, 0], p = 1 (exactly, enumerated or sampled); no file written."""
    monkeypatch.chdir(tmp_path)
    a = str(eval_runs[0])
    for flips, exact in (("10000", True), ("100", False)):  # 2^8 = 256 sign vectors: enumerated, then sampled
        result = run_compare(None, [f"x={a}", f"y={a}", "--sign_flips", flips])
        for c in result["comparisons"]:
            assert (c["mean_difference"], c["interval"], c["p_value"]) == (0.0, [0.0, 0.0], 1.0)
            assert (c["exact_p"], c["ties"], c["verdict"]) == (exact, 8, "no significant difference")
    assert "significant gain" not in capsys.readouterr().out and list(tmp_path.iterdir()) == []


def test_statistics_equal_an_independent_computation(tmp_path):
    """8 queries whose scores are multiples of 1/256, so every mean of 8 differences is a multiple of 1/2048: exact
    in floating point whatever the order of summation, and the test recomputes each from integers. The bootstrap
    draws the same indices (``default_rng(seed).integers(0, 8, (R, 8))``) and takes numpy's percentiles of the
    same exact means, so the interval is equal to the last bit; R = 1000 makes it move with the seed. The sign-flip
    p-value is the exact one over all 2^8 sign vectors (256 <= sign_flips), counted with integers as a Fraction;
    with 100 sign flips, the same generator's vectors and (1 + count) / 101."""
    base = [128, 144, 64, 32, 112, 48, 96, 80]
    num = np.array([37, 11, 23, 58, 0, 45, -13, 29])  # differences in 1/256
    runs = [write_run(tmp_path / name, {f"q{i}": (b + s * x) / 256 for i, (b, x) in enumerate(zip(base, num, strict=True))})
            for name, s in (("base", 0), ("new", 1))]  # fmt: skip
    common = [*runs, "--metrics", "ndcg@10", "--seed", "5", "--bootstrap_resamples", "1000"]
    (c,) = run_compare(None, common)["comparisons"]
    rng = np.random.default_rng(5)
    means = num[rng.integers(0, 8, size=(1000, 8))].sum(axis=1) / 2048
    lo, hi = np.percentile(means, [2.5, 97.5])
    count = sum(abs(sum(s * x for s, x in zip(signs, num, strict=True))) >= abs(num.sum())
                for signs in itertools.product((-1, 1), repeat=8))  # fmt: skip
    assert c["mean_difference"] == 190 / 2048 and c["interval"] == [lo, hi] and lo > 0
    assert c["p_value"] == float(Fraction(int(count), 256)) and c["exact_p"]
    assert (c["wins"], c["ties"], c["losses"], c["verdict"]) == (6, 1, 1, "significant gain")

    (c,) = run_compare(None, [*common, "--sign_flips", "100"])["comparisons"]
    signs = np.random.default_rng(5).integers(0, 2, size=(100, 8)) * 2 - 1
    assert c["p_value"] == (1 + int((np.abs(signs @ num) >= abs(num.sum())).sum())) / 101 and not c["exact_p"]


def test_an_interval_containing_zero_is_never_a_gain(tmp_path, capsys):
    runs = [write_run(tmp_path / name, {f"q{i}": (8 + s * (4 if i % 2 else -3)) / 16 for i in range(8)})
            for name, s in (("base", 0), ("new", 1))]  # fmt: skip
    (c, _) = run_compare(None, runs)["comparisons"]
    assert c["mean_difference"] > 0 and c["interval"][0] < 0 < c["interval"][1]
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| new | ndcg@10"))
    assert row.endswith("| no significant difference |") and "gain" not in row


def test_no_gain_from_too_few_queries_or_inside_the_seed_spread(tmp_path):
    """One query: interval [d, d] but p = 1; two: p = 1/2 (exact): neither is a gain. Seeds: every query gains
    exactly 0.02 (interval [0.02, 0.02], exact p = 2/256) while a reseed moves the reference by sd 0.05: "within seed
    spread"; the same shift of 0.0625 > 0.05 is a gain, and a single-seed pair has no spread to exceed."""
    one = [write_run(tmp_path / f"one{s}", {"q1": 0.5 + s / 8}) for s in (0, 1)]
    (c,) = run_compare(None, [*one, "--metrics", "ndcg@10"])["comparisons"]
    assert (c["interval"], c["p_value"], c["verdict"]) == ([0.125, 0.125], 1.0, "no significant difference")
    two = [write_run(tmp_path / f"two{s}", {"q1": 0.5 + s / 8, "q2": 0.25 + s / 8}) for s in (0, 1)]
    (c,) = run_compare(None, [*two, "--metrics", "ndcg@10"])["comparisons"]
    assert (c["interval"], c["p_value"], c["verdict"]) == ([0.125, 0.125], 0.5, "no significant difference")

    base = [0.5, 0.25, 0.75, 0.375, 0.625, 0.125, 0.5, 0.25]
    offsets = (-0.05, 0.0, 0.05)  # sd over seeds exactly 0.05 in both groups

    def group(name: str, shift: float) -> str:
        folders = [write_run(tmp_path / f"{name}{k}", {f"q{i}": b + o + shift for i, b in enumerate(base)})
                   for k, o in enumerate(offsets)]  # fmt: skip
        return f"{name}={','.join(folders)}"

    ref = group("ref", 0.0)
    for shift, expected in ((0.02, "within seed spread"), (0.0625, "significant gain")):
        result = run_compare(None, [ref, group(f"s{shift}", shift), "--metrics", "ndcg@10"])
        (c,) = result["comparisons"]
        assert c["seed_spread"] == pytest.approx(0.05, abs=1e-12) and c["p_value"] == 2 / 256
        assert c["interval"] == pytest.approx([shift, shift], abs=1e-12) and c["verdict"] == expected
    single = [
        write_run(tmp_path / f"single{s}", {f"q{i}": b + s * 0.02 for i, b in enumerate(base)})
        for s in (0, 1)
    ]
    (c,) = run_compare(None, [*single, "--metrics", "ndcg@10"])["comparisons"]
    assert (c["seed_spread"], c["verdict"]) == (None, "significant gain")


def test_grouped_seeds_mean_and_sd_by_hand(tmp_path, capsys):
    """Per seed the mean over the paired queries (q5 is judged in one seed only), then mean and sd over seeds;
    the group's per-query value for the test is the mean over its seeds."""
    base = write_run(tmp_path / "base", {"q1": 0.5, "q2": 0.25, "q3": 1.0, "q4": 0.0})
    seeds = [{"q1": 0.75, "q2": 0.5, "q3": 1.0, "q4": 0.25},
             {"q1": 0.5, "q2": 0.5, "q3": 0.75, "q4": 0.5, "q5": 1.0},
             {"q1": 1.0, "q2": 0.25, "q3": 1.0, "q4": 0.0}]  # fmt: skip
    folders = [write_run(tmp_path / f"s{i}", s) for i, s in enumerate(seeds)]
    result = run_compare(None, [base, f"tuned={','.join(folders)}", "--metrics", "ndcg@10"])
    out = capsys.readouterr().out
    per_seed = [
        statistics.mean(s[q] for q in ("q1", "q2", "q3", "q4")) for s in seeds
    ]  # 0.625, 0.5625, 0.5625
    group = result["groups"][1]
    assert result["paired_queries"] == 4 and out.startswith("4 queries paired")
    assert [s["values"]["ndcg@10"] for s in group["seeds"]] == per_seed
    assert group["mean"]["ndcg@10"] == pytest.approx(statistics.mean(per_seed), abs=1e-15)
    assert group["sd"]["ndcg@10"] == pytest.approx(statistics.stdev(per_seed), abs=1e-15)
    assert f"| tuned | 3 | {statistics.mean(per_seed):.4f} +- {statistics.stdev(per_seed):.4f} |" in out
    assert all(f"- tuned: `{f}` ndcg@10 {v:.4f}" in out for f, v in zip(folders, per_seed, strict=True))
    (c,) = result["comparisons"]
    hand = {"q1": 0.75 - 0.5, "q2": 1.25 / 3 - 0.25, "q3": 2.75 / 3 - 1.0, "q4": 0.25}
    assert c["differences"] == pytest.approx(hand, abs=1e-15) and (c["wins"], c["losses"]) == (3, 1)


def test_round_folders_are_base_against_trained_over_the_rounds_given(tmp_path):
    """Each round folder's last round's eval (round_2/eval over eval), base and trained grouped over the folders."""
    values = {}
    for seed, last in ((42, "eval"), (43, "round_2/eval")):
        root = tmp_path / f"round_s{seed}"
        root.mkdir()
        (root / "round.json").write_text("{}")
        for model, shift in (("base", 0.0), ("trained", 0.125)):
            for where in {"eval", last}:  # round 1's eval of the two-round folder must not be read
                v = {"q1": 0.5 + shift + (where == last) / 16, "q2": 0.25 + shift}
                write_run(root / where / model / "query", v)
            values[(model, seed)] = v
    runs = [str(tmp_path / "round_s42"), str(tmp_path / "round_s43")]
    result = run_compare(None, [*runs, "--metrics", "ndcg@10"])
    assert [(g["name"], [s["folder"] for s in g["seeds"]]) for g in result["groups"]] == [
        (m, [str(tmp_path / "round_s42" / "eval" / m / "query"), str(tmp_path / "round_s43" / "round_2" / "eval" / m / "query")])
        for m in ("base", "trained")
    ]  # fmt: skip
    (c,) = result["comparisons"]
    assert c["differences"] == pytest.approx({"q1": 0.125, "q2": 0.125}, abs=1e-15)


def _error(capsys, *args: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["compare", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_runs_on_other_data_or_splits_are_not_paired(eval_runs, tmp_path, capsys):
    """Query ids of another dataset or split overlap by chance (numeric ids): eval_config.json tells them apart."""
    import shutil

    a, b = eval_runs
    other = tmp_path / "other_split"
    shutil.copytree(b, other)
    record = read(other / "eval_config.json")
    record["arguments"]["split"] = "train"
    (other / "eval_config.json").write_text(json.dumps(record))
    err = _error(capsys, str(a), str(other))
    assert f"{other} was evaluated on beir split 'train' (12 documents), {a} on beir split 'test'" in err
    stringly = write_run(tmp_path / "stringly", {"q1": 0.5})
    (Path(stringly) / "per_query.json").write_text(json.dumps({"q1": {"ndcg@10": "0.5", "recall@100": 1.0}}))
    assert "query 'q1' has a value that is not a number" in _error(capsys, f"x={stringly}", f"y={stringly}")


def test_one_line_errors(tmp_path, capsys):
    ok = write_run(tmp_path / "ok", {"q1": 0.5})
    missing = str(tmp_path / "nope")
    assert f"'runs': {missing}: no such folder" in _error(capsys, missing, ok)
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.json").write_text("{}")
    assert "rerun `rir-finetune eval` with this version" in _error(capsys, ok, str(old))
    write_run(tmp_path / "round" / "eval" / "base" / "query", {"q1": 0.5})
    assert f"name one, e.g. {tmp_path / 'round' / 'eval' / 'base' / 'query'}" in _error(
        capsys, ok, str(tmp_path / "round" / "eval" / "base")
    )
    assert "at least two runs" in _error(capsys, ok)
    (tmp_path / "round").mkdir(exist_ok=True)
    (tmp_path / "round" / "round.json").write_text("{}")
    assert f"'runs': {ok!r} is not a round folder like" in _error(capsys, str(tmp_path / "round"), ok)
    assert f"'runs': {tmp_path / 'round' / 'eval' / 'base' / 'answer'}: no such folder" in _error(
        capsys, str(tmp_path / "round"), "--mode", "answer"
    )
    assert f"config key 'metrics': {ok}/per_query.json: no 'ndcg@7'" in _error(
        capsys, ok, f"x={ok}", "--metrics", "ndcg@7"
    )
    other = write_run(tmp_path / "other", {"q9": 0.5})
    assert "no query is judged in every run" in _error(capsys, ok, other)
    assert "two runs are named 'x'" in _error(capsys, f"x={ok}", f"x={other}")


def test_runs_encoded_in_other_float_types_are_compared_with_a_warning(eval_runs, tmp_path, capsys):
    """bf16 alone moves metrics in the third decimal: eval records what it computed in, compare says when paired runs
    differ (for folders written before eval recorded it: their dtype argument, unless auto)."""
    import shutil

    a, _ = eval_runs
    args = read(a / "eval_config.json")["arguments"]
    common = ["eval", "--model", args["model"], "--data", args["data"], "--use_cache", "false", "--show_progress",
              "false", "--device", "cpu"]  # fmt: skip
    main([*common, "--output_dir", str(tmp_path / "fp32"), "--dtype", "float32", "--pack_sequences", "false"])
    main([*common, "--output_dir", str(tmp_path / "bf16"), "--dtype", "bf16", "--pack_sequences", "true"])
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    assert read(fp32 / "eval_config.json")["computed"] == {
        "device": "cpu",
        "dtype": "float32",
        "packed": False,
    }
    assert read(bf16 / "eval_config.json")["computed"] == {
        "device": "cpu",
        "dtype": "bfloat16",
        "packed": True,
    }
    capsys.readouterr()
    main(["compare", str(fp32), str(bf16)])
    assert f"different float types ({fp32} float32, {bf16} bfloat16)" in capsys.readouterr().err
    main(["compare", f"x={fp32}", f"y={fp32}"])
    assert "float types" not in capsys.readouterr().err
    old = tmp_path / "old"  # an eval folder from before 'computed': its dtype argument says it
    shutil.copytree(bf16, old)
    record = read(old / "eval_config.json")
    del record["computed"]
    (old / "eval_config.json").write_text(json.dumps(record))
    main(["compare", str(fp32), str(old)])
    assert f"different float types ({fp32} float32, {old} bfloat16)" in capsys.readouterr().err
