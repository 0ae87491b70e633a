"""training/allocator.py: freed memory stays in the process, and a heap that fragments
(small objects kept across steps) is handed back instead of growing without bound."""

import subprocess
import sys

import pytest

from himoe.training.allocator import FreedMemoryWatch, glibc

MB = 1 << 20


class Fake:
    """A resident size the test sets, and a count of trims."""

    def __init__(self):
        self.now, self.trims = 1000 * MB, 0

    def watch(self, active=True) -> FreedMemoryWatch:
        def trim():
            self.trims += 1
            self.now -= 300 * MB  # the step's own blocks go back too

        return FreedMemoryWatch(active, resident=lambda: self.now, trim=trim)


def test_trims_once_growth_passes_the_slack_then_waits_a_step_to_take_the_new_size():
    f = Fake()
    w = f.watch()
    w.after_step()  # steady size: 1000 MB; slack max(256 MB, 25%) = 256 MB
    f.now += 256 * MB
    w.after_step()
    assert f.trims == 0  # at the slack, not past it
    f.now += 4 * MB
    w.after_step()
    assert f.trims == 1 and f.now == 960 * MB
    f.now += 300 * MB  # the next step takes its blocks back: no second trim for them
    w.after_step()  # steady 1260 MB, slack 315 MB
    f.now += 315 * MB
    w.after_step()
    assert f.trims == 1
    f.now += 1 * MB
    w.after_step()
    assert f.trims == 2


def test_slack_grows_with_the_process_and_an_inactive_watch_never_trims():
    f = Fake()
    f.now = 4000 * MB  # slack: 25% = 1000 MB
    w = f.watch()
    w.after_step()
    f.now += 900 * MB
    w.after_step()
    assert f.trims == 0
    f = Fake()
    w = f.watch(active=False)
    for _ in range(3):
        w.after_step()
        f.now += 10_000 * MB
    assert f.trims == 0 and w.steady is None


KEPT_THEN_TRIMMED = """
import torch
from himoe.training.allocator import FreedMemoryWatch, keep_freed_memory, resident_bytes
assert keep_freed_memory()
watch = FreedMemoryWatch(active=True, min_slack=64 << 20)
torch.ones(64, 1024, 1024).sum()  # a first step's blocks
watch.after_step()  # steady size
steady = resident_bytes()
torch.ones(160, 1024, 1024).sum()  # 640 MB, freed at once: heap pages the process keeps
kept = resident_bytes()
watch.after_step()
print((kept - steady) >> 20, (resident_bytes() - steady) >> 20, watch.trims)
"""


@pytest.mark.skipif(glibc() is None, reason="the heap setting is glibc's")
def test_freed_pages_stay_until_the_process_grows_past_the_slack_then_go_back():
    out = subprocess.run([sys.executable, "-c", KEPT_THEN_TRIMMED], capture_output=True,
                         text=True, check=True).stdout.split()
    kept, after, trims = map(int, out)
    assert kept > 250  # freed, but resident: what saves each step's page faults
    assert trims == 1 and after < 64
