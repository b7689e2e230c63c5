"""The round report's paired comparison of base and trained (from the eval stage's per_query.json files) and its
plot's styles, on a round folder written by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rir_finetune.evaluation.compare import run_compare
from rir_finetune.round.config import RoundConfig
from rir_finetune.round.plan import Stage
from rir_finetune.round.report import report_figure, report_lines, write_png

BASE = [8, 9, 4, 2, 7, 3, 6, 5]  # nDCG@10 of 8 queries, in 1/16


def write_eval(out: Path, gains: dict[str, list[int]]) -> Stage:
    """OUT/eval/<model>/<mode>/per_query.json and summary.json: base scores BASE, trained BASE + gain (in 1/16)
    per mode; recall@100 is 1 everywhere (all ties)."""
    summary = {}
    for model in ("base", "trained"):
        for mode, gain in gains.items():
            scores = [(b + (g if model == "trained" else 0)) / 16 for b, g in zip(BASE, gain, strict=True)]
            per_query = {f"q{i}": {"ndcg@10": s, "recall@10": s, "recall@100": 1.0, "mrr@10": s}
                         for i, s in enumerate(scores)}  # fmt: skip
            folder = out / "eval" / model / mode
            folder.mkdir(parents=True)
            (folder / "per_query.json").write_text(json.dumps(per_query))
            summary[f"{model}/{mode}"] = {
                m: sum(v[m] for v in per_query.values()) / 8 for m in per_query["q0"]
            }
    (out / "eval" / "summary.json").write_text(json.dumps(summary))
    return Stage("eval", "eval", out / "eval", [out / "eval" / "summary.json"], {"split": "test"}, [])


def report(out: Path, stage: Stage) -> str:
    return "\n".join(report_lines(RoundConfig(output_dir=str(out), data="data"), [stage]))


def test_paired_section_matches_compare_and_names_no_gain_without_its_interval(tmp_path):
    out = tmp_path / "round"
    stage = write_eval(out, {"query": [3, 1, 2, 5, 0, 4, -1, 2], "answer": [0] * 8,
                             "fused_dev": [4, -3, 4, -3, 4, -3, 4, -3], "fused_0.8": [9] * 8})  # fmt: skip
    text = report(out, stage)
    # query mode: a clear gain of 2 / 16 = 12.5 points; the other mode tested is fused_dev (alpha chosen on held-out
    # queries), never a point of the alpha sweep on test, however high (fused_0.8)
    expected = run_compare(None, [f"base={out}/eval/base/query", f"trained={out}/eval/trained/query"])
    c = expected["comparisons"][0]
    lo, hi = (100 * x for x in c["interval"])
    assert (f"- training changed query-mode nDCG@10 by +12.50 points (95 % interval [{lo:+.2f}, {hi:+.2f}], "
            f"p = {c['p_value']:.4f}): significant gain") in text  # fmt: skip
    assert (
        f"| query | ndcg@10 | 0.3438 | 0.4688 | +0.1250 | [{c['interval'][0]:+.4f}, {c['interval'][1]:+.4f}] |"
        in text
    )
    assert "| 6 / 1 / 1 | significant gain |" in text
    assert (
        "| query | recall@100 | 1.0000 | 1.0000 | +0.0000 | [+0.0000, +0.0000] | 1.0000 | 0 / 8 / 0 |" in text
    )
    fused = next(line for line in text.splitlines() if line.startswith("| fused_dev | ndcg@10 |"))
    assert fused.endswith("| 4 / 0 / 4 | no significant difference |") and "gain" not in fused
    assert (
        "| answer | ndcg@10 |" not in text and "| fused_0.8 | ndcg@10 |" not in text
    )  # only the tested mode
    assert not [x for x in text.splitlines() if x.startswith("- best mode") and "fused_0.8" in x]
    assert "paired over the 8 queries" in text


@pytest.mark.parametrize("drop", [False, True], ids=["tested", "no-per-query-files"])
def test_query_mode_line_never_calls_an_untested_or_insignificant_change_a_gain(tmp_path, drop):
    out = tmp_path / "round"
    stage = write_eval(out, {"query": [4, -3, 4, -3, 4, -3, 4, -3]})
    if drop:  # an eval stage of an older version
        for f in (out / "eval").glob("*/*/per_query.json"):
            f.unlink()
    line = next(x for x in report(out, stage).splitlines() if x.startswith("- training changed"))
    assert line.startswith("- training changed query-mode nDCG@10 by +3.12 points") and "gain" not in line
    assert line.endswith("not tested: no per-query results, rerun the eval stage" if drop else
                         ": no significant difference")  # fmt: skip


def test_plot_gives_each_model_a_colour_each_mode_a_style_and_keeps_the_legend_off_the_curves(tmp_path):
    summary = {f"{model}/{mode}": {"ndcg@10": v + (0.05 if model == "trained" else 0)}
               for model in ("base", "trained")
               for mode, v in (("query", 0.6), ("answer", 0.5), ("fused_0.5", 0.62), ("fused_0.8", 0.63))}  # fmt: skip
    fig = report_figure(summary)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {f"{m}, {k}" for m in ("base", "trained") for k in ("fused", "query", "answer only")}
    colours = {m: {lines[f"{m}, {k}"].get_color() for k in ("fused", "query", "answer only")} for m in ("base", "trained")}  # fmt: skip
    assert (
        len(colours["base"]) == 1 and len(colours["trained"]) == 1 and colours["base"] != colours["trained"]
    )
    styles = {k: (lines[f"base, {k}"].get_linestyle(), lines[f"base, {k}"].get_marker()) for k in ("fused", "query", "answer only")}  # fmt: skip
    assert len(set(styles.values())) == 3
    fig.canvas.draw()
    legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= axes.x1  # right of the plot area, never over a curve
    assert write_png(tmp_path / "report.png", summary) and (tmp_path / "report.png").stat().st_size > 1000
