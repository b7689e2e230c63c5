"""Configuration: every command's keys as dataclass fields, loaded from YAML/JSON plus command-line overrides.

- :mod:`.fields`: :func:`option` declares a key (default, help, range); ranges are checked in one place.
- :mod:`.convert`: values converted to the field's type.
- :mod:`.loader`: files (duplicate keys refused with ``file:line``) and command lines into dataclasses; unknown keys
  refused with ``file:line`` and the closest valid key.
- :mod:`.help`: the key table ``rir-finetune CMD --help`` prints.
"""

from rir_finetune.config.convert import convert_value, field_types, type_name
from rir_finetune.config.fields import (
    TRAINER_RANGES,
    Range,
    Ranges,
    check_range,
    check_ranges,
    key_help,
    option,
    ranges_of,
)
from rir_finetune.config.help import describe_keys
from rir_finetune.config.loader import (
    COMMAND_LINE,
    ConfigFile,
    build_configs,
    build_one,
    check_values,
    load_config,
    parse_overrides,
    read_config_file,
    split_positional,
    suggest,
    to_dict,
)

__all__ = [
    "COMMAND_LINE",
    "ConfigFile",
    "TRAINER_RANGES",
    "Range",
    "Ranges",
    "build_configs",
    "build_one",
    "check_range",
    "check_ranges",
    "check_values",
    "convert_value",
    "describe_keys",
    "field_types",
    "key_help",
    "load_config",
    "option",
    "parse_overrides",
    "ranges_of",
    "read_config_file",
    "split_positional",
    "suggest",
    "to_dict",
    "type_name",
]
