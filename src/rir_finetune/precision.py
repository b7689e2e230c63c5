"""Which float type to compute in: bf16 where the hardware does bf16 arithmetic natively, fp32 elsewhere.

bf16 matmuls are the largest speed lever on hardware that has them: measured on a 2-core AMD EPYC with AVX512-BF16,
a 2048^3 matmul ran at ~359 GFLOP/s in bf16 against ~93 in fp32 (3.9x). On a CPU without native bf16 (AVX2 only)
torch emulates it and bf16 is slower than fp32, so ``auto`` means bf16 only where it is native: CUDA devices with
bf16 (Ampere and later), CPUs with AVX512-BF16, AMX-BF16 or Arm's BF16 extensions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")  # the values of every 'dtype' config key
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def cpu_has_bf16(capabilities: Mapping[str, Any]) -> bool:
    """Whether a CPU (``torch.cpu.get_capabilities()``) does bf16 arithmetic natively rather than emulated."""
    return any(bool(capabilities.get(k)) for k in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))


def bf16_native(device: str | None = None) -> bool:
    """Whether ``device`` (``cpu``, ``cuda``, ``cuda:1``; None: cuda when available) computes bf16 natively."""
    import torch

    on_cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    if on_cuda:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_has_bf16(torch.cpu.get_capabilities())


def check_dtype(value: str, key: str = "dtype") -> str:
    """The canonical name of a dtype setting (``bf16`` -> ``bfloat16``), or a UserError naming the key."""
    from rir_finetune.errors import UserError

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
