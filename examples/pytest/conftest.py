"""pytest fixtures on qsnap clones: one golden VM per session, one running clone per test.

The golden VM boots once (qsnap's test guest: a kernel, an initramfs and a disk) and is
snapshotted when its console ticks; every test gets its own clone of that snapshot through
`qsnap clone … --json` (its own disks, monitor, console and guest-agent socket), and the clone
is removed after the test (`qsnap remove`), whether it passed or not.

Environment: QSNAP (the qsnap binary, default target/debug/qsnap), QSNAP_GUEST (the guest kit,
default target/qsnap-guest).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QSNAP = os.environ.get("QSNAP", str(REPO / "target" / "debug" / "qsnap"))
GUEST = Path(os.environ.get("QSNAP_GUEST", REPO / "target" / "qsnap-guest"))
_names = itertools.count(1)


class Qsnap:
    """Runs the qsnap CLI against one store; `json()` parses `--json` output."""

    def __init__(self, store: Path) -> None:
        self.store = store

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([QSNAP, "--store", str(self.store), *args], capture_output=True,
                              text=True, timeout=timeout)

    def json(self, *args: str, timeout: float = 120):
        # --json before a `--` (after it, everything is QEMU's command line).
        cut = args.index("--") if "--" in args else len(args)
        out = self.run(*args[:cut], "--json", *args[cut:], timeout=timeout)
        if out.returncode != 0:
            raise AssertionError(f"qsnap {' '.join(args)} failed: {out.stderr}")
        return json.loads(out.stdout)


class Clone:
    """One running clone: its monitor, console and guest agent, from `qsnap clone --json`."""

    def __init__(self, name: str, report: dict, status: dict) -> None:
        self.name = name
        self.qmp = report["qmp"]
        moved = {m["option"]: m["to"] for m in status["clone-of"]["moved"]}
        self.console = Path(moved["-chardev qsnapser"])
        self.agent = moved["-chardev qga0"]
        self.disks = [d["overlay"] for d in report["disks"]]

    def hmp(self, qsnap: Qsnap, line: str) -> str:
        out = qsnap.run("qmp", self.qmp, "human-monitor-command",
                        json.dumps({"command-line": line}))
        assert out.returncode == 0, out.stderr
        return out.stdout

    def disk_has(self, qsnap: Qsnap, pattern: int, offset: str) -> bool:
        """Whether 64 KiB at `offset` of disk vd0 hold `pattern`. QEMU prints qemu-io's output
        on its own stdout, not in the monitor's reply: flush through the monitor, then read
        the disk's current image (and its backing chain) from the files."""
        self.hmp(qsnap, 'qemu-io -d /machine/peripheral/vd0/virtio-backend "flush"')
        out = qsnap.run("qmp", self.qmp, "query-block")
        assert out.returncode == 0, out.stderr
        image = next(b["inserted"]["image"] for b in json.loads(out.stdout)
                     if b.get("qdev") == "/machine/peripheral/vd0/virtio-backend")
        read = subprocess.run(["qemu-io", "-r", "-U", "-f", image["format"], "-c",
                               f"read -P {pattern:#04x} {offset} 64k", image["filename"]],
                              capture_output=True, text=True, timeout=60)
        return read.returncode == 0 and "verification failed" not in read.stdout

    def disk_write(self, qsnap: Qsnap, pattern: int, offset: str) -> None:
        out = self.hmp(qsnap, f'qemu-io -d /machine/peripheral/vd0/virtio-backend '
                              f'"write -P {pattern:#04x} {offset} 64k"')
        assert "rror" not in out, out

    def agent_call(self, command: str, args: dict | None = None):
        """One guest-agent command (the guest's memory: its initramfs root is RAM)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(self.agent)
            f = s.makefile("rwb")
            f.write(json.dumps({"execute": "guest-sync", "arguments": {"id": 4242}}).encode() + b"\n")
            f.flush()
            while json.loads(f.readline()).get("return") != 4242:
                pass
            msg = {"execute": command}
            if args:
                msg["arguments"] = args
            f.write(json.dumps(msg).encode() + b"\n")
            f.flush()
            reply = json.loads(f.readline())
            return reply

    def write_memory_file(self, path: str, text: str) -> None:
        h = self.agent_call("guest-file-open", {"path": path, "mode": "w"})["return"]
        self.agent_call("guest-file-write",
                        {"handle": h, "buf-b64": base64.b64encode(text.encode()).decode()})
        self.agent_call("guest-file-close", {"handle": h})

    def memory_file_exists(self, path: str) -> bool:
        reply = self.agent_call("guest-file-open", {"path": path, "mode": "r"})
        if "return" in reply:
            self.agent_call("guest-file-close", {"handle": reply["return"]})
            return True
        return False


def _wait_for(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    tail = path.read_text(errors="replace")[-2000:] if path.exists() else "(no console)"
    raise AssertionError(f"{text!r} did not appear in {path} within {timeout} s:\n{tail}")


@pytest.fixture(scope="session")
def qsnap(tmp_path_factory) -> Qsnap:
    return Qsnap(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="session")
def golden(qsnap: Qsnap, tmp_path_factory):
    """The golden VM, booted once, snapshotted as `ready` when it ticks; stopped at the end."""
    d = tmp_path_factory.mktemp("golden")
    disk, console, agent = d / "disk.qcow2", d / "console.log", d / "qga.sock"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    argv = [
        "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
        "-accel", "tcg", "-m", "256", "-no-reboot",
        "-kernel", str(GUEST / "vmlinuz"), "-initrd", str(GUEST / "initramfs.gz"),
        "-append", "console=ttyS0 quiet panic=-1 qsnap.tick_ms=200",
        "-blockdev", f"driver=file,filename={disk},node-name=file0",
        "-blockdev", "driver=qcow2,file=file0,node-name=disk0",
        "-device", "virtio-blk-pci,drive=disk0,id=vd0",
        "-chardev", f"socket,id=qga0,path={agent},server=on,wait=off",
        "-device", "virtio-serial", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        "-chardev", f"file,id=qsnapser,path={console},append=on", "-serial", "chardev:qsnapser",
    ]
    qsnap.json("run", "golden", "--", *argv)
    try:
        _wait_for(console, "tick 3", 120)
        qsnap.json("create", "golden", "ready")
        qsnap.json("lazy-ram", "golden", "ready")
        yield "golden"
    finally:
        qsnap.run("stop", "golden")


@pytest.fixture
def clone(qsnap: Qsnap, golden: str):
    """A running clone of the golden snapshot for one test; removed after it."""
    name = f"t{next(_names)}"
    report = qsnap.json("clone", golden, "ready", name)
    try:
        status = qsnap.json("status", name)
        c = Clone(name, report, status)
        _wait_for(c.console, "tick", 60)
        yield c
    finally:
        out = qsnap.run("remove", name)
        assert out.returncode == 0, out.stderr
