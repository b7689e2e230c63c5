"""What every data-preparation command shares: config loading (with positional arguments) and the final summary."""

from __future__ import annotations

import os
import sys
from typing import Any, TypeVar

from rir_finetune.config import build_configs, parse_overrides
from rir_finetune.errors import UserError

T = TypeVar("T")


def load_config(
    cls: type[T],
    config_file: str | os.PathLike | None,
    tokens: list[str],
    positional: tuple[str, ...] = (),
) -> T:
    """Build the command's config dataclass from a config file and command-line tokens.

    Leading tokens that are not ``--key`` options fill the ``positional`` keys in order
    (``data from-beir DATA_DIR`` is ``--data_dir DATA_DIR``); a positional and its ``--key`` together are an error.
    """
    tokens = list(tokens)
    values: dict[str, Any] = {}
    names = list(positional)
    while tokens and not tokens[0].startswith("--"):
        if not names:
            raise UserError(f"command line: unexpected argument {tokens[0]!r} (options are --key value)")
        values[names.pop(0)] = tokens.pop(0)
    options = parse_overrides(tokens)
    for key in values:
        if key in options:
            raise UserError(f"command line: {key!r} given twice (as an argument and as --{key})")
    (config,) = build_configs([cls], config_file, {**values, **options})
    return config


def report(command: str, lines: list[str]) -> None:
    """Print the end-of-run counts: one header line, then one indented line per count."""
    print(f"{command}:", file=sys.stdout)
    for line in lines:
        print(f"  {line}", file=sys.stdout)
    sys.stdout.flush()


def min_mean_max(values: list[int]) -> str:
    if not values:
        return "none"
    return f"min {min(values)} / mean {sum(values) / len(values):.2f} / max {max(values)}"
