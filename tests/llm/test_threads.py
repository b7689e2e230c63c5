"""How many threads a local LLM backend takes: the cores other work leaves free right now (llm/common.py)."""

from __future__ import annotations

import os

import pytest

from rir_finetune.llm import common

STAT_BEFORE = """cpu  900 0 300 2700 100 0 0 0 0 0
cpu0 100 0 0 900 0 0 0 0 0 0
cpu1 200 0 100 600 100 0 0 0 0 0
cpu2 600 0 200 1200 0 0 0 0 0 0
intr 12345
"""
# over the interval: cpu0 100 jiffies, 40 idle + 10 iowait -> 0.5 busy; cpu1 100 jiffies, none idle -> 1.0 busy;
# cpu2 (not ours) fully busy -> not counted
STAT_AFTER = """cpu  1150 0 450 2740 110 0 0 0 0 0
cpu0 140 0 10 940 10 0 0 0 0 0
cpu1 290 0 110 600 100 0 0 0 0 0
cpu2 700 0 300 1200 0 0 0 0 0 0
intr 12399
"""


def test_busy_cores_is_the_non_idle_share_of_our_cores_between_two_samples(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text(STAT_BEFORE)
    monkeypatch.setattr(common.time, "sleep", lambda s: stat.write_text(STAT_AFTER))
    assert common.busy_cores({0, 1}, stat=str(stat)) == pytest.approx(1.5)
    stat.write_text(STAT_BEFORE)
    assert common.busy_cores({0}, stat=str(stat)) == pytest.approx(0.5)
    stat.write_text(STAT_BEFORE)
    assert common.busy_cores({7}, stat=str(stat)) is None  # no such cpu line: fall back
    assert common.busy_cores({0}, stat=str(tmp_path / "missing")) is None


@pytest.mark.parametrize(
    "busy, expected",
    [(0.0, 4), (0.4, 4), (0.6, 3), (2.5, 1), (3.9, 1), (9.0, 1)],
)
def test_threads_are_the_cores_not_busy_now(monkeypatch, busy, expected):
    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(common, "busy_cores", lambda cpus: busy)
    monkeypatch.setattr(common.os, "getloadavg", lambda: (50.0, 50.0, 50.0))  # a stale average is not used
    assert common.threads_setting(None) == expected
    assert common.threads_setting(3) == 3  # the setting wins


def test_threads_fall_back_to_the_load_average_without_proc_stat(monkeypatch):
    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(common, "busy_cores", lambda cpus: None)
    monkeypatch.setattr(common.os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    assert common.threads_setting(None) == 1


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux only")
def test_busy_cores_reads_this_machine():
    cpus = set(os.sched_getaffinity(0))
    busy = common.busy_cores(cpus)
    assert busy is not None and 0.0 <= busy <= len(cpus) + 1e-9
