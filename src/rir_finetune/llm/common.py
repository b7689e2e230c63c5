"""What the LLM backends share: the call types (:class:`Sampling`, :class:`Completion`, :class:`BackendSettings`),
prompt and seed helpers, the progress bar and counts. The entry point is :mod:`rir_finetune.llm.generation`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Protocol, Union

from rir_finetune.config import option
from rir_finetune.errors import UserError

Prompt = Union[str, list[dict[str, str]]]  # noqa: UP007 (a runtime alias)
BACKENDS = ("transformers", "llama_cpp", "openai")
REQUANTIZE_TYPES = (
    "q4_0",
    "q8_0",
    "f16",
)  # gguf_requantize targets: types with batched CPU kernels in llama.cpp


@dataclass
class Sampling:
    """Per call, not per backend."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    n: int = 1  # completions per prompt
    seed: int = 42
    logprobs: bool = (
        False  # per-token log-probabilities of the generated tokens (the model's, at temperature 1)
    )

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise UserError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise UserError("top_p must be in (0, 1]")
        if self.n < 1:
            raise UserError("n (completions per prompt) must be at least 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    text: str
    tokens: int  # generated tokens (the end-of-sequence token not counted)
    finish_reason: str  # "stop" | "length"
    token_logprobs: list[float] | None = None


OnResult = Callable[[int, list[Completion]], None]


class Backend(Protocol):
    name: str

    def generate(
        self, prompts: Sequence[Prompt], sampling: Sampling, on_result: OnResult | None = None
    ) -> list[list[Completion]]:
        """One list of ``sampling.n`` completions per prompt, in input order whatever the batching.

        ``on_result(i, completions)`` runs as soon as prompt ``i`` is finished (in finishing order), so a caller
        can write results as they come; the list returned is complete.
        """
        ...

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[list[float]]:
        """log p(continuation token | prompt, earlier continuation tokens), per continuation token."""
        ...


@dataclass
class BackendSettings:
    """The LLM backend's keys, defined once: every command that generates (augment, generate, reward, score's LLM
    teacher) inherits them, and the round passes its shared ``llm:`` section as these keys."""

    backend: str = option("transformers", "transformers | llama_cpp | openai")
    model: str | None = option(None, "model folder, .gguf file, or (openai) the model name to request")
    gguf_file: str | None = option(None, "GGUF file inside the 'model' folder")
    device: str = option(
        "auto",
        "transformers: auto (the local rank's GPU, else the CPU), cpu, cuda, cuda:1...; llama_cpp: cpu = no "
        "offload, anything else offloads every layer when the library can",
    )
    n_ctx: int = option(4096, "context window in tokens (prompt + reply) for local backends", range=">=1")
    n_threads: int | None = option(
        None, "CPU threads (llama_cpp, torch); None: the cores idle now", range=">=1"
    )
    batch_size: int = option(
        8,
        "sequences decoded together (llama_cpp; transformers on a CPU: on CUDA its batch comes from free memory)",
        range=">=1",
    )
    use_chat_template: bool = option(True, "wrap a plain prompt in the model's chat template when it has one")
    system_prompt: str | None = option(None, "system message sent before a plain prompt (chat models)")
    api_base: str | None = option(None, "openai: endpoint, e.g. http://localhost:8000/v1")
    api_key_env: str = option(
        "OPENAI_API_KEY", "openai: environment variable holding the key (unset: no key)"
    )
    api_timeout: float = option(300.0, "openai: seconds per request", range=">0")
    api_max_retries: int = option(
        5, "openai: retries on 429, 5xx, timeouts and refused connections (with backoff)", range=">=0"
    )
    api_concurrency: int = option(8, "openai: requests in flight", range=">=1")
    api_extra_body: str | None = option(
        None, "openai: JSON object added to every request, e.g. '{\"repeat_penalty\": 1}'"
    )
    progress: bool = option(True, "a progress bar on stderr (prompts and tokens/s)")
    gguf_requantize: str | None = option(
        None, "llama_cpp: re-quantise the GGUF once (cached) to q4_0 / q8_0 / f16, types that batch on CPU"
    )
    dtype: str = option(
        "auto", "transformers: float32 | bfloat16 | float16 | auto (bf16 where the device has it natively)"
    )

    def resolved_dtype(self) -> str | None:
        """The float type the transformers backend computes in (``auto`` resolved on this machine); None for the
        other backends. Part of every fingerprint: bf16 and fp32 greedy answers differ."""
        if self.backend != "transformers" or self.api_base:
            return None
        from rir_finetune.precision import resolve_dtype

        return resolve_dtype(self.dtype, self.device)

    def __post_init__(self):
        from rir_finetune.precision import check_dtype

        self.dtype = check_dtype(self.dtype)
        if self.dtype != "auto" and self.backend != "transformers":
            raise UserError(
                f"config key 'dtype': only the transformers backend takes a dtype ({self.backend} computes in the "
                "GGUF file's types or the server's); leave it at auto"
            )
        if self.backend not in BACKENDS:
            raise UserError(f"config key 'backend': {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.gguf_requantize is not None and self.gguf_requantize not in REQUANTIZE_TYPES:
            raise UserError(
                f"config key 'gguf_requantize': {self.gguf_requantize!r} is not one of {', '.join(REQUANTIZE_TYPES)}"
            )
        if self.gguf_requantize is not None and self.backend != "llama_cpp":
            raise UserError(
                "config key 'gguf_requantize': only the llama_cpp backend re-quantises a GGUF file"
            )

    def backend_settings(self) -> BackendSettings:
        """Just the backend's keys (a command's config inherits them among its own)."""
        return BackendSettings(**{f.name: getattr(self, f.name) for f in fields(BackendSettings)})


# ----------------------------------------------------------------------------------------------------------------
# Shared by the backends


class PromptTooLong(UserError):
    """Prompt ``index`` (0-based, in the caller's list) does not fit the context with ``max_new_tokens``."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def model_file(model: str | None, gguf_file: str | None, key: str = "model") -> tuple[Path, str | None]:
    """(folder, GGUF file name or None) for ``--model FOLDER [--gguf_file F]`` or ``--model FILE.gguf``."""
    if not model:
        raise UserError(f"config key {key!r} is required")
    path = Path(model)
    if gguf_file is None and path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"{path}: GGUF file not found")
        return path.parent, path.name
    if not path.is_dir():
        raise UserError(f"{model}: model folder not found (config key {key!r})")
    if gguf_file is not None and not (path / gguf_file).is_file():
        raise UserError(f"{path / gguf_file}: GGUF file not found (config key 'gguf_file')")
    return path, gguf_file


def check_gguf(path: Path) -> None:
    """A file that does not start with the GGUF magic is refused in one line (llama.cpp would abort)."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UserError(f"{path}: cannot read the model file ({e.strerror})") from None
    if magic != b"GGUF":
        raise UserError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")


def messages_of(prompt: Prompt, system_prompt: str | None) -> list[dict[str, str]]:
    """Chat messages for a prompt: a plain text becomes a user message (after the system message, if any)."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return messages
    if not isinstance(prompt, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in prompt
    ):
        raise UserError("a prompt must be a string or a list of {'role': ..., 'content': ...} messages")
    return [dict(m) for m in prompt]


def sample_seed(seed: int, prompt: Prompt, j: int) -> int:
    """The seed of sample ``j`` of ``prompt``: the same whatever the batch, the order or an earlier interruption."""
    key = json.dumps([seed, prompt, j], ensure_ascii=False, sort_keys=True)
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:4], "little") & 0x7FFFFFFF


def order_by_length(lengths: Sequence[int]) -> list[int]:
    """Prompt indices, longest first (the batches that need most memory come first; equal lengths keep order)."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


@dataclass
class Counts:
    """What a generate call produced; :meth:`lines` is the end-of-run summary."""

    prompts: int = 0
    completions: int = 0
    tokens: int = 0
    empty: int = 0  # completions whose text is blank
    cut: int = 0  # completions stopped by max_new_tokens
    seconds: float = 0.0

    def add(self, completions: list[Completion]) -> None:
        self.prompts += 1
        for c in completions:
            self.completions += 1
            self.tokens += c.tokens
            self.empty += not c.text.strip()
            self.cut += c.finish_reason == "length"

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def lines(self, max_new_tokens: int) -> list[str]:
        return [
            f"{self.prompts} prompts, {self.completions} completions, {self.tokens} tokens in {self.seconds:.1f} s "
            f"({self.tokens_per_s:.1f} tokens/s)",
            f"{self.empty} empty, {self.cut} cut at max_new_tokens={max_new_tokens}",
        ]


@dataclass
class Progress:
    """A tqdm bar over prompts with tokens/s, plus the counts; backends call :meth:`done` per finished prompt."""

    total: int
    enabled: bool = True
    on_result: OnResult | None = None
    counts: Counts = field(default_factory=Counts)

    def __post_init__(self):
        from tqdm import tqdm

        self._start = time.perf_counter()
        # prompts finish in bursts (a whole decoded batch at once): the bar is redrawn on every prompt and its rate is
        # the run's average, so the time left shown after a burst counts the whole burst (drawn at the burst's first
        # prompt with a smoothed rate, it promised hours for minutes of work)
        self._bar = tqdm(
            total=self.total, desc="generate", unit="prompt", disable=not self.enabled, file=sys.stderr,
            smoothing=0, mininterval=0,
        )  # fmt: skip

    def done(self, index: int, completions: list[Completion]) -> None:
        self.counts.add(completions)
        self.counts.seconds = time.perf_counter() - self._start
        self._bar.set_postfix_str(f"{self.counts.tokens_per_s:.0f} tok/s", refresh=False)
        self._bar.update(1)
        if self.on_result is not None:
            self.on_result(index, completions)

    def close(self) -> None:
        self.counts.seconds = time.perf_counter() - self._start
        self._bar.close()


class ScoreProgress:
    """A tqdm bar over scored (prompt, continuation) pairs with tokens/s, for the backends' ``score``."""

    def __init__(self, total: int, enabled: bool = True):
        from tqdm import tqdm

        self._start, self._tokens = time.perf_counter(), 0
        self._bar = tqdm(total=total, desc="score (LLM)", unit="pair", disable=not enabled, file=sys.stderr)

    def update(self, pairs: int, tokens: int) -> None:
        self._tokens += tokens
        rate = self._tokens / max(time.perf_counter() - self._start, 1e-9)
        self._bar.set_postfix_str(f"{rate:.0f} tok/s", refresh=False)
        self._bar.update(pairs)

    def close(self) -> None:
        self._bar.close()


def threads_setting(n_threads: int | None) -> int:
    """The thread count for a local backend: the setting, else the cores not already busy.

    On a machine whose cores other processes keep busy, every extra thread waits for a descheduled sibling at each
    barrier, and one thread decodes several times faster than two (benchmarks/README.md). So ``None`` takes
    the cores minus those busy right now (at least 1); an idle machine gets every core. "Right now" is the busy
    share of this process's cores over a quarter second (``/proc/stat``), not the 1-minute load average: that one
    still counts a job that ended a minute ago, and a run that started after one kept a single thread for its whole
    run. The load average is the fallback off Linux.
    """
    if n_threads:
        return n_threads
    try:
        cpus = set(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = set(range(os.cpu_count() or 1))
    cores = max(len(cpus), 1)
    busy = busy_cores(cpus)
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:
            busy = 0.0
    return max(1, min(cores, cores - int(busy + 0.5)))


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads lowered to ``n`` (never raised) inside the block, and the previous count restored after
    it: the count is process-wide, and the stages that follow an LLM call in the same process (a round's mining,
    training, evaluation) must get the threads that suit them, not the busy-core count of a moment ago."""
    import torch

    before = torch.get_num_threads()
    if n < before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _cpu_times(cpus: set[int], stat: str) -> dict[int, tuple[int, int]]:
    """``{cpu: (total jiffies, idle + iowait jiffies)}`` for the ``cpuN`` lines of ``stat`` named in ``cpus``."""
    out = {}
    with open(stat, encoding="ascii") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                v = [int(x) for x in values[:8]]  # user nice system idle iowait irq softirq steal
                out[int(name[3:])] = (sum(v), v[3] + v[4])
    return out


def busy_cores(cpus: set[int], interval: float = 0.25, stat: str = "/proc/stat") -> float | None:
    """How many of ``cpus`` other work keeps busy: the non-idle share of each over ``interval`` seconds, summed.
    None where ``stat`` cannot be read or names none of them."""
    try:
        before = _cpu_times(cpus, stat)
        time.sleep(interval)
        after = _cpu_times(cpus, stat)
    except (OSError, ValueError, IndexError):
        return None
    busy = 0.0
    for cpu in before.keys() & after.keys():
        total, idle = after[cpu][0] - before[cpu][0], after[cpu][1] - before[cpu][1]
        if total > 0:
            busy += 1.0 - idle / total
    return busy if before.keys() & after.keys() else None
