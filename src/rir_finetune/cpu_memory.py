"""Keep freed CPU memory in the process for reuse (glibc), instead of returning it to the kernel after every op.

A transformer step on CPU allocates and frees the same large blocks (activations, attention scores of tens to
hundreds of MiB) over and over. glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and unmaps it on free, so each step faults in every page again: on a 2-core machine about a third of a
MiniLM training step went to the kernel. With mmap disabled for the heap and trimming off, freed blocks stay in the
heap and the next step reuses them: the resident set stays at its peak (which the step needs anyway) and the page
faults stop. Nothing happens off glibc (macOS, musl) or when ``RIR_FINETUNE_MALLOC=default``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger("rir_finetune")

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_applied = False


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
    ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _applied = ok
    if ok:
        logger.debug("glibc malloc: freed memory kept for reuse (RIR_FINETUNE_MALLOC=default turns this off)")
    return ok
