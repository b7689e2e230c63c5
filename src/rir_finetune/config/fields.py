"""Declaring a config key: its default, one line of help and its numeric range, beside the field.

    @dataclass
    class MineConfig:
        negatives: int = option(15, "hard negatives per record", range=">=1")
        sample_range: list[int] = option(factory=lambda: [10, 100], help="ranks drawn from")

:func:`rir_finetune.config.build_configs` checks every range before the dataclass is built (one line naming the key,
exit 2), and ``rir-finetune CMD --help`` prints the help. A config that subclasses someone else's dataclass
(``transformers.TrainingArguments``) declares ranges for the fields it inherits in ``INHERITED_RANGES``.

Range specs: ``">0"``, ``">=1"``, ``"<=10"``, ``"[0, 1]"``, ``"(0, 1]"``, ``"[0, 1)"``, and alternatives joined by
``|`` (``"-1 | >=1"``: upstream's "unset" or a positive count). ``None`` always passes (it is the "no limit" / "off"
value); NaN and infinity never pass; lists are checked element by element.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any

from rir_finetune.errors import UserError

# transformers.TrainingArguments' numbers, for the configs that subclass it (train, train-generator); 0 never means
# "off" unless upstream says so
TRAINER_RANGES: dict[str, str] = {
    "per_device_train_batch_size": ">=1", "per_device_eval_batch_size": ">=1", "num_train_epochs": ">0",
    "max_steps": "-1 | >=1", "learning_rate": ">0", "warmup_steps": ">=0", "warmup_ratio": "[0, 1)",
    "weight_decay": ">=0", "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)", "adam_epsilon": ">0",
    "gradient_accumulation_steps": ">=1", "max_grad_norm": ">=0", "label_smoothing_factor": "[0, 1)",
    "neftune_noise_alpha": ">0", "torch_empty_cache_steps": ">=1", "logging_steps": ">0", "eval_steps": ">0",
    "eval_delay": ">=0", "eval_accumulation_steps": ">=1", "save_steps": ">0", "save_total_limit": ">=1",
    "seed": ">=0", "data_seed": ">=0", "dataloader_num_workers": ">=0", "dataloader_prefetch_factor": ">=1",
    "ddp_bucket_cap_mb": ">=1", "ddp_timeout": ">=1", "local_rank": ">=-1",
}  # fmt: skip


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002 (the word every argument parser uses)
    *,
    range: str | None = None,  # noqa: A002
    factory: Any = dataclasses.MISSING,
    hidden: bool = False,
    **field_kwargs: Any,
) -> Any:
    """A dataclass field whose metadata carries the key's help and range (``hidden``: not listed by ``--help``)."""
    metadata: dict[str, Any] = {"help": help, "hidden": hidden}
    if range is not None:
        Ranges.parse(range)  # a bad spec fails at import, not at the first user who hits it
        metadata["range"] = range
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata, **field_kwargs)
    return dataclasses.field(default=default, metadata=metadata, **field_kwargs)


_RANGE = re.compile(
    r"\s*(?:(?P<op>>=|<=|>|<)\s*(?P<bound>[-+0-9.eE]+)"
    r"|(?P<lo_br>[\[(])\s*(?P<lo>[-+0-9.eE]+)\s*,\s*(?P<hi>[-+0-9.eE]+)\s*(?P<hi_br>[\])]))\s*"
)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


@dataclasses.dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    @classmethod
    def parse(cls, spec: str) -> Range:
        spec = spec.strip()
        if re.fullmatch(r"[-+]?[0-9.]+(e[-+]?[0-9]+)?", spec):  # a single allowed value
            return cls(float(spec), float(spec))
        m = _RANGE.fullmatch(spec)
        if not m:
            raise ValueError(f"bad range spec {spec!r}")
        if m.group("op"):
            op, bound = m.group("op"), float(m.group("bound"))
            if op[0] == ">":
                return cls(low=bound, low_open=op == ">")
            return cls(high=bound, high_open=op == "<")
        return cls(
            float(m.group("lo")), float(m.group("hi")), m.group("lo_br") == "(", m.group("hi_br") == ")"
        )

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self) -> str:
        if self.low is not None and self.low == self.high:
            return _num(self.low)
        if self.low is not None and self.high is not None:
            return (
                f"between {_num(self.low)} and {_num(self.high)}"
                + (" (exclusive)" if self.low_open and self.high_open else "")
                + (f" (above {_num(self.low)})" if self.low_open and not self.high_open else "")
                + (f" (below {_num(self.high)})" if self.high_open and not self.low_open else "")
            )
        if self.low is not None:
            if self.low_open:
                return f"greater than {_num(self.low)}"
            return "a positive integer" if self.low == 1 else f"{_num(self.low)} or more"
        return f"{'less than' if self.high_open else 'at most'} {_num(self.high)}"


@dataclasses.dataclass(frozen=True)
class Ranges:
    """One spec, or alternatives joined by ``|``."""

    parts: tuple[Range, ...]
    spec: str = ""

    @classmethod
    def parse(cls, spec: str) -> Ranges:
        return cls(tuple(Range.parse(alt) for alt in spec.split("|")), spec)

    def contains(self, value: float) -> bool:
        return any(p.contains(value) for p in self.parts)

    @property
    def low(self) -> float | None:
        lows = [p.low for p in self.parts]
        return None if any(v is None for v in lows) else min(lows)

    def describe(self) -> str:
        return " or ".join(p.describe() for p in self.parts)


def ranges_of(cls: type) -> dict[str, Ranges]:
    """Every declared range of dataclass ``cls``: its fields' metadata and ``INHERITED_RANGES`` up its bases."""
    specs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        specs.update(getattr(klass, "INHERITED_RANGES", None) or {})
    for f in dataclasses.fields(cls):
        if "range" in f.metadata:
            specs[f.name] = f.metadata["range"]
    return {key: Ranges.parse(spec) for key, spec in specs.items()}


def check_range(key: str, value: Any, rng: Ranges, none_allowed: bool = False) -> None:
    """A :class:`UserError` naming ``key`` unless ``value`` (a number, a list of numbers, or None) is in range."""
    if value is None or isinstance(value, bool):
        return
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not rng.contains(v):
            zero_is_not_none = none_allowed and v == 0 and rng.low is not None and rng.low >= 0
            extra = "; 0 does not mean off or no limit here: use none" if zero_is_not_none else ""
            raise UserError(f"config key {key!r}: must be {rng.describe()}, got {v!r}{extra}")


def check_ranges(cls: type, values: dict[str, Any]) -> None:
    """Check every value in ``values`` that ``cls`` declares a range for (``build_configs`` calls it)."""
    ranges = ranges_of(cls)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 (unresolvable annotations: no hint, same check)
        hints = {}
    for key, value in values.items():
        if key in ranges:
            optional = type(None) in typing.get_args(hints.get(key))
            check_range(key, value, ranges[key], none_allowed=optional)


def key_help(cls: type, name: str) -> str:
    """The one-line help of field ``name`` (transformers' ``metadata["help"]`` too), with its range."""
    f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    text = " ".join(str((f.metadata or {}).get("help", "")).split()) if f is not None else ""
    rng = ranges_of(cls).get(name)
    if rng is not None:
        text = f"{text} [{rng.spec.strip()}]" if text else f"[{rng.spec.strip()}]"
    return text
