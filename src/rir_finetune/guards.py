"""The reliability rules every command shares, in one place (issue 13). A command uses them like this:

1. **Numeric ranges** — declare them on the config dataclass; :func:`rir_finetune.config.build_configs` checks every
   value the user gave before the dataclass is built (one line naming the key, exit 2)::

       @dataclass
       class MyConfig:
           RANGES: ClassVar[dict[str, str]] = {"batch_size": ">=1", "alpha": "[0, 1]", "max_records": ">=1"}
           batch_size: int = 32
           alpha: float = 0.5
           max_records: int | None = None  # None: no limit (0 is never "no limit": it is refused)

   Specs: ``">0"``, ``">=1"``, ``"<=10"``, ``"[0, 1]"``, ``"(0, 1]"``, ``"[0, 1)"``, alternatives ``"-1 | >=1"``.
   ``None`` always passes (it is
   the "no limit" / "off" value); NaN and infinity never pass. Lists are checked element by element.
   Every int/float field of a command's config needs an entry (tests/test_reliability.py enforces it).

2. **Outputs** — check every output location *before any work*, naming every input the command reads::

       out = guards.check_output_file(cfg.output, key="output", reads=[cfg.input, cfg.corpus])
       folder = guards.check_output_dir(cfg.output_dir, key="output_dir", reads=[cfg.model, cfg.data])

   Refused: an output that is one of the inputs (or inside an input folder and already there), a folder path that
   is a file, a file path that is a folder, a location that cannot be written. Nothing is created by the check;
   write with :func:`rir_finetune.files.atomic_write` or ``prep.io.atomic_jsonl`` (they create the parent folder).

3. **Decoding** — read text only through :mod:`rir_finetune.files` (``iter_jsonl``, ``iter_lines``,
   ``read_text``): a non-UTF-8 byte is a :class:`UserError` naming ``file:line``. Write JSON with
   :func:`json_line` (NaN / infinity refused: they are not JSON).

4. **Interrupts** — nothing to do: ``cli.main`` installs :func:`install_signal_handlers`, so SIGINT and SIGTERM
   raise :class:`Interrupted` (a ``KeyboardInterrupt``: never swallowed by ``except Exception``) in the main thread;
   ``finally`` blocks and context managers run (partial files stay as written, ``atomic_*`` temporaries are
   removed), and ``cli.main`` prints one ``interrupted (SIGTERM): ...`` line and exits 130 (SIGINT) / 143
   (SIGTERM). A command that can resume should keep its partial work in ``finally``/``except BaseException``
   paths and say how to resume; it must never catch :class:`Interrupted` to carry on.

5. **Model folders** — before loading: :func:`check_model_folder` (exists, config.json, tokenizer files, readable
   safetensors); after loading: :func:`check_tokenizer` (vocabulary not a stub) and :func:`check_finite_weights`
   (no NaN / inf parameter); lengths: :func:`check_max_length` against the model's positions; devices:
   :func:`check_device`; results: :func:`check_finite_array` on embeddings and scores.

6. **Runs into one folder** — :func:`lock_folder` (one writer per output folder, released when the process ends),
   :func:`changed_settings` (what a resumed run would change), :func:`refused_run_cleanup` (a refused run leaves
   a folder it created as it was: removed when it holds only our bookkeeping files).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rir_finetune.errors import UserError

# ----------------------------------------------------------------------------------------------------------------
# 4. Interrupts


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; raised in the main thread by :func:`install_signal_handlers`.

    A ``KeyboardInterrupt``, so every library's Ctrl-C path (DataLoader workers, tqdm, the Trainer) treats
    SIGTERM the same way, and ``except Exception`` never swallows it.
    """

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signum)
        self.signum = int(signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # shell convention: 130 for SIGINT, 143 for SIGTERM


last_signal: int | None = (
    None  # the signal that stopped this run (typer turns KeyboardInterrupt into Exit(130))
)


def _raise_interrupted(signum, frame):
    global last_signal
    last_signal = signum
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread (no-op outside it)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_interrupted)


def interrupted_exit() -> tuple[str, int]:
    """``(signal name, exit status)`` of the interrupt that ended the run (SIGINT when none was recorded)."""
    signum = last_signal or signal.SIGINT
    return signal.Signals(signum).name, 128 + int(signum)


def ignore_signals() -> None:
    """After an interrupt: a second Ctrl-C while we print the last line must not print a traceback."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):
            signal.signal(sig, signal.SIG_IGN)


# ----------------------------------------------------------------------------------------------------------------
# 1. Numeric ranges

_RANGE = re.compile(
    r"\s*(?:(?P<op>>=|<=|>|<)\s*(?P<bound>[-+0-9.eE]+)"
    r"|(?P<lo_br>[\[(])\s*(?P<lo>[-+0-9.eE]+)\s*,\s*(?P<hi>[-+0-9.eE]+)\s*(?P<hi_br>[\])]))\s*"
)


@dataclasses.dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    spec: str = ""

    @classmethod
    def parse(cls, spec: str) -> Range:
        m = _RANGE.fullmatch(spec)
        if not m:
            raise ValueError(f"bad range spec {spec!r}")
        if m.group("op"):
            op, bound = m.group("op"), float(m.group("bound"))
            if op[0] == ">":
                return cls(low=bound, low_open=op == ">", spec=spec)
            return cls(high=bound, high_open=op == "<", spec=spec)
        return cls(
            float(m.group("lo")), float(m.group("hi")), m.group("lo_br") == "(", m.group("hi_br") == ")", spec
        )

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else repr(x)

        if self.low is not None and self.high is not None:
            return (
                f"between {num(self.low)} and {num(self.high)}"
                + (" (exclusive)" if self.low_open and self.high_open else "")
                + (f" (above {num(self.low)})" if self.low_open and not self.high_open else "")
                + (f" (below {num(self.high)})" if self.high_open and not self.low_open else "")
            )
        if self.low is not None:
            if self.low_open:
                return f"greater than {num(self.low)}"
            return "a positive integer" if self.low == 1 else f"{num(self.low)} or more"
        return f"{'less than' if self.high_open else 'at most'} {num(self.high)}"


@dataclasses.dataclass(frozen=True)
class Ranges:
    """One spec, or alternatives joined by ``|`` (``"-1 | >=1"``: -1, upstream's "unset", or a positive count)."""

    parts: tuple[Range, ...]

    @classmethod
    def parse(cls, spec: str) -> Ranges:
        parts = []
        for alt in spec.split("|"):
            alt = alt.strip()
            if re.fullmatch(r"[-+]?[0-9.]+(e[-+]?[0-9]+)?", alt):  # a single allowed value
                parts.append(Range(float(alt), float(alt), spec=alt))
            else:
                parts.append(Range.parse(alt))
        return cls(tuple(parts))

    def contains(self, value: float) -> bool:
        return any(p.contains(value) for p in self.parts)

    @property
    def low(self) -> float | None:
        lows = [p.low for p in self.parts]
        return None if any(v is None for v in lows) else min(lows)

    def describe(self) -> str:
        def one(p: Range) -> str:
            if p.low is not None and p.low == p.high:
                return str(int(p.low)) if p.low.is_integer() else repr(p.low)
            return p.describe()

        return " or ".join(one(p) for p in self.parts)


def declared_ranges(cls: type) -> dict[str, Ranges]:
    """``cls.RANGES`` (and its bases'), parsed."""
    specs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        specs.update(getattr(klass, "RANGES", None) or {})
    return {key: Ranges.parse(spec) for key, spec in specs.items()}


def check_range(key: str, value: Any, rng: Range | Ranges, none_allowed: bool = False) -> None:
    """A :class:`UserError` naming ``key`` unless ``value`` (a number, a list of numbers, or None) is in range."""
    if value is None or isinstance(value, bool):
        return
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not rng.contains(v):
            zero_is_not_none = none_allowed and v == 0 and rng.low is not None and rng.low >= 0
            extra = "; 0 does not mean off or no limit here: use none" if zero_is_not_none else ""
            raise UserError(f"config key {key!r}: must be {rng.describe()}, got {v!r}{extra}")


def check_ranges(cls: type, values: dict[str, Any]) -> None:
    """Check every value in ``values`` that ``cls`` declares a range for (called by ``build_configs``)."""
    import typing

    ranges = declared_ranges(cls)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 (unresolvable annotations: no hint, same check)
        hints = {}
    for key, value in values.items():
        if key in ranges:
            optional = type(None) in typing.get_args(hints.get(key))
            check_range(key, value, ranges[key], none_allowed=optional)


# ----------------------------------------------------------------------------------------------------------------
# 2. Outputs: checked before any work, nothing created by the check


def _paths(reads: Iterable[str | os.PathLike | None]) -> list[Path]:
    return [Path(p) for p in reads if p]


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _inside(child: Path, folder: Path) -> bool:
    try:
        return child.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def _check_writable(path: Path, key: str) -> None:
    """The nearest existing ancestor of ``path`` must be a folder we can write into."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe != path and not probe.is_dir():
        raise UserError(f"config key {key!r}: {path}: {probe} is a file, not a folder")
    if probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"config key {key!r}: {path}: the folder {probe} is not writable")


def check_output_file(
    path: str | os.PathLike | None, *, key: str, reads: Iterable[str | os.PathLike | None] = ()
) -> Path:
    """The output file ``path``, refused (UserError naming ``key``) when writing it could destroy an input.

    Refused: no path; ``path`` is a folder; ``path`` is one of ``reads`` (files or folders the command reads);
    ``path`` already exists inside a folder in ``reads`` (a model or data folder's own file); the location cannot
    be written (read-only folder, a parent that is a file). Nothing is created.
    """
    if not path:
        raise UserError(f"config key {key!r} is required (the file to write)")
    out = Path(path)
    if out.is_dir():
        raise UserError(f"config key {key!r}: {out} is a folder; give a file path")
    for src in _paths(reads):
        if _same(out, src) or (src.is_file() and out.name == src.name and _same(out.parent, src.parent)):
            raise UserError(
                f"config key {key!r}: {out}: the output is the input file {src}; write to another path"
            )
        if src.is_dir() and out.exists() and _inside(out, src):
            raise UserError(
                f"config key {key!r}: {out} is a file of the input folder {src}; write to another path"
            )
    _check_writable(out, key)
    if out.exists() and not os.access(out, os.W_OK):
        raise UserError(f"config key {key!r}: {out} is not writable")
    return out


def check_output_dir(
    path: str | os.PathLike | None,
    *,
    key: str,
    reads: Iterable[str | os.PathLike | None] = (),
    may_hold_inputs: bool = False,
) -> Path:
    """The output folder ``path``, refused when it is a file, one of the input folders (or, unless
    ``may_hold_inputs``, an existing folder holding one: a command that writes sub-folders could reach it), or
    cannot be written. Nothing is created."""
    if not path:
        raise UserError(f"config key {key!r}: required (the folder to write)")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"config key {key!r}: {out} is a file, not a folder")
    for src in _paths(reads):
        holds = not may_hold_inputs and src.exists() and src.is_dir() and out.exists() and _inside(src, out)
        if _same(out, src) or holds:
            raise UserError(
                f"config key {key!r}: {out} is (or holds) the input {src}; writing there would change it; "
                "choose another folder"
            )
    _check_writable(out, key)
    return out


def check_cache_dir(path: str | os.PathLike | None, *, key: str = "cache_dir") -> tuple[Path | None, bool]:
    """``(cache folder, store)`` checked before any work: a folder that cannot be written still serves hits
    (``store`` False, one warning); a location that cannot become a folder is refused. ``None``: no cache."""
    if path is None:
        return None, False
    path = Path(path)
    try:
        _check_writable(path, key)
    except UserError as e:
        if path.is_dir():
            print(f"warning: {e}; corpus embeddings are read from it but not stored", file=sys.stderr)
            return path, False
        raise
    return path, True


# ----------------------------------------------------------------------------------------------------------------
# 3. Writing JSON


def json_line(record: dict[str, Any], where: str = "output") -> str:
    """One JSONL line; NaN and infinity are refused (they are not JSON)."""
    try:
        return json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"
    except ValueError:
        raise UserError(
            f"{where}: a record holds NaN or infinity (the model gives non-finite numbers)"
        ) from None


# ----------------------------------------------------------------------------------------------------------------
# 5. Model folders

TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "sentencepiece.model",
    "spm.model",
    "vocab.model",
)
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|npu|hpu|meta)(:(\d+))?")


def check_model_folder(
    path: str | os.PathLike | None,
    *,
    key: str,
    need_tokenizer: bool = True,
    transformer_dir: Path | None = None,
) -> Path:
    """A local model folder ready to load: it exists, has ``config.json``, tokenizer files and readable weights.

    ``transformer_dir`` is where the transformers model lives (a sentence-transformers folder may keep it in a
    sub-folder); default ``path``.
    """
    if not path:
        raise UserError(f"config key {key!r}: required (a local model folder)")
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"config key {key!r}: {root} is not a model folder (not found)")
    inner = transformer_dir or root
    if not (inner / "config.json").is_file():
        raise UserError(f"config key {key!r}: {inner} is not a model folder (no config.json)")
    if need_tokenizer and not any((d / f).is_file() for d in {root, inner} for f in TOKENIZER_FILES):
        raise UserError(
            f"config key {key!r}: {inner} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
            "copy them from the base model"
        )
    for weights in sorted(inner.glob("*.safetensors")):
        check_safetensors(weights)
    return root


def check_safetensors(path: Path) -> None:
    """The header of a ``.safetensors`` file parses and its data is as long as the header says."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 0 or 8 + n > size:
                raise ValueError("truncated header")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"file is {size} bytes, its header needs {8 + n + end}")
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"{path}: damaged weights file ({e}); copy the model again") from None


def check_tokenizer(tokenizer: Any, model_config: Any, where: str | os.PathLike) -> None:
    """A tokenizer whose vocabulary is a stub (far smaller than the model's embedding table) is refused."""
    vocab = len(tokenizer)
    model_vocab = getattr(model_config, "vocab_size", None)
    if isinstance(model_vocab, int) and model_vocab > 0 and 2 * vocab < model_vocab:
        raise UserError(
            f"{where}: the tokenizer has {vocab} tokens but the model {model_vocab}; "
            "tokenizer files are missing or wrong"
        )


def check_finite_weights(model: Any, where: str | os.PathLike) -> None:
    """A model with a NaN or infinite parameter gives garbage everywhere: refused, naming a parameter."""
    import torch

    for name, p in model.named_parameters():
        if p.is_floating_point() and p.numel() and not bool(torch.isfinite(p).all()):
            raise UserError(f"{where}: weight {name} holds NaN or infinite values; the model is broken")


def check_finite_array(values: Any, what: str) -> None:
    """Embeddings or scores with NaN / inf cannot be right."""
    import numpy as np

    arr = np.asarray(values)
    if arr.size and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).reshape(arr.shape[0], -1).any(axis=1).sum()) if arr.ndim else 1
        raise UserError(
            f"{what}: {bad} of {arr.shape[0] if arr.ndim else 1} are NaN or infinite; the model is broken"
        )


def model_max_positions(model_dir: str | os.PathLike) -> int | None:
    """``max_position_embeddings`` (or ``n_positions``) of ``model_dir/config.json``, None when unknown."""
    cfg_path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = cfg.get(name)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_max_length(key: str, value: int | None, model_dir: str | os.PathLike) -> None:
    """A length above the model's position table is refused before the first batch."""
    limit = model_max_positions(model_dir)
    if value is not None and limit is not None and value > limit:
        raise UserError(f"config key {key!r}: {value} is above the model's {limit} positions ({model_dir})")


def check_device(device: str | None, key: str = "device") -> None:
    """A device that this machine does not have is refused (e.g. ``cuda`` without a GPU)."""
    if device is None:
        return
    m = _DEVICE.fullmatch(str(device).strip())
    if not m:
        raise UserError(f"config key {key!r}: {device!r} is not a device (cpu, cuda, cuda:1, mps)")
    kind, index = m.group(1), int(m.group(3)) if m.group(3) else 0
    if kind == "cpu":
        return
    import torch

    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            have = f"{count} GPU{'s' if count != 1 else ''}" if count else "no CUDA GPU"
            raise UserError(f"config key {key!r}: {device!r} is not available (this machine has {have})")
    elif kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError(f"config key {key!r}: {device!r} is not available on this machine")


# ----------------------------------------------------------------------------------------------------------------
# 6. Runs into one folder

LOCK_NAME = ".rir_finetune.lock"
_held_locks: dict[str, Any] = {}


def lock_folder(folder: str | os.PathLike) -> None:
    """Hold ``folder/.rir_finetune.lock`` until the process ends; a second writer is refused at once."""
    import fcntl

    folder = Path(folder)
    key = str(folder.resolve())
    if key in _held_locks:
        return
    folder.mkdir(parents=True, exist_ok=True)
    handle = (folder / LOCK_NAME).open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise UserError(
            f"{folder}: another run is writing into this folder (lock {LOCK_NAME} held); wait for it or choose "
            "another folder"
        ) from None
    _held_locks[key] = handle


def unlock_folder(folder: str | os.PathLike) -> None:
    handle = _held_locks.pop(str(Path(folder).resolve()), None)
    if handle is not None:
        handle.close()


def changed_settings(saved: dict[str, Any], new: dict[str, Any], may_change: Iterable[str]) -> list[str]:
    """``key: old -> new`` for every key of ``saved`` that ``new`` sets differently (except ``may_change``)."""
    allowed = set(may_change)
    out = []
    for key in sorted(set(saved) & set(new)):
        if key in allowed:
            continue
        old, cur = saved[key], new[key]
        if json.dumps(old, default=str, sort_keys=True) != json.dumps(cur, default=str, sort_keys=True):
            out.append(f"{key}: {old!r} -> {cur!r}")
    return out


@contextlib.contextmanager
def refused_run_cleanup(folder: str | os.PathLike, ours: Iterable[str]) -> Iterator[None]:
    """On a :class:`UserError` inside the block, put ``folder`` back as it was before it.

    A folder that did not exist is removed when it holds only the files named in ``ours`` (our bookkeeping:
    resolved config, lock). An existing folder keeps everything; of ``ours`` only files that were not there
    before are removed.
    """
    folder = Path(folder)
    existed = folder.exists()
    before = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    names = set(ours) | {LOCK_NAME}
    try:
        yield
    except UserError:
        if folder.is_dir():
            now = {p.name for p in folder.iterdir()}
            created = now - before
            if created <= names:
                unlock_folder(folder)
                for name in created:
                    (folder / name).unlink(missing_ok=True)
                if not existed and not any(folder.iterdir()):
                    shutil.rmtree(folder, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------------------------
# Training: the checks `train` runs before it writes anything (duck-typed: guards imports nothing from training)

# keys that may change when a run resumes: how long, how often to save / log / evaluate, where output goes
RESUME_MAY_CHANGE = {
    "resume_from_checkpoint", "overwrite_output_dir", "output_dir", "max_steps", "num_train_epochs",
    "cache_dir", "cache_path", "token", "trust_remote_code", "eval_data", "eval_split", "eval_name",
    "eval_max_queries",
}  # fmt: skip
# TrainingArguments keys that define the optimisation a checkpoint continues
RESUME_MUST_MATCH = {
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio", "weight_decay",
    "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim", "optim_args", "seed", "data_seed",
    "per_device_train_batch_size", "gradient_accumulation_steps", "fp16", "bf16", "dataloader_drop_last",
}  # fmt: skip


def _is_local(path: str | None) -> bool:
    return bool(path) and (Path(path).exists() or Path(path).is_absolute() or str(path).startswith("."))


def check_training_start(
    model_args: Any, data_args: Any, train_args: Any, bookkeeping: Iterable[str]
) -> None:
    """Before ``train`` reads data or writes anything: the output folder, the model folder, the lengths.

    - ``output_dir`` is never the base model, tokenizer, data or eval folder (nor holds one), never a file;
    - ``resume_from_checkpoint auto`` only in a folder that is empty, absent, or holds an earlier run of ours
      (``bookkeeping`` file or a ``checkpoint-N``): it never turns someone's folder into a training folder;
    - a local model folder has config.json, tokenizer files and readable weights;
    - ``query_max_len`` / ``passage_max_len`` / ``answer_max_len`` fit the model's position table.
    """
    model = model_args.model_name_or_path
    tokenizer = model_args.tokenizer_name
    reads = [model, tokenizer, model_args.config_name, *(data_args.train_data or []), data_args.eval_data]
    out = check_output_dir(train_args.output_dir, key="output_dir", reads=[p for p in reads if _is_local(p)])
    resume = train_args.resume_from_checkpoint
    if resume is not None and str(resume).lower() in {"auto", "latest", "true"} and out.is_dir():
        names = {p.name for p in out.iterdir()}
        ours = set(bookkeeping) | {LOCK_NAME}
        if names and not (names & ours or any(re.fullmatch(r"checkpoint-\d+", n) for n in names)):
            raise UserError(
                f"config key 'output_dir': {out} holds files but no earlier run (no {', '.join(sorted(bookkeeping))}, "
                "no checkpoint-N); resume_from_checkpoint auto would train over them. Choose an empty folder"
            )
    if _is_local(model):
        check_model_folder(model, key="model_name_or_path", need_tokenizer=not tokenizer)
        if (
            tokenizer
            and _is_local(tokenizer)
            and not any((Path(tokenizer) / f).is_file() for f in TOKENIZER_FILES)
        ):
            raise UserError(f"config key 'tokenizer_name': {tokenizer} has no tokenizer files")
        for key in ("query_max_len", "passage_max_len", "answer_max_len"):
            check_max_length(key, getattr(data_args, key, None), model_args.config_name or model)


def check_resume_settings(saved_config: str | os.PathLike, parts: list[Any]) -> None:
    """A resumed run must continue the checkpoint's run: refused when a defining setting differs from the one
    recorded in ``saved_config`` (the run's ``rir_config.yaml``); lengths, cadence and output keys may change."""
    import dataclasses
    import enum

    import yaml

    def to_dict(obj: Any) -> dict[str, Any]:  # config.to_dict's mapping; config imports this module
        out = {}
        for f in dataclasses.fields(obj):
            if f.init:
                v = getattr(obj, f.name)
                out[f.name] = v.value if isinstance(v, enum.Enum) else v
        return out

    path = Path(saved_config)
    if not path.is_file():
        return
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return
    new: dict[str, Any] = {}
    defining: set[str] = set()
    for part in parts:
        values = json.loads(json.dumps(to_dict(part), default=str))
        new.update(values)
        is_training_args = hasattr(part, "learning_rate") and hasattr(part, "output_dir")
        defining |= RESUME_MUST_MATCH if is_training_args else set(values) - RESUME_MAY_CHANGE
    changed = changed_settings(saved, new, may_change=set(new) - defining)
    if changed:
        raise UserError(
            f"{path}: resuming would continue the checkpoint's run with other settings ({'; '.join(changed[:4])}"
            f"{'; ...' if len(changed) > 4 else ''}); restore them, or train into a new output_dir"
        )
