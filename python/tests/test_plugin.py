"""The fixture's promise: a session whose test fails still leaves no QEMU behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import guest_argv


def qemus_naming(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline and b"qemu-system" in cmdline:
            pids.append(int(entry))
    return pids


def test_a_failing_test_leaves_no_qemu_behind(
    pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory
) -> None:
    argv = guest_argv(pytester.path)
    note = pytester.path / "store.txt"
    pytester.makepyfile(
        test_inner=f"""
import json, pathlib
from qsnap import console_prints

def test_fails(qsnap):
    pathlib.Path({str(note)!r}).write_text(str(qsnap.store))
    golden = qsnap.golden(json.loads({json.dumps(json.dumps(argv))}), ready=console_prints("tick 2"))
    fork = golden.fork()  # not in a `with`: the session's end must remove it
    fork.wait_console("tick", timeout=60)
    assert False, "this test fails on purpose"
"""
    )
    # A short base: a clone's sockets live under the store, and a socket path has 108 bytes.
    inner = tmp_path_factory.getbasetemp() / "inner"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--basetemp={inner}", timeout=300)
    result.assert_outcomes(failed=1)
    assert "this test fails on purpose" in result.stdout.str()
    store = note.read_text()
    assert qemus_naming(store) == [], f"QEMU left running for {store}"
    assert not any((Path(store) / "vms").iterdir()), "VMs left in the store"
    # The golden's disk stays the user's; its QEMU (named by its disk path) is gone too.
    assert qemus_naming(str(pytester.path / "disk.qcow2")) == []
