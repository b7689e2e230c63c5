"""``rir-finetune compare``: eval runs compared query by query, to tell a real gain from seed noise.

    rir-finetune compare runs/base/eval runs/x/eval
    rir-finetune compare base=runs/base/eval retrieval=runs/s1/eval,runs/s2/eval --output_dir runs/compare
    rir-finetune compare work/round_s42 work/round_s43 --mode fused_dev    # rounds: base vs trained over seeds

Each argument is a group: ``NAME=DIR,DIR,...`` (several seeds of one setting) or a plain ``DIR`` (a group of one,
named by its folder). A DIR is an ``eval`` output folder (a round's ``OUT/eval/<model>/<mode>/`` is one) holding
``per_query.json``. Round folders (``rir-finetune round``'s output_dir, holding round.json) instead give two groups,
base and trained, each over the rounds named, from each one's last round's eval in ``mode``. The first group is the
reference; only queries judged in every run are paired. A group's
per-query value is the mean over its seeds; on the n paired differences d (group - reference), per metric:

- the mean difference and wins / ties / losses (d > 0, d = 0, d < 0);
- a paired bootstrap interval, percentile method: ``bootstrap_resamples`` rows of n query indices drawn with
  replacement (``numpy.random.default_rng(seed).integers(0, n, (R, n))``, row by row in chunks), the mean of d over
  each row, ``numpy.percentile`` (linear) at (1 - confidence) / 2 and (1 + confidence) / 2;
- a two-sided paired randomization (sign-flip) test of mean d = 0: when 2^n <= ``sign_flips`` every sign vector
  is enumerated and p = #{|mean(s d)| >= |mean(d)|} / 2^n (exact; the identity is one of them), otherwise
  ``sign_flips`` random vectors from ``default_rng(seed)`` and p = (1 + #{...}) / (1 + sign_flips), so p is never 0.

The verdict: a "significant gain" (or loss) needs all three of an interval that excludes 0, p below 1 -
``confidence`` (one query gives [d, d] but p = 1), and, when a group has several seeds, a mean difference larger than
the seed spread (the larger sd over seeds of the two groups): the bootstrap resamples queries, not seeds, so a
difference smaller than what a reseed moves is "within seed spread", never a gain. Otherwise: "no significant
difference".
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from rir_finetune import files
from rir_finetune.config import load_config, option
from rir_finetune.errors import UserError

DEFAULT_METRICS = ("ndcg@10", "recall@100")
PER_QUERY = "per_query.json"
# float noise in sums of the same values taken in another order; metric differences are far coarser
TOLERANCE = 1e-10
_CHUNK = 1 << 22  # resampled values held at once


@dataclass
class CompareConfig:
    """CompareConfig: paired comparison of eval runs (per_query.json)."""

    POSITIONAL: ClassVar[tuple[str, ...]] = ("runs",)
    runs: list[str] = option(
        factory=list,
        help="eval output folders or NAME=DIR,DIR,...; the first is the base; or round folders: base vs trained",
    )
    mode: str = option(
        "query", "round folders: the eval mode compared (query, answer, fused_dev, fused_0.8, ...)"
    )
    metrics: list[str] = option(factory=lambda: list(DEFAULT_METRICS), help="metrics compared")
    bootstrap_resamples: int = option(10_000, "bootstrap resamples of the queries", range=">=1")
    sign_flips: int = option(
        10_000, "sign vectors of the randomization test (all when 2^n is fewer)", range=">=1"
    )
    confidence: float = option(
        0.95, "level of the bootstrap interval; a gain also needs p < 1 - confidence", range="(0, 1)"
    )
    seed: int = option(0, "seed of the bootstrap and of the sign flips", range=">=0")
    output_dir: str | None = option(None, "write compare.md, .json and .png here; None: print only")

    def __post_init__(self):
        if not self.runs:
            raise UserError("config key 'runs': give at least two runs (rir-finetune compare BASE OTHER ...)")
        for m in self.metrics:
            if "@" not in m:
                raise UserError(f"config key 'metrics': {m!r} is not a metric name like ndcg@10")


def read_per_query(folder: str | Path, metrics: tuple[str, ...] | list[str]) -> dict[str, dict[str, float]]:
    """``{query id: {metric: value}}`` of an eval output folder; one-line errors naming the folder."""
    folder = Path(folder)
    path = folder / PER_QUERY
    if not folder.is_dir():
        raise UserError(f"config key 'runs': {folder}: no such folder")
    if not path.is_file():
        below = sorted([*folder.glob(f"*/{PER_QUERY}"), *folder.glob(f"*/*/{PER_QUERY}")])
        why = f"it holds eval outputs: name one, e.g. {below[0].parent}" if below else "not an eval output"
        if (folder / "metrics.json").is_file():
            why = "an older eval wrote it: rerun `rir-finetune eval` with this version"
        raise UserError(f"config key 'runs': {folder}: no {PER_QUERY} ({why})")
    try:
        data = json.loads(files.read_text(path))
    except ValueError as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict) or not data or not all(isinstance(v, dict) for v in data.values()):
        raise UserError(f"{path}: expected {{query id: {{metric: value}}}} as eval writes it")
    out: dict[str, dict[str, float]] = {}
    for qid, values in data.items():
        missing = [m for m in metrics if m not in values]
        if missing:
            raise UserError(f"config key 'metrics': {path}: no {missing[0]!r} (it has {', '.join(values)})")
        if not all(isinstance(values[m], (int, float)) and not isinstance(values[m], bool) for m in metrics):
            raise UserError(f"{path}: query {qid!r} has a value that is not a number")
        out[qid] = {m: float(values[m]) for m in metrics}
        if not all(math.isfinite(v) for v in out[qid].values()):
            raise UserError(f"{path}: query {qid!r} has a value that is not a finite number")
    return out


def round_eval(folder: Path) -> Path:
    """A round folder's last evaluation: ``round_<N>/eval`` of its highest N that has one, else ``eval``."""
    later = sorted((int(d.name.split("_")[1]), d / "eval") for d in folder.glob("round_*")
                   if d.name.split("_")[1].isdigit() and (d / "eval").is_dir())  # fmt: skip
    return later[-1][1] if later else folder / "eval"


def round_groups(runs: list[str], mode: str) -> list[tuple[str, list[str]]] | None:
    """Round folders as ``[("base", [...]), ("trained", [...])]`` in ``mode``; None when no argument is one."""
    rounds = [Path(r) for r in runs if (Path(r) / "round.json").is_file()]
    if not rounds:
        return None
    if len(rounds) < len(runs):
        other = next(r for r in runs if not (Path(r) / "round.json").is_file())
        raise UserError(f"config key 'runs': {other!r} is not a round folder like {rounds[0]}: compare round folders "
                        "with each other, or name eval folders (ROUND/eval/trained/query)")  # fmt: skip
    return [(model, [str(round_eval(r) / model / mode) for r in rounds]) for model in ("base", "trained")]


def evaluated_on(folder: str | Path) -> tuple[str, str, int] | None:
    """(data folder's name, split, documents) from an eval folder's eval_config.json; None without one."""
    path = Path(folder) / "eval_config.json"
    if not path.is_file():  # written by hand, or by the ablation's table from kept per-query values
        return None
    try:
        record = json.loads(files.read_text(path))
        data = Path(record["arguments"]["data"])
        name = data.name or data.resolve().name  # `--data .` names no folder
        return name, str(record["arguments"]["split"]), int(record["documents"])
    except (UserError, ValueError, KeyError, TypeError):
        return None


def check_same_data(groups: list[tuple[str, list[str]]]) -> None:
    """Paired query ids mean the same queries only on the same data: runs on other data or splits are refused
    (numeric ids overlap between datasets)."""
    seen: tuple[str, tuple[str, str, int]] | None = None
    for folder in (f for _, folders in groups for f in folders):
        data = evaluated_on(folder)
        if data is None:
            continue
        if seen is not None and data != seen[1]:
            (a, b) = (seen[1], data)
            raise UserError(f"config key 'runs': {folder} was evaluated on {b[0]} split {b[1]!r} ({b[2]} documents), "
                            f"{seen[0]} on {a[0]} split {a[1]!r} ({a[2]} documents): compare runs on the same data")  # fmt: skip
        seen = seen or (folder, data)
    dtypes = {f: computed_dtype(f) for _, folders in groups for f in folders}
    if len(set(dtypes.values()) - {None}) > 1:
        listed = ", ".join(f"{f} {d}" for f, d in dtypes.items() if d)
        print(f"warning: the runs were encoded in different float types ({listed}); bf16 alone moves nDCG in "
              "the third decimal: evaluate them with the same --dtype", file=sys.stderr)  # fmt: skip


def computed_dtype(folder: str | Path) -> str | None:
    """The float type an eval folder's encoder computed in: eval_config.json's ``computed``, or for a folder written
    before eval recorded it, its ``dtype`` argument unless that was ``auto`` (the default then was float32); None
    when unknown."""
    try:
        record = json.loads(files.read_text(Path(folder) / "eval_config.json"))
    except (UserError, OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    computed, arguments = record.get("computed"), record.get("arguments")
    if isinstance(computed, dict) and computed.get("dtype"):
        return str(computed["dtype"])
    if isinstance(arguments, dict):
        given = arguments.get("dtype", "float32")
        return None if given == "auto" else str(given)
    return None


def parse_groups(runs: list[str], mode: str = "query") -> list[tuple[str, list[str]]]:
    """``NAME=DIR,DIR`` and plain ``DIR`` arguments as ``(name, folders)``; a plain folder is named by its last
    component, or by its whole path when another run has that name (``runs/a/eval`` vs ``runs/b/eval``); round
    folders as base and trained (:func:`round_groups`)."""
    rounds = round_groups(runs, mode)
    if rounds is not None:
        return rounds
    if len(runs) < 2:
        raise UserError("config key 'runs': give at least two runs (rir-finetune compare BASE OTHER ...)")
    parsed: list[tuple[str, list[str], bool]] = []
    for arg in runs:
        name, eq, rest = arg.partition("=")
        if eq and name and "/" not in name and not Path(arg).exists():
            parsed.append((name, rest.split(","), False))
        else:
            parsed.append((Path(arg).name or arg, [arg], True))
        if not all(parsed[-1][1]):
            raise UserError(f"config key 'runs': {arg!r}: an empty folder name")
    names = [name for name, _, _ in parsed]
    groups = [(f[0].rstrip("/") if plain and names.count(name) > 1 else name, f) for name, f, plain in parsed]
    for i, (name, _) in enumerate(groups):
        if any(name == g[0] for g in groups[:i]):
            raise UserError(f"config key 'runs': two runs are named {name!r}; name them: NAME=DIR")
    return groups


def _count_extreme(d: np.ndarray, signs: np.ndarray) -> int:
    """How many sign vectors (rows of ``signs``, (rows, n)) give |mean(s d)| >= |mean(d)|."""
    return int((np.abs(signs @ d / len(d)) >= abs(d.mean()) - TOLERANCE).sum())


def paired_stats(
    d: np.ndarray,
    bootstrap_resamples: int,
    sign_flips: int,
    seed: int,
    confidence: float,
    seed_spread: float | None = None,
) -> dict:
    """Mean, bootstrap interval, sign-flip p-value and wins / ties / losses of paired differences ``d`` (n,);
    ``seed_spread``: the larger sd over seeds of the two groups compared (None: one seed each)."""
    n = len(d)
    rows = max(1, _CHUNK // n)  # resamples per chunk
    rng = np.random.default_rng(seed)
    boot = []
    for start in range(0, bootstrap_resamples, rows):
        idx = rng.integers(0, n, size=(min(rows, bootstrap_resamples - start), n))  # (rows, n)
        boot.append(d[idx].mean(axis=1))
    tail = (100 - 100 * confidence) / 2  # 2.5 exactly for 0.95 (100 * (1 - 0.95) is not)
    low, high = np.percentile(np.concatenate(boot), [tail, 100 - tail])
    exact = n < 63 and 2**n <= sign_flips
    extreme = 0
    if exact:
        for start in range(0, 2**n, rows):
            codes = np.arange(start, min(start + rows, 2**n))[:, None]
            extreme += _count_extreme(d, ((codes >> np.arange(n)) & 1) * 2.0 - 1)  # every sign vector
        p = extreme / 2**n
    else:
        rng = np.random.default_rng(seed)
        for start in range(0, sign_flips, rows):
            signs = rng.integers(0, 2, size=(min(rows, sign_flips - start), n)) * 2.0 - 1  # (rows, n)
            extreme += _count_extreme(d, signs)
        p = (1 + extreme) / (1 + sign_flips)
    return {"queries": n, "mean_difference": float(d.mean()), "interval": [float(low), float(high)],
            "p_value": p, "exact_p": exact, "p_floor": None if exact else 1 / (1 + sign_flips), "wins": int((d > TOLERANCE).sum()),
            "ties": int((np.abs(d) <= TOLERANCE).sum()), "losses": int((d < -TOLERANCE).sum()),
            "seed_spread": seed_spread,
            "verdict": verdict(float(d.mean()), float(low), float(high), p, confidence, seed_spread)}  # fmt: skip


def verdict(
    mean: float, low: float, high: float, p: float, confidence: float = 0.95, seed_spread: float | None = None
) -> str:
    """A gain (or loss) only when the interval excludes 0, p < 1 - confidence and the difference exceeds the seed
    spread (when there is one); see the module's docstring."""
    if not (low > 0 or high < 0) or p >= round(1 - confidence, 12):  # 1 - 0.95 is 0.050000000000000044
        return "no significant difference"
    if seed_spread is not None and abs(mean) <= seed_spread:
        return "within seed spread"
    return "significant gain" if low > 0 else "significant loss"


def compare(cfg: CompareConfig) -> dict[str, Any]:
    """Every number of the comparison (what compare.json holds)."""
    groups = parse_groups(cfg.runs, cfg.mode)
    check_same_data(groups)
    loaded = [[read_per_query(f, cfg.metrics) for f in folders] for _, folders in groups]
    common = set.intersection(*(set(run) for runs in loaded for run in runs))
    if not common:
        raise UserError("config key 'runs': no query is judged in every run (evaluated on other data?)")
    qids = sorted(common)
    # (seeds, n, metrics) per group
    arrays = [np.array([[[run[q][m] for m in cfg.metrics] for q in qids] for run in runs]) for runs in loaded]
    result: dict[str, Any] = {"metrics": list(cfg.metrics), "paired_queries": len(qids), "reference": groups[0][0],
                              "confidence": cfg.confidence, "bootstrap_resamples": cfg.bootstrap_resamples,
                              "sign_flips": cfg.sign_flips, "seed": cfg.seed, "groups": [], "comparisons": []}  # fmt: skip
    for (name, folders), runs, arr in zip(groups, loaded, arrays, strict=True):
        per_seed = arr.mean(axis=1)  # (seeds, metrics)
        sd = per_seed.std(axis=0, ddof=1) if len(folders) > 1 else np.full(len(cfg.metrics), math.nan)
        result["groups"].append({
            "name": name, "mean": dict(zip(cfg.metrics, per_seed.mean(axis=0).tolist(), strict=True)),
            "sd": dict(zip(cfg.metrics, [None if math.isnan(x) else x for x in sd.tolist()], strict=True)),
            "seeds": [{"folder": f, "judged_queries": len(run), "values": dict(zip(cfg.metrics, v, strict=True))}
                      for f, run, v in zip(folders, runs, per_seed.tolist(), strict=True)],
        })  # fmt: skip
    reference = arrays[0].mean(axis=0)  # (n, metrics)
    for (name, _), arr, group in zip(groups[1:], arrays[1:], result["groups"][1:], strict=True):
        for j, metric in enumerate(cfg.metrics):
            d = arr.mean(axis=0)[:, j] - reference[:, j]  # (n,)
            sds = [g["sd"][metric] for g in (result["groups"][0], group) if g["sd"][metric] is not None]
            stats = paired_stats(d, cfg.bootstrap_resamples, cfg.sign_flips, cfg.seed, cfg.confidence,
                                 seed_spread=max(sds) if sds else None)  # fmt: skip
            stats.update(group=name, metric=metric, differences=dict(zip(qids, d.tolist(), strict=True)))
            result["comparisons"].append(stats)
    return result


def fmt_diff(stats: dict[str, Any]) -> tuple[str, str, str]:
    """``(mean difference, [low, high], p)`` as text."""
    (lo, hi), p = stats["interval"], stats["p_value"]
    ptext = f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"
    if stats.get("p_floor") is not None and p <= stats["p_floor"]:  # no sampled sign vector was as extreme
        ptext = f"<= {ptext}"
    return f"{stats['mean_difference']:+.4f}", f"[{lo:+.4f}, {hi:+.4f}]", ptext


def markdown(result: dict[str, Any]) -> str:
    metrics, ref = result["metrics"], result["reference"]
    seeds = {s["folder"]: s["judged_queries"] for g in result["groups"] for s in g["seeds"]}
    level = f"{100 * result['confidence']:g} %"
    lines = [f"{result['paired_queries']} queries paired (judged in every run; "
             + ", ".join(f"{f}: {n}" for f, n in seeds.items()) + ").", "",
             "| run | seeds | " + " | ".join(metrics) + " |", "|---|---:|" + "---:|" * len(metrics)]  # fmt: skip
    for g in result["groups"]:
        sd = {m: "" if g["sd"][m] is None else f" +- {g['sd'][m]:.4f}" for m in metrics}
        cells = [f"{g['mean'][m]:.4f}{sd[m]}" for m in metrics]
        lines.append(f"| {g['name']} | {len(g['seeds'])} | " + " | ".join(cells) + " |")
    lines.append("")
    for name, s in [(g["name"], s) for g in result["groups"] if len(g["seeds"]) > 1 for s in g["seeds"]]:
        values = ", ".join(f"{m} {s['values'][m]:.4f}" for m in metrics)
        lines.append(f"- {name}: `{s['folder']}` {values}")
    if lines[-1]:  # after the seed list
        lines.append("")
    lines += [f"| run vs {ref} | metric | mean difference | {level} interval | p | wins / ties / losses | verdict |",
              "|---|---|---:|---|---:|---|---|"]  # fmt: skip
    for c in result["comparisons"]:
        mean, interval, p = fmt_diff(c)
        lines.append(f"| {c['group']} | {c['metric']} | {mean} | {interval} | {p} | "
                     f"{c['wins']} / {c['ties']} / {c['losses']} | {c['verdict']} |")  # fmt: skip
    lines += ["", f"Bootstrap interval: percentile method, {result['bootstrap_resamples']} resamples of the queries; "
              f"p: two-sided paired sign-flip test ({result['sign_flips']} resamples, or every sign vector when "
              f"fewer); seed {result['seed']}. Means are over the paired queries; a group's per-query value is the mean "
              "over its seeds; +- is the standard deviation over seeds. p = (1 + extreme) / (1 + resamples) when "
              "sampled, so it is never below 1 / (1 + resamples). A gain needs the interval to exclude 0, p < "
              f"{1 - result['confidence']:.2g} and, with several seeds, a difference larger than the seed sd "
              "(\"within seed spread\" otherwise)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_plot(path: Path, result: dict[str, Any]) -> None:
    """The sorted per-query differences against the reference, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = result["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5), dpi=100, squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for c in (c for c in result["comparisons"] if c["metric"] == metric):
            ax.plot(sorted(c["differences"].values()), label=f"{c['group']} ({c['verdict']})")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set(title=f"{metric}: per-query difference vs {result['reference']}", xlabel="queries, sorted",
               ylabel="difference")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    files.atomic_write(path, lambda f: fig.savefig(f, format="png"), binary=True)
    plt.close(fig)


def run_compare(config_file: str | None, tokens: list[str] | dict[str, Any]) -> dict[str, Any]:
    """The ``compare`` command: print the comparison; with ``output_dir`` also write compare.md/.json/.png."""
    cfg = load_config(CompareConfig, config_file, tokens)
    out = None
    if cfg.output_dir:
        reads = [f for _, folders in parse_groups(cfg.runs, cfg.mode) for f in folders]
        out = files.check_output_dir(cfg.output_dir, key="output_dir", reads=reads, may_hold_inputs=True)
        for name in ("compare.md", "compare.json", "compare.png"):
            files.check_output_file(out / name, key="output_dir", reads=reads)
    result = compare(cfg)
    text = markdown(result)
    print(text, end="")
    if out is not None:
        files.atomic_write(out / "compare.json", lambda f: f.write(json.dumps(result, indent=2) + "\n"))
        files.atomic_write(out / "compare.md", lambda f: f.write(f"# Compare\n\n{text}\n![sorted per-query "
                                                                  "differences](compare.png)\n"))  # fmt: skip
        write_plot(out / "compare.png", result)
    return result
