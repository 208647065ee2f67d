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
import signal
import stat
import subprocess
import time
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

from .errors import NotReady, QsnapError
from .ready import Ready

#: The `--json` format this package reads; an output of another format is refused.
FORMAT = 1

Json = Dict[str, Any]

#: The exit codes' kinds, for a failure that printed no error object.
_KINDS = {1: "failed", 2: "usage", 3: "unreachable", 4: "not-found", 5: "busy", 6: "refused", 130: "cancelled", 143: "cancelled"}

#: The code of a `QsnapError` for a command that overran its time limit (as `timeout(1)`).
TIMED_OUT = 124

#: How long cleanup waits for another qsnap operation on a VM to finish.
_CLEANUP_WAIT = "120"


def _end(proc: "subprocess.Popen[str]") -> None:
    """Ends a qsnap that is still running: SIGTERM (it rolls back what it started), SIGKILL
    only if it has not ended a minute later."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


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
        self._forks: Dict[str, int] = {}
        #: Goldens this `Qsnap` imported from a cache (their disks are in the store).
        self._imported: Set[str] = set()
        #: Per VM, the console log's size when it was last (re)started: waits read after it.
        self._console_from: Dict[str, int] = {}
        #: Pools of standbys this `Qsnap` made (`Golden.pool`): emptied by `close`.
        self._pools: Set[Tuple[str, str]] = set()

    # -- running the CLI ----------------------------------------------------------------------

    def call(self, *args: str, timeout: Optional[float] = None) -> Any:
        """Runs `qsnap ARGS… --json` (the `--json` goes before a `--`) for a command that has
        `--json`, and returns its output; raises `QsnapError` when it fails."""
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
        limit = self.timeout if timeout is None else timeout
        argv = [self.binary, "--store", str(self.store), *command]
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        except FileNotFoundError:
            raise QsnapError(command, 127, "failed",
                             f"the qsnap binary {self.binary!r} was not found (install qsnap, or pass binary=PATH)") from None
        try:
            stdout, stderr = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            _end(proc)
            raise QsnapError(command, TIMED_OUT, "timeout", f"no answer within {limit:g} s; qsnap was interrupted (it rolls back)") from None
        except BaseException:
            # Ctrl-C or another exception in the caller: qsnap must finish rolling back
            # before anyone cleans up after it.
            _end(proc)
            raise
        out = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
        if out.returncode != 0:
            error: Json = {}
            try:
                parsed = json.loads(out.stdout)
                if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
                    error = parsed["error"]
            except ValueError:
                pass
            raise QsnapError(
                command, out.returncode, str(error.get("kind") or _KINDS.get(out.returncode, "failed")),
                str(error.get("message") or out.stderr.strip() or "(no message)"),
                error.get("fix"),
            )
        return out

    def _exists(self, name: str) -> Optional[bool]:
        """Whether the store has VM `name` (None when qsnap cannot say)."""
        try:
            self._run(["status", name], 60)
            return True
        except QsnapError as e:
            return False if e.code == 4 else None

    def _making(self, name: str, *args: str) -> Any:
        """Runs a command that makes VM `name`. The VM is this `Qsnap`'s (`close` removes it)
        when it did not exist before and exists after, whether the command succeeded or not
        (a run cut short may have made it); a VM that was there before is never taken."""
        before = self._exists(name)
        try:
            return self.call(*args)
        finally:
            if before is False and name not in self._made and self._exists(name) is not False:
                self._made.append(name)

    @staticmethod
    def _parsed(command: List[str], out: "subprocess.CompletedProcess[str]") -> Any:
        try:
            return json.loads(out.stdout)
        except ValueError as e:
            raise QsnapError(command, 1, "failed", f"qsnap printed no JSON ({e}): {out.stdout[:200]!r}") from None

    # -- VMs ----------------------------------------------------------------------------------

    def run(self, name: str, argv: Sequence[str]) -> "Vm":
        """Starts QEMU with `argv` under qsnap as VM `name` (stopped and removed by `close`)."""
        offset = _offset(_console_in(list(argv), Path.cwd()))
        self._making(name, "run", name, "--", *argv)
        self._console_from[name] = offset
        return Vm(self, name, owned=True)

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
        cache_key: Optional[str] = None,
    ) -> "Golden":
        """A VM booted from `argv` once and snapshotted (with its memory, mappable) as soon
        as `ready(vm)` is true; `Golden.fork()` then starts running copies of that instant.

        The same `argv` on the same store gives the same golden VM (another `snapshot` is
        taken on it). With `cache_dir`, the snapshot is also kept there as a bundle (`qsnap
        export`) that a later session imports instead of booting. Its key: `cache_key` (or,
        without one, the command line, which must then name the same paths in every
        session), the snapshot's name, qsnap's version, and the size and time of QEMU's
        binary and of the files it boots from (`-kernel`, `-initrd`, `-bios`, `-dtb`). Disk
        images count by path only: change `cache_key` when a base image changes."""
        name = f"golden-{_digest([list(argv)])[:8]}"
        vm = Vm(self, name)
        known = {v.get("vm") for v in self.vms()}
        if name in known and snapshot in vm.snapshots():
            return Golden(vm, snapshot)
        bundle = None
        if cache_dir is not None:
            key = _golden_key(argv, cache_key, snapshot, self._version())
            bundle = _cache(cache_dir) / f"{key}.qsnap"
        if bundle is not None and bundle.exists() and name not in known and not (self.store / "vms" / name).exists():
            _private(bundle)
            try:
                # The cache is its user's own (`_cache`, `_private`): its command lines are trusted.
                self._making(name, "import", str(bundle), name, "--trust-command-line")
                self._imported.add(name)
                return Golden(vm, snapshot)
            except QsnapError as e:
                if e.code not in (1, 6):
                    raise
                warnings.warn(f"pytest-qsnap: the cached golden {bundle} could not be imported ({e}); it is removed and the VM booted")
                bundle.unlink(missing_ok=True)
                if name in self._made:
                    Vm(self, name)._dispose()
        if name not in known:
            self.run(name, argv)
        elif vm.status()["state"]["state"] == "stopped":
            # Left stopped (an imported golden asked for another snapshot): boot it again.
            self._console_from[name] = _offset(vm._console())
            self._run(["start", name], None)
        _wait(lambda: ready(vm), timeout, name, ready.__doc__ or "the readiness check", vm)
        # Its overlays in the store, not beside the command line's images.
        overlays = self.store / "overlays" / name
        overlays.mkdir(mode=0o700, parents=True, exist_ok=True)
        vm.create(snapshot, lazy_ram=True, overlay_dir=str(overlays))
        if bundle is not None:
            partial = bundle.with_name(f".{bundle.name}.{os.getpid()}")
            partial.unlink(missing_ok=True)
            self.call("export", name, snapshot, str(partial))
            os.replace(partial, bundle)
        return Golden(vm, snapshot)

    def _version(self) -> str:
        return self._run(["--version"], 30).stdout.strip()

    def fork_name(self, vm: str) -> str:
        """A name for the next fork of `vm` that no VM of the store has."""
        taken = {v.get("vm") for v in self.vms()}
        while True:
            self._forks[vm] = self._forks.get(vm, 0) + 1
            # Short: a clone's sockets live under its directory, and a socket path has 108 bytes.
            name = f"{vm}-{self._forks[vm]}"
            if name not in taken:
                return name

    def close(self) -> None:
        """Stops and removes every VM this `Qsnap` made, clones first; a VM that cannot be
        removed is at least stopped. Raises the first failure after trying them all."""
        failures: List[QsnapError] = []
        # Standbys first: they are VMs of the store this `Qsnap` did not list in `_made`.
        for vm, snapshot in sorted(self._pools):
            try:
                self._run(["pool", vm, snapshot, "--size", "0"], None)
            except QsnapError as e:
                failures.append(e)
        self._pools.clear()
        for name in reversed(list(self._made)):
            try:
                Vm(self, name)._dispose()
            except QsnapError as e:
                failures.append(e)
                try:
                    self._run(["--wait", _CLEANUP_WAIT, "stop", name], None)
                except QsnapError:
                    pass
        self._made.clear()
        if failures:
            raise failures[0]


def _offset(console: Optional[Tuple[Path, bool]]) -> int:
    """Where a (re)started QEMU's console output will begin in its log: the log's size when
    QEMU appends to it, else 0 (QEMU truncates it)."""
    if console is None or not console[1]:
        return 0
    try:
        return console[0].stat().st_size
    except OSError:
        return 0


def _cache(cache_dir: Union[str, "os.PathLike[str]"]) -> Path:
    """The cache directory (made 0700 when it is new); refused when another user could write
    bundles into it (their command lines would run with `--trust-command-line`)."""
    path = Path(cache_dir)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _private(path)
    return path


def _private(path: Path) -> None:
    """Refuses a cache directory or bundle another user owns or may write."""
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise QsnapError(
            ["golden", "cache_dir"], 2, "usage",
            f"{path} may be written by another user, and a cached golden's command line is run as trusted: "
            "use files and a directory of your own (chmod go-w)",
        )


def _console_in(argv: List[str], cwd: Path) -> Optional[Tuple[Path, bool]]:
    """The file a command line logs its serial console to, and whether QEMU appends to it:
    `-chardev file,id=ID,path=P[,append=on]` that `-serial chardev:ID` uses, or `-serial
    file:P` (truncated at every start)."""
    files: Dict[str, Tuple[str, bool]] = {}
    serial: List[str] = []
    for opt, val in zip(argv, argv[1:]):
        if opt == "-chardev" and val.startswith("file,"):
            props = dict(p.split("=", 1) for p in val.split(",")[1:] if "=" in p)
            if "id" in props and "path" in props:
                files[props["id"]] = (props["path"], props.get("append") in ("on", "yes", "true"))
        elif opt == "-serial":
            serial.append(val)
    for s in serial:
        if s.startswith("chardev:") and s[len("chardev:"):] in files:
            path, appends = files[s[len("chardev:"):]]
            return cwd / path, appends
        if s.startswith("file:"):
            return cwd / s[len("file:"):], False
    return None


#: Options whose file QEMU only reads: its identity (size, mtime) is part of a golden's key.
_BOOT_FILES = ("-kernel", "-initrd", "-bios", "-dtb")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


def _golden_key(argv: Sequence[str], cache_key: Optional[str], snapshot: str, version: str) -> str:
    """A cached golden's key: `cache_key` or the command line, the snapshot's name, qsnap's
    version, and the identity (size, mtime) of QEMU's binary and of the files it boots from.
    Disk images count by path only: the guest writes them."""
    files = [shutil.which(argv[0]) or argv[0]] if argv else []
    files += [value for opt, value in zip(argv, argv[1:]) if opt in _BOOT_FILES]
    ids = []
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            continue
        ids.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
    return _digest([cache_key if cache_key is not None else list(argv), snapshot, version, ids])


def _wait(check: Callable[[], bool], timeout: float, vm: str, what: str, subject: "Vm") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise NotReady(vm, what, timeout, subject.console_tail())


class Vm:
    """One VM of the store. The handle `run`, `clone` or `Golden.fork` returns owns its VM:
    as a context manager it disposes of it on exit, also when the block raised (a clone
    removed, any other VM stopped and forgotten: its snapshots' memory files deleted, never
    a disk image). Other handles (`Qsnap.vm`, a golden's) leave the VM as it is."""

    def __init__(self, qsnap: Qsnap, name: str, owned: bool = False) -> None:
        self.qsnap = qsnap
        self.name = name
        self.owned = owned

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
        if not self.owned:
            return
        try:
            self._dispose()
        except QsnapError as e:
            if value is None:
                raise
            # The test's own failure matters more; `Qsnap.close` tries again.
            warnings.warn(f"pytest-qsnap: {self.name} could not be removed: {e}")

    def _dispose(self) -> None:
        """Removes a clone, or stops and forgets any other VM, then deletes what this
        `Qsnap` made for it in the store (a golden's overlays, an imported golden's disks);
        gone already is fine. Waits for another qsnap operation on it to end."""
        qs = self.qsnap
        try:
            if self.status().get("clone-of") is not None:
                qs.call("--wait", _CLEANUP_WAIT, "remove", self.name)
            else:
                qs.call("--wait", _CLEANUP_WAIT, "forget", self.name, "--stop", "--with-snapshots")
        except QsnapError as e:
            if e.code != 4:
                raise
        # `forget` keeps every image; these are the plugin's own, and nothing uses them now
        # (it refuses while a clone does). Left, they would block the next session's golden.
        shutil.rmtree(qs.store / "overlays" / self.name, ignore_errors=True)
        folder = qs.store / "vms" / self.name
        if self.name in qs._imported and (folder / "FORGOTTEN").exists():
            shutil.rmtree(folder, ignore_errors=True)
        qs._imported.discard(self.name)
        if self.name in qs._made:
            qs._made.remove(self.name)

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

    def _console(self) -> Optional[Tuple[Path, bool]]:
        command = self.listing()["vm"].get("command") or {}
        return _console_in(list(command.get("argv") or []), Path(command.get("cwd") or "/"))

    @property
    def console_log(self) -> Optional[Path]:
        """The file its serial console is logged to, when its command line has one
        (`-chardev file,id=ID,path=P` that `-serial chardev:ID` uses, or `-serial file:P`)."""
        console = self._console()
        return console[0] if console else None

    def console_text(self) -> str:
        """What its console printed since qsnap last started it (`run`, `clone`, `revert`,
        a golden's `start`, through this `Qsnap`); the whole log for a VM it did not start."""
        log = self.console_log
        if log is None or not log.exists():
            return ""
        with open(log, "rb") as f:
            offset = self.qsnap._console_from.get(self.name, 0)
            # A log shorter than the offset was truncated by a restart: all of it is new.
            f.seek(offset if offset <= os.fstat(f.fileno()).st_size else 0)
            return f.read().decode(errors="replace")

    @property
    def agent_socket(self) -> Optional[Path]:
        """The QEMU guest agent's socket, when its command line has one."""
        path = self.listing()["vm"].get("guest-agent")
        return Path(path) if path else None

    def console_tail(self, chars: int = 2000) -> str:
        return self.console_text()[-chars:] or "(nothing on its console)"

    def wait_console(self, text: str, timeout: float = 60) -> None:
        """Waits until its console prints `text` — since qsnap last started it, so a revert's
        wait never matches what the replaced QEMU printed (`NotReady` after `timeout` s)."""
        if self.console_log is None:
            raise ValueError(f"{self.name}: its command line logs no serial console to a file")
        _wait(lambda: text in self.console_text(), timeout, self.name, f"the console printing {text!r}", self)

    # -- what it does -------------------------------------------------------------------------

    def create(self, snapshot: str, **opts: Any) -> Json:
        """`qsnap create NAME SNAPSHOT` with options as keywords (`disk_only=True`,
        `description="…"`, `lazy_ram=True`, …); returns the snapshot's JSON."""
        value = self.qsnap.call("create", self.name, snapshot, *_flags(opts))
        assert isinstance(value, dict)
        return value

    def revert(self, snapshot: str, **opts: Any) -> Json:
        """`qsnap revert NAME SNAPSHOT` (`paused=True`, `keep_current="name"`, …)."""
        before = self.qsnap._console_from.get(self.name, 0)
        self.qsnap._console_from[self.name] = _offset(self._console())
        try:
            value = self.qsnap.call("revert", self.name, snapshot, *_flags(opts))
        except QsnapError as e:
            if e.code in (2, 4, 5, 6):  # nothing changed: the same QEMU runs on
                self.qsnap._console_from[self.name] = before
            raise
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
        self.qsnap._making(name, "clone", self.name, snapshot, name, *_flags(opts))
        # Its console file is its own, new (in its store directory): all of it is the clone's.
        self.qsnap._console_from[name] = 0
        return Vm(self.qsnap, name, owned=True)

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
            raise QsnapError(words, 1, "failed", f"QEMU's reply is not JSON: {out.stdout[:200]!r}") from None


class Golden:
    """A snapshot to fork running VMs from (`Qsnap.golden`)."""

    def __init__(self, vm: Vm, snapshot: str) -> None:
        self.vm = vm
        self.snapshot = snapshot

    def fork(self, name: Optional[str] = None) -> Vm:
        """A new running VM at the golden instant: its own disks (overlays), monitor,
        console and sockets. Use it as a context manager: it is removed on exit, also when
        the test fails (and `Qsnap.close` removes any left)."""
        return self.vm.clone(self.snapshot, name or self.vm.qsnap.fork_name(self.vm.name))

    def pool(self, size: int) -> Json:
        """Keeps `size` standbys of the golden snapshot ready (0: none): VMs started and
        loaded ahead of time, paused before their guest runs. `fork()` then claims one (its
        status names it under `clone-of.standby`) and qsnap refills the pool in the
        background. Returns `qsnap pool --json`'s report once `size` are ready;
        `Qsnap.close` empties the pool."""
        qsnap = self.vm.qsnap
        key = (self.vm.name, self.snapshot)
        if size > 0:
            qsnap._pools.add(key)
        report: Json = qsnap.call("pool", self.vm.name, self.snapshot, "--size", str(size))
        if size == 0:
            qsnap._pools.discard(key)
        return report
