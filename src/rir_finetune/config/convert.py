"""Converting a config value (YAML, JSON or command-line text) to its field's type.

YAML reads ``1e-5`` as a string and the command line gives only strings: both still become the field's float. A
value that does not fit is a :class:`UserError` naming the key.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from typing import Any, Literal, get_args, get_origin

from rir_finetune.errors import UserError

# text keys whose values include "true" (resume_from_checkpoint: true is "auto", as upstream's launches write it)
_BOOL_AS_TEXT = frozenset({"resume_from_checkpoint"})
_NONE_IS_A_VALUE = {"report_to"}  # keys where the text "none" is a real value, not null
_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off", "none", ""}


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type of every init field of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls) if f.init}


def type_name(tp: Any) -> str:
    """``int | None`` -> ``int?``: how ``--help`` shows a key's type."""
    args = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) in (typing.Union, types.UnionType):
        inner = " | ".join(type_name(a) for a in args)
        return f"{inner}?" if type(None) in get_args(tp) and len(args) == 1 else inner
    if get_origin(tp) is Literal:
        return "|".join(map(str, get_args(tp)))
    if get_origin(tp) in (list, tuple):
        return f"list[{type_name(args[0]) if args else 'any'}]"
    if get_origin(tp) is dict:
        return "mapping"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "|".join(str(m.value) for m in tp)
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


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
        # a bare `--out` (its value lost, e.g. an empty shell variable) or YAML's true
        if isinstance(value, bool):
            if key in _BOOL_AS_TEXT:
                return str(value).lower()
            raise UserError(
                f"config key {key!r}: expected text, got {str(value).lower()} (a YAML true/false, or --{key} given "
                "without its value)"
            )
        return str(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in tp)
            raise UserError(f"config key {key!r}: {value!r} is not one of {choices}") from None
    return value
