"""When a golden VM is ready to be snapshotted: a check on the running VM, polled until true.

`console_prints(TEXT)` and `agent_answers()` are the usual two; any `Callable[[Vm], bool]`
will do. A check must not block for long (it is polled every 100 ms until the deadline).
"""

from __future__ import annotations

import json
import socket
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .client import Vm

#: A readiness check: true once the VM is ready.
Ready = Callable[["Vm"], bool]


def console_prints(text: str) -> Ready:
    """Ready once the VM's serial console prints `text` after qsnap started it (the command
    line must log its console to a file: `-chardev file,id=…,path=…` with `-serial
    chardev:…`)."""

    def check(vm: Vm) -> bool:
        log = vm.console_log
        if log is None:
            raise ValueError(
                f"{vm.name}: its command line logs no serial console to a file; "
                "console_prints needs -chardev file,...,path=LOG and -serial chardev:ID"
            )
        return text in vm.console_text()

    check.__doc__ = f"the console prints {text!r}"
    return check


def agent_answers() -> Ready:
    """Ready once the QEMU guest agent answers `guest-sync` on the socket the command line
    gives it (`-chardev socket,id=…,path=…` on an `org.qemu.guest_agent.0` port)."""

    def check(vm: Vm) -> bool:
        path = vm.agent_socket
        if path is None:
            raise ValueError(f"{vm.name}: its command line has no guest agent socket")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1.0)
                s.connect(str(path))
                s.sendall(json.dumps({"execute": "guest-sync", "arguments": {"id": 7}}).encode() + b"\n")
                reply = s.makefile("rb").readline()
            return bool(reply) and json.loads(reply).get("return") == 7
        except (OSError, ValueError):
            return False

    check.__doc__ = "the guest agent answers"
    return check
