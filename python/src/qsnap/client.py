"""qsnap from Python: the CLI's `--json`, typed.

Every call runs the `qsnap` binary on one store and reads its JSON output (format 1, see
docs/json/ in qsnap's repository); a failure raises `QsnapError` with the exit code and the
error object. Nothing here talks to QEMU or reads the store's files itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
import types
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from .errors import NotReady, QsnapError
from .ready import Ready

#: The `--json` format this package reads; an output of another format is refused.
FORMAT = 1

Json = Dict[str, Any]


def _flags(opts: Dict[str, Any]) -> List[str]:
    """Keyword options as command-line flags: `disk_only=True` → `--disk-only`,
    `description="x"` → `--description x`; False and None leave the flag out."""
    out: List[str] = []
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            for v in value:
                out += [flag, str(v)]
        else:
            out += [flag, str(value)]
    return out


def _checked_format(value: Any, command: Sequence[str]) -> None:
    items = value if isinstance(value, list) else [value]
    for item in items:
        got = item.get("format") if isinstance(item, dict) else None
        if got != FORMAT:
            raise QsnapError(
                command, 1, "failed",
                f"qsnap printed JSON of format {got!r}; this package reads format {FORMAT}: "
                "install the pytest-qsnap that comes with this qsnap",
            )


class Qsnap:
    """The qsnap CLI on one store."""

    def __init__(
        self,
        store: Union[str, "os.PathLike[str]"],
        binary: str = "qsnap",
        timeout: float = 300,
    ) -> None:
        self.store = Path(store)
        self.binary = binary
        #: Seconds any one command may take.
        self.timeout = timeout
        self._made: List[str] = []

    # -- running the CLI ----------------------------------------------------------------------

    def call(self, *args: str, timeout: Optional[float] = None) -> Any:
        """Runs `qsnap ARGS… --json` (the `--json` goes before a `--`) and returns its output;
        raises `QsnapError` when it fails."""
        args_list = list(args)
        cut = args_list.index("--") if "--" in args_list else len(args_list)
        command = args_list[:cut] + ["--json"] + args_list[cut:]
        out = self._run(command, timeout)
        value = self._parsed(command, out)
        _checked_format(value, command)
        return value

    def _run(self, command: List[str], timeout: Optional[float]) -> "subprocess.CompletedProcess[str]":
        env = dict(os.environ, NO_COLOR="1")
        env.pop("QSNAP_COMPLETE", None)
        try:
            out = subprocess.run(
                [self.binary, "--store", str(self.store), *command],
                capture_output=True, text=True, env=env,
                timeout=self.timeout if timeout is None else timeout,
            )
        except FileNotFoundError:
            raise QsnapError(command, 127, "failed",
                             f"the qsnap binary {self.binary!r} was not found (install qsnap, or pass binary=PATH)") from None
        except subprocess.TimeoutExpired as e:
            raise QsnapError(command, 1, "failed", f"no answer within {e.timeout} s") from None
        if out.returncode != 0:
            error: Json = {}
            try:
                parsed = json.loads(out.stdout)
                if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
                    error = parsed["error"]
            except ValueError:
                pass
            raise QsnapError(
                command, out.returncode, str(error.get("kind", "failed")),
                str(error.get("message") or out.stderr.strip() or "(no message)"),
                error.get("fix"),
            )
        return out

    @staticmethod
    def _parsed(command: List[str], out: "subprocess.CompletedProcess[str]") -> Any:
        try:
            return json.loads(out.stdout)
        except ValueError as e:
            raise QsnapError(command, 1, "failed", f"qsnap printed no JSON ({e}): {out.stdout[:200]!r}") from None

    # -- VMs ----------------------------------------------------------------------------------

    def run(self, name: str, argv: Sequence[str]) -> "Vm":
        """Starts QEMU with `argv` under qsnap as VM `name` (stopped and removed by `close`)."""
        self.call("run", name, "--", *argv)
        self._made.append(name)
        return Vm(self, name)

    def vm(self, name: str) -> "Vm":
        """The VM `name` of the store (`QsnapError` with code 4 when there is none)."""
        self.call("status", name)
        return Vm(self, name)

    def vms(self) -> List[Json]:
        """Every VM's `status --json`."""
        value = self.call("status")
        assert isinstance(value, list)
        return value

    def golden(
        self,
        argv: Sequence[str],
        ready: Ready,
        snapshot: str = "ready",
        cache_dir: Union[str, "os.PathLike[str]", None] = None,
        timeout: float = 300,
    ) -> "Golden":
        """A VM booted from `argv` once and snapshotted (with its memory, mappable) as soon
        as `ready(vm)` is true; `Golden.fork()` then starts running copies of that instant.

        The same `argv` in the same session gives the same golden. With `cache_dir`, the
        snapshot is also kept there as a bundle (`qsnap export`), keyed by the command line
        and the size and time of QEMU's binary and of the files it boots from (`-kernel`,
        `-initrd`, `-bios`, `-dtb`); a later session imports it instead of booting. Disks
        count by path only: give a changed base image a new path, or empty the cache."""
        key = _golden_key(argv)
        name = f"golden-{key[:8]}"
        vm = Vm(self, name)
        known = {v.get("vm") for v in self.vms()}
        if name in known and snapshot in vm.snapshots():
            return Golden(vm, snapshot)
        bundle = Path(cache_dir) / f"{key}.qsnap" if cache_dir is not None else None
        if bundle is not None and bundle.exists() and name not in known:
            self.call("import", str(bundle), name, "--trust-command-line")
            self._made.append(name)
            return Golden(vm, snapshot)
        if name not in known:
            self.run(name, argv)
        _wait(lambda: ready(vm), timeout, name, ready.__doc__ or "the readiness check", vm)
        vm.create(snapshot, lazy_ram=True)
        if bundle is not None:
            bundle.parent.mkdir(parents=True, exist_ok=True)
            partial = bundle.with_name(f".{bundle.name}.{os.getpid()}")
            if partial.exists():
                partial.unlink()
            self.call("export", name, snapshot, str(partial))
            os.replace(partial, bundle)
        return Golden(vm, snapshot)

    def close(self) -> None:
        """Stops and removes every VM this `Qsnap` made, clones first; raises the first
        failure after trying them all."""
        failures: List[QsnapError] = []
        for name in reversed(self._made):
            vm = Vm(self, name)
            try:
                if vm.status().get("clone-of") is not None:
                    vm.remove()
                else:
                    self.call("forget", name, "--stop", "--with-snapshots")
            except QsnapError as e:
                if e.code != 4:
                    failures.append(e)
        self._made.clear()
        if failures:
            raise failures[0]


#: Options whose file QEMU only reads: its identity (size, mtime) is part of a golden's key.
_BOOT_FILES = ("-kernel", "-initrd", "-bios", "-dtb")


def _golden_key(argv: Sequence[str]) -> str:
    """The command line, and the identity (size, mtime) of QEMU's binary and of the files it
    boots from. Disk images are named by path only: the guest writes them."""
    h = hashlib.sha256(json.dumps(list(argv)).encode())
    files = [shutil.which(argv[0]) or argv[0]] if argv else []
    files += [value for opt, value in zip(argv, argv[1:]) if opt in _BOOT_FILES]
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            continue
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _wait(check: Callable[[], bool], timeout: float, vm: str, what: str, subject: "Vm") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise NotReady(vm, what, timeout, subject.console_tail())


class Vm:
    """One VM of the store. As a context manager, it is removed on exit (a clone) or
    stopped and forgotten (any other VM), also when the block raised."""

    def __init__(self, qsnap: Qsnap, name: str) -> None:
        self.qsnap = qsnap
        self.name = name

    def __repr__(self) -> str:
        return f"Vm({self.name!r})"

    def __enter__(self) -> "Vm":
        return self

    def __exit__(
        self,
        kind: Optional[type],
        value: Optional[BaseException],
        tb: Optional[types.TracebackType],
    ) -> None:
        if self.status().get("clone-of") is not None:
            self.remove()
        else:
            self.qsnap.call("forget", self.name, "--stop", "--with-snapshots")
        if self.name in self.qsnap._made:
            self.qsnap._made.remove(self.name)

    # -- what it is ---------------------------------------------------------------------------

    def status(self) -> Json:
        """`qsnap status NAME --json`: `state` (`state`, `pid`, `runstate`), `current`,
        `snapshots`, `disks`, `clone-of`, …"""
        value = self.qsnap.call("status", self.name)
        assert isinstance(value, dict)
        return value

    def listing(self) -> Json:
        """`qsnap list NAME --json`: the VM's record (`vm`) and its snapshots."""
        value = self.qsnap.call("list", self.name)
        assert isinstance(value, dict)
        return value

    def snapshots(self) -> List[str]:
        return [str(s["name"]) for s in self.listing()["snapshots"]]

    def _argv(self) -> tuple[List[str], Path]:
        command = self.listing()["vm"].get("command") or {}
        return list(command.get("argv") or []), Path(command.get("cwd") or "/")

    @property
    def console_log(self) -> Optional[Path]:
        """The file its serial console is logged to, when its command line has one
        (`-chardev file,id=ID,path=P` that `-serial chardev:ID` uses, or `-serial file:P`)."""
        argv, cwd = self._argv()
        files: Dict[str, str] = {}
        serial: List[str] = []
        for opt, val in zip(argv, argv[1:]):
            if opt == "-chardev" and val.startswith("file,"):
                props = dict(p.split("=", 1) for p in val.split(",")[1:] if "=" in p)
                if "id" in props and "path" in props:
                    files[props["id"]] = props["path"]
            elif opt == "-serial":
                serial.append(val)
        for s in serial:
            if s.startswith("chardev:") and s[len("chardev:"):] in files:
                return cwd / files[s[len("chardev:"):]]
            if s.startswith("file:"):
                return cwd / s[len("file:"):]
        return None

    @property
    def agent_socket(self) -> Optional[Path]:
        """The QEMU guest agent's socket, when its command line has one."""
        path = self.listing()["vm"].get("guest-agent")
        return Path(path) if path else None

    def console_tail(self, chars: int = 2000) -> str:
        log = self.console_log
        if log is None or not log.exists():
            return "(no console log)"
        return log.read_text(errors="replace")[-chars:]

    def wait_console(self, text: str, timeout: float = 60) -> None:
        """Waits until its console log holds `text` (`NotReady` after `timeout` s)."""
        log = self.console_log
        if log is None:
            raise ValueError(f"{self.name}: its command line logs no serial console to a file")

        path: Path = log

        def seen() -> bool:
            return path.exists() and text in path.read_text(errors="replace")

        _wait(seen, timeout, self.name, f"the console printing {text!r}", self)

    # -- what it does -------------------------------------------------------------------------

    def create(self, snapshot: str, **opts: Any) -> Json:
        """`qsnap create NAME SNAPSHOT` with options as keywords (`disk_only=True`,
        `description="…"`, `lazy_ram=True`, …); returns the snapshot's JSON."""
        value = self.qsnap.call("create", self.name, snapshot, *_flags(opts))
        assert isinstance(value, dict)
        return value

    def revert(self, snapshot: str, **opts: Any) -> Json:
        """`qsnap revert NAME SNAPSHOT` (`paused=True`, `keep_current="name"`, …)."""
        value = self.qsnap.call("revert", self.name, snapshot, *_flags(opts))
        assert isinstance(value, dict)
        return value

    def delete(self, snapshot: str, **opts: Any) -> Json:
        """`qsnap delete NAME SNAPSHOT` (`children=True`, …)."""
        value = self.qsnap.call("delete", self.name, snapshot, *_flags(opts))
        assert isinstance(value, dict)
        return value

    def clone(self, snapshot: str, name: str, **opts: Any) -> "Vm":
        """A new running VM from `snapshot` (`paused=True`, `replace=["OLD=NEW", …]`); a
        context manager that removes it."""
        self.qsnap.call("clone", self.name, snapshot, name, *_flags(opts))
        self.qsnap._made.append(name)
        return Vm(self.qsnap, name)

    def stop(self) -> None:
        """Stops its QEMU (`quit`, then SIGKILL)."""
        self.qsnap._run(["stop", self.name], None)

    def remove(self) -> Json:
        """Removes a clone: stops it and deletes its overlays, files and record."""
        value = self.qsnap.call("remove", self.name)
        if self.name in self.qsnap._made:
            self.qsnap._made.remove(self.name)
        assert isinstance(value, dict)
        return value

    def qmp(self, command: str, arguments: Optional[Json] = None, **args: Any) -> Any:
        """One QMP command; returns QEMU's `return` value. Keyword arguments name QMP
        arguments with `_` for `-` (`command_line=` is `command-line`); `arguments` is
        passed as it is."""
        merged: Json = dict(arguments or {})
        merged.update({k.replace("_", "-"): v for k, v in args.items()})
        words = ["qmp", self.name, command]
        if merged:
            words.append(json.dumps(merged))
        out = self.qsnap._run(words, None)
        try:
            return json.loads(out.stdout)
        except ValueError:
            return out.stdout


class Golden:
    """A snapshot to fork running VMs from (`Qsnap.golden`)."""

    def __init__(self, vm: Vm, snapshot: str) -> None:
        self.vm = vm
        self.snapshot = snapshot
        self._forks = 0

    def fork(self, name: Optional[str] = None) -> Vm:
        """A new running VM at the golden instant: its own disks (overlays), monitor,
        console and sockets. Use it as a context manager: it is removed on exit, also when
        the test fails (and `Qsnap.close` removes any left)."""
        self._forks += 1
        # Short: the clone's sockets live under its directory, and a socket path has 108 bytes.
        return self.vm.clone(self.snapshot, name or f"{self.vm.name}-{self._forks}")
