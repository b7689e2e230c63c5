"""Configuration: flat keys with upstream names, loaded from YAML/JSON plus command-line overrides.

A config file sets values; ``--key value`` on the command line overrides them. Every key belongs to exactly one
dataclass (model, data, objective, training). Values are converted to the field's type (YAML reads ``1e-5`` as a
string: that still becomes a float). An unknown key is a :class:`UserError` that names it and suggests the
closest valid key. A numeric value outside the range its dataclass declares (``RANGES``, see
:mod:`rir_finetune.guards`) is a UserError naming the key, checked before the dataclass is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from rir_finetune.errors import UserError
from rir_finetune.files import read_text
from rir_finetune.guards import check_ranges

_NONE_IS_A_VALUE = {"report_to"}  # keys where the text "none" is a real value, not null
_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off", "none", ""}


# ----------------------------------------------------------------------------------------------------------------
# Reading files and command lines into one flat mapping


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


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML or JSON config file into a flat ``{key: value}`` mapping.

    Sections (``model:``, ``data:``, ``objective:``, ``training:``, ``eval:``) are flattened, so both flat and
    sectioned files work. A key given twice (in one mapping, or in two sections) is an error naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    text = read_text(path)
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(text, object_pairs_hook=_unique_json_object) if text.strip() else {}
        else:
            raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}  # noqa: S506 (a SafeLoader subclass)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    except ValueError as e:  # a duplicate JSON key
        raise UserError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}{line}: invalid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a config file must hold a mapping of keys to values")
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        items = value.items() if key in _SECTIONS and isinstance(value, dict) else [(key, value)]
        for k, v in items:
            if k in flat:
                raise UserError(f"{path}: key {k!r} given twice (in two sections, or flat and in a section)")
            flat[k] = v
    return flat


_SECTIONS = {"model", "data", "objective", "training", "eval"}


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
        out[key] = True if not values else values[0] if len(values) == 1 else values
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------------------------
# Type conversion


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def convert_value(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` to the field type ``tp``; raise a UserError naming ``key`` when it does not fit."""
    if isinstance(tp, str):  # unresolved forward reference: leave as is
        return value
    origin = get_origin(tp)
    args = get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        none_text = isinstance(value, str) and value.strip().lower() in {"none", "null"}
        if value is None or (none_text and key not in _NONE_IS_A_VALUE):
            if type(None) in args:
                return None
        errors = []
        # try the more specific types first (bool, int, float) before str
        order = sorted(non_none, key=lambda a: 0 if a in (bool, int, float) else 1 if a is not str else 2)
        for a in order:
            try:
                return convert_value(key, value, a)
            except UserError as e:
                errors.append(e)
        raise errors[0] if errors else UserError(f"config key {key!r}: cannot use {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise UserError(f"config key {key!r}: {value!r} is not one of {', '.join(map(repr, args))}")
    if origin in (list, tuple, typing.List):  # noqa: UP006
        inner = args[0] if args else Any
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [convert_value(key, v, inner) for v in value]
    if origin in (dict, typing.Dict):  # noqa: UP006
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise UserError(f"config key {key!r}: expected a mapping (JSON), got {value!r}") from None
        if not isinstance(value, dict):
            raise UserError(f"config key {key!r}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise UserError(f"config key {key!r}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"config key {key!r}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise UserError(f"config key {key!r}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"config key {key!r}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"config key {key!r}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"config key {key!r}: expected a string, got {value!r}")
        if isinstance(value, bool):
            return str(value).lower()
        return str(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in tp)
            raise UserError(f"config key {key!r}: {value!r} is not one of {choices}") from None
    return value


# ----------------------------------------------------------------------------------------------------------------
# Building the dataclasses


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type of every init field of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls) if f.init}


def suggest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def split_keys(values: dict[str, Any], classes: list[type], source: str) -> list[dict[str, Any]]:
    """Assign each key to the dataclass that owns it, converting its value; unknown keys are errors."""
    types_by_cls = [field_types(c) for c in classes]
    owner: dict[str, int] = {}
    for i, fts in enumerate(types_by_cls):
        for name in fts:
            owner.setdefault(name, i)
    parts: list[dict[str, Any]] = [{} for _ in classes]
    for key, value in values.items():
        if key not in owner:
            raise UserError(f"{source}: unknown config key {key!r}{suggest(key, sorted(owner))}")
        i = owner[key]
        parts[i][key] = convert_value(key, value, types_by_cls[i][key])
    return parts


def build_configs(
    classes: list[type],
    config_file: str | os.PathLike | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> list[Any]:
    """Load ``config_file`` (optional), apply ``overrides`` and return one instance per class in ``classes``.

    Raises :class:`UserError` on unknown keys, wrong types and values a dataclass rejects in ``__post_init__``.
    """
    merged: dict[str, Any] = {}
    file_values = read_config_file(config_file) if config_file else {}
    cli_values = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides or []))
    file_parts = split_keys(file_values, classes, str(config_file)) if file_values else [{} for _ in classes]
    cli_parts = split_keys(cli_values, classes, "command line")
    out = []
    for cls, fp, cp in zip(classes, file_parts, cli_parts, strict=True):
        merged = {**fp, **cp}
        check_ranges(cls, merged)  # declared numeric ranges (guards.py), before the dataclass sees them
        try:
            out.append(cls(**merged))
        except UserError:
            raise
        except (ValueError, TypeError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"invalid configuration ({cls.__name__}): {msg}") from None
        except ImportError as e:  # e.g. `deepspeed` set but the package is not installed
            msg = " ".join(str(e).split())
            raise UserError(f"a configured feature needs a package that is not installed: {msg}") from None
    return out


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
