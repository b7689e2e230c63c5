"""``rir-finetune CMD --help``: every key of a command's config with its type, default and one line of help."""

from __future__ import annotations

import dataclasses
import shutil
import textwrap
from typing import Any

from rir_finetune.config.convert import field_types, type_name
from rir_finetune.config.fields import key_help

_SECRET = ("token", "api_key")  # never print the value a factory read from the environment


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value: Any = f.default
    elif f.default_factory is not dataclasses.MISSING:
        if any(s in f.name for s in _SECRET):
            return "from the environment"
        value = f.default_factory()
    else:
        return "required"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if hasattr(value, "value") and not isinstance(value, (int, float, str)):  # an enum
        value = value.value
    return repr(value) if isinstance(value, str) else str(value)


def describe_keys(classes: list[type], skip: frozenset[str] = frozenset()) -> str:
    """The key table: ``--key TYPE (default D)`` and its help, wrapped to the terminal, grouped by dataclass."""
    width = max(60, min(shutil.get_terminal_size((100, 20)).columns, 120))
    out: list[str] = []
    seen: set[str] = set()
    for cls in classes:
        types = field_types(cls)
        rows = []
        own = set(vars(cls).get("__annotations__", {}))  # the command's own keys first, inherited ones after
        for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):
            if not f.init or f.name in seen or f.name in skip or f.metadata.get("hidden"):
                continue
            seen.add(f.name)
            head = f"  --{f.name} {type_name(types[f.name])} (default {_default(f)})"
            text = key_help(cls, f.name)
            rows.append(head)
            if text:
                rows += textwrap.wrap(text, width=width, initial_indent=" " * 6, subsequent_indent=" " * 6)
        if rows:
            title = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            out.append(
                f"{cls.__name__}" + (f": {title}" if title and not title.startswith(cls.__name__) else "")
            )
            out += rows
    return "\n".join(out)
