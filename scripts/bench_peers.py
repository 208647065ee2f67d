#!/usr/bin/env python3
"""Side-by-side snapshot benchmark: qsnap vs QEMU's internal snapshots vs libvirt, same guest.

What it measures, per RAM size and guest load, for each tool (median and min–max over --rounds):

  vCPU pause        QEMU's own STOP → RESUME event timestamps during the snapshot command, read
                    on an extra *observer* QMP monitor that the harness adds to every QEMU
                    (`-qmp unix:…/observer.sock,server=on,wait=off`; QEMU serves one client per
                    monitor socket, so the tool under test keeps its own). Several pauses in one
                    command are summed.
  guest hiccup      the largest gap between consecutive `tick N` lines on the guest's serial
                    console (a reader thread tails the console file and timestamps each line as
                    it appears, polling every 5 ms) from the last tick before the command to the
                    first tick after it, minus the usual gap (the median gap over the 8 ticks
                    just before the command).
  snapshot wall     command start → command returns.
  memory file       apparent (st_size) and allocated (st_blocks*512) size of the memory file in
                    MB (10^6 bytes). QEMU internal: `vm-state-size` from `qemu-img info`
                    (apparent) and the qcow2 file's allocation beyond what it had before the
                    first snapshot (allocated; deleted snapshots' clusters are reused, the file
                    does not shrink). qsnap lazy: the RAM image + device-state file.
  revert wall       command start → command returns.
  revert → tick     command start → the guest's first tick from the snapshot (the first tick
                    whose number is below the last tick seen before the revert; its number is
                    checked against the ticks around the snapshot).
  revert outage     last tick of the old guest → that first tick (what the guest "sees").
  delete wall       command start → command returns (the snapshot just reverted to, so the
                    tools that keep disk layers merge one).
  qsnap's own figures from its --json reports (pause-ms, total-ms, verify-ms, load-ms) are kept
  next to the harness's, prefixed "qsnap says".

Tools:
  qsnap       its CLI: `qsnap run NAME -- <qemu argv>` (the observer monitor is in that argv),
              `qsnap create/revert/delete NAME SNAP --json`, `qsnap stop NAME`; a store of its
              own under the run directory (QSNAP_STORE).
  qsnap-lazy  if `qsnap lazy-ram` exists: a VM of its own under qsnap (a lazily reverted VM
              can only take precopy snapshots afterwards, so it must not share the qsnap
              column's VM). In the first round one snapshot is taken (its figures stay in the
              raw samples as "setup", out of the table) and converted once with
              `qsnap lazy-ram NAME SNAP --json` (conversion time; memory = RAM image +
              device state); every round then reverts to it (revert figures); the last round
              deletes it. Skipped with a note if the command does not exist (or --no-lazy).
  qemu        QEMU's internal snapshots, driven by the harness on the VM's own QMP socket:
              `snapshot-save` / `snapshot-load` / `snapshot-delete` jobs (vmstate and disk in
              the qcow2), waiting for JOB_STATUS_CHANGE "concluded", checking `query-jobs` for
              an error, then `job-dismiss`. The guest is paused for the whole save.
  libvirt     with --with-libvirt only: a persistent domain with the same kernel, initramfs,
              command line, disk and serial file (and the observer monitor through
              <qemu:commandline>); `virsh snapshot-create-as --live --atomic --memspec …
              --diskspec …` (external), `virsh snapshot-revert`, `virsh snapshot-delete`.

The guest is qsnap's test guest (tests/guest: `tick N` every 200 ms, `qsnap.dirty_mb=N` rewrites
N MiB of RAM continuously), the same kernel/initramfs/cmdline for every tool, a fresh 64 MiB
qcow2 disk as virtio-blk, the serial console to a file, TCG, 1 vCPU, machine `pc`.
Loads: idle (dirty_mb=0) and busy: dirty_mb = min(200, (RAM-112)/2) MiB (or --dirty-mb). The
guest keeps the source and the copy in tmpfs (2×N MiB), so N is capped to leave ≥ 112 MiB for
the kernel and initramfs; for RAM ≥ 512 MiB that is the 200 MiB of ../shared/ANCHORS.md.

Method: each tool's VM is booted once per (RAM, load) and then *parked* (QMP `stop` on the
observer) while the others are measured, so only one guest runs at a time on this 2-core host.
Tools are interleaved round by round, with the order rotating, so no tool always gets the host's
fast page cache (file writes slow down once free memory is used up). Each round, per tool:
unpark, wait 8 ticks, create, wait 5 ticks, revert, wait 5 ticks, delete, park (each wait ends
a random fraction of a tick later, so commands do not always start just after a tick). The host
disk's sequential bandwidth in the work directory (1 GiB written with O_DIRECT, written buffered
+ fdatasync, read with O_DIRECT; then deleted) is printed as the physical bound.

Usage: python3 scripts/bench_peers.py [--rounds N] [--ram 512,2048] [--load idle,busy]
           [--tools qsnap,qsnap-lazy,qemu,libvirt] [--with-libvirt] [--json OUT] [--workdir DIR]
           [--keep] [--no-lazy]   (defaults: 3 rounds, 512 MiB, idle,busy, qsnap,qsnap-lazy,qemu)

--with-libvirt changes the machine: if `virsh` is missing it runs `apt-get install -y
--no-install-recommends` of libvirt 11.x's daemon packages (from bookworm-backports when apt
offers them there: bookworm's 9.0 cannot revert external snapshots); if the system libvirt
daemon does not answer it starts `virtlogd -d` and `libvirtd -d` and stops them again (by pid)
at exit. It does not edit /etc/libvirt/qemu.conf: QEMU runs as libvirt's usual user, so the
libvirt run directory is made world-writable (0777) and the kernel/initramfs are copied into it.

Everything runs in its own directory under --workdir (default /var/tmp/qsnap-bench-peers), which
is removed at the end unless --keep. Every wait is bounded; every QEMU and domain is stopped at
exit, on error and on Ctrl-C / SIGTERM.

Caveats, read before quoting figures:
  - Tick gaps under TCG are ~270-350 ms, not 200: each tick also reads and writes a disk sector
    with O_DIRECT. The hiccup is relative to that usual gap.
  - A tool that relaunches QEMU on revert (qsnap, libvirt) restarts with a cold TCG translation
    cache, so "revert → first new tick" includes some TCG warm-up; QEMU's own snapshot-load keeps
    its process. "revert wall" is the tool's own work.
  - The hiccup covers the whole command: for qsnap's point-in-time snapshot it includes the
    guest slowing while QEMU's background-snapshot thread copies RAM (a write to a page not yet
    saved waits for it), not only the vCPU pause. On a 2-core host shared with other work that
    slowdown is large; compare with the load averages printed at the end.
  - qsnap's revert checks the memory file's checksum first (qsnap says: verify-ms); page-cache
    state changes it a lot, which is why tools are interleaved.

Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import mmap
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

REPO = Path(__file__).resolve().parent.parent
TICK_MS = 200
POLL_S = 0.005  # serial console polling period (tick timestamps are ±5 ms)
DISK_MB = 64
QEMU_BIN = "qemu-system-x86_64"
VIRSH = ["virsh", "-c", "qemu:///system"]
LIBVIRT_PKGS = [
    "libvirt-common", "libvirt0", "libvirt-clients", "libvirt-daemon-common",
    "libvirt-daemon-log", "libvirt-daemon", "libvirt-daemon-driver-network",
    "libvirt-daemon-config-network", "libvirt-daemon-driver-nwfilter",
    "libvirt-daemon-config-nwfilter", "libvirt-daemon-driver-nodedev",
    "libvirt-daemon-driver-qemu", "libvirt-daemon-driver-secret",
    "libvirt-daemon-driver-storage", "libvirt-daemon-system",
]


class BenchError(Exception):
    """A failure with a message meant for the user."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Cleanup: every VM, domain, daemon and directory registers how to undo itself.


class Cleanup:
    def __init__(self) -> None:
        self._actions: list[tuple[int, str, object]] = []
        self._next = 0
        self._lock = threading.Lock()

    def push(self, label: str, fn) -> int:
        with self._lock:
            self._next += 1
            self._actions.append((self._next, label, fn))
            return self._next

    def run(self, handle: int) -> None:
        """Run one action now (and forget it)."""
        with self._lock:
            found = [a for a in self._actions if a[0] == handle]
            self._actions = [a for a in self._actions if a[0] != handle]
        for _, label, fn in found:
            self._call(label, fn)

    def run_all(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            try:
                signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut cleanup short
            except (ValueError, OSError):
                pass
        while True:
            with self._lock:
                if not self._actions:
                    return
                _, label, fn = self._actions.pop()
            self._call(label, fn)

    @staticmethod
    def _call(label: str, fn) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - cleanup must go on
            log(f"cleanup: {label}: {e}")


CLEANUP = Cleanup()
atexit.register(CLEANUP.run_all)


def _on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


for _sig in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(_sig, _on_signal)


# ---------------------------------------------------------------------------------------------
# Small helpers


def run_cmd(argv, timeout: float, what: str, env=None, check=True) -> subprocess.CompletedProcess:
    """Run a command with a bounded wait; a failure raises BenchError with its stderr. On a
    timeout or Ctrl-C the command gets SIGTERM (10 s to finish its cleanup), then SIGKILL."""
    argv = [str(a) for a in argv]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
    except FileNotFoundError as e:
        raise BenchError(f"{what}: {argv[0]} not found") from e
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as e:
        proc.terminate()
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        if isinstance(e, subprocess.TimeoutExpired):
            raise BenchError(f"{what}: no answer within {timeout:.0f} s ({' '.join(argv)})") from e
        raise
    p = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if check and p.returncode != 0:
        msg = (p.stderr.strip() or p.stdout.strip())[-2000:]
        raise BenchError(f"{what}: exit {p.returncode}: {msg}")
    return p


def file_sizes(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_blocks * 512


def summarize(values):
    vals = [v for v in values if isinstance(v, (int, float))]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def first_line(argv) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        return "unknown"


# ---------------------------------------------------------------------------------------------
# QMP client


class QMPError(BenchError):
    pass


class QMP:
    """A minimal QMP client: one Unix socket, a reader thread, commands matched by id, and an
    event log (each event keeps QEMU's `timestamp` and gets `_recv`, the local monotonic time)."""

    def __init__(self, path, name: str = "qmp", connect_timeout: float = 30.0) -> None:
        self.path, self.name = str(path), name
        deadline = time.monotonic() + connect_timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(5.0)
                sock.connect(self.path)
                rfile = sock.makefile("rb")
                greeting = json.loads(rfile.readline() or b"null")
                if not isinstance(greeting, dict) or "QMP" not in greeting:
                    raise QMPError(f"no QMP greeting: {greeting!r}")
                break
            except (OSError, ValueError, QMPError) as e:
                sock.close()
                if time.monotonic() >= deadline:
                    raise QMPError(f"{name}: cannot connect to {self.path} within "
                                   f"{connect_timeout:.0f} s: {e}") from e
                time.sleep(0.05)
        sock.settimeout(None)
        self.sock, self._rfile = sock, rfile
        self.cond = threading.Condition()
        self.events: list[dict] = []
        self._replies: dict[str, dict] = {}
        self._id = 0
        self.closed = False
        threading.Thread(target=self._reader, name=f"qmp:{name}", daemon=True).start()
        self.execute("qmp_capabilities")

    def _reader(self) -> None:
        try:
            for raw in self._rfile:
                try:
                    msg = json.loads(raw)
                except ValueError:
                    continue
                with self.cond:
                    if "event" in msg:
                        msg["_recv"] = time.monotonic()
                        self.events.append(msg)
                    elif "id" in msg:
                        self._replies[msg["id"]] = msg
                    self.cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self.cond:
                self.closed = True
                self.cond.notify_all()

    def execute(self, cmd: str, args: dict | None = None, timeout: float = 30.0):
        with self.cond:
            self._id += 1
            ident = f"{self.name}-{self._id}"
        msg = {"execute": cmd, "id": ident}
        if args:
            msg["arguments"] = args
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise QMPError(f"{self.name}: {cmd}: {e}") from e
        deadline = time.monotonic() + timeout
        with self.cond:
            while ident not in self._replies:
                if self.closed:
                    raise QMPError(f"{self.name}: the monitor closed before answering {cmd}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise QMPError(f"{self.name}: no answer to {cmd} within {timeout:.0f} s")
                self.cond.wait(left)
            reply = self._replies.pop(ident)
        if "error" in reply:
            err = reply["error"]
            raise QMPError(f"{cmd}: {err.get('class')}: {err.get('desc')}")
        return reply.get("return")

    def mark(self) -> int:
        with self.cond:
            return len(self.events)

    def events_since(self, mark: int) -> list[dict]:
        with self.cond:
            return list(self.events[mark:])

    def wait_event(self, pred, since: int, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        with self.cond:
            i = since
            while True:
                while i < len(self.events):
                    if pred(self.events[i]):
                        return self.events[i]
                    i += 1
                if self.closed:
                    raise QMPError(f"{self.name}: the monitor closed while waiting for {what}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise QMPError(f"{self.name}: no {what} within {timeout:.0f} s")
                self.cond.wait(left)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def event_time(ev: dict) -> float:
    ts = ev["timestamp"]
    return ts["seconds"] + ts["microseconds"] / 1e6


def pauses_ms(events: list[dict]) -> tuple[list[float], bool]:
    """STOP → RESUME pairs by QEMU's timestamps; the flag says a STOP is still unmatched."""
    out, stop = [], None
    for ev in events:
        if ev["event"] == "STOP" and stop is None:
            stop = event_time(ev)
        elif ev["event"] == "RESUME" and stop is not None:
            out.append((event_time(ev) - stop) * 1000)
            stop = None
    return out, stop is not None


# ---------------------------------------------------------------------------------------------
# The guest's serial console: `tick N` lines, timestamped as they appear

TICK_RE = re.compile(rb"(?:^|\s)tick (\d+)\s*$")


class SerialTicks:
    """Tails a console file in a thread; keeps (monotonic time, tick number) per tick line."""

    def __init__(self, path) -> None:
        self.path = Path(path)
        self.ticks: list[tuple[float, int]] = []
        self.mismatches: list[str] = []
        self.cond = threading.Condition()
        self._stop = False
        threading.Thread(target=self._run, name=f"ticks:{self.path.name}", daemon=True).start()

    def _run(self) -> None:
        f, buf = None, b""
        try:
            while not self._stop:
                if f is None:
                    try:
                        f = open(self.path, "rb")
                    except FileNotFoundError:
                        time.sleep(0.02)
                        continue
                chunk = f.read(1 << 16)
                if not chunk:
                    if os.fstat(f.fileno()).st_size < f.tell():  # truncated: start over
                        f.seek(0)
                        buf = b""
                    time.sleep(POLL_S)
                    continue
                now = time.monotonic()
                *lines, buf = (buf + chunk).split(b"\n")
                with self.cond:
                    for line in lines:
                        m = TICK_RE.search(line)
                        if m:
                            self.ticks.append((now, int(m.group(1))))
                        elif b"MISMATCH" in line:
                            self.mismatches.append(line.decode(errors="replace").strip())
                    self.cond.notify_all()
        finally:
            if f is not None:
                f.close()

    def stop(self) -> None:
        self._stop = True

    def count(self) -> int:
        with self.cond:
            return len(self.ticks)

    def snapshot(self) -> list[tuple[float, int]]:
        with self.cond:
            return list(self.ticks)

    def last(self):
        with self.cond:
            return self.ticks[-1] if self.ticks else None

    def tail_text(self, lines: int = 8) -> str:
        try:
            return b"\n".join(self.path.read_bytes().splitlines()[-lines:]).decode(errors="replace")
        except OSError as e:
            return f"(cannot read {self.path}: {e})"

    def wait_index(self, pred, start: int, timeout: float, what: str) -> int:
        """Index of the first tick at or after `start` for which pred(time, n) holds."""
        deadline = time.monotonic() + timeout
        with self.cond:
            i = start
            while True:
                while i < len(self.ticks):
                    if pred(*self.ticks[i]):
                        return i
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(min(left, 0.5))
        raise BenchError(f"{what}: not seen within {timeout:.0f} s; console {self.path} ends with:\n"
                         f"{self.tail_text()}")

    def wait_new(self, k: int, timeout: float, what: str) -> int:
        start = self.count()
        return self.wait_index(lambda t, n: True, start + k - 1, timeout, what)


def usual_gap(ticks: list[tuple[float, int]]) -> float:
    gaps = [b[0] - a[0] for a, b in zip(ticks, ticks[1:])]
    return statistics.median(gaps) if gaps else TICK_MS / 1000


def window_gaps(ticks: list[tuple[float, int]], t0: float, t1: float) -> list[float]:
    """Gaps between consecutive ticks from the last one before t0 to the first after t1."""
    before = [x for x in ticks if x[0] < t0][-1:]
    inside = [x for x in ticks if t0 <= x[0] <= t1]
    after = [x for x in ticks if x[0] > t1][:1]
    seq = before + inside + after
    return [b[0] - a[0] for a, b in zip(seq, seq[1:])]


# ---------------------------------------------------------------------------------------------
# The guest and the VMs under each tool


class Case:
    def __init__(self, ram_mb: int, load: str, dirty_mb: int) -> None:
        self.ram_mb, self.load, self.dirty_mb = ram_mb, load, dirty_mb

    @property
    def label(self) -> str:
        what = f"guest rewrites {self.dirty_mb} MiB" if self.dirty_mb else "idle guest"
        return f"{self.ram_mb} MiB, {self.load} ({what})"

    def cmdline(self) -> str:
        return f"console=ttyS0 quiet panic=-1 qsnap.tick_ms={TICK_MS} qsnap.dirty_mb={self.dirty_mb}"


class VM:
    """One tool's VM for one case. Subclasses implement boot/create/revert/delete/stop."""

    tool = "?"
    relaunches_on_revert = True  # a new QEMU after a revert: reconnect the observer

    def __init__(self, case: Case, casedir: Path, opts) -> None:
        self.case, self.opts = case, opts
        self.dir = casedir / self.tool
        self.dir.mkdir(parents=True)
        self.serial = self.dir / "serial.log"
        self.observer_path = self.dir / "observer.sock"
        if len(str(self.observer_path)) > 100:
            raise BenchError(f"socket path too long for AF_UNIX: {self.observer_path}; use a shorter --workdir")
        self.disk = self.dir / "disk.qcow2"
        self.obs: QMP | None = None
        self.ticks: SerialTicks | None = None
        self.dead = False
        self.cleanup_handle: int | None = None
        self.mismatches_reported = 0

    # -- common

    def qemu_argv(self, kernel, initrd) -> list[str]:
        return [
            QEMU_BIN, "-nodefaults", "-no-user-config", "-display", "none", "-accel", "tcg",
            "-m", str(self.case.ram_mb), "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", self.case.cmdline(),
            "-blockdev", f"driver=file,filename={self.disk},node-name=file0",
            "-blockdev", "driver=qcow2,file=file0,node-name=disk0",
            "-device", "virtio-blk-pci,drive=disk0,id=vd0",
            "-chardev", f"file,id=ser,path={self.serial},append=on", "-serial", "chardev:ser",
            "-no-reboot",
            "-qmp", f"unix:{self.observer_path},server=on,wait=off",
        ]

    def make_disk(self) -> None:
        run_cmd(["qemu-img", "create", "-q", "-f", "qcow2", self.disk, f"{DISK_MB}M"], 30, "qemu-img create")

    def start(self) -> None:
        """Boot, wait for the guest to tick, park it. shutdown() is registered first."""
        self.cleanup_handle = CLEANUP.push(f"{self.tool} VM", self.shutdown)
        self.ticks = SerialTicks(self.serial)
        self.boot()
        self.connect_observer()
        self.ticks.wait_index(lambda t, n: n >= 3, 0, self.opts.boot_timeout,
                              f"{self.tool}: the guest's third tick after boot")
        self.park()

    def connect_observer(self) -> None:
        if self.obs is not None:
            self.obs.close()
        self.obs = None
        self.obs = QMP(self.observer_path, name=f"observer-{self.tool}", connect_timeout=30)

    def park(self) -> None:
        self.obs.execute("stop")

    def unpark(self) -> None:
        self.obs.execute("cont")

    def shutdown(self) -> None:
        """Stop the VM (tool-specific stop()), close the observer, stop the console reader."""
        try:
            self.stop()
        finally:
            if self.obs is not None:
                self.obs.close()
            if self.ticks is not None:
                self.ticks.stop()

    # -- per tool

    def boot(self) -> None:
        raise NotImplementedError

    def create(self, snap: str) -> dict:
        raise NotImplementedError

    def memory_size(self, snap: str, created: dict) -> tuple[int | None, int | None]:
        raise NotImplementedError

    def revert(self, snap: str) -> dict:
        raise NotImplementedError

    def delete(self, snap: str) -> dict:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class QsnapVM(VM):
    tool = "qsnap"

    def __init__(self, case, casedir, opts) -> None:
        super().__init__(case, casedir, opts)
        self.name = f"bench-{case.ram_mb}-{case.load}"
        self.env = dict(os.environ, QSNAP_STORE=str(opts.store))
        self.store_vm = opts.store / "vms" / self.name
        self.booted = False

    def q(self, *args, timeout=None, what=None) -> dict:
        p = run_cmd([self.opts.qsnap, *args], timeout or self.opts.op_timeout,
                    what or f"qsnap {args[0]}", env=self.env)
        try:
            return json.loads(p.stdout) if p.stdout.strip() else {}
        except ValueError:
            return {"_stdout": p.stdout.strip()[-500:]}

    def boot(self) -> None:
        self.make_disk()
        argv = self.qemu_argv(self.opts.kernel, self.opts.initrd)
        self.booted = True
        self.q("run", self.name, "--json", "--", *argv, timeout=60)

    def create(self, snap):
        args = ["create", self.name, snap, "--json"]
        if self.opts.qsnap_mode:
            args += ["--mode", self.opts.qsnap_mode]
        js = self.q(*args)
        rep = {"qsnap_pause_ms": js.get("pause-ms"), "qsnap_create_total_ms": js.get("total-ms"),
               "qsnap_downtime_ms": js.get("qemu-downtime-ms"), "qsnap_mode": js.get("mode")}
        return {"reported": rep, "memory_file": (js.get("memory") or {}).get("file")}

    def memory_size(self, snap, created):
        f = created.get("memory_file") or self.store_vm / "memory" / f"{snap}.mem"
        return file_sizes(f)

    def revert(self, snap):
        js = self.q("revert", self.name, snap, "--json")
        return {"reported": {"qsnap_revert_verify_ms": js.get("verify-ms"),
                             "qsnap_revert_load_ms": js.get("load-ms"),
                             "qsnap_revert_total_ms": js.get("total-ms")}}

    def lazy_ram(self, snap) -> dict:
        args = ["lazy-ram", self.name, snap] + (["--json"] if self.opts.lazy_json else [])
        return self.q(*args, what="qsnap lazy-ram")

    def delete(self, snap):
        js = self.q("delete", self.name, snap, "--json")
        return {"reported": {"qsnap_delete_total_ms": js.get("total-ms")}}

    def stop(self) -> None:
        if not self.booted:
            return
        self.booted = False
        try:
            run_cmd([self.opts.qsnap, "stop", self.name], 30, f"qsnap stop {self.name}", env=self.env)
            return
        except BenchError as e:
            err = e
        # Fallback: kill the QEMU the store names, if it is really ours.
        try:
            rec = json.loads((self.store_vm / "vm.json").read_text())
            pid = int(rec["pid"])
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if str(self.dir).encode() in cmd:
                os.kill(pid, signal.SIGKILL)
                return
        except (OSError, ValueError, KeyError):
            pass
        raise err


class QsnapLazyVM(QsnapVM):
    """qsnap with lazy-RAM reverts: a VM of its own (see measure_lazy_round)."""

    tool = "qsnap-lazy"

    def __init__(self, case, casedir, opts) -> None:
        super().__init__(case, casedir, opts)
        self.name += "-lazy"
        self.store_vm = opts.store / "vms" / self.name
        self.setup: dict | None = None  # the snapshot taken and converted in the first round


class QemuVM(VM):
    """QEMU's internal snapshots, driven through the VM's own monitor."""

    tool = "qemu"
    relaunches_on_revert = False

    def __init__(self, case, casedir, opts) -> None:
        super().__init__(case, casedir, opts)
        self.tool_sock = self.dir / "qmp.sock"
        self.proc: subprocess.Popen | None = None
        self.qmp: QMP | None = None
        self._blocks_base: int | None = None  # the qcow2's allocation before its first snapshot

    def boot(self) -> None:
        self.make_disk()
        argv = self.qemu_argv(self.opts.kernel, self.opts.initrd)
        argv += ["-qmp", f"unix:{self.tool_sock},server=on,wait=off"]
        logf = open(self.dir / "qemu.log", "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()
        try:
            self.qmp = QMP(self.tool_sock, name="qemu-tool", connect_timeout=30)
        except QMPError as e:
            raise BenchError(f"{e}; QEMU log: {(self.dir / 'qemu.log').read_text(errors='replace')[-1500:]}") from e

    def job(self, cmd: str, args: dict) -> None:
        job_id = args["job-id"]
        mark = self.qmp.mark()
        self.qmp.execute(cmd, args)
        self.qmp.wait_event(lambda e: e["event"] == "JOB_STATUS_CHANGE"
                            and e["data"].get("id") == job_id
                            and e["data"].get("status") == "concluded",
                            mark, self.opts.op_timeout, f"{cmd} job {job_id} concluded")
        jobs = self.qmp.execute("query-jobs")
        err = next((j.get("error") for j in jobs if j.get("id") == job_id), None)
        self.qmp.execute("job-dismiss", {"id": job_id})
        if err:
            raise BenchError(f"{cmd} ({job_id}): {err}")

    def create(self, snap):
        if self._blocks_base is None:
            self._blocks_base = os.stat(self.disk).st_blocks * 512
        self.job("snapshot-save", {"job-id": f"save-{snap}", "tag": snap, "vmstate": "disk0",
                                   "devices": ["disk0"]})
        return {"reported": {}}

    def memory_size(self, snap, created):
        p = run_cmd(["qemu-img", "info", "-U", "--output=json", self.disk], 30, "qemu-img info")
        info = json.loads(p.stdout)
        vm_state = next((s.get("vm-state-size") for s in info.get("snapshots", []) if s.get("name") == snap), None)
        # snapshot-delete frees clusters for reuse without shrinking the file: measure against
        # the allocation before the first snapshot, not before this one
        grown = os.stat(self.disk).st_blocks * 512 - self._blocks_base
        return vm_state, grown

    def revert(self, snap):
        self.job("snapshot-load", {"job-id": f"load-{snap}", "tag": snap, "vmstate": "disk0",
                                   "devices": ["disk0"]})
        return {"reported": {}}

    def delete(self, snap):
        self.job("snapshot-delete", {"job-id": f"delete-{snap}", "tag": snap, "devices": ["disk0"]})
        return {"reported": {}}

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            if self.qmp is not None and not self.qmp.closed:
                self.qmp.execute("quit", timeout=5)
            self.proc.wait(10)
        except (QMPError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)
        finally:
            if self.qmp is not None:
                self.qmp.close()


class LibvirtVM(VM):
    tool = "libvirt"

    def __init__(self, case, casedir, opts) -> None:
        super().__init__(case, casedir, opts)
        self.dom = f"qsnap-bench-{os.getpid()}-{case.ram_mb}-{case.load}"
        os.chmod(self.dir, 0o777)  # QEMU runs as libvirt's user and creates the observer socket here
        self.defined = False

    def virsh(self, *args, timeout=None, check=True):
        return run_cmd([*VIRSH, *args], timeout or self.opts.op_timeout, f"virsh {args[0]}", check=check)

    def domain_xml(self, kernel: Path, initrd: Path) -> str:
        a = quoteattr
        return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{escape(self.dom)}</name>
  <memory unit='MiB'>{self.case.ram_mb}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
    <cmdline>{escape(self.case.cmdline())}</cmdline>
  </os>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(self.opts.qemu_path)}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file={a(str(self.disk))}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <serial type='file'>
      <source path={a(str(self.serial))} append='on'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value={a(f"unix:{self.observer_path},server=on,wait=off")}/>
  </qemu:commandline>
</domain>
"""

    def boot(self) -> None:
        self.make_disk()
        kernel, initrd = self.dir / "vmlinuz", self.dir / "initramfs.gz"
        shutil.copyfile(self.opts.kernel, kernel)
        shutil.copyfile(self.opts.initrd, initrd)
        for f in (kernel, initrd, self.disk):
            os.chmod(f, 0o666 if f == self.disk else 0o644)
        xml = self.dir / "domain.xml"
        xml.write_text(self.domain_xml(kernel, initrd))
        self.virsh("define", xml, timeout=60)
        self.defined = True
        self.virsh("start", self.dom, timeout=120)

    def create(self, snap):
        mem = self.dir / f"{snap}.mem"
        ovl = self.dir / f"disk.{snap}.qcow2"
        self.virsh("snapshot-create-as", self.dom, snap, "--live", "--atomic",
                   "--memspec", f"file={mem},snapshot=external",
                   "--diskspec", f"vda,snapshot=external,file={ovl}")
        return {"reported": {}, "memory_file": str(mem)}

    def memory_size(self, snap, created):
        return file_sizes(created["memory_file"])

    def revert(self, snap):
        self.virsh("snapshot-revert", self.dom, snap)
        return {"reported": {}}

    def delete(self, snap):
        self.virsh("snapshot-delete", self.dom, snap)
        return {"reported": {}}

    def stop(self) -> None:
        if not self.defined:
            return
        self.virsh("destroy", self.dom, timeout=60, check=False)
        p = self.virsh("snapshot-list", self.dom, "--name", timeout=30, check=False)
        for s in p.stdout.split():
            self.virsh("snapshot-delete", self.dom, s, "--metadata", timeout=30, check=False)
        self.virsh("undefine", self.dom, "--snapshots-metadata", timeout=60)
        self.defined = False


TOOL_CLASSES = {"qsnap": QsnapVM, "qsnap-lazy": QsnapLazyVM, "qemu": QemuVM, "libvirt": LibvirtVM}


# ---------------------------------------------------------------------------------------------
# One round for one tool


def settle(vm: VM, k: int, what: str) -> float:
    """Wait for k new ticks, then a random fraction of a tick (so that commands do not always
    start just after a tick); return the usual (median) gap in seconds."""
    start = vm.ticks.count()
    vm.ticks.wait_new(k, 30 + k * 2, f"{vm.tool}: {k} ticks ({what})")
    usual = usual_gap(vm.ticks.snapshot()[start:])
    time.sleep(random.uniform(0, usual))
    return usual


def measure_create(vm: VM, snap: str, s: dict) -> dict:
    usual = settle(vm, 8, "before the snapshot")
    s["usual_gap_ms"] = usual * 1000
    mark = vm.obs.mark()
    before = vm.ticks.last()
    t0 = time.monotonic()
    created = vm.create(snap)
    t1 = time.monotonic()
    s["create_wall_s"] = t1 - t0
    s.update(created["reported"])
    # the first two ticks after the command returned close the hiccup window
    idx = vm.ticks.wait_index(lambda t, n: t > t1, 0, 60, f"{vm.tool}: a tick after the snapshot")
    vm.ticks.wait_index(lambda t, n: True, idx + 1, 30, f"{vm.tool}: a second tick after the snapshot")
    after = vm.ticks.snapshot()[idx]
    gaps = window_gaps(vm.ticks.snapshot(), t0, t1)
    s["create_tick_gaps_ms"] = [round(g * 1000, 1) for g in gaps]
    s["hiccup_ms"] = (max(gaps) - usual) * 1000 if gaps else None
    s["snapshot_ticks"] = [before[1] if before else None, after[1]]
    evs = vm.obs.events_since(mark)
    pauses, open_stop = pauses_ms(evs)
    if open_stop:  # the RESUME may trail the command by a little
        try:
            vm.obs.wait_event(lambda e: e["event"] == "RESUME", mark, 5, "RESUME after the snapshot")
        except QMPError:
            pass
        pauses, open_stop = pauses_ms(vm.obs.events_since(mark))
    s["pause_ms"] = sum(pauses) if pauses and not open_stop else None
    s["pause_count"] = len(pauses)
    app, alloc = vm.memory_size(snap, created)
    s["mem_apparent_mb"] = app / 1e6 if app is not None else None
    s["mem_alloc_mb"] = alloc / 1e6 if alloc is not None else None
    return s


def measure_revert(vm: VM, snap: str, s: dict, prefix: str = "revert") -> None:
    """Revert and time the guest's return; figures go to s[prefix + '_…']."""
    settle(vm, 5, "before the revert")
    pre = vm.ticks.last()
    start_idx = vm.ticks.count()
    t0 = time.monotonic()
    res = vm.revert(snap)
    t1 = time.monotonic()
    s[f"{prefix}_wall_s"] = t1 - t0
    s.update(res["reported"])
    i = vm.ticks.wait_index(lambda t, n: n < pre[1], start_idx, 120,
                            f"{vm.tool}: the reverted guest's first tick (below {pre[1]})")
    ticks = vm.ticks.snapshot()
    t_new, n_new = ticks[i]
    t_prev = ticks[i - 1][0] if i > 0 else pre[0]
    s[f"{prefix}_to_tick_s"] = t_new - t0
    s[f"{prefix}_outage_s"] = t_new - t_prev
    s[f"{prefix}_resumed_tick"] = n_new
    lo, hi = s.get("snapshot_ticks", [None, None])
    if lo is not None and hi is not None and not (lo <= n_new <= hi + 1):
        s.setdefault("warnings", []).append(
            f"{prefix}: the guest resumed at tick {n_new}, the snapshot was taken between ticks {lo} and {hi}")
    if vm.relaunches_on_revert:
        vm.connect_observer()


def measure_round(vm: VM, rnd: int, rounds: int) -> dict:
    """One round for one tool: create, revert, delete the snapshot s<round>."""
    if isinstance(vm, QsnapLazyVM):
        return measure_lazy_round(vm, rnd, rounds)
    snap = f"s{rnd}"
    s: dict = {"round": rnd}
    created = False
    try:
        vm.unpark()
        measure_create(vm, snap, s)
        created = True
        measure_revert(vm, snap, s)
        settle(vm, 5, "before the delete")
        t0 = time.monotonic()
        s.update(vm.delete(snap)["reported"])
        s["delete_wall_s"] = time.monotonic() - t0
        created = False
    except BenchError as e:
        s["error"] = str(e)
        log(f"  {vm.tool}: round {rnd + 1} failed: {e}")
        if created:
            try:
                if vm.relaunches_on_revert and (vm.obs is None or vm.obs.closed):
                    vm.connect_observer()
                vm.delete(snap)
            except BenchError as e2:
                log(f"  {vm.tool}: could not delete {snap} after the failure: {e2}")
    finally:
        park_after_round(vm)
    note_mismatches(vm, s)
    return s


def measure_lazy_round(vm: QsnapLazyVM, rnd: int, rounds: int) -> dict:
    """First round: a snapshot, converted once by `qsnap lazy-ram`. Every round: a revert to it.
    Last round: its delete."""
    snap = "lazy"
    s: dict = {"round": rnd}
    try:
        vm.unpark()
        if vm.setup is None:
            setup: dict = {}
            measure_create(vm, snap, setup)
            vm.setup = setup
            s["setup"] = setup
            settle(vm, 5, "before lazy-ram")
            t0 = time.monotonic()
            rep = vm.lazy_ram(snap)
            s["lazy_convert_s"] = time.monotonic() - t0
            s["qsnap_lazy_total_ms"] = rep.get("total-ms")
            s["qsnap_lazy_report"] = rep
            app = alloc = 0
            for key in ("image", "devices"):
                if rep.get(key):
                    a, b = file_sizes(rep[key])
                    app, alloc = app + a, alloc + b
            if app:
                s["mem_apparent_mb"], s["mem_alloc_mb"] = app / 1e6, alloc / 1e6
        s["snapshot_ticks"] = vm.setup["snapshot_ticks"]
        measure_revert(vm, snap, s)
        if rnd == rounds - 1:
            settle(vm, 5, "before the delete")
            t0 = time.monotonic()
            s.update(vm.delete(snap)["reported"])
            s["delete_wall_s"] = time.monotonic() - t0
    except BenchError as e:
        s["error"] = str(e)
        log(f"  {vm.tool}: round {rnd + 1} failed: {e}")
        if vm.setup is None or (rnd == 0 and "lazy_convert_s" not in s):
            vm.dead = True  # no converted snapshot to revert to
    finally:
        park_after_round(vm)
    note_mismatches(vm, s)
    return s


def park_after_round(vm: VM) -> None:
    try:
        if vm.obs is None or vm.obs.closed:
            vm.connect_observer()
        vm.park()
    except BenchError as e:
        log(f"  {vm.tool}: cannot park the VM ({e}); it is left out from now on")
        vm.dead = True


def note_mismatches(vm: VM, s: dict) -> None:
    """The guest prints MISMATCH when its memory and disk disagree (a broken snapshot)."""
    mism = list(vm.ticks.mismatches)
    if len(mism) > vm.mismatches_reported:
        s.setdefault("warnings", []).append(
            f"the guest printed {mism[-1]} ({len(mism) - vm.mismatches_reported} new)")
        vm.mismatches_reported = len(mism)


def round_line(tool: str, s: dict) -> str:
    def f(key, fmt):
        v = s.get(key)
        return fmt.format(v) if isinstance(v, (int, float)) else "—"
    if "error" in s and "create_wall_s" not in s:
        return f"{tool}: failed"
    parts = []
    if "pause_ms" in s or "create_wall_s" in s:
        parts += [f"pause {f('pause_ms', '{:.1f}')} ms", f"hiccup {f('hiccup_ms', '{:.0f}')} ms",
                  f"create {f('create_wall_s', '{:.2f}')} s", f"mem {f('mem_apparent_mb', '{:.0f}')} MB"]
    if "lazy_convert_s" in s:
        parts.append(f"lazy-ram {f('lazy_convert_s', '{:.2f}')} s")
    parts += [f"revert {f('revert_wall_s', '{:.2f}')} s (first tick {f('revert_to_tick_s', '{:.2f}')} s)"]
    if "delete_wall_s" in s:
        parts.append(f"delete {f('delete_wall_s', '{:.2f}')} s")
    out = f"{tool}: " + ", ".join(parts)
    for w in s.get("warnings", []):
        out += f"\n    warning: {w}"
    return out


# ---------------------------------------------------------------------------------------------
# Host facts: disk bandwidth, machine description


def disk_bandwidth(workdir: Path, mb: int) -> dict:
    """Sequential write (O_DIRECT; buffered + fdatasync) and read (O_DIRECT) of `mb` MiB of
    random data (not zeros: thin storage may skip those), 4 MiB per request."""
    path = workdir / "disk-bandwidth.tmp"
    chunk = 4 << 20
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT wants
    buf.write(os.urandom(chunk))
    n = max(1, (mb << 20) // chunk)
    out = {"mib": n * chunk >> 20}

    def timed_write(flags, sync) -> float:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o600)
        try:
            t0 = time.monotonic()
            for _ in range(n):
                os.write(fd, buf)
            if sync:
                os.fdatasync(fd)
            return time.monotonic() - t0
        finally:
            os.close(fd)

    try:
        try:
            out["write_direct_mb_s"] = n * chunk / 1e6 / timed_write(os.O_DIRECT, True)
        except OSError as e:  # e.g. tmpfs has no O_DIRECT
            out["write_direct_error"] = str(e)
            timed_write(0, True)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            try:
                t0 = time.monotonic()
                total = 0
                while True:
                    got = os.readv(fd, [buf])
                    if got <= 0:
                        break
                    total += got
                out["read_direct_mb_s"] = total / 1e6 / (time.monotonic() - t0)
            finally:
                os.close(fd)
        except OSError as e:
            out["read_direct_error"] = str(e)
        os.unlink(path)
        out["write_buffered_fdatasync_mb_s"] = n * chunk / 1e6 / timed_write(0, True)
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return out


def machine_info(opts) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = mem_kb // 1024
    except (OSError, AttributeError):
        pass
    info = {
        "cpu_model": cpu, "cores": os.cpu_count(), "mem_total_mib": mem,
        "kernel": platform.release(), "os": _os_release(),
        "qemu": first_line([QEMU_BIN, "--version"]),
        "qsnap": first_line([opts.qsnap, "--version"]) if any(t.startswith("qsnap") for t in opts.tools) else None,
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
        "workdir_fs": _fs_of(opts.workdir),
    }
    return info


def _os_release() -> str:
    try:
        return re.search(r'PRETTY_NAME="?([^"\n]*)', Path("/etc/os-release").read_text()).group(1)
    except (OSError, AttributeError):
        return platform.platform()


def _fs_of(path: Path) -> str:
    try:
        p = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, timeout=10)
        fields = p.stdout.splitlines()[-1].split()
        return f"{fields[0]} ({fields[1]})"
    except Exception:  # noqa: BLE001
        return "unknown"


# ---------------------------------------------------------------------------------------------
# libvirt setup (only with --with-libvirt)


def libvirt_answers() -> bool:
    try:
        return subprocess.run([*VIRSH, "uri"], capture_output=True, timeout=15).returncode == 0
    except (subprocess.TimeoutExpired, FileNotFoundError):
        return False


def ensure_libvirt() -> str:
    """Install libvirt if virsh is missing, start its daemons if they do not answer; return the
    daemon's version."""
    if shutil.which("virsh") is None:
        pol = run_cmd(["apt-cache", "policy", "libvirt-daemon-system"], 60, "apt-cache policy").stdout
        if "Candidate:" not in pol or "Candidate: (none)" in pol:
            log("--with-libvirt: apt-get update …")
            run_cmd(["apt-get", "update", "-q"], 600, "apt-get update")
            pol = run_cmd(["apt-cache", "policy", "libvirt-daemon-system"], 60, "apt-cache policy").stdout
        pkgs = LIBVIRT_PKGS
        if "bookworm-backports" in pol:
            pkgs = [f"{p}/bookworm-backports" for p in LIBVIRT_PKGS]
        log(f"--with-libvirt: installing libvirt ({'bookworm-backports' if pkgs is not LIBVIRT_PKGS else 'default release'}) …")
        run_cmd(["apt-get", "install", "-y", "--no-install-recommends", *pkgs], 900,
                "apt-get install libvirt", env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    if not libvirt_answers():
        for daemon, pidfile in (("virtlogd", "/run/virtlogd.pid"), ("libvirtd", "/run/libvirtd.pid")):
            exe = shutil.which(daemon) or f"/usr/sbin/{daemon}"
            if not Path(exe).exists():
                raise BenchError(f"--with-libvirt: {daemon} not found")
            log(f"--with-libvirt: starting {daemon} -d")
            run_cmd([exe, "-d"], 30, f"{daemon} -d")
            _stop_daemon_at_exit(daemon, Path(pidfile))
        deadline = time.monotonic() + 30
        while not libvirt_answers():
            if time.monotonic() > deadline:
                raise BenchError("--with-libvirt: libvirtd started but `virsh -c qemu:///system uri` "
                                 "does not answer within 30 s")
            time.sleep(0.5)
    out = run_cmd([*VIRSH, "version", "--daemon"], 30, "virsh version").stdout
    m = re.search(r"Running against daemon:\s*(\S+)", out) or re.search(r"libvirt\S*\s+([\d.]+)", out)
    version = m.group(1) if m else out.strip()
    try:
        if tuple(int(x) for x in version.split(".")[:2]) < (9, 9):
            log(f"warning: libvirt {version} cannot revert external snapshots (needs ≥ 9.9); "
                "its revert will fail")
    except ValueError:
        pass
    return version


def _stop_daemon_at_exit(name: str, pidfile: Path) -> None:
    def stop():
        deadline = time.monotonic() + 5
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        pid = int(pidfile.read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        if comm != name[:15]:
            raise BenchError(f"pid {pid} from {pidfile} is {comm!r}, not {name}; left alone")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    CLEANUP.push(f"stop {name}", stop)


# ---------------------------------------------------------------------------------------------
# Report

FIGURES = [
    # key, label, unit, digits
    ("pause_ms", "vCPU pause (QEMU STOP→RESUME)", "ms", 1),
    ("hiccup_ms", "guest hiccup (max tick gap − usual)", "ms", 0),
    ("create_wall_s", "snapshot wall", "s", 2),
    ("mem_apparent_mb", "memory file, apparent", "MB", 0),
    ("mem_alloc_mb", "memory file, allocated", "MB", 0),
    ("lazy_convert_s", "lazy-ram conversion", "s", 2),
    ("revert_wall_s", "revert wall", "s", 2),
    ("revert_to_tick_s", "revert: command → first new tick", "s", 2),
    ("revert_outage_s", "revert: last old → first new tick", "s", 2),
    ("delete_wall_s", "delete wall", "s", 2),
    ("usual_gap_ms", "usual tick gap", "ms", 0),
    ("qsnap_pause_ms", "qsnap says: pause-ms", "ms", 1),
    ("qsnap_create_total_ms", "qsnap says: create total-ms", "ms", 0),
    ("qsnap_revert_verify_ms", "qsnap says: revert verify-ms", "ms", 0),
    ("qsnap_revert_load_ms", "qsnap says: revert load-ms", "ms", 0),
    ("qsnap_revert_total_ms", "qsnap says: revert total-ms", "ms", 0),
    ("qsnap_lazy_total_ms", "qsnap says: lazy-ram total-ms", "ms", 0),
    ("qsnap_delete_total_ms", "qsnap says: delete total-ms", "ms", 0),
]


def cell(summary, digits: int) -> str:
    if not summary:
        return "—"
    fmt = f"{{:.{digits}f}}"
    med = fmt.format(summary["median"])
    if summary["n"] == 1:
        return med
    return f"{med} ({fmt.format(summary['min'])}–{fmt.format(summary['max'])})"


def print_table(case_result: dict, rounds: int) -> None:
    tools = [t for t in case_result["tools"]]
    ratio = "qsnap" in tools and "libvirt" in tools
    header = ["figure (median; min–max)"] + [TOOL_LABELS.get(t, t) for t in tools]
    if ratio:
        header.append("qsnap/libvirt")
    rows = []
    for key, label, unit, digits in FIGURES:
        sums = {t: case_result["tools"][t]["summary"].get(key) for t in tools}
        if not any(sums.values()):
            continue
        row = [f"{label}, {unit}"] + [cell(sums[t], digits) for t in tools]
        if ratio:
            q, lv = sums.get("qsnap"), sums.get("libvirt")
            row.append(f"{q['median'] / lv['median']:.2f}×" if q and lv and lv["median"] > 0 else "—")
        rows.append(row)
    errors = [(t, s["error"]) for t in tools for s in case_result["tools"][t]["samples"] if "error" in s]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    print(f"\n== {case_result['label']}, {rounds} round(s) ==")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    for t, e in errors:
        print(f"  ! {t}: {e.splitlines()[0]}")
    for t in tools:
        for s in case_result["tools"][t]["samples"]:
            for w in s.get("warnings", []):
                print(f"  ! {t} round {s['round'] + 1}: {w}")


TOOL_LABELS = {"qsnap": "qsnap", "qsnap-lazy": "qsnap lazy", "qemu": "QEMU internal", "libvirt": "libvirt"}


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="qsnap vs QEMU internal snapshots vs libvirt, side by side "
                                "(see the docstring at the top of this file for what is measured).")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ram", default="512", help="comma-separated MiB (default 512)")
    p.add_argument("--load", default="idle,busy", help="idle,busy")
    p.add_argument("--tools", default=None, help="comma-separated: qsnap,qsnap-lazy,qemu,libvirt "
                   "(default qsnap,qemu, plus libvirt with --with-libvirt; qsnap brings qsnap-lazy "
                   "along when `qsnap lazy-ram` exists)")
    p.add_argument("--no-lazy", action="store_true", help="leave out qsnap-lazy")
    p.add_argument("--with-libvirt", action="store_true",
                   help="measure libvirt too; may install it and start libvirtd (see docstring)")
    p.add_argument("--json", dest="json_out", type=Path, help="write raw samples, medians and the machine here")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/qsnap-bench-peers"))
    p.add_argument("--keep", action="store_true", help="keep the run directory (disks, consoles, logs)")
    p.add_argument("--dirty-mb", type=int, help="busy load: MiB the guest rewrites (default min(200, (RAM-112)/2))")
    p.add_argument("--qsnap", type=Path, default=REPO / "target" / "release" / "qsnap")
    p.add_argument("--qsnap-mode", choices=["auto", "point-in-time", "precopy"],
                   help="qsnap create --mode (default: qsnap's own default)")
    p.add_argument("--guest-dir", type=Path,
                   default=Path(os.environ.get("QSNAP_GUEST_DIR", REPO / "target" / "qsnap-guest")))
    p.add_argument("--disk-mb", type=int, default=1024, help="MiB for the disk bandwidth test (0: skip)")
    p.add_argument("--boot-timeout", type=float, default=240)
    p.add_argument("--op-timeout", type=float, default=600, help="seconds for one create/revert/delete")
    opts = p.parse_args(argv)
    try:
        opts.ram = [int(x) for x in opts.ram.split(",") if x]
    except ValueError:
        p.error("--ram: comma-separated MiB, e.g. 512,2048")
    opts.load = [x for x in opts.load.split(",") if x]
    if any(x not in ("idle", "busy") for x in opts.load):
        p.error("--load: idle and/or busy")
    tools = opts.tools.split(",") if opts.tools else ["qsnap", "qemu"] + (["libvirt"] if opts.with_libvirt else [])
    tools = [t for t in tools if t]
    for t in tools:
        if t not in TOOL_CLASSES:
            p.error(f"--tools: unknown tool {t!r} (qsnap, qsnap-lazy, qemu, libvirt)")
    if "qsnap" in tools and "qsnap-lazy" not in tools and not opts.no_lazy:
        tools.insert(tools.index("qsnap") + 1, "qsnap-lazy")
    if opts.no_lazy and "qsnap-lazy" in tools:
        tools.remove("qsnap-lazy")
    if "libvirt" in tools and not opts.with_libvirt:
        p.error("libvirt needs --with-libvirt (it may install libvirt and start libvirtd)")
    if opts.with_libvirt and "libvirt" not in tools:
        tools.append("libvirt")
    opts.tools = tools
    if opts.rounds < 1:
        p.error("--rounds must be ≥ 1")
    return opts


def check_prereqs(opts) -> None:
    opts.qemu_path = shutil.which(QEMU_BIN)
    if not opts.qemu_path:
        raise BenchError(f"{QEMU_BIN} not found (install QEMU: bash tests/guest/install-deps.sh)")
    if not shutil.which("qemu-img"):
        raise BenchError("qemu-img not found")
    opts.kernel, opts.initrd = opts.guest_dir / "vmlinuz", opts.guest_dir / "initramfs.gz"
    if not (opts.kernel.is_file() and opts.initrd.is_file()):
        raise BenchError(f"no test guest in {opts.guest_dir}: build it with `bash tests/guest/build.sh`")
    if any(t.startswith("qsnap") for t in opts.tools) and not os.access(opts.qsnap, os.X_OK):
        raise BenchError(f"no qsnap binary at {opts.qsnap}: build it with `cargo build --release -p qsnap`")


def main(argv=None) -> int:
    opts = parse_args(argv)
    check_prereqs(opts)
    notes: list[str] = []

    opts.workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(opts.workdir, 0o755)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    rundir = opts.workdir / f"run-{stamp}-{os.getpid()}"
    rundir.mkdir(mode=0o755)
    os.chmod(rundir, 0o755)
    if not opts.keep:
        CLEANUP.push(f"rm -rf {rundir}", lambda: shutil.rmtree(rundir, ignore_errors=True))
    opts.store = rundir / "store"
    log(f"run directory: {rundir}")

    lazy = False
    opts.lazy_json = False
    if "qsnap-lazy" in opts.tools:
        p = subprocess.run([opts.qsnap, "lazy-ram", "--help"], capture_output=True, text=True, timeout=20)
        lazy = p.returncode == 0
        if lazy:
            opts.lazy_json = "--json" in p.stdout
        else:
            opts.tools.remove("qsnap-lazy")
            notes.append("`qsnap lazy-ram` does not exist in this qsnap build: the 'qsnap lazy' column is skipped")
            log("note: " + notes[-1])

    machine = machine_info(opts)
    if "libvirt" in opts.tools:
        machine["libvirt"] = ensure_libvirt()
        notes.append("libvirt writes its memory file and overlays in the run directory, like the others")
    log(f"machine: {machine['cpu_model']}, {machine['cores']} cores, kernel {machine['kernel']}, "
        f"{machine['qemu']}" + (f", libvirt {machine['libvirt']}" if "libvirt" in machine else ""))

    disk = {}
    if opts.disk_mb > 0:
        log(f"host disk bandwidth in {rundir} ({opts.disk_mb} MiB) …")
        disk = disk_bandwidth(rundir, opts.disk_mb)

    result = {"schema": 1, "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "argv": sys.argv, "machine": machine, "disk_bandwidth": disk,
              "config": {"rounds": opts.rounds, "ram_mib": opts.ram, "loads": opts.load, "tools": opts.tools,
                         "tick_ms": TICK_MS, "disk_mib": DISK_MB, "accel": "tcg", "vcpus": 1,
                         "qsnap_mode": opts.qsnap_mode or "default", "lazy": lazy},
              "notes": notes, "cases": []}
    interrupted = False
    try:
        for ram in opts.ram:
            for load in opts.load:
                dirty = 0 if load == "idle" else (opts.dirty_mb or min(200, max(16, (ram - 112) // 2)))
                case = Case(ram, load, dirty)
                cr = {"ram_mib": ram, "load": load, "dirty_mib": dirty, "label": case.label,
                      "tools": {t: {"samples": [], "summary": {}} for t in opts.tools}}
                result["cases"].append(cr)
                run_case(case, rundir, opts, cr)
                print_table(cr, opts.rounds)
                sys.stdout.flush()
    except KeyboardInterrupt:
        interrupted = True
        log("\ninterrupted: the VMs are stopped; the figures so far follow")
        if result["cases"] and any(t["samples"] for t in result["cases"][-1]["tools"].values()):
            print_table(result["cases"][-1], opts.rounds)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["interrupted"] = interrupted

    if disk:
        print("\nhost disk, sequential, in the work directory "
              f"({disk['mib']} MiB, 4 MiB requests): "
              + ", ".join(f"{k.replace('_mb_s', '').replace('_', ' ')} {v:.0f} MB/s"
                          for k, v in disk.items() if k.endswith("_mb_s")))
    print(f"machine: {machine['cpu_model']}, {machine['cores']} cores, {machine['mem_total_mib']} MiB, "
          f"{machine['os']}, kernel {machine['kernel']}, {machine['qemu']}"
          + (f", libvirt {machine['libvirt']}" if "libvirt" in machine else "")
          + f"; load average {machine['loadavg_start'][0]:.2f} at start, {machine['loadavg_end'][0]:.2f} at end")
    for n in notes:
        print(f"note: {n}")
    if opts.json_out:
        opts.json_out.parent.mkdir(parents=True, exist_ok=True)
        opts.json_out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"raw samples and medians: {opts.json_out}")
    if interrupted:
        return 130
    failed = any("error" in s for c in result["cases"] for t in c["tools"].values() for s in t["samples"])
    return 1 if failed else 0


def run_case(case: Case, rundir: Path, opts, cr: dict) -> None:
    """Boot every tool's VM for this case, run the rounds interleaved, stop the VMs; samples and
    summaries go into cr (also when interrupted)."""
    casedir = rundir / f"{case.ram_mb}-{case.load}"
    casedir.mkdir()
    vms: dict[str, VM] = {}
    log(f"\n[{case.label}] booting {', '.join(opts.tools)} …")
    try:
        for tool in opts.tools:
            t0 = time.monotonic()
            try:
                vm = TOOL_CLASSES[tool](case, casedir, opts)
                vms[tool] = vm
                vm.start()
                log(f"  {tool}: up in {time.monotonic() - t0:.1f} s, parked")
            except BenchError as e:
                log(f"  {tool}: cannot boot: {e}")
                cr["tools"][tool]["samples"].append({"round": 0, "error": f"boot: {e}"})
                if tool in vms:
                    vms[tool].dead = True
        for rnd in range(opts.rounds):
            order = opts.tools[rnd % len(opts.tools):] + opts.tools[:rnd % len(opts.tools)]
            log(f"[{case.label}] round {rnd + 1}/{opts.rounds}: {', '.join(order)}")
            for tool in order:
                vm = vms.get(tool)
                if vm is None or vm.dead:
                    continue
                s = measure_round(vm, rnd, opts.rounds)
                cr["tools"][tool]["samples"].append(s)
                log("  " + round_line(tool, s))
    finally:
        for vm in vms.values():
            if vm.cleanup_handle is not None:
                CLEANUP.run(vm.cleanup_handle)
        for d in cr["tools"].values():
            keys = {k for s in d["samples"] for k, v in s.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round"}
            d["summary"] = {k: summarize([s.get(k) for s in d["samples"]]) for k in sorted(keys)}


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        log(f"bench_peers: {e}")
        sys.exit(1)
    except KeyboardInterrupt:
        log("bench_peers: interrupted")
        sys.exit(130)
