"""What every data-preparation command shares: the final summary of counts."""

from __future__ import annotations

import sys


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
