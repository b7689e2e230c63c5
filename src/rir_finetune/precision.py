"""Devices and float types: ``device: auto`` (every command's default) is the local rank's CUDA device when one is
visible, else the CPU; :func:`check_device` refuses a device this machine does not have; ``dtype: auto`` computes
in bf16 where the hardware does bf16 arithmetic natively and in fp32 elsewhere, except for an encoder
(:func:`resolve_encode_dtype`: bf16 on a GPU, fp32 on a CPU).

bf16 matmuls are the largest speed lever on hardware that has them (benchmarks/README.md has the measured ratio). On
a CPU without native bf16 (AVX2 only) torch emulates it and bf16 is slower than fp32, so ``auto`` means bf16 only
where it is native: CUDA devices with bf16 (Ampere and later), CPUs with AVX512-BF16, AMX-BF16 or Arm's BF16
extensions.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from rir_finetune.errors import UserError

DTYPES = ("auto", "float32", "bfloat16", "float16")  # the values of every 'dtype' config key
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def cpu_has_bf16(capabilities: Mapping[str, Any]) -> bool:
    """Whether a CPU (``torch.cpu.get_capabilities()``) does bf16 arithmetic natively rather than emulated."""
    return any(bool(capabilities.get(k)) for k in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))


def bf16_native(device: str | None = None) -> bool:
    """Whether ``device`` (``cpu``, ``cuda``, ``cuda:1``; None or ``auto``: cuda when available) computes bf16
    natively."""
    import torch

    on_cuda = device.startswith("cuda") if device and device != "auto" else torch.cuda.is_available()
    if on_cuda:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_has_bf16(torch.cpu.get_capabilities())


def check_dtype(value: str, key: str = "dtype") -> str:
    """The canonical name of a dtype setting (``bf16`` -> ``bfloat16``), or a UserError naming the key."""

    name = _ALIASES.get(str(value).lower(), str(value).lower())
    if name not in DTYPES:
        raise UserError(
            f"config key {key!r}: {value!r} is not one of {', '.join(DTYPES)} (or bf16, fp16, fp32)"
        )
    return name


def resolve_dtype(value: str, device: str | None = None) -> str:
    """``auto`` -> ``bfloat16`` where ``device`` has native bf16, else ``float32``; other names as they are."""
    name = check_dtype(value)
    if name != "auto":
        return name
    return "bfloat16" if bf16_native(device) else "float32"


# Encoding (eval, mine, score's teachers, reward's and generate's retrievers) resolves ``auto`` by its own rule, as
# FlagEmbedding's use_fp16 does: half precision on a GPU, where fp32 matmuls waste most of the chip, and fp32 on a
# CPU even with native bf16, where bf16 is faster but moves embeddings in the third decimal and swaps near-tied
# documents: the numbers a CPU user compares across runs stay fp32 unless they ask (benchmarks/README.md).
ENCODE_DTYPE_HELP = (
    "the encoder's float type: auto (bf16 on a CUDA device that has it, fp32 on a CPU: set bfloat16 there to "
    "take its speed, embeddings move in the third decimal) | float32 | bfloat16 | float16"
)
PACK_HELP = (
    "each batch as one packed row of its real tokens (no FLOPs on padding, the same embeddings): true | false | "
    "auto (packed on CUDA, padded on a CPU, whose padded path is tuned)"
)


def resolve_encode_dtype(value: str, device: str | None = None) -> str:
    """An encoder's ``dtype``: ``auto`` -> ``bfloat16`` on a CUDA device with native bf16, else ``float32``."""
    name = check_dtype(value)
    if name != "auto":
        return name
    import torch

    on_cuda = str(device).startswith("cuda") if device and device != "auto" else torch.cuda.is_available()
    return "bfloat16" if on_cuda and bf16_native(device) else "float32"


def true_false_or_auto(value: Any, key: str) -> bool | str:
    """A true / false / auto key (None is auto), or a UserError naming it."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return "auto"
    if isinstance(value, bool):
        return value
    raise UserError(f"config key {key!r}: true, false or auto, got {value!r}")


_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|npu|hpu|meta)(:(\d+))?")


DEVICE_HELP = (
    "auto: the local rank's CUDA device when one is visible, else the CPU; or cpu, cuda, cuda:1, mps"
)


def resolve_device(device: str | None, key: str = "device") -> str:
    """``auto`` (or None) -> ``cuda:<LOCAL_RANK>`` when CUDA is visible, else ``cpu``; a named device is checked."""
    check_device(device, key)
    if device is not None and str(device).strip() != "auto":
        return str(device).strip()
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0) % torch.cuda.device_count()}"
    return "cpu"


def check_device(device: str | None, key: str = "device") -> None:
    """A device that this machine does not have is refused (e.g. ``cuda`` without a GPU); ``auto`` always passes."""
    if device is None or str(device).strip() == "auto":
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


def cuda_free_bytes(device) -> float:
    """Bytes a new allocation on the CUDA ``device`` can take: what the driver reports free plus what torch's caching
    allocator holds unused."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return float(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
