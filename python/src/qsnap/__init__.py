"""pytest-qsnap: qsnap from Python, and pytest fixtures on it.

    qs = Qsnap(store="/tmp/store")                     # the `qsnap` on PATH
    golden = qs.golden(argv, ready=console_prints("login:"))
    with golden.fork() as vm:                           # a running copy, removed on exit
        vm.qmp("human-monitor-command", command_line="info status")

The pytest plugin (registered on install) adds the session-scoped `qsnap` fixture: a `Qsnap`
on a temporary store whose VMs are all stopped and removed when the session ends.
"""

from .client import FORMAT, Golden, Qsnap, Vm
from .errors import NotReady, QsnapError
from .ready import Ready, agent_answers, console_prints

__all__ = [
    "FORMAT",
    "Golden",
    "NotReady",
    "Qsnap",
    "QsnapError",
    "Ready",
    "Vm",
    "agent_answers",
    "console_prints",
]
