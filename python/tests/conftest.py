"""The plugin's own suite, on qsnap's test guest (a Debian kernel and a busybox initramfs
that ticks on its console): one golden per session, a fork per test.

Environment: QSNAP_GUEST, the guest kit (qsnap's tests build it in target/qsnap-guest).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from qsnap import Golden, Qsnap, Vm, console_prints

pytest_plugins = ["pytester"]

GUEST = Path(os.environ.get("QSNAP_GUEST", Path(__file__).resolve().parents[2] / "target" / "qsnap-guest"))


def guest_argv(d: Path) -> List[str]:
    """The test guest's command line, its disk, console and agent socket in `d`."""
    if not (GUEST / "vmlinuz").exists():
        pytest.fail(f"no test guest kit in {GUEST} (set QSNAP_GUEST; tests/guest/build.sh builds it)", pytrace=False)
    d.mkdir(parents=True, exist_ok=True)
    disk = d / "disk.qcow2"
    if not disk.exists():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    return [
        "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
        "-accel", "tcg", "-m", "256", "-no-reboot",
        "-kernel", str(GUEST / "vmlinuz"), "-initrd", str(GUEST / "initramfs.gz"),
        "-append", "console=ttyS0 quiet panic=-1 qsnap.tick_ms=200",
        "-blockdev", f"driver=file,filename={disk},node-name=file0",
        "-blockdev", "driver=qcow2,file=file0,node-name=disk0",
        "-device", "virtio-blk-pci,drive=disk0,id=vd0",
        "-chardev", f"socket,id=qga0,path={d / 'qga.sock'},server=on,wait=off",
        "-device", "virtio-serial",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        "-chardev", f"file,id=qsnapser,path={d / 'console.log'},append=on",
        "-serial", "chardev:qsnapser",
    ]


@pytest.fixture(scope="session")
def golden_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("golden")


@pytest.fixture(scope="session")
def golden(qsnap: Qsnap, golden_dir: Path) -> Golden:
    """The recipe: a session-scoped golden, snapshotted once the guest ticks."""
    return qsnap.golden(guest_argv(golden_dir), ready=console_prints("tick 3"))


@pytest.fixture
def vm(golden: Golden) -> Iterator[Vm]:
    """The recipe: a running fork of the golden for each test, removed after it."""
    with golden.fork() as vm:
        vm.wait_console("tick", timeout=60)
        yield vm


# -- looking into a fork: its disk (through QEMU's own qemu-io) and its memory (the agent) --

VD0 = "/machine/peripheral/vd0/virtio-backend"


def disk_write(vm: Vm, pattern: int, offset: str) -> None:
    out = vm.qmp("human-monitor-command", command_line=f'qemu-io -d {VD0} "write -P {pattern:#04x} {offset} 64k"')
    assert "rror" not in str(out), out


def disk_has(vm: Vm, pattern: int, offset: str) -> bool:
    """Whether 64 KiB at `offset` of vd0 hold `pattern`: flushed through the monitor, then
    read from the disk's current image file."""
    vm.qmp("human-monitor-command", command_line=f'qemu-io -d {VD0} "flush"')
    image = next(b["inserted"]["image"] for b in vm.qmp("query-block") if b.get("qdev") == VD0)
    read = subprocess.run(
        ["qemu-io", "-r", "-U", "-f", image["format"], "-c", f"read -P {pattern:#04x} {offset} 64k", image["filename"]],
        capture_output=True, text=True, timeout=60,
    )
    return read.returncode == 0 and "verification failed" not in read.stdout


def agent(vm: Vm, command: str, args: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    path = vm.agent_socket
    assert path is not None
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        f = s.makefile("rwb")
        f.write(json.dumps({"execute": "guest-sync", "arguments": {"id": 4242}}).encode() + b"\n")
        f.flush()
        while json.loads(f.readline()).get("return") != 4242:
            pass
        msg: Dict[str, Any] = {"execute": command}
        if args:
            msg["arguments"] = args
        f.write(json.dumps(msg).encode() + b"\n")
        f.flush()
        reply: Dict[str, Any] = json.loads(f.readline())
        return reply


def memory_write(vm: Vm, path: str, text: str) -> None:
    """A file in the guest's RAM (its root is an initramfs)."""
    h = agent(vm, "guest-file-open", {"path": path, "mode": "w"})["return"]
    agent(vm, "guest-file-write", {"handle": h, "buf-b64": base64.b64encode(text.encode()).decode()})
    agent(vm, "guest-file-close", {"handle": h})


def memory_has(vm: Vm, path: str) -> bool:
    reply = agent(vm, "guest-file-open", {"path": path, "mode": "r"})
    if "return" in reply:
        agent(vm, "guest-file-close", {"handle": reply["return"]})
        return True
    return False
