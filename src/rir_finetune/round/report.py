"""The round's report: ``OUTPUT_DIR/report.md`` and ``report.png`` from the eval summary and the stage markers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rir_finetune.files import atomic_write
from rir_finetune.round.config import RoundConfig
from rir_finetune.round.stages import Stage

METRICS = ("ndcg@10", "recall@10", "recall@100", "mrr@10")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _alpha(label: str) -> float | None:
    if label == "query":
        return 1.0
    if label.startswith("fused_"):
        return float(label[len("fused_") :])
    return None


def report_lines(cfg: RoundConfig, stages: list[Stage]) -> list[str]:
    lines = [f"# Round report: {cfg.output_dir}", ""]
    ev = next((s for s in stages if s.name == "eval"), None)
    summary = _read_json(ev.outputs[0]) if ev is not None else None
    if summary:
        split = ev.settings.get("split", cfg.eval_split)
        lines += [f"Retrieval on `{cfg.data}` split `{split}`"
                  + (f" (first {cfg.max_eval_queries} judged queries)" if cfg.max_eval_queries else "") + ".", ""]  # fmt: skip
        lines += ["| model | mode | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
        for key, metrics in summary.items():
            model, label = key.split("/", 1)
            cells = [f"{metrics[m]:.4f}" if m in metrics else "-" for m in METRICS]
            lines.append(f"| {model} | {label} | " + " | ".join(cells) + " |")
        lines.append("")
        best = {}
        for key, metrics in summary.items():
            model, label = key.split("/", 1)
            if model not in best or metrics.get("ndcg@10", -1) > best[model][1]:
                best[model] = (label, metrics.get("ndcg@10", -1))
        for model, (label, value) in best.items():
            lines.append(f"- best mode of the {model} model: {label} (nDCG@10 {value:.4f})")
        if "base/query" in summary and "trained/query" in summary:
            d = summary["trained/query"]["ndcg@10"] - summary["base/query"]["ndcg@10"]
            lines.append(f"- training changed query-mode nDCG@10 by {100 * d:+.2f} points")
        lines.append("")
    lines += ["| stage | command | wall (s) |", "|---|---|---|"]
    total = 0.0
    for s in stages:
        mark = _read_json(s.folder / "stage.json") or {}
        wall = mark.get("wall_s")
        total += wall or 0.0
        status = f"{wall:.1f}" if isinstance(wall, (int, float)) else mark.get("status", "not run")
        lines.append(f"| {s.name} | `{s.command}` | {status} |")
    lines += [f"| total | | {total:.1f} |", ""]
    lines.append(
        "Wall times are those of each stage's last run (a resumed stage counts only its resumed part)."
    )
    return lines


def write_png(path: Path, summary: dict[str, dict[str, float]]) -> bool:
    """nDCG@10 against the fused weight alpha (1 = query only), one line per model; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    models = sorted({k.split("/", 1)[0] for k in summary})
    for model in models:
        points = sorted((_alpha(k.split("/", 1)[1]), v["ndcg@10"]) for k, v in summary.items()
                        if k.startswith(model + "/") and _alpha(k.split("/", 1)[1]) is not None)  # fmt: skip
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=model)
        answer = summary.get(f"{model}/answer")
        if answer:
            ax.axhline(answer["ndcg@10"], linestyle=":", linewidth=1, label=f"{model}, answer only")
    ax.set_xlabel("alpha (weight of the query embedding; 1 = query only)")
    ax.set_ylabel("nDCG@10")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()

    def save(f):
        fig.savefig(f, format="png")

    atomic_write(path, save, binary=True)
    plt.close(fig)
    return True


def write_report(cfg: RoundConfig, stages: list[Stage]) -> Path:
    out = Path(cfg.output_dir)
    lines = report_lines(cfg, stages)
    ev = next((s for s in stages if s.name == "eval"), None)
    summary = _read_json(ev.outputs[0]) if ev is not None else None
    if summary and write_png(out / "report.png", summary):
        lines += ["", "![nDCG@10 against alpha](report.png)"]
    text = "\n".join(lines) + "\n"
    atomic_write(out / "report.md", lambda f: f.write(text))
    print(f"round: report written to {out / 'report.md'}")
    return out / "report.md"
