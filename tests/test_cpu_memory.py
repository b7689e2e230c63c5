"""cpu_memory.keep_freed_memory: a freed large block is reused without new page faults (glibc, Linux)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from rir_finetune.cpu_memory import keep_freed_memory
applied = keep_freed_memory()
x = torch.ones(16 * 2**20)  # 64 MiB, freed: a training step frees its activations like this
del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(12 * 2**20)  # 48 MiB: above glibc's largest mmap threshold (32 MiB), fits in the freed block
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")


def _probe(**env) -> tuple[bool, int]:
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **env})  # fmt: skip
    assert r.returncode == 0, r.stderr
    applied, faults = r.stdout.split()
    return applied == "True", int(faults)


def test_freed_block_is_reused_without_page_faults():
    applied, faults = _probe()
    assert applied
    assert faults < 1000  # 48 MiB of fresh pages would be ~12,000 faults


def test_opt_out_leaves_glibc_default():
    applied, faults = _probe(RIR_FINETUNE_MALLOC="default")
    assert not applied
    assert faults > 10_000  # the default: a fresh mmap, every page faulted in again


HOLES = """
import sys, torch
from rir_finetune.cpu_memory import keep_freed_memory, release_free_memory

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) >> 10

applied = keep_freed_memory()
blocks = [torch.ones(2**18) for _ in range(400)]  # 400 x 1 MiB in the heap (mmap off)
keep = blocks[1::2]  # every other block stays live: the freed ones are holes below a live block, not the top
del blocks
full = anon()
released = release_free_memory()
print(applied, released, full, anon())
"""


def test_release_returns_the_holes_between_live_blocks():
    r = subprocess.run([sys.executable, "-c", HOLES], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    applied, released, full, after = r.stdout.split()
    assert applied == "True" and released == "True"
    assert int(full) - int(after) > 150  # ~200 MiB of holes back to the kernel; glibc's own trim keeps them


def test_release_is_a_no_op_without_the_setting():
    r = subprocess.run([sys.executable, "-c", HOLES], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "RIR_FINETUNE_MALLOC": "default"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:2] == ["False", "False"]
