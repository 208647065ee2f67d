"""Three tests, each on its own fork of one golden snapshot: each changes its fork's disk and
memory, and none sees a trace of the others."""

from __future__ import annotations

import pytest

from conftest import disk_has, disk_write, memory_has, memory_write
from qsnap import Vm

OFFSET = "8M"
MARKERS = {"a": 0xA1, "b": 0xB2, "c": 0xC3}


def check_clean_then_mark(vm: Vm, me: str) -> None:
    # Nothing any other test wrote, on disk or in memory: the fork is the golden instant.
    for other, pattern in MARKERS.items():
        assert not disk_has(vm, pattern, OFFSET), f"disk shows test {other}'s write"
        assert not memory_has(vm, f"/marker-{other}"), f"memory shows test {other}'s file"
    disk_write(vm, MARKERS[me], OFFSET)
    memory_write(vm, f"/marker-{me}", f"written by test {me}")
    assert disk_has(vm, MARKERS[me], OFFSET)
    assert memory_has(vm, f"/marker-{me}")
    assert "MISMATCH" not in vm.console_tail(100_000)


@pytest.mark.parametrize("me", ["a", "b", "c"])
def test_a_fork_sees_nothing_of_the_others(vm: Vm, me: str) -> None:
    check_clean_then_mark(vm, me)
