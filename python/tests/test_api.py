"""The API beyond forks: errors as exceptions with the exit code, `vms()`, a VM's own
snapshots, QMP, a golden reused within a session and one cached across sessions."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import disk_has, disk_write, guest_argv
from qsnap import FORMAT, Golden, NotReady, Qsnap, QsnapError, Vm, agent_answers, console_prints


def test_errors_carry_the_exit_code_and_kind(qsnap: Qsnap) -> None:
    with pytest.raises(QsnapError) as e:
        qsnap.vm("nosuch")
    assert e.value.code == 4 and e.value.kind == "not-found", e.value
    assert "nosuch" in e.value.message
    with pytest.raises(QsnapError) as e:
        qsnap.call("create", "nosuch", "bad/name")
    assert e.value.code == 2 and e.value.kind == "usage", e.value


def test_vms_status_and_qmp(qsnap: Qsnap, golden: Golden, vm: Vm) -> None:
    names = {v["vm"]: v for v in qsnap.vms()}
    assert golden.vm.name in names and vm.name in names, names
    assert all(v["format"] == FORMAT for v in names.values())
    st = vm.status()
    assert st["state"]["state"] == "running", st
    assert st["clone-of"]["vm"] == golden.vm.name and st["clone-of"]["snapshot"] == golden.snapshot
    assert vm.qmp("query-status")["status"] == "running"
    assert vm.console_log is not None and vm.console_log.parent != golden.vm.console_log.parent  # type: ignore[union-attr]
    assert qsnap.vm(vm.name).name == vm.name


def test_a_fork_snapshots_reverts_and_deletes_its_own(vm: Vm) -> None:
    made = vm.create("clean", disk_only=True, description="before the write")
    assert made["name"] == "clean" and made["description"] == "before the write", made
    disk_write(vm, 0x5A, "4M")
    assert disk_has(vm, 0x5A, "4M")
    vm.revert("clean")
    vm.wait_console("tick", timeout=60)
    assert not disk_has(vm, 0x5A, "4M"), "the revert kept a write made after the snapshot"
    assert vm.snapshots() == ["clean"]
    vm.delete("clean")
    assert vm.snapshots() == []


def test_the_same_command_line_is_the_same_golden(qsnap: Qsnap, golden: Golden, golden_dir: Path, vm: Vm) -> None:
    again = qsnap.golden(guest_argv(golden_dir), ready=console_prints("never printed"))
    assert again.vm.name == golden.vm.name and again.snapshot == golden.snapshot
    # Its fork does not take the name of the fork `vm` (of the other Golden object).
    with again.fork() as other:
        assert other.name != vm.name
        other.remove()  # gone before the `with` ends: its exit is still fine
    # The golden's overlays are in the store, not beside the command line's disk.
    assert sorted(p.name for p in golden_dir.iterdir()) == ["console.log", "disk.qcow2", "qga.sock"]
    # A handle that does not own its VM leaves it alone on exit.
    with qsnap.vm(golden.vm.name):
        pass
    assert golden.snapshot in golden.vm.snapshots()


def test_a_cached_golden_is_imported_not_booted(tmp_path: Path) -> None:
    binary = shutil.which("qsnap")
    assert binary is not None
    cache = tmp_path / "cache"
    # Each session's command line names its own paths: the cache key says they are one golden.
    key = "the test guest, v1"
    first = Qsnap(tmp_path / "s1", binary=binary)
    try:
        first.golden(guest_argv(tmp_path / "one"), ready=agent_answers(), cache_dir=cache, cache_key=key)
        assert len(list(cache.glob("*.qsnap"))) == 1
    finally:
        first.close()
    assert not (tmp_path / "s1" / "overlays").exists() or not any((tmp_path / "s1" / "overlays").iterdir())
    second = Qsnap(tmp_path / "s2", binary=binary)
    argv = guest_argv(tmp_path / "two")
    try:
        # A cache another user could write into is refused (its command lines run trusted).
        shared = tmp_path / "shared"
        shared.mkdir(mode=0o777)
        shared.chmod(0o777)
        with pytest.raises(QsnapError) as e:
            second.golden(argv, ready=agent_answers(), cache_dir=shared)
        assert e.value.kind == "usage", e.value
        # A check that never passes: the golden must come from the cache, without a boot.
        cached = second.golden(argv, ready=lambda vm: False, cache_dir=cache, cache_key=key, timeout=1)
        assert cached.vm.status()["state"]["state"] == "stopped"
        assert cached.snapshot in cached.vm.snapshots()
        with cached.fork() as fork:
            assert fork.status()["state"]["state"] == "running"
            fork.wait_console("tick", timeout=60)
    finally:
        second.close()
    assert second.vms() == []
    # The imported golden's disks (in the store) went with it: the next import can take the name.
    assert not (tmp_path / "s2" / "vms" / cached.vm.name).exists()
    third = Qsnap(tmp_path / "s3", binary=binary)
    try:
        # Another snapshot name is not the cached golden: it boots (and is never ready here).
        with pytest.raises(NotReady):
            third.golden(guest_argv(tmp_path / "three"), ready=lambda vm: False, snapshot="other",
                         cache_dir=cache, cache_key=key, timeout=1)
    finally:
        third.close()
    assert third.vms() == []


def test_console_offsets_follow_how_qemu_opens_the_log(tmp_path: Path) -> None:
    from qsnap.client import _console_in, _offset

    log = tmp_path / "c.log"
    log.write_text("an earlier boot\n")
    appends = _console_in(["q", "-chardev", f"file,id=s,path={log},append=on", "-serial", "chardev:s"], tmp_path)
    assert appends == (log, True) and _offset(appends) == len("an earlier boot\n")
    # Without append=on (and with -serial file:), QEMU truncates the log at every start.
    truncates = _console_in(["q", "-chardev", f"file,id=s,path={log}", "-serial", "chardev:s"], tmp_path)
    assert truncates == (log, False) and _offset(truncates) == 0
    assert _console_in(["q", "-serial", "file:rel.log"], tmp_path) == (tmp_path / "rel.log", False)
    assert _console_in(["q", "-serial", "stdio"], tmp_path) is None


def test_forks_claim_standbys_of_the_golden_s_pool(qsnap: Qsnap, golden: Golden) -> None:
    report = golden.pool(1)
    assert len(report["ready"]) == 1, report
    standby = report["ready"][0]
    with golden.fork() as vm:
        assert vm.status()["clone-of"]["standby"] == standby
        vm.wait_console("tick", timeout=60)
        assert "MISMATCH" not in vm.console_tail(100_000)
    # Emptied (after the refill the fork started): no standby is left in the store.
    assert golden.pool(0)["ready"] == []
    assert not [v["vm"] for v in qsnap.vms() if v["vm"].startswith("sb-")]
