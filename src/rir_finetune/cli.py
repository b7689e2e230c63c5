"""The ``rir-finetune`` command line: train, eval, and the data-preparation commands.

Every command takes ``--config FILE`` (YAML or JSON) and any config key as ``--key value``; the command-line value
wins. Errors in user input print one line (``error: ...``) and exit with code 2, without a traceback; SIGINT and
SIGTERM print one ``interrupted`` line and exit 130 / 143 (:mod:`rir_finetune.guards` holds every such rule).
"""

from __future__ import annotations

import sys

import typer
from typer import _click

from rir_finetune import guards
from rir_finetune.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Fine-tune bi-encoder retrievers with the Reinforced-IR objective.",
)
data_app = typer.Typer(no_args_is_help=True, help="Build training data: `data from-beir`, `data get`.")
app.add_typer(data_app, name="data")

_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": ["-h", "--help"]}
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML or JSON config file; --key value overrides it.")


@app.command(context_settings=_EXTRA)
def train(ctx: typer.Context, config: str = ConfigOpt):
    """Fine-tune a retriever. Keys: FlagEmbedding's names plus every transformers.TrainingArguments field."""
    from rir_finetune.training.train import run_train

    run_train(config, ctx.args)


@app.command(name="eval", context_settings=_EXTRA)
def eval_(ctx: typer.Context, config: str = ConfigOpt):
    """Score a retriever on BEIR-layout data: --model DIR --data DATA_DIR --split test --output_dir OUT."""
    from rir_finetune.evaluation.run import run_eval

    run_eval(config, ctx.args)


@app.command(context_settings=_EXTRA)
def mine(ctx: typer.Context, config: str = ConfigOpt):
    """Add hard negatives to training records: --input IN --output OUT --model DIR|bm25 --negatives N."""
    from rir_finetune.prep.mine import run_mine

    run_mine(config, ctx.args)


@app.command(context_settings=_EXTRA)
def score(ctx: typer.Context, config: str = ConfigOpt):
    """Add teacher scores (pos_scores / neg_scores) from a cross-encoder or bi-encoder."""
    from rir_finetune.prep.score import run_score

    run_score(config, ctx.args)


@app.command(context_settings=_EXTRA)
def augment(ctx: typer.Context, config: str = ConfigOpt):
    """Add an LLM-written answer to every record from a local causal language model."""
    from rir_finetune.prep.augment import run_augment

    run_augment(config, ctx.args)


@app.command(context_settings=_EXTRA)
def generate(ctx: typer.Context, config: str = ConfigOpt):
    """Training queries for a corpus without any: CORPUS --output OUT --model LLM [--num_passages N]."""
    from rir_finetune.prep.generate import run_generate

    run_generate(config, ctx.args)


@app.command(context_settings=_EXTRA)
def reward(ctx: typer.Context, config: str = ConfigOpt):
    """Preference pairs for the generator: K answers per query judged by a retriever (--input --output --retriever --model)."""
    from rir_finetune.generator.reward import run_reward

    run_reward(config, ctx.args)


@app.command(name="train-generator", context_settings=_EXTRA)
def train_generator(ctx: typer.Context, config: str = ConfigOpt):
    """DPO of the answer generator on reward's pairs (TRL, LoRA): --model LLM --data pairs.jsonl --output_dir OUT."""
    from rir_finetune.generator.dpo import run_train_generator

    run_train_generator(config, ctx.args)


@app.command(name="round", context_settings=_EXTRA)
def round_(
    ctx: typer.Context,
    config: str = ConfigOpt,
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the stage plan (what runs, what is skipped, why)."
    ),
    from_stage: str = typer.Option(
        None, "--from", help="First stage to run; earlier ones must be up to date."
    ),
    until_stage: str = typer.Option(None, "--until", help="Last stage to run."),
):
    """One Reinforced-IR round, stage by stage, resumable: --config round.yaml [--dry-run] [--section.key value]."""
    from rir_finetune.round.run import run_round

    run_round(config, ctx.args, dry_run=dry_run, start=from_stage, until=until_stage)


@data_app.command("from-beir", context_settings=_EXTRA)
def data_from_beir(ctx: typer.Context, config: str = ConfigOpt):
    """Training records (query + judged positives) from BEIR data: DATA_DIR --split train --out train.jsonl."""
    from rir_finetune.prep.beir import run_from_beir

    run_from_beir(config, ctx.args)


@data_app.command("get", context_settings=_EXTRA)
def data_get(ctx: typer.Context, config: str = ConfigOpt):
    """Download a BEIR dataset by name: NAME --out DIR."""
    from rir_finetune.prep.beir import run_get

    run_get(config, ctx.args)


def main(argv: list[str] | None = None) -> None:
    """Console entry point; every way a run ends maps to one exit status (guards.py, part 4).

    0: done. 2: bad input (:class:`UserError`, one ``error:`` line) or bad usage (unknown command, missing value).
    130 / 143: SIGINT / SIGTERM (one ``interrupted`` line; partial work is kept as the command left it).
    """
    guards.install_signal_handlers()
    try:
        rv = app(args=argv, standalone_mode=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (
        KeyboardInterrupt,
        typer.Abort,
    ):  # guards.Interrupted is a KeyboardInterrupt; Abort: Ctrl-D/C at a prompt
        _interrupted()
    except _click.exceptions.ClickException as e:  # usage errors: typer raises its vendored click's classes
        e.show()
        sys.exit(2 if e.exit_code == 0 else e.exit_code)
    if isinstance(rv, int) and not isinstance(rv, bool) and rv != 0:
        # typer turns a KeyboardInterrupt it sees into Exit(130) and, with standalone_mode=False, returns the code
        if rv == 130:
            _interrupted()
        sys.exit(rv)


def _interrupted() -> None:
    guards.ignore_signals()
    name, code = guards.interrupted_exit()
    print(
        f"interrupted ({name}): stopped before the end; nothing reported as done. Outputs are written only when a "
        "run completes; train resumes with --resume_from_checkpoint auto, augment continues from OUT.partial.",
        file=sys.stderr,
    )
    sys.exit(code)


if __name__ == "__main__":
    main()
