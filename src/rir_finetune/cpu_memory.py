"""Keep freed CPU memory in the process for reuse (glibc), up to a bound, instead of returning it after every op.

A transformer step on CPU allocates and frees the same large blocks (activations, attention scores of tens to
hundreds of MiB) over and over. glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and unmaps it on free, so each step faults in every page again (a large share of a CPU training step went
to the kernel: benchmarks/README.md). With mmap off for the heap, freed blocks stay in the heap and the next step
reuses them without page faults.

Retention is bounded: when the free memory at the top of the heap exceeds ``M_TRIM_THRESHOLD`` (1 GiB)
glibc gives it back to the kernel down to ``M_TOP_PAD`` (512 MiB). Freed blocks below a live one (holes) stay
resident until reused, and blocks of varying sizes leave holes the next step may not fit into; so the trainer also
calls :func:`release_free_memory` (``malloc_trim(0)``: every whole free page, holes included) at a step boundary
where the resident memory has grown (``training.trainer.ReleaseFreedMemory``). What bounds the process is then the step's own working set (the gradient
cache's memory budget, :mod:`rir_finetune.training.gradcache`).

Nothing happens off glibc (macOS, musl) or when ``RIR_FINETUNE_MALLOC=default``. ``python -m rir_finetune.cpu_memory``
prints the same setting as glibc environment variables, for giving it to another program (benchmarks/peers).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger("rir_finetune")

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

# (mallopt parameter, value, glibc environment variable of the same setting)
SETTINGS = (
    (M_MMAP_MAX, 0, "MALLOC_MMAP_MAX_"),  # large blocks from the heap, so freeing them keeps them for reuse
    (M_TRIM_THRESHOLD, 1 << 30, "MALLOC_TRIM_THRESHOLD_"),  # free top of heap above 1 GiB goes back ...
    (M_TOP_PAD, 512 << 20, "MALLOC_TOP_PAD_"),  # ... down to 512 MiB kept for the next step
)

_applied = False
_malloc_trim = None


def env_equivalent() -> dict[str, str]:
    """The setting as glibc environment variables (read at process start)."""
    return {name: str(value) for _, value, name in SETTINGS}


def keep_freed_memory() -> bool:
    """Apply the setting once per process; True when it is in effect."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("RIR_FINETUNE_MALLOC", "") == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value, _ in SETTINGS)
    _applied = ok
    if ok:
        global _malloc_trim
        _malloc_trim = libc.malloc_trim
        _malloc_trim.argtypes = [ctypes.c_size_t]
        _malloc_trim.restype = ctypes.c_int
    if ok:
        logger.debug(
            "glibc malloc: freed memory kept for reuse, at most ~1 GiB at the top of the heap "
            "(RIR_FINETUNE_MALLOC=default turns this off)"
        )
    return ok


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``; 0 where it is not available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def freed_memory_kept() -> bool:
    """True when :func:`keep_freed_memory` is in effect in this process."""
    return _applied


def release_free_memory() -> bool:
    """Give every whole free page of the heap back to the kernel (``malloc_trim(0)``), holes included."""
    if _malloc_trim is None:
        return False
    return bool(_malloc_trim(0))


if __name__ == "__main__":
    print(" ".join(f"{k}={v}" for k, v in env_equivalent().items()))
