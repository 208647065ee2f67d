"""What a failed qsnap command raises: its exit code, and the error object `--json` printed."""

from __future__ import annotations

from typing import Optional, Sequence


class QsnapError(Exception):
    """A qsnap command failed.

    `code` is its exit code (1 failed, 2 usage, 3 unreachable, 4 not found, 5 busy, 6 refused,
    130/143 interrupted); `kind` the error's kind (`failed`, `usage`, `unreachable`,
    `not-found`, `busy`, `refused`, `cancelled`), `message` what qsnap said, and `fix` the one
    command that is the way on, when qsnap knows one.
    """

    def __init__(
        self,
        command: Sequence[str],
        code: int,
        kind: str,
        message: str,
        fix: Optional[str] = None,
    ) -> None:
        self.command = list(command)
        self.code = code
        self.kind = kind
        self.message = message
        self.fix = fix
        text = f"qsnap {' '.join(self.command)}: {message} (exit code {code}, {kind})"
        if fix:
            text += f"; fix: {fix}"
        super().__init__(text)


class NotReady(QsnapError):
    """A VM did not become ready (the console text, the guest agent, a check) in time."""

    def __init__(self, vm: str, what: str, timeout: float, tail: str) -> None:
        super().__init__(
            ["(waiting)", vm],
            1,
            "failed",
            f"{vm}: {what} did not happen within {timeout:g} s; its console ends with:\n{tail}",
        )
