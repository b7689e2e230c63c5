"""Reading config files and command lines into config dataclasses: one loader for every command and the round.

A config file sets values; ``--key value`` on the command line overrides them. Every key belongs to exactly one of
the command's dataclasses. Values are converted to the field's type, then checked against the range declared beside
the field (:mod:`.fields`), before the dataclass is built. A key given twice, an unknown key (with the closest valid
one suggested), a value of the wrong type or out of range is a :class:`UserError` naming ``file:line`` or the
command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml

from rir_finetune.config.convert import convert_value, field_types
from rir_finetune.config.fields import check_ranges
from rir_finetune.errors import UserError
from rir_finetune.files import read_text

COMMAND_LINE = "command line"
# a command's config file may group its keys under these headings; they are flattened
SECTIONS = frozenset({"model", "data", "objective", "training", "eval"})


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML itself keeps the last silently)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if isinstance(key, (str, int, float, bool)) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice (lines {seen[key]} and {line})", key_node.start_mark
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _unique_json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} given twice")
        out[key] = value
    return out


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """``(section, key)`` / ``(key,)`` -> line number, for naming ``file:line`` (JSON parses as YAML here)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    lines.setdefault((*prefix, k.value), k.start_mark.line + 1)
                    if len(prefix) < 2:
                        walk(v, (*prefix, k.value))

    walk(root, ())
    return lines


class ConfigFile:
    """A YAML or JSON config file: its mapping (``data``) and where each key sits (:meth:`where`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: config file not found")
        text = read_text(self.path)
        try:
            if self.path.suffix.lower() == ".json":
                raw = json.loads(text, object_pairs_hook=_unique_json_object) if text.strip() else {}
            else:
                raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}  # noqa: S506 (a SafeLoader subclass)
        except json.JSONDecodeError as e:
            raise UserError(f"{self.path}:{e.lineno}: invalid JSON: {e.msg}") from None
        except ValueError as e:  # a duplicate JSON key
            raise UserError(f"{self.path}: {e}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise UserError(f"{self.path}{line}: invalid YAML: {problem}") from None
        if not isinstance(raw, dict):
            raise UserError(f"{self.path}: a config file must hold a mapping of keys to values")
        self.data: dict[str, Any] = raw
        self.lines = _key_lines(text)

    def where(self, *keys: str) -> str:
        """``file:line`` of the key at ``keys`` (``("train", "max_steps")``), or the file when unknown."""
        line = self.lines.get(tuple(str(k) for k in keys))
        return f"{self.path}:{line}" if line else str(self.path)

    def flat(self) -> tuple[dict[str, Any], dict[str, str]]:
        """The keys with :data:`SECTIONS` flattened, and each key's ``file:line``."""
        values: dict[str, Any] = {}
        where: dict[str, str] = {}
        for key, value in self.data.items():
            section = key in SECTIONS and isinstance(value, dict)
            for k, v in value.items() if section else [(key, value)]:
                if k in values:
                    raise UserError(
                        f"{self.path}: key {k!r} given twice (in two sections, or flat and in a section)"
                    )
                values[k] = v
                where[k] = self.where(key, k) if section else self.where(k)
        return values, where


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The flat ``{key: value}`` mapping of a YAML or JSON config file (sections flattened)."""
    return ConfigFile(path).flat()[0]


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """Parse ``--key value``, ``--key=value``, ``--flag`` and ``--key v1 v2`` (lists) into a mapping.

    Values stay strings (or lists of strings, or ``True`` for a bare flag); :func:`build_configs` converts them.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise UserError(f"command line: expected --key, got {tok!r}")
        key = tok[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            out[key.replace("-", "_")] = value
            i += 1
            continue
        values = []
        i += 1
        while i < len(tokens) and not (
            tokens[i].startswith("--") and len(tokens[i]) > 2 and not _is_number(tokens[i])
        ):
            values.append(tokens[i])
            i += 1
        key = key.replace("-", "_")
        # a key given again wins (README): scripts pass their defaults, then the user's "$@"
        out[key] = True if not values else values[0] if len(values) == 1 else values
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def suggest(key: str, valid: list[str]) -> str:
    """The closest valid key; two swapped letters first (difflib ranks ``modle`` nearer ``mode`` than ``model``)."""
    match = [v for v in valid if len(v) == len(key) and sorted(v) == sorted(key)
             and sum(a != b for a, b in zip(v, key, strict=True)) == 2]  # fmt: skip
    match = match or difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


Where = Callable[[str], str]


def _where_fn(where: str | dict[str, str] | Where) -> Where:
    if callable(where):
        return where
    if isinstance(where, dict):
        return lambda key: where.get(key, COMMAND_LINE)
    return lambda key: where


def _located(where: str, error: UserError) -> UserError:
    """Prefix a key's error with the file:line it came from (command-line errors name the key already)."""
    return error if where == COMMAND_LINE else UserError(f"{where}: {error}")


def check_values(
    classes: list[type], values: dict[str, Any], where: str | dict[str, str] | Where = COMMAND_LINE
) -> list[dict[str, Any]]:
    """Assign each key to the dataclass that owns it, convert it to the field's type and check its range.

    Returns one ``{key: value}`` per class. Nothing is built, so a caller can validate keys long before it runs
    anything (the round validates every stage this way before any stage starts).
    """
    at = _where_fn(where)
    types_by_cls = [field_types(c) for c in classes]
    owner: dict[str, int] = {}
    for i, fts in enumerate(types_by_cls):
        for name in fts:
            owner.setdefault(name, i)
    parts: list[dict[str, Any]] = [{} for _ in classes]
    for key, value in values.items():
        if key not in owner:
            raise UserError(f"{at(key)}: unknown config key {key!r}{suggest(key, sorted(owner))}")
        i = owner[key]
        try:
            parts[i][key] = convert_value(key, value, types_by_cls[i][key])
            check_ranges(classes[i], {key: parts[i][key]})
        except UserError as e:
            raise _located(at(key), e) from None
    return parts


def build_configs(
    classes: list[type],
    config_file: str | os.PathLike | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> list[Any]:
    """Load ``config_file`` (optional), apply ``overrides`` and return one instance per class in ``classes``.

    Raises :class:`UserError` on unknown keys, wrong types, values out of range and values a dataclass rejects in
    ``__post_init__``.
    """
    file_values, file_where = ConfigFile(config_file).flat() if config_file else ({}, {})
    cli_values = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides or []))
    file_parts = check_values(classes, file_values, file_where)
    cli_parts = check_values(classes, cli_values, COMMAND_LINE)
    return [build_one(cls, {**fp, **cp}) for cls, fp, cp in zip(classes, file_parts, cli_parts, strict=True)]


def build_one(cls: type, values: dict[str, Any]) -> Any:
    """``cls(**values)``: a refusal of its ``__post_init__``, a bad value or a missing package as one UserError."""
    try:
        return cls(**values)
    except UserError:
        raise
    except (ValueError, TypeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"invalid configuration ({cls.__name__}): {msg}") from None
    except ImportError as e:  # e.g. `deepspeed` set but the package is not installed
        msg = " ".join(str(e).split())
        raise UserError(f"a configured feature needs a package that is not installed: {msg}") from None


def split_positional(
    tokens: list[str], positional: tuple[str, ...], cls: type | None = None
) -> dict[str, Any]:
    """``--key value`` tokens, with leading bare arguments filling the ``positional`` keys in order
    (``data from-beir DATA_DIR`` is ``--data_dir DATA_DIR``); a positional and its ``--key`` together are an error.

    When the last positional key is a list field of ``cls``, it takes every remaining bare argument
    (``compare A B C`` is ``--runs A B C``).
    """
    tokens = list(tokens)
    values: dict[str, Any] = {}
    names = list(positional)
    last_is_list = False
    if cls is not None and names:
        tp = field_types(cls).get(names[-1])
        last_is_list = any(get_origin(t) in (list, tuple) for t in (tp, *get_args(tp)))
    while tokens and not tokens[0].startswith("--"):
        if not names:
            raise UserError(f"command line: unexpected argument {tokens[0]!r} (options are --key value)")
        if len(names) == 1 and last_is_list:
            rest = []
            while tokens and not tokens[0].startswith("--"):
                rest.append(tokens.pop(0))
            values[names.pop(0)] = rest
            break
        values[names.pop(0)] = tokens.pop(0)
    options = parse_overrides(tokens)
    for key in values:
        if key in options:
            raise UserError(f"command line: {key!r} given twice (as an argument and as --{key})")
    return {**values, **options}


def load_config(
    classes: type | list[type],
    config_file: str | os.PathLike | None,
    tokens: list[str] | dict[str, Any] | None,
    positional: tuple[str, ...] = (),
) -> Any:
    """A command's config: one instance of ``classes`` (a class), or a list (a list of classes).

    Leading bare command-line arguments fill the first class's ``POSITIONAL`` keys (or ``positional``) in order.
    """
    many = isinstance(classes, (list, tuple))
    first = list(classes)[0] if many else classes
    positional = positional or tuple(getattr(first, "POSITIONAL", ()))
    values = tokens if isinstance(tokens, dict) else split_positional(list(tokens or []), positional, first)
    built = build_configs(list(classes) if many else [classes], config_file, values)
    return built if many else built[0]


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-serialisable flat mapping of a config dataclass (enums by value)."""
    out = {}
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        v = getattr(obj, f.name)
        if isinstance(v, enum.Enum):
            v = v.value
        elif isinstance(v, (list, tuple)):
            v = [x.value if isinstance(x, enum.Enum) else x for x in v]
        try:
            json.dumps(v)
        except TypeError:
            v = str(v)
        out[f.name] = v
    return out
