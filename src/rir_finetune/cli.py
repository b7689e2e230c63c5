"""The ``rir-finetune`` command line, built from the command table (:mod:`rir_finetune.commands`).

Every command takes ``--config FILE`` (YAML or JSON) and any config key as ``--key value``; the command-line value
wins; ``rir-finetune CMD --help`` lists every key with its type, default and help. Errors in user input print one
line (``error: ...``) and exit with code 2, without a traceback; SIGINT and SIGTERM print one ``interrupted`` line
and exit 130 / 143.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading

import typer
from typer import _click

from rir_finetune.commands import COMMANDS, Command
from rir_finetune.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Fine-tune bi-encoder retrievers with the Reinforced-IR objective. `rir-finetune CMD --help` lists CMD's keys.",
)
data_app = typer.Typer(
    no_args_is_help=True, help="Build training data: `data from-beir`, `data split`, `data get`."
)
app.add_typer(data_app, name="data")

# --help is ours (the key table), so typer passes it through with the other --key tokens
_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
_HELP = {"--help", "-h"}


def _register(cmd: Command) -> None:
    group, _, name = cmd.name.rpartition(" ")
    target = data_app if group == "data" else app

    def command(
        ctx: typer.Context,
        config: list[str] = typer.Option(
            None, "--config", "-c", help="YAML or JSON config file; --key value overrides it."
        ),
    ) -> None:
        if _HELP & set(ctx.args):
            print(cmd.help_text())
            return
        if config and len(config) > 1:  # the last would win silently, the others ignored
            raise UserError(
                f"command line: --config given {len(config)} times ({', '.join(config)}); give one"
            )
        cmd.run(config[0] if config else None, ctx.args)

    command.__doc__ = cmd.summary
    target.command(name=name, context_settings=_EXTRA, help=f"{cmd.summary} (--help: every key)")(command)


for _cmd in COMMANDS.values():
    _register(_cmd)


# ----------------------------------------------------------------------------------------------------------------
# Interrupts: SIGINT and SIGTERM raise Interrupted in the main thread, so `finally` blocks and context managers run
# (partial files stay as written, atomic temporaries are removed) and main() prints one line. A command that can
# resume keeps its partial work in those paths and says how to resume; it never catches Interrupted to carry on.


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived. A ``KeyboardInterrupt``, so every library's Ctrl-C path (DataLoader workers, tqdm,
    the Trainer) treats SIGTERM the same way, and ``except Exception`` never swallows it."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signum)
        self.signum = int(signum)


_last_signal: int | None = (
    None  # typer turns a KeyboardInterrupt into Exit(130): remember which signal it was
)


def _raise_interrupted(signum, frame):
    global _last_signal
    _last_signal = signum
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread (no-op outside it)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_interrupted)


def _interrupted() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C while we print must not print a traceback
        with contextlib.suppress(ValueError):
            signal.signal(sig, signal.SIG_IGN)
    signum = _last_signal or signal.SIGINT
    print(
        f"interrupted ({signal.Signals(signum).name}): stopped before the end; nothing reported as done. Outputs are "
        "written only when a run completes; train resumes with --resume_from_checkpoint auto, augment, generate and "
        "reward continue from OUT.partial, a round continues with the same command.",
        file=sys.stderr,
    )
    sys.exit(128 + int(signum))


def main(argv: list[str] | None = None) -> None:
    """Console entry point; every way a run ends maps to one exit status.

    0: done. 2: bad input (:class:`UserError`, one ``error:`` line) or bad usage (unknown command, missing value).
    1: the machine failed the run (a full disk, an I/O error): one ``error:`` line naming the file
    (``RIR_FINETUNE_TRACEBACK=1`` shows the traceback).
    130 / 143: SIGINT / SIGTERM (one ``interrupted`` line; partial work is kept as the command left it).
    """
    install_signal_handlers()
    try:
        rv = app(args=argv, standalone_mode=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (
        KeyboardInterrupt,
        typer.Abort,
    ):  # Interrupted is a KeyboardInterrupt; Abort: Ctrl-D/C at a prompt
        _interrupted()
    except _click.exceptions.ClickException as e:  # usage errors: typer raises its vendored click's classes
        e.show()
        sys.exit(2 if e.exit_code == 0 else e.exit_code)
    except OSError as e:  # the machine, not the input: a full disk, a vanished folder; one line all the same
        if os.environ.get("RIR_FINETUNE_TRACEBACK"):
            raise
        where = f"{e.filename}: " if e.filename else ""
        hint = " (free space and run again; augment, generate and reward continue from OUT.partial)" if e.errno in (
            errno.ENOSPC, errno.EDQUOT) else ""  # fmt: skip
        print(f"error: {where}{e.strerror or e}{hint}", file=sys.stderr)
        sys.exit(1)
    if isinstance(rv, int) and not isinstance(rv, bool) and rv != 0:
        if rv == 130:  # typer turned a KeyboardInterrupt it saw into this code
            _interrupted()
        sys.exit(rv)


if __name__ == "__main__":
    main()
