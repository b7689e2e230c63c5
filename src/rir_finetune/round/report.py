"""The round's report: ``OUTPUT_DIR/report.md`` and ``report.png`` from the eval summary and the stage markers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rir_finetune.errors import UserError
from rir_finetune.evaluation.compare import CompareConfig, compare, fmt_diff
from rir_finetune.files import atomic_write
from rir_finetune.round.config import RoundConfig
from rir_finetune.round.plan import Stage

METRICS = ("ndcg@10", "recall@10", "recall@100", "mrr@10")
PAIRED_METRICS = ("ndcg@10", "recall@100")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _alpha(label: str) -> float | None:
    if label == "query":
        return 1.0
    if label.startswith("fused_") and label != "fused_dev":  # fused_dev is one of the sweep's points, again
        return float(label[len("fused_") :])
    return None


def _eval_lines(cfg: RoundConfig, ev: Stage | None) -> list[str]:
    summary = _read_json(ev.outputs[0]) if ev is not None else None
    if not summary:
        return []
    split = ev.settings.get("split", cfg.eval_split)
    lines = [f"Retrieval on `{cfg.data}` split `{split}`"
             + (f" (first {cfg.max_eval_queries} judged queries)" if cfg.max_eval_queries else "") + ".", ""]  # fmt: skip
    lines += ["| model | mode | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for key, metrics in summary.items():
        model, label = key.split("/", 1)
        cells = [f"{metrics[m]:.4f}" if m in metrics else "-" for m in METRICS]
        lines.append(f"| {model} | {label} | " + " | ".join(cells) + " |")
    lines.append("")
    dev = {k.split("/")[0]: v for k, v in summary.items() if k.endswith("/fused_dev")}
    if dev:
        chosen = ", ".join(f"{m} {v['alpha']:g}" for m, v in dev.items() if "alpha" in v) or "see eval/dev/"
        lines.append(f"- fused_dev: the fused weight alpha chosen on the dev queries held out from training ({chosen}),"
                     " scored here; the fused_<alpha> rows are the sweep on this split, for the plot only")  # fmt: skip
    elif any("/fused_" in k for k in summary):
        why = "dev_queries 0" if not cfg.dev_queries else "the dev stage did not run"
        lines.append(
            f"- no dev split ({why}): the fused_<alpha> rows are a sweep on this split, not a result"
        )
    for model, (label, value) in _best(summary).items():
        lines.append(f"- best mode of the {model} model: {label} (nDCG@10 {value:.4f})")
    paired = paired_comparisons(ev.folder, summary)
    if "base/query" in summary and "trained/query" in summary:
        d = summary["trained/query"]["ndcg@10"] - summary["base/query"]["ndcg@10"]
        stats = paired.get(("query", "ndcg@10"))
        tested = "; not tested: no per-query results, rerun the eval stage"  # an older eval wrote none
        if stats is not None:
            lo, hi = (100 * x for x in stats["interval"])
            interval = f"{stats['interval_level']} interval [{lo:+.2f}, {hi:+.2f}], p = {fmt_diff(stats)[2]}"
            tested = f" ({interval}): {stats['verdict']}"
        lines.append(f"- training changed query-mode nDCG@10 by {100 * d:+.2f} points{tested}")
    lines.append("")
    return lines + _paired_lines(ev.folder, summary, paired)


def paired_comparisons(folder: Path, summary: dict[str, dict[str, float]]) -> dict[tuple[str, str], dict]:
    """Trained vs base, query by query (``rir-finetune compare`` with its defaults), in query mode and in fused_dev
    (alpha chosen on the dev queries), else answer mode: ``{(mode, metric): stats}``; modes without per_query.json
    are left out."""
    others = [
        k.split("/", 1)[1] for k in summary if k.startswith("trained/") and _is_result(k.split("/", 1)[1])
    ]
    others = [m for m in others if m != "query"]
    best = "fused_dev" if "fused_dev" in others else ("answer" if "answer" in others else None)
    out: dict[tuple[str, str], dict] = {}
    for mode in ("query", best):
        if mode is None or f"base/{mode}" not in summary or f"trained/{mode}" not in summary:
            continue
        runs = [f"{m}={folder / m / mode}" for m in ("base", "trained")]
        metrics = [m for m in PAIRED_METRICS if m in summary[f"base/{mode}"]]
        try:
            result = compare(CompareConfig(runs=runs, metrics=metrics))
        except UserError:
            continue
        level = f"{100 * result['confidence']:g} %"
        out.update({(mode, c["metric"]): {**c, "interval_level": level} for c in result["comparisons"]})
    return out


def _paired_lines(folder: Path, summary: dict[str, dict[str, float]], paired: dict) -> list[str]:
    if not paired:
        return []
    modes = list(dict.fromkeys(mode for mode, _ in paired))
    cmd = f"`rir-finetune compare base={folder}/base/{modes[0]} trained={folder}/trained/{modes[0]}`"
    level = next(iter(paired.values()))["interval_level"]
    lines = [f"Trained vs base, paired over the {next(iter(paired.values()))['queries']} queries ({cmd} "
             "reproduces a row; a gain needs an interval that excludes 0 and p < 0.05, else no significant difference):", "",
             f"| mode | metric | base | trained | difference | {level} interval | p | wins / ties / losses | verdict |",
             "|---|---|---:|---:|---:|---|---:|---|---|"]  # fmt: skip
    for (mode, metric), c in paired.items():
        mean, interval, p = fmt_diff(c)
        lines.append(f"| {mode} | {metric} | {summary[f'base/{mode}'][metric]:.4f} | "
                     f"{summary[f'trained/{mode}'][metric]:.4f} | {mean} | {interval} | {p} | "
                     f"{c['wins']} / {c['ties']} / {c['losses']} | {c['verdict']} |")  # fmt: skip
    return [*lines, ""]


def _is_result(label: str) -> bool:
    """A mode whose score may be reported: not one point of the alpha sweep on the split it is scored on."""
    return not label.startswith("fused_") or label == "fused_dev"


def _best(summary: dict[str, dict[str, float]]) -> dict[str, tuple[str, float]]:
    best: dict[str, tuple[str, float]] = {}
    for key, metrics in summary.items():
        model, label = key.split("/", 1)
        if not _is_result(label):
            continue
        if model not in best or metrics.get("ndcg@10", -1) > best[model][1]:
            best[model] = (label, metrics.get("ndcg@10", -1))
    return best


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def generator_summary(stages: list[Stage]) -> dict[str, Any]:
    """The round's reward counts and scores and its DPO's margins, from the stage markers and the samples file."""
    out: dict[str, Any] = {}
    rw = next((s for s in stages if s.name == "reward"), None)
    tg = next((s for s in stages if s.name == "train_generator"), None)
    if rw is not None:
        mark = _read_json(rw.folder / "stage.json") or {}
        counts = (mark.get("result") or {}).get("counts") if mark.get("status") == "done" else None
        if counts:
            out["counts"] = counts
            out["samples_per_query"] = rw.settings.get("samples_per_query", 5)
            samples = rw.settings.get("samples_output")
            rows = []
            if samples and Path(samples).is_file():
                rows = [
                    json.loads(line)
                    for line in Path(samples).read_text(encoding="utf-8").splitlines()
                    if line.strip()
                ]
            out["mean_score"] = _mean([x for r in rows for x in r.get("scores", [])])
            out["mean_raw"] = _mean([r["raw_score"] for r in rows if "raw_score" in r])
    if tg is not None:
        mark = _read_json(tg.folder / "stage.json") or {}
        if mark.get("status") == "done":
            out["dpo"] = mark.get("result") or {}
            out["generator_dir"] = str(tg.outputs[0].parent)
    return out


def _generator_lines(stages: list[Stage]) -> list[str]:
    g = generator_summary(stages)
    if not g:
        return []
    lines = []
    if "counts" in g:
        c = g["counts"]
        dropped = ", ".join(f"{c.get(k, 0)} {k[len('dropped_') :]}" for k in c if k.startswith("dropped_"))
        lines.append(f"- reward: {c.get('records')} queries x {g['samples_per_query']} sampled answers, "
                     f"{c.get('pairs')} preference pairs kept (dropped: {dropped})")  # fmt: skip
        if g.get("mean_score") is not None and g.get("mean_raw") is not None:
            lines.append(f"- reward: mean answer score {g['mean_score']:.4f}, "
                         f"mean query-only score {g['mean_raw']:.4f}")  # fmt: skip
    if "dpo" in g:
        d = g["dpo"]
        text = f"- train_generator: {d.get('steps')} DPO step{'' if d.get('steps') == 1 else 's'}"
        if "margins" in d:
            text += (f", reward margin {d['margins'][0]:.4f} -> {d['margins'][1]:.4f}, "
                     f"accuracy {d['accuracies'][0]:.2f} -> {d['accuracies'][1]:.2f}")  # fmt: skip
        lines.append(text + f"; the generator is in `{g['generator_dir']}`")
    return ["Generator (reward and DPO):", "", *lines, ""]


def _round_header(cfg: RoundConfig, stages: list[Stage], r: int) -> list[str]:
    mine = [s for s in stages if s.round == r]
    llm = next((s for s in mine if s.name in {"augment", "test_answers", "generate"}), None)
    train = next((s for s in mine if s.name == "train"), None)
    lines = [f"## Round {r}", ""]
    if llm is not None:
        lines.append(
            f"- answers by `{llm.settings.get('model')}` (backend {llm.settings.get('backend', 'transformers')})"
        )
    if train is not None:
        lines.append(f"- retriever trained from `{train.settings.get('model_name_or_path')}` "
                     f"into `{train.folder / 'model'}`")  # fmt: skip
    return [*lines, ""] if len(lines) > 2 else lines


def _across_rounds(stages: list[Stage], rounds: int) -> list[str]:
    lines = ["## Across rounds", "", "| round | trained, query nDCG@10 | best trained mode | pairs kept |",
             "|---|---|---|---|"]  # fmt: skip
    for r in range(1, rounds + 1):
        mine = [s for s in stages if s.round == r]
        ev = next((s for s in mine if s.name == "eval"), None)
        summary = (_read_json(ev.outputs[0]) if ev is not None else None) or {}
        query = summary.get("trained/query", {}).get("ndcg@10")
        best = _best(summary).get("trained")
        counts = generator_summary(mine).get("counts")
        q = f"{query:.4f}" if query is not None else "-"
        b = f"{best[0]} ({best[1]:.4f})" if best else "-"
        kept = f"{counts['pairs']} of {counts['records']}" if counts else "-"
        lines.append(f"| {r} | {q} | {b} | {kept} |")
    return [*lines, ""]


def report_lines(cfg: RoundConfig, stages: list[Stage]) -> list[str]:
    lines = [f"# Round report: {cfg.output_dir}", ""]
    rounds = max((s.round for s in stages), default=1)
    if rounds == 1:
        lines += _eval_lines(cfg, next((s for s in stages if s.name == "eval"), None))
        lines += _generator_lines(stages)
    else:
        for r in range(1, rounds + 1):
            mine = [s for s in stages if s.round == r]
            lines += _round_header(cfg, stages, r)
            lines += _eval_lines(cfg, next((s for s in mine if s.name == "eval"), None))
            lines += _generator_lines(mine)
        lines += _across_rounds(stages, rounds)
        lines += ["## Stages", ""]
    lines += ["| stage | command | wall (s) |", "|---|---|---|"]
    total = 0.0
    for s in stages:
        mark = _read_json(s.folder / "stage.json") or {}
        wall = mark.get("wall_s")
        total += wall or 0.0
        status = f"{wall:.1f}" if isinstance(wall, (int, float)) else mark.get("status", "not run")
        lines.append(f"| {s.label} | `{s.command}` | {status} |")
    lines += [f"| total | | {total:.1f} |", ""]
    lines.append(
        "Wall times are those of each stage's last run (a resumed stage counts only its resumed part)."
    )
    return lines


# one colour per model (matplotlib's cycle: C0, C1, ...), one line style per mode
MODE_STYLES = {
    "query": {"linestyle": "none", "marker": "s", "markersize": 8},  # alpha = 1, on the fused curve's end
    "fused": {"linestyle": "-", "marker": "o"},
    "answer": {"linestyle": ":", "marker": None, "linewidth": 1.5},
}


def report_figure(summary: dict[str, dict[str, float]]) -> Any:
    """nDCG@10 against the fused weight alpha (1 = query only): a colour per model, a style per mode, the legend
    outside the axes so it never hides a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    models = sorted({k.split("/", 1)[0] for k in summary})
    for i, model in enumerate(models):
        colour = f"C{i % 10}"
        points = sorted((_alpha(k.split("/", 1)[1]), v["ndcg@10"]) for k, v in summary.items()
                        if k.startswith(model + "/") and _alpha(k.split("/", 1)[1]) is not None)  # fmt: skip
        if len(points) > 1:
            ax.plot(*zip(*points, strict=True), color=colour, label=f"{model}, fused", **MODE_STYLES["fused"])
        if f"{model}/query" in summary:
            ax.plot([1.0], [summary[f"{model}/query"]["ndcg@10"]], color=colour, label=f"{model}, query",
                    **MODE_STYLES["query"])  # fmt: skip
        if f"{model}/answer" in summary:
            ax.axhline(summary[f"{model}/answer"]["ndcg@10"], color=colour, label=f"{model}, answer only",
                       **MODE_STYLES["answer"])  # fmt: skip
    ax.set_xlabel("alpha (weight of the query embedding; 1 = query only)")
    ax.set_ylabel("nDCG@10")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


def write_png(path: Path, summary: dict[str, dict[str, float]]) -> bool:
    """The report's plot (:func:`report_figure`); False without matplotlib."""
    try:
        fig = report_figure(summary)
    except ImportError:
        return False
    import matplotlib.pyplot as plt

    atomic_write(path, lambda f: fig.savefig(f, format="png", bbox_inches="tight"), binary=True)
    plt.close(fig)
    return True


def _all_summaries(stages: list[Stage]) -> dict[str, dict[str, float]]:
    """Every round's eval summary; with several rounds the model names carry the round (``r2 trained``)."""
    rounds = max((s.round for s in stages), default=1)
    merged: dict[str, dict[str, float]] = {}
    for ev in (s for s in stages if s.name == "eval"):
        summary = _read_json(ev.outputs[0]) or {}
        for key, metrics in summary.items():
            merged[key if rounds == 1 else f"r{ev.round} {key}"] = metrics
    return merged


def write_report(cfg: RoundConfig, stages: list[Stage]) -> Path:
    out = Path(cfg.output_dir)
    lines = report_lines(cfg, stages)
    summary = _all_summaries(stages)
    if summary and write_png(out / "report.png", summary):
        lines += ["", "![nDCG@10 against alpha](report.png)"]
    text = "\n".join(lines) + "\n"
    atomic_write(out / "report.md", lambda f: f.write(text))
    print(f"round: report written to {out / 'report.md'}")
    return out / "report.md"
